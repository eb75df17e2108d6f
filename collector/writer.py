"""Storing row batches in ClickHouse: in order, exactly once, whatever the server does.

The receive loop hands batches to `RowWriter.submit()`; a writer thread inserts them.  Rows
flow oldest first through three places:

    pending (the batch being inserted) -> spool file (older) -> memory queue (newest)

When an insert fails the batch stays pending and is retried with backoff.  While the server
is away, rows go to the spool file once inserts have failed for SPOOL_AFTER seconds (and the
memory queue never grows beyond `max_buffered_rows`); the spool is replayed before anything
newer (also after a restart).

Exactly once: a failed insert may still have landed (the connection broke after the server
had the data).  This writer is the only one writing its table, so it tracks the table's row
count: after an unsure failure it reads count() again and retries only if the batch is not
there.  For spooled batches the count before the insert is kept on disk (see spool.py), so the
answer survives a crash.

While a rotation swaps the table (bus/rotation.py), hold() stops inserts until release().
A hold can last `max_hold` (a peer collector stuck), so rows that fall due during it go to the
spool instead of waiting in memory: a SIGKILL during a hold costs what it costs at any other
time.  They are replayed, oldest first, into the new table once the hold ends.

When to insert: every INSERT has a fixed cost (about 1 ms in the collector and 1 ms in
ClickHouse, for 4 rows or 1,000), so queued rows wait until `batch_rows` of them are queued or
the oldest would otherwise miss `latency_target` (receive -> queryable): at live rates that is
about one insert per `latency_target`, at high rates one per `batch_rows` rows, as before.
Rows from the spool, or a batch being retried, are due at once.
"""
import collections
import dataclasses
import enum
import logging
import math
import threading
import time
from typing import List, Optional

from core import archive, store
from core.log import first_line

log = logging.getLogger(__name__)

# Of latency_target, what the queue may not use: the time the receive loop took to hand the
# rows over, the writer thread's wake-up, the server making the block visible, a loaded
# machine's scheduling delays.  The insert's own duration is taken off as measured.
LATENCY_MARGIN = 0.3  # s
# After inserts have failed this long (from the start of the first failed one: it may have hung),
# every queued row goes to the spool at each retry: a SIGKILL during a ClickHouse outage then
# costs seconds of rows, not max_buffered_rows (hours at live rates).
SPOOL_AFTER = 2.0  # s


class InsertFailed(Exception):
    pass


class WriterState(enum.Enum):
    """Where the writer thread is in its life (a rotation's hold is apart: RowWriter.hold)."""
    RUNNING = "running"    # storing rows as they fall due
    STOPPING = "stopping"  # stop(): everything is due; past its grace, the rest is spooled
    STOPPED = "stopped"    # the thread is done: every row is stored or spooled
    FAILED = "failed"      # the thread died: the collector must exit and be restarted


@dataclasses.dataclass
class Hold:
    """A rotation swapping our table: nothing is inserted until it ends (or max_hold)."""
    rotation: str  # its id
    since: float  # monotonic
    spooled: int = 0  # rows that fell due during it and went to the spool


class RowWriter:
    """The writer thread of one collector: stores submitted batches in {name}_current in
    order, exactly once, through outages (memory queue, then spool) and rotations (hold)."""

    def __init__(self, ch: dict, name: str, spool, max_buffered_rows: int, max_hold: float = 30.0,
                 max_insert_rows: int = 50_000, retry_max: float = 2.0, batch_rows: int = 1000,
                 latency_target: float = 1.0, files_dir: Optional[str] = None):
        self.store = store.Store(ch)
        self.files_dir = files_dir  # this host's hour files: where a rotated batch may be by now
        self.name = name
        self.table = store.current_table(name)
        self.spool = spool
        self.max_buffered_rows = max_buffered_rows
        self.max_insert_rows = max_insert_rows
        self.retry_max = retry_max
        self.batch_rows = batch_rows
        self.latency_target = latency_target
        self.insert_seconds = 0.0  # how long an insert takes, smoothed

        self.queue = collections.deque()  # batches from the receive loop, oldest first
        self.queued_rows = 0
        self.queued_since = 0.0  # when the oldest queued batch was submitted
        self.wakeup = threading.Condition()  # guards state, held and the queue
        self.state = WriterState.RUNNING
        self.stop_deadline = math.inf  # monotonic; set by stop()
        self.storing = threading.Lock()  # held for the whole of one insert attempt
        self.held: Optional[Hold] = None  # while the exporter swaps our table
        self.max_hold = max_hold

        self.pending: Optional[List[tuple]] = None
        self.pending_next_offset: Optional[int] = None  # set when pending came from the spool
        self.unsure = False  # the last insert of `pending` failed and may have landed
        self.table_rows: Optional[int] = None  # count() of our table, when known
        self.recount = False  # set after a rotation: table_rows must be read again

        self.connected = False  # our table is known to exist on the current connection
        self.spool_broken_until = 0.0  # after a failed spool write (disk full), retry later
        self.rows_submitted = 0  # by the receive loop and backfill, in this run
        self.rows_written = 0
        self.insert_errors = 0
        self.failing_since: Optional[float] = None  # monotonic time of the first failed insert
        self.thread = threading.Thread(target=self._run, name=f"writer-{name}", daemon=True)

        # An earlier run died during the insert of the first spooled batch: find out whether
        # it landed, by its rows (a rotation may have swapped the table since: the count
        # the marker kept is then another table's).
        self.inherited_unsure = bool(spool.inflight and spool.inflight[0] == spool.offset)
        if self.inherited_unsure:
            _offset, self.table_rows, _rows = spool.inflight
            self.unsure = True

    # --- called from the receive loop ------------------------------------------------------

    def submit(self, rows: List[tuple]) -> None:
        """Queue rows; wakes the writer thread only when that changes when it is due (the
        first rows start its latency clock, batch_rows rows make it due at once)."""
        with self.wakeup:
            first, before = not self.queue, self.queued_rows
            if first:
                self.queued_since = time.monotonic()
            self.queue.append(rows)
            self.queued_rows += len(rows)
            self.rows_submitted += len(rows)
            if first or before < self.batch_rows <= self.queued_rows:
                self.wakeup.notify()

    def buffered_rows(self) -> int:
        return self.queued_rows + (len(self.pending) if self.pending else 0)

    def start(self) -> None:
        self.thread.start()

    @property
    def failed(self) -> bool:
        """The writer thread died: the collector must exit and be restarted."""
        return self.state is WriterState.FAILED

    def hold(self, rotation: str) -> None:
        """Stop inserting until release(); returns at once (see holding())."""
        with self.wakeup:
            if self.held is None or self.held.rotation != rotation:
                self.held = Hold(rotation, time.monotonic())
                log.info("holding rows for rotation=%s", rotation)

    def holding(self) -> bool:
        """True once a hold is on and no insert is in flight: our table may be swapped now.
        (`held` is set first, and an insert re-checks it under `storing`.)"""
        return self.held is not None and not self.storing.locked()

    def release(self, rotation: str) -> None:
        with self.wakeup:
            self.recount = True  # the table was swapped, whether we held or missed the hold
            if self.held is not None and self.held.rotation == rotation:
                self._release(f"rotation={rotation} ended after "
                              f"{time.monotonic() - self.held.since:.2f}s")

    def _release(self, why: str) -> None:
        spooled = f" ({self.held.spooled} held rows spooled)" if self.held.spooled else ""
        self.held = None
        self.recount = True
        self.wakeup.notify()
        log.info("writing again: %s%s", why, spooled)

    def stop(self, grace: float) -> None:
        """Store everything; after `grace` seconds of failures, spool what is left."""
        with self.wakeup:
            if self.state is WriterState.RUNNING:
                self.state = WriterState.STOPPING
            self.stop_deadline = time.monotonic() + grace
            self.wakeup.notify()
        self.thread.join()
        self.spool.close()
        self.store.close()

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._store_forever()
            with self.wakeup:
                self.state = WriterState.STOPPED
        except Exception:
            with self.wakeup:
                self.state = WriterState.FAILED
            log.exception("writer thread failed; %d rows in memory are lost, %d spooled rows "
                          "are kept", self.buffered_rows(), self.spool.rows)

    def _store_forever(self) -> None:
        backoff = 0.0
        while True:
            if not self._wait_for_work():
                return
            self._spill_over_bound()
            attempt_started = time.monotonic()
            try:
                with self.storing:
                    if self.held is not None:
                        continue  # a hold began while we were waiting for the lock
                    self._store_next()
                backoff, self.failing_since = 0.0, None
            except InsertFailed as e:
                backoff = min(self.retry_max, max(0.2, backoff * 2))
                self.insert_errors += 1
                self._spill_if_failing_long(attempt_started)
                log.warning("insert failed table=%s buffered=%d spooled=%d retry_in=%.1fs: %s",
                            self.table, self.buffered_rows(), self.spool.rows, backoff, e)
                if self._stop_overdue():
                    self._spill_all("ClickHouse is unreachable")
                    return
                self._back_off(backoff)

    def _back_off(self, seconds: float) -> None:
        """Wait before the next try, deaf to new rows (each would wake us: with the queue
        spooled empty every submit is a first row) but not to stop: stopping, it waits no
        longer than the stop's deadline (returning at once made thousands of failed tries in
        the grace while ClickHouse was away)."""
        deadline = time.monotonic() + seconds
        with self.wakeup:
            while (left := min(deadline, self.stop_deadline) - time.monotonic()) > 0:
                self.wakeup.wait(left)

    def _wait_for_work(self) -> bool:
        """Block until something is due to be stored and no hold; False: stop now."""
        with self.wakeup:
            while True:
                self._end_overlong_hold()
                if self.held is None:
                    if self._stopping():
                        return self._has_work()  # stopping: everything is due
                    wait = self._until_due()
                    if wait is not None and wait <= 0:
                        return True
                elif self._stop_overdue():
                    self._spill_all("a rotation holds rows")  # never write into a swapped table
                    return False
                else:
                    wait = self._spool_held_rows()
                self.wakeup.wait(wait)

    def _spool_held_rows(self) -> float:
        """During a hold: rows in memory that are due go to the spool; returns how long to
        wait (for them, the hold's end or its timeout)."""
        due = self._memory_due_in()
        if due is not None and due <= 0:
            spooled = self.spool.rows
            self._spill(keep_rows=0, why="held for a rotation", level=logging.DEBUG)
            self.held.spooled += self.spool.rows - spooled
            due = self._memory_due_in()
            if due is not None and due <= 0:
                due = None  # the disk refused: _spill tries again once it may accept
        return 0.5 if due is None else min(0.5, due)

    def _memory_due_in(self) -> Optional[float]:
        """Seconds until the rows held only in memory are due (<= 0: now); None: none are."""
        if self.pending and self.pending_next_offset is None:
            return 0.0  # a batch being retried
        return self._queue_due_in()

    def _until_due(self) -> Optional[float]:
        """Seconds until the next insert is due (<= 0: now); None: nothing to store."""
        if self.pending or self.spool:
            return 0.0
        return self._queue_due_in()

    def _queue_due_in(self) -> Optional[float]:
        """Seconds until the memory queue is due (<= 0: now); None: it is empty."""
        if not self.queue:
            return None
        if self.queued_rows >= self.batch_rows:
            return 0.0
        wait = self.latency_target - LATENCY_MARGIN - self.insert_seconds
        return self.queued_since + wait - time.monotonic()

    def _stopping(self) -> bool:
        return self.state is WriterState.STOPPING

    def _stop_overdue(self) -> bool:
        return self._stopping() and time.monotonic() >= self.stop_deadline

    def _end_overlong_hold(self) -> None:
        if self.held is not None and time.monotonic() - self.held.since > self.max_hold:
            log.warning("rotation=%s held rows for over %.0fs without its end: writing again",
                        self.held.rotation, self.max_hold)
            self._release("hold timed out")

    def _has_work(self) -> bool:
        return bool(self.pending or self.spool or self.queue)

    def _store_next(self) -> None:
        if self.pending is None:
            self._take_next()
        started = time.monotonic()
        self._insert(self.pending)
        self.insert_seconds += (time.monotonic() - started - self.insert_seconds) / 8
        if self.pending_next_offset is not None:
            self.spool.advance(self.pending_next_offset, len(self.pending))
        self.rows_written += len(self.pending)
        self.pending = self.pending_next_offset = None

    def _take_next(self) -> None:
        """Oldest first: the spool, then the memory queue (merged into one larger insert)."""
        if self.spool:
            self.pending_next_offset, self.pending = self.spool.peek()
            return
        rows = []
        with self.wakeup:
            while self.queue and (not rows or len(rows) + len(self.queue[0]) <= self.max_insert_rows):
                batch = self.queue.popleft()
                self.queued_rows -= len(batch)
                rows.extend(batch)
        self.pending = rows

    def _insert(self, rows: List[tuple]) -> None:
        self._connect()
        if self.recount and not self.unsure:
            self.recount, self.table_rows = False, None
        try:
            if self.table_rows is None:
                self.table_rows = self.store.count(self.table)
            if self.unsure:
                landed = self._landed(rows)
                self.unsure = False
                if landed:
                    self.table_rows += len(rows)
                    return
            if self.pending_next_offset is not None:
                self.spool.mark_inflight(self.table_rows, len(rows))
        except Exception as e:  # only reads so far: nothing can have landed
            self._disconnect()
            raise InsertFailed(f"{type(e).__name__}: {e}") from None
        try:
            self.store.insert_rows(self.table, rows)
        except store.Refused as e:  # the server refused the block: it did not land
            if e.code == store.UNKNOWN_TABLE:
                self._disconnect()  # reconnecting recreates the table
            raise InsertFailed(f"server refused: {first_line(e)}") from None
        except Exception as e:
            self.unsure = True
            self._disconnect()
            raise InsertFailed(f"{type(e).__name__}: {first_line(e)}") from None
        self.table_rows += len(rows)

    def _landed(self, rows: List[tuple]) -> bool:
        """Did the unsure insert of `rows` land?  The row count answers when only we wrote;
        when someone else changed the table too (the exporter moving rows back after a
        rotation), look for the batch's first and last rows: a block lands whole or not."""
        count = self.store.count(self.table)
        if self.inherited_unsure:  # the current table then, or the previous one by now
            self.inherited_unsure = False
            found = [table for table in (self.table, store.previous_table(self.name))
                     if self.store.exists(table) and self.store.contains(table, rows[0])
                     and self.store.contains(table, rows[-1])]
            # or exported and its table dropped by the time this run started
            landed = bool(found) or (self.files_dir is not None and archive.holds_rows(
                self.files_dir, self.name, (rows[0], rows[-1])))
            self.table_rows = count - (len(rows) if self.table in found else 0)
        elif count in (self.table_rows, self.table_rows + len(rows)):
            landed = count == self.table_rows + len(rows)
        else:
            landed = (self.store.contains(self.table, rows[0])
                      and self.store.contains(self.table, rows[-1]))
            self.table_rows = count - (len(rows) if landed else 0)
        log.info("unsure insert of %d rows %s table=%s", len(rows),
                 "had landed" if landed else "had not landed: inserting again", self.table)
        return landed

    def _connect(self) -> None:
        """Make sure the database and our table exist (a rotation or an operator may have
        dropped them; a fresh server has neither)."""
        if not self.connected:
            try:
                self.store.create_database()
                self.store.create_rows_table(self.table)
            except Exception as e:
                self.store.close()
                raise InsertFailed(f"cannot reach ClickHouse: {type(e).__name__}: "
                                   f"{first_line(e)}") from None
            self.connected = True

    def _disconnect(self) -> None:
        self.store.close()
        self.connected = False

    # --- spilling to the spool -------------------------------------------------------------

    def _spill_over_bound(self) -> None:
        if self.queued_rows > self.max_buffered_rows:
            self._spill(keep_rows=self.max_buffered_rows // 2, why="memory bound reached")

    def _spill_if_failing_long(self, attempt_started: float) -> None:
        """Failing time counts from the start of the first failed attempt: an insert that hung
        for seconds (a server shutting down) before it failed has kept its rows and the
        queue's in memory all that while."""
        if self.failing_since is None:
            self.failing_since = attempt_started
        if time.monotonic() - self.failing_since >= SPOOL_AFTER:
            self._spill(keep_rows=0, why=f"inserts failing for over {SPOOL_AFTER:.0f}s")

    def _spill_all(self, why: str) -> None:
        self._spill(keep_rows=0, why=f"stopping while {why}")
        log.warning("stopping while %s: %d rows kept in %s for the next start", why,
                    self.spool.rows, self.spool.path)

    def _spill(self, keep_rows: int, why: str, level: int = logging.WARNING) -> None:
        """Move the oldest queued batches to the spool until at most keep_rows stay queued.
        When the disk refuses (full, read-only), rows stay in memory and we try again later."""
        if time.monotonic() < self.spool_broken_until:
            return
        try:
            self._spill_to_disk(keep_rows, why, level)
        except OSError as e:
            self.spool_broken_until = time.monotonic() + 5.0
            log.error("cannot write spool %s: %s; keeping %d rows in memory, trying again in 5s",
                      self.spool.path, e, self.buffered_rows())

    def _spill_to_disk(self, keep_rows: int, why: str, level: int) -> None:
        if self.pending and self.pending_next_offset is None:
            # The pending batch is older than anything spooled, so it goes first; the spool is
            # empty here (a batch is taken from memory only when the spool is empty).
            self.spool.append(self.pending)
            self.pending_next_offset = self.spool.size
            if self.unsure:
                self.spool.mark_inflight(self.table_rows, len(self.pending))
        with self.wakeup:
            # the oldest batches, as one spool record: it is replayed as one insert
            count, rows = 0, 0
            while count < len(self.queue) and self.queued_rows - rows > keep_rows:
                rows += len(self.queue[count])
                count += 1
            if count:
                merged = [row for i in range(count) for row in self.queue[i]]
                self.spool.append(merged)  # may raise: then the batches stay queued
                for _ in range(count):
                    self.queue.popleft()
                self.queued_rows -= rows
            moved = rows
        if moved:
            log.log(level, "%s table=%s: %d rows moved to spool %s (%d spooled)", why,
                    self.table, moved, self.spool.path, self.spool.rows)

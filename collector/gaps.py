"""The gap ledger: each stretch in which a symbol had no live subscription, recorded once.

The receive loop tells the ledger what happens, each with one small call:
  seen(rows, now)       a data frame arrived (ticker, deal or depth rows)
  lost(reason, detail)  the connection ended (disconnect, dead socket)
  hint(reason, detail)  something that explains a gap open now or opening within HINT_TTL
                        seconds (an exchange error; the supervisor's word that our tor was
                        restarted, from the bus thread)
  book_resync(...)      the whole book's versions broke and a snapshot resynced them
                        (collector/book.py): a closed gap of its own, with no backfill
A gap opens when the connection is lost (its start: the newest exchange ts seen before it) or
when the process starts (its start: what was stored last, read back from ClickHouse or from
an exported hour's file, since a SIGKILLed process left no word; its reason comes from whoever
started us: the supervisor knows whether it restarted a crashed collector or the daemon
started fresh).  A live connection on which every channel stays silent for `stall_after`
seconds has a gap too (a stall), even when its data comes back by itself: the collector sets
it to the socket's stale limit, learnt from its busy channels' rhythm (a few seconds on a
liquid symbol), or `exchange.silent_alarm` while no channel is busy.  Every gap closes at
the first data frame after it (its end: that frame's oldest ts), so it is recorded when the
data is back, never while it is still open; one still open when the collector stops ends
then (the exchange's now), and the next start's gap begins where it ends.

Closed gaps go to a worker thread, which asks the REST API for the latest trades at once
(collector/backfill.py), waits until the writer has stored the rows around the gap, stores
the trades the WebSocket did not deliver, and writes the record to the `gaps` table,
retrying while ClickHouse is away.  A closed gap is also written to a small journal beside
the spool (GapJournal) until its record is in ClickHouse: a process killed or stopped before
that (ClickHouse away, a SIGKILL) leaves it to the next start, which records it first.  The
REST answer goes into the journal too, as soon as it comes (one answer serves every gap closed
before it was asked for, also those closing while the worker waits on an earlier one): MEXC's
100 latest trades move on, and an answer asked for again later may no longer reach back.
"""
import dataclasses
import enum
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

from core import archive
from core.clock import HOUR_MS, EventClock
from core.log import first_line
from core.process import write_json_atomic
from core.store import Store
from core.vocabulary import GAP_BOOK_RESYNC, GAP_STALL, Gap, Row

log = logging.getLogger(__name__)

SETTLE = 0.3  # seconds after a gap closes before its edge rows are surely handed to the writer
RETRY = 2.0  # seconds between tries while ClickHouse is away
STOP_GRACE = 1.0  # a stopping collector gives its gap records this long (its rows come first)
HINT_TTL = 5.0  # seconds a hint explains a gap that has not opened yet


class Outcome(enum.Enum):
    """What became of one closed gap."""
    RECORDED = "recorded"
    ALREADY_RECORDED = "already recorded"  # by a try whose answer was lost, or an earlier run
    NO_GAP = "no gap"  # the symbol's first data: nothing was stored before it
    LEFT = "left to the next start"  # we stopped first: it stays in the journal


class _Stopped(Exception):
    """The collector is stopping and a step did not succeed (ClickHouse away or slow)."""


@dataclass
class OpenGap:
    start_ms: Optional[int]  # None: the process started; read what was stored last
    reason: str
    detail: str
    end_ms: int = 0
    closed_at: float = 0.0  # monotonic time of the first data frame after it
    # backfill's REST answer (deal rows), taken as soon as the gap had closed and kept in the
    # journal: one taken later (after a restart, or after waiting out a ClickHouse outage for
    # an earlier gap) may no longer reach back over the gap
    fetched: Optional[List[tuple]] = None


def stored_last(store, export_dir: str, symbol: str, name: str,
                before_ms: int) -> Optional[int]:
    """The newest data row stored before `before_ms`: in the tables, or in the file of an
    exported hour newer than that (read back: its hour's start alone would make the gap claim
    rows the file holds; an hour is often exported just as a collector restarts).  None:
    nothing stored yet."""
    newest = store.newest_table_ms(name, before_ms)
    hour = store.latest_exported_hour(symbol, before_ms)
    while hour is not None and (newest is None or hour + HOUR_MS > newest):
        try:
            in_file = archive.newest_data_ms(export_dir, name, hour, before_ms)
        except OSError as e:  # moved away: its start is a lower bound
            log.warning("gap start: %s unreadable, counting from its hour's start: %s",
                        archive.file_name(name, hour), first_line(e))
            return max(newest or 0, hour)
        if in_file is not None:
            return max(newest or 0, in_file)
        hour = store.latest_exported_hour(symbol, hour)
    return newest


def record_end(ch: dict, export_dir: str, symbol, reason: str, detail: str,
               give_up: threading.Event, retry: float = RETRY, end_ms: Optional[int] = None,
               covered: bool = True) -> Optional[Gap]:
    """Record that a symbol's data here ends at `end_ms` (default now) without a collector
    to say so: one gap from what is stored last to then.  A delisted contract whose collector
    the supervisor stopped: covered (the market stopped: no trade is missing); a symbol a
    killed cluster host held and no longer collects: not covered.  Retries while ClickHouse is
    away, until `give_up` is set; the record, or None (nothing stored: no gap; or given up)."""
    end_ms = int(time.time() * 1000) if end_ms is None else end_ms
    with Store(ch) as store:
        while True:
            try:
                start_ms = stored_last(store, export_dir, symbol.symbol, symbol.name, end_ms)
                if start_ms is None:
                    return None
                record = Gap(symbol.symbol, symbol.name, start_ms, end_ms, reason, detail, 0,
                             covered, int(time.time() * 1000))
                store.create_gaps_table()
                if not store.gap_recorded(record):
                    store.record_gaps([record])
                return record
            except Exception as e:
                store.close()
                log.warning("gap ledger: %s end not recorded yet: %s; retrying in %.0fs",
                            symbol.symbol, first_line(e), retry)
                if give_up.wait(retry):
                    log.error("gap ledger: %s: the %s record was not written (stopping)",
                              symbol.symbol, reason)
                    return None


class GapJournal:
    """The closed gaps whose records are not in ClickHouse yet, in one JSON file (rewritten
    whole: it holds a few entries at most).  Used from the receive loop and the worker."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.gaps: List[OpenGap] = []

    def load(self) -> List[OpenGap]:
        """The gaps an earlier run closed and did not record."""
        try:
            with open(self.path) as f:
                entries = json.load(f)
        except FileNotFoundError:
            return []
        except ValueError as e:
            log.error("gap journal %s unreadable, its gaps are inside the next start's gap: "
                      "%s", self.path, e)
            return []
        with self.lock:
            self.gaps = [OpenGap(**entry) for entry in entries]
            for gap in self.gaps:
                if gap.fetched is not None:
                    gap.fetched = [Row(*row) for row in gap.fetched]
            return list(self.gaps)

    def add(self, gap: OpenGap) -> None:
        with self.lock:
            self.gaps.append(gap)
            self._save()

    def unanswered(self) -> List[OpenGap]:
        """The closed gaps with no REST answer yet."""
        with self.lock:
            return [g for g in self.gaps if g.fetched is None]

    def answered(self, gaps: List[OpenGap], fetched: List[tuple]) -> None:
        """One answer, taken after every one of `gaps` had closed, serves them all."""
        with self.lock:
            for gap in gaps:
                gap.fetched = fetched
            self._save()

    def done(self, gap: OpenGap) -> None:
        with self.lock:
            self.gaps = [g for g in self.gaps if g is not gap]
            self._save()

    def _save(self) -> None:
        try:
            write_json_atomic(self.path, [dataclasses.asdict(g) for g in self.gaps])
        except OSError as e:  # a full disk: the record may still be written; say so
            log.error("gap journal %s not written (a kill now loses %d gap(s) closed and not "
                      "recorded): %s", self.path, len(self.gaps), e)


class GapLedger:
    """One collector's ledger.  `writer` is its RowWriter (backfilled rows go through it, and
    the ledger waits for it); `backfill` a collector.backfill.Backfill or None; `journal_path`
    the file of its GapJournal; `export_dir` where this host's exported hours' files are,
    `files_log` the table that logs them (in a cluster: its copies, core/archive.py); `clock`
    the exchange's time (a gap open at the stop ends at its now)."""

    def __init__(self, symbol, ch: dict, writer, stall_after: float, start_reason: str,
                 start_detail: str, journal_path: str, export_dir: str, backfill=None,
                 files_log: str = "export_log", clock: EventClock = EventClock()):
        self.symbol, self.name = symbol.symbol, symbol.name
        self.clock = clock
        self.store = Store(ch, files_log=files_log)
        self.export_dir = export_dir
        self.writer = writer
        self.written_before = writer.spool.rows  # spooled by an earlier run, stored first
        self.stall_after = stall_after  # the collector updates it as it learns the rhythm
        self.backfill = backfill
        self.open: Optional[OpenGap] = OpenGap(None, start_reason, start_detail)
        self.last_ms = 0  # newest exchange ts of the data seen
        self.first_ms: Optional[int] = None  # exchange ts of this run's first data
        self.last_seen = 0.0  # monotonic time of the last data frame
        self.hinted = None  # (reason, detail, until): explains a gap opening before `until`
        self.closed = queue.Queue()
        self.journal = GapJournal(journal_path)
        earlier = self.journal.load()
        if earlier:
            log.info("%d gap(s) closed by an earlier run and not recorded; recording them first",
                     len(earlier))
        for gap in earlier:
            self.closed.put(gap)
        self.stopping = threading.Event()
        self.next_fetch = 0.0  # monotonic; after a failed fetch, the next waits RETRY
        self.recorded = 0
        self.thread = threading.Thread(target=self._run, name=f"gaps-{self.name}", daemon=True)

    # --- called from the receive loop ------------------------------------------------------

    def seen(self, rows, now: float) -> None:
        """A data frame's rows arrived (rows is not empty)."""
        if self.open is not None or now - self.last_seen >= self.stall_after:
            self._data_again(rows, now)
        newest = rows[0][0] if len(rows) == 1 else max(row[0] for row in rows)  # hot path
        if newest > self.last_ms:
            self.last_ms = newest
        self.last_seen = now

    def lost(self, reason: str, detail: str) -> None:
        """The connection ended; a gap opens unless one is open already."""
        if self.open is None:
            reason, detail = self._hinted() or (reason, detail)
            self.open = OpenGap(self.last_ms or None, reason, detail)
            log.info("gap opened reason=%s detail=%s start_ms=%s", reason, detail, self.last_ms)

    def hint(self, reason: str, detail: str) -> None:
        """This explains the gap open now (a start's gap keeps its own reason), or one that
        opens within HINT_TTL seconds."""
        gap = self.open
        if gap is not None and gap.start_ms is not None:
            gap.reason, gap.detail = reason, detail
        else:
            self.hinted = (reason, detail, time.monotonic() + HINT_TTL)

    def book_resync(self, start_ms: int, end_ms: int, detail: str) -> None:
        """The whole book was unknown from start_ms (the last increment in sequence) to
        end_ms (the snapshot that resynced it); recorded like any closed gap."""
        gap = OpenGap(start_ms, GAP_BOOK_RESYNC, detail, end_ms, time.monotonic(), fetched=[])
        self.journal.add(gap)
        self.closed.put(gap)

    def _hinted(self):
        hinted = self.hinted
        if hinted is not None and time.monotonic() < hinted[2]:
            return hinted[:2]
        return None

    def _data_again(self, rows, now: float) -> None:
        gap = self.open
        if gap is None:  # data stopped on a live connection
            reason, detail = self._hinted() or (GAP_STALL,
                                                f"no data for {now - self.last_seen:.1f}s")
            gap = OpenGap(self.last_ms, reason, detail)
        gap.end_ms, gap.closed_at = min(row[0] for row in rows), now
        if self.first_ms is None:  # the start's gap ends at the first data
            self.first_ms = gap.end_ms
        self.open = None
        self.journal.add(gap)
        self.closed.put(gap)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Finish the gaps closed so far within about `grace` seconds (the writer still runs;
        a request or query still blocked then is left to the daemon thread's end).  A gap
        still open is closed now and recorded with them."""
        self._close_at_stop()
        self.closed.put(None)
        self.thread.join(grace)
        self.stopping.set()
        self.thread.join(0.2)
        if self.thread.is_alive() or not self.closed.empty():
            log.warning("stopping with a gap record unwritten (ClickHouse or the REST API slow "
                        "or away); the next start records it (%s)", self.journal.path)

    def _close_at_stop(self) -> None:
        """A gap open when we stop (a silence judged on a market that stayed quiet, a
        connection lost and not back) ends now: recorded (or journaled for the next start,
        whose gap begins where it ends), so a collector that never starts again leaves no
        stretch without a record.  A start's own gap (no data yet) stays the next start's."""
        gap = self.open
        if gap is None or gap.start_ms is None:
            return
        gap.end_ms = max(self.clock.now_ms(), gap.start_ms)
        gap.closed_at, gap.detail = time.monotonic(), f"{gap.detail}; open at the stop"
        self.open = None
        log.info("gap open at the stop, recorded up to now reason=%s start_ms=%d end_ms=%d",
                 gap.reason, gap.start_ms, gap.end_ms)
        self.journal.add(gap)
        self.closed.put(gap)

    # --- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            gap = self.closed.get()
            if gap is None:
                return
            try:
                if self._settle(gap) is not Outcome.LEFT:
                    self.journal.done(gap)
            except Exception:
                log.exception("gap record failed start_ms=%s end_ms=%s reason=%s",
                              gap.start_ms, gap.end_ms, gap.reason)
            if self.closed.empty():  # gaps are rare: no idle session (a server thread) kept
                self.store.close()

    def _settle(self, gap: OpenGap) -> Outcome:
        """Backfill and record one closed gap."""
        self._fetch_for_closed_gaps()
        if not self._wait_stored(gap):
            return Outcome.LEFT
        try:
            if gap.start_ms is None:
                start_ms = self._retry(lambda: self._stored_last(gap.end_ms))
                if start_ms is None:
                    log.info("first data of %s: nothing stored before, no gap", self.symbol)
                    return Outcome.NO_GAP
                # an earlier run recorded the gap it stopped in: this one begins at its end
                recorded = self._retry(lambda: self.store.newest_gap_end_ms(self.name,
                                                                            gap.end_ms))
                gap.start_ms = max(start_ms, recorded or 0)
            gap.end_ms = max(gap.end_ms, gap.start_ms)
            backfilled, covered = ((0, True) if gap.reason == GAP_BOOK_RESYNC  # no trade missed
                                   else self._backfill(gap.fetched, gap))
            if backfilled:  # a reader of the record finds its rows (stopping: they are spooled)
                self._wait_written()
            record = Gap(self.symbol, self.name, gap.start_ms, gap.end_ms, gap.reason,
                         gap.detail, backfilled, covered, int(time.time() * 1000))
            outcome = self._retry(lambda: self._record(record))
        except _Stopped:
            return Outcome.LEFT
        if outcome is Outcome.ALREADY_RECORDED:
            log.info("gap already recorded (by a try whose answer was lost, or by an earlier run "
                     "killed before it cleared its journal) reason=%s end_ms=%d",
                     record.reason, record.end_ms)
            return outcome
        self.recorded += 1
        log.info("gap recorded reason=%s detail=%s start_ms=%d end_ms=%d seconds=%.3f "
                 "backfilled=%d covered=%s", record.reason, record.detail, record.start_ms,
                 record.end_ms, (record.end_ms - record.start_ms) / 1000, backfilled,
                 str(covered).lower())
        return outcome

    def _fetch_for_closed_gaps(self) -> None:
        """Ask the REST API for the latest trades if a closed gap has no answer yet: at once,
        also while the worker waits on an earlier gap (its rows, or ClickHouse)."""
        if self.backfill is None or time.monotonic() < self.next_fetch:
            return
        waiting = self.journal.unanswered()
        if not waiting:
            return
        fetched = self.backfill.fetch()
        if fetched is None:
            self.next_fetch = time.monotonic() + RETRY
        else:
            self.journal.answered(waiting, fetched)

    def _backfill(self, fetched, gap: OpenGap) -> tuple:
        """(trades stored, covered) for the gap from what backfill fetched; (0, False) when
        nothing was fetched or we stop first (the record still goes, if ClickHouse answers)."""
        if fetched is None:
            return 0, False
        try:
            return self._retry(
                lambda: self.backfill.fill(fetched, gap.start_ms, gap.end_ms, self.store))
        except _Stopped:
            return 0, False

    def _stored_last(self, before_ms: int) -> Optional[int]:
        return stored_last(self.store, self.export_dir, self.symbol, self.name, before_ms)

    def _wait_stored(self, gap: OpenGap) -> bool:
        """Wait until the writer has stored every row handed to it up to the gap's end (so
        the rows at both edges are in ClickHouse).  False: we are stopping first."""
        self.stopping.wait(max(0.0, gap.closed_at + SETTLE - time.monotonic()))
        return self._wait_written()

    def _wait_written(self) -> bool:
        """Wait until the writer has stored every row handed to it so far (the writer sizes
        inserts by latency: up to collector.latency_target).  False: we are stopping first."""
        mark = self.written_before + self.writer.rows_submitted
        while self.writer.rows_written < mark:
            self._fetch_for_closed_gaps()
            if self.stopping.wait(0.05):
                return False
        return True

    def _record(self, record: Gap) -> Outcome:
        """Write the record unless it is there already: an insert that failed may have landed,
        and a run killed between writing a record and clearing its journal leaves it to us."""
        self.store.create_gaps_table()
        if self.store.gap_recorded(record):
            return Outcome.ALREADY_RECORDED
        self.store.record_gaps([record])
        return Outcome.RECORDED

    def _retry(self, step):
        """step() until it succeeds (ClickHouse may be away): its value; _Stopped when we
        stop first."""
        while True:
            try:
                return step()
            except Exception as e:
                self.store.close()
                if self.stopping.is_set():
                    log.warning("gap ledger: %s; giving up, stopping", first_line(e))
                    raise _Stopped from None
                log.warning("gap ledger: %s; retrying in %.0fs", first_line(e), RETRY)
                self._fetch_for_closed_gaps()
                self.stopping.wait(RETRY)

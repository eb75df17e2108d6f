"""The whole order book's continuity, for a collector with exchange.book "full" or "both".

Every sub.depth increment is stored as it arrives (a `bu` row, its versions first: nothing is
dropped, a reader skips what a snapshot already holds).  On every frame the versions must
follow: `begin == last end + 1` (unmerged frames have begin = end = version).  A break (a
missed or out-of-order increment, a reconnect, a restart) starts the standard resync:

  1. hold the increments (their versions: the rows themselves are stored already);
  2. fetch a REST depth snapshot (stored as a `bs` row, with its version);
  3. drop the held increments the snapshot contains (end <= its version);
  4. apply the rest: they must follow on from the snapshot, or the resync starts again.

Each resync is one gap-ledger record (reason book_resync) from the last increment in sequence
to the snapshot, with the versions on both sides.  Snapshots are also taken at the start of
each hour (of the increments' exchange time) and every exchange.book_snapshot_interval
seconds, so every hour's file can be replayed on its own.

The receive loop calls on_increment() per frame and poll() after each read; the REST requests
run in this module's thread, through the symbol's tor, within the collector's rate budget
(shared with the trade backfill)."""
import collections
import logging
import threading
import time
from typing import List, Optional

from collector import wire
from collector.backfill import rest_body
from core import archive
from core.clock import HOUR_MS
from core.log import first_line
from core.store import Store

log = logging.getLogger(__name__)

RETRY = 1.0  # s after a failed snapshot request, or one older than the increments held
MAX_HELD = 1_000_000  # increments held at most while a snapshot is awaited (then resync anew)
SYNCED, WAITING = "synced", "waiting for a snapshot"


class Held(collections.namedtuple("Held", "begin end ts")):
    """The versions and exchange ms of an increment received while resyncing."""


class BookKeeper:
    """One symbol's whole-book continuity.  `ledger` is the collector's GapLedger, `budget`
    its RateBudget; `ch` its ClickHouse section and `export_dir` the archive's (read once,
    after a restart: where the book broke)."""

    def __init__(self, ex: dict, symbol, socks_proxy, budget, ledger, ch: dict,
                 export_dir: str):
        self.ex, self.symbol, self.name = ex, symbol.symbol, symbol.name
        self.socks_proxy, self.budget, self.ledger, self.ch = socks_proxy, budget, ledger, ch
        self.export_dir = export_dir
        self.url = ex["rest_url"].rstrip("/") + wire.depth_snapshot_path(symbol.symbol)
        self.interval = ex["book_snapshot_interval"]
        self.state = WAITING
        self.last_end: Optional[int] = None  # version the increments in sequence reached
        self.last_ts = 0  # exchange ms of that increment
        self.covered = -1  # version of the newest snapshot: increments up to it are in it
        self.held: List[Held] = []
        self.broke = None  # (version, ms, why) where the book broke; None at a first start
        self.restarted = True  # the first resync looks up where an earlier run stopped:
        # among the increments received before this run started, for by the time it looks
        # the writer may have stored this run's first ones
        self.started_ms = int(time.time() * 1000)
        self.hour = None
        self.next_periodic = time.monotonic() + self.interval
        self.asked = False  # a snapshot is asked for and not in yet
        self.retry_at = 0.0  # monotonic; the next request waits until then
        self.answers = collections.deque()  # (row, version) from the thread
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"book-{self.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(1.0)

    # --- the receive loop ---------------------------------------------------------------------

    def reconnected(self) -> None:
        """A new subscription: whatever came before, the versions broke."""
        if self.state == SYNCED:
            self._break("reconnect")
        self.held = []

    def on_increment(self, row) -> None:
        begin, end = wire.book_versions(row[2])
        ts = row[0]
        if ts // HOUR_MS != self.hour:
            if self.hour is not None:
                self._ask("hour start")
            self.hour = ts // HOUR_MS
        if self.state == SYNCED:
            if begin == self.last_end + 1:
                self.last_end, self.last_ts = end, ts
                return
            if end <= self.covered:
                return  # sent before the snapshot was taken: in it
            self._break(f"version {begin}..{end} after {self.last_end}")
        self.held.append(Held(begin, end, ts))
        if len(self.held) > MAX_HELD:
            log.warning("book: %d increments held without a snapshot; holding anew",
                        len(self.held))
            del self.held[:-1]
        self._ask("resync")

    def poll(self, now: float) -> list:
        """The snapshot rows that came in (the caller stores them); asks for the periodic one
        when due."""
        if self.interval and now >= self.next_periodic:
            self.next_periodic = now + self.interval
            self._ask("interval")
        rows = []
        while self.answers:
            row, version = self.answers.popleft()
            rows.append(row)
            self._snapshot(row, version)
        return rows

    def _break(self, why: str) -> None:
        self.broke = (self.last_end, self.last_ts, why)
        self.state = WAITING
        log.warning("book versions broke (%s); resyncing from a snapshot", why)

    def _ask(self, why: str) -> None:
        if not self.asked:
            self.asked = True
            log.debug("book snapshot asked for: %s", why)
            self.wake.set()

    def _snapshot(self, row, version: int) -> None:
        self.covered = max(self.covered, version)
        if self.state == SYNCED or not self.held:
            return  # a resync starts from the increments held (asked for by the first one)
        after = sorted((h for h in self.held if h.end > version), key=lambda h: h.begin)
        if after and after[0].begin > version + 1:
            log.info("book snapshot version %d is older than the increments held (from %d); "
                     "asking again", version, after[0].begin)
            self._ask_later()
            return
        reached, ts = version, row[0]
        for i, held in enumerate(after):
            if held.begin > reached + 1:  # a hole among the increments held
                self.held = after[i:]
                self.broke = (reached, ts, f"version {held.begin} after {reached}")
                self._ask_later()
                return
            reached, ts = max(reached, held.end), max(ts, held.ts)
        self._synced(row, version, reached, ts, len(after))

    def _synced(self, row, version: int, reached: int, ts: int, applied: int) -> None:
        held, self.held = len(self.held), []
        self.state, self.last_end, self.last_ts = SYNCED, reached, ts
        broke = self.broke
        self.broke = None
        log.info("book resynced: snapshot version %d, %d increments held, %d applied after it, "
                 "in sequence from version %d", version, held, applied, reached)
        if broke is None or broke[0] is None:
            return  # the first data ever: nothing broke
        start_ms = min(broke[1], row[0])
        self.ledger.book_resync(start_ms, row[0], f"{broke[2]}: versions {broke[0]} -> "
                                f"snapshot {version}, in sequence again from {reached}")

    def _ask_later(self) -> None:
        self.asked = True
        self.retry_at = time.monotonic() + RETRY
        self.wake.set()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait()
            self.wake.clear()
            if self.stopping.is_set():
                return
            if self.restarted:
                self.restarted = False
                self._where_an_earlier_run_stopped()
            delay, self.retry_at = self.retry_at - time.monotonic(), 0.0
            if delay > 0 and self.stopping.wait(delay):
                return
            answer = self._fetch()
            if answer is None:
                self.wake.set()  # try again, after RETRY
                self.stopping.wait(RETRY)
                continue
            self.asked = False
            self.answers.append(answer)

    def _where_an_earlier_run_stopped(self) -> None:
        """A restart broke the book where the newest stored increment ends: in the tables,
        else in the latest exported hour's file (a rotation may have moved every row there
        while we were down); none stored: the first start, no break."""
        try:
            with Store(self.ch) as store:
                newest = store.newest_book_update(self.name, self.started_ms)
                hour = store.latest_exported_hour(self.symbol) if newest is None else None
            if hour is not None:
                newest = archive.newest_book_update(self.export_dir, self.name, hour,
                                                    self.started_ms)
        except Exception as e:
            log.warning("book: where an earlier run stopped is unknown: %s", first_line(e))
            return
        if newest is not None and self.broke is None:
            self.broke = (wire.book_versions(newest[1])[1], newest[0], "collector start")

    def _fetch(self):
        """(snapshot row, version), or None (logged)."""
        try:
            body = rest_body(self.url, self.ex, self.socks_proxy, self.budget)
            return wire.depth_snapshot_row(body, int(time.time() * 1000))
        except Exception as e:
            log.warning("book snapshot request failed url=%s: %s: %s", self.url,
                        type(e).__name__, first_line(e))
            return None


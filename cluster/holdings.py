"""When this host held each symbol: every take and release goes to its own ClickHouse
(`cluster_holdings`, core/store.py), which the merge of the hosts' copies reads.

A take counts from the collector's first data, not from its start: a host that took a symbol
covers nothing while its tor bootstraps and its collector connects, and a take stamped at the
start counted it as covering another host's hole of that moment (cluster soak seed 11: a
collector SIGKILLed on one host while a second took the symbol, the third cut off; the merged
file had no gap for the second between them).  The supervisor sees that first data in the
collector's heartbeats, so a collector stopped within a second of it may leave its take
unrecorded: the merge then counts that second as not covered (a gap where rows may be, never
rows missing where no gap is).  A release counts from when it is asked for.

Each record is stamped by the host's event clock (core/clock.py: its wall clock at speed 1,
the exchange's time in the tests' and the demo's faster hours), the time the merge compares
with the hours and the gap ledger's exchange times.

A worker thread writes them in order, retrying while ClickHouse is away, so the supervisor's
loop never waits on it; what is still queued at shutdown gets a last try.
"""
import collections
import logging
import threading
from typing import Optional

from core.clock import EventClock
from core.log import first_line
from core.store import Store

log = logging.getLogger(__name__)

RETRY_EVERY = 1.0


class HoldingsLog:
    def __init__(self, clickhouse: dict, host: str, clock: EventClock):
        self.clickhouse = clickhouse
        self.host = host
        self.clock = clock
        self._queue = collections.deque()  # (name, ts_ms, held), oldest first
        self._taking = set()  # names taken whose collector has not delivered yet
        self._wake = threading.Event()
        self._stopped = False
        self._failing = False
        self._thread = threading.Thread(target=self._work, name="cluster-holdings", daemon=True)
        self._thread.start()

    def taking(self, name: str) -> None:
        """The symbol's collector starts here: held from its first data (delivering())."""
        self._taking.add(name)

    def delivering(self, name: str, first_data_ms: Optional[int]) -> None:
        """The collector's heartbeat: the exchange ms of its first data, None before any.
        Records the take waiting for it."""
        if first_data_ms is not None and name in self._taking:
            self._taking.discard(name)
            self.record(name, True, first_data_ms)

    def record(self, name: str, held: bool, ts_ms: Optional[int] = None) -> None:
        if not held:
            self._taking.discard(name)
        self._queue.append((name, self.clock.now_ms() if ts_ms is None else ts_ms, held))
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        if self._queue:
            log.error("cluster: %d holding records not written to ClickHouse: %s",
                      len(self._queue), ", ".join(f"{n} {'take' if h else 'release'} at {ts}"
                                                  for n, ts, h in self._queue))

    def _work(self) -> None:
        while True:
            self._wake.wait(RETRY_EVERY)
            self._wake.clear()
            if self._queue:
                self._write()
            if self._stopped:
                return

    def _write(self) -> None:
        try:
            with Store(self.clickhouse, timeout=5.0) as store:
                store.create_database()
                store.create_holdings_table()
                while self._queue:
                    name, ts, held = self._queue[0]
                    store.record_holding(name, self.host, ts, held)
                    self._queue.popleft()
            if self._failing:
                log.info("cluster: holding records written again")
            self._failing = False
        except Exception as e:
            if not self._failing:
                log.warning("cluster: cannot record holdings in ClickHouse yet (%s); retrying",
                            first_line(e))
            self._failing = True

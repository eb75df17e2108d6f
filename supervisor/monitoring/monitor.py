"""What the dashboard, /metrics and the alerts read: the daemon's status every SAMPLE_EVERY s,
an hour of message rates, the restarts seen, and from ClickHouse the gap ledger and the
hours exported; in a cluster also each host's receive lag (cluster/lag.py) every LAG_EVERY s,
which the status's cluster section carries (`cluster_lag`).

A thread of the supervisor process.  It asks for the status over the control socket, as
`mexc status` does, so the supervisor's loop answers in its own time and no state of the
loop is read from another thread.  ClickHouse is read with a session of its own every
STORE_EVERY s; a slow or absent server delays only this thread.
"""
import collections
import logging
import shutil
import threading
import time
from typing import Callable, Optional

from core.clock import HOUR_MS, EventClock, hour_start
from core.log import first_line
from core.store import Store
from core.vocabulary import COLLECTOR

log = logging.getLogger(__name__)

SAMPLE_EVERY = 2.0  # seconds between status samples: the page's refresh, the alerts' delay
STORE_EVERY = 30.0  # seconds between reads of the gap ledger and export_log
RATE_BUCKET = 30.0  # seconds per point of the rate history ...
RATE_POINTS = 120  # ... an hour of them
CALENDAR_HOURS = 24
EXPORT_GRACE = 60.0  # wall seconds an hour's export may take before its file counts missing
EVENTS_KEPT = 200


class Ledger:
    """What ClickHouse says, as last read: server version, gaps, exported hours."""

    def __init__(self):
        self.version = None
        self.gaps = []  # core.vocabulary.Gap, oldest first
        self.exported = set()  # (symbol, hour start ms)
        self.error = None  # why the last read failed, None when it worked


class Monitor(threading.Thread):
    """Call start(); read snapshot(), dashboard(), ledger and disks from any thread.
    `on_sample(monitor)` runs in this thread after every sample (the alerts)."""

    def __init__(self, config, ask_status: Callable[[], dict],
                 on_sample: Optional[Callable] = None):
        super().__init__(name="monitor", daemon=True)
        self.config = config
        self.ask_status = ask_status
        self.on_sample = on_sample
        self.clock = EventClock(config.export["clock_speed"], config.export["clock_anchor_ms"])
        self.started_ms = self.clock.now_ms()
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # guards status, rates, events, ledger, disks
        self.status = None
        self.rates = collections.deque(maxlen=RATE_POINTS)  # (bucket start ms, {symbol: rows/s})
        self.bucket = None  # (start ms, {symbol: [sum, samples]}) being filled
        self.events = collections.deque(maxlen=EVENTS_KEPT)  # restarts, newest last
        self.ledger = Ledger()
        self.disks = {}  # path -> (free bytes, size bytes)
        self.store = Store(config.clickhouse, timeout=2.0)
        self.cluster_lag: Optional[dict] = None  # cluster/lag.py's last measurement

    # --- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        next_store = next_lag = 0.0
        while not self.stopped.is_set():
            if time.monotonic() >= next_store:
                self._read_store()
                self._read_disks()
                next_store = time.monotonic() + STORE_EVERY
            self._sample()
            if self.config.clustered and time.monotonic() >= next_lag:
                next_lag = time.monotonic() + self._measure_lag()
            self.stopped.wait(SAMPLE_EVERY)
        self.store.close()

    def stop(self) -> None:
        """Stop sampling.  A status request in flight at shutdown gets no answer (the loop
        has ended): do not wait for it; its late answer is dropped."""
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=1.0)

    def _sample(self) -> None:
        try:
            status = self.ask_status()
        except Exception as e:  # the loop is busy (a shutdown, a reload): try next time
            log.debug("monitor: no status: %s", first_line(e))
            return
        if self.stopped.is_set():
            return
        now_ms = int(time.time() * 1000)
        with self.lock:
            self._note_restarts(self.status, status, now_ms)
            self._note_rates(status, now_ms)
            self.status = status
        if self.on_sample is not None:
            try:
                self.on_sample(self)
            except Exception:  # a bug in a rule must not end the sampling (nor the dashboard)
                log.exception("monitor: the alerts failed on this sample")

    def _note_restarts(self, before: Optional[dict], after: dict, now_ms: int) -> None:
        if before is None:
            return
        restarts = {c["name"]: c["restarts"] for c in before["children"]}
        for child in after["children"]:
            if child["restarts"] > restarts.get(child["name"], child["restarts"]):
                self.events.append({"ts_ms": now_ms, "kind": "restart", "child": child["name"],
                                    "symbol": child["symbol"], "detail": child["last_exit"]})

    def _note_rates(self, status: dict, now_ms: int) -> None:
        start = now_ms - now_ms % int(RATE_BUCKET * 1000)
        if self.bucket is None or self.bucket[0] != start:
            if self.bucket is not None:
                self.rates.append((self.bucket[0], {symbol: total / n for symbol, (total, n)
                                                    in self.bucket[1].items()}))
            self.bucket = (start, {})
        for child in collectors(status):
            total = self.bucket[1].setdefault(child["symbol"], [0.0, 0])
            total[0] += sum((child["msgs_per_s"] or {}).values())
            total[1] += 1

    def _read_store(self) -> None:
        ledger = Ledger()
        since = hour_start(self.clock.now_ms()) - (CALENDAR_HOURS - 1) * HOUR_MS
        try:
            ledger.version = self.store.features.version
            ledger.gaps = self.store.gaps()
            ledger.exported = set(self.store.exported_hours(since))
        except Exception as e:  # ClickHouse away, or tables not made yet: keep what we had
            self.store.close()
            with self.lock:
                self.ledger.error = first_line(e)
            return
        with self.lock:
            self.ledger = ledger

    def _measure_lag(self) -> float:
        """Each host's receive lag over the symbols live on two hosts or more, from the
        hosts and addresses of the last status's cluster section; returns the seconds to
        the next measurement."""
        from cluster.lag import LAG_EVERY, receive_lag  # a single host never loads cluster/
        cluster = (self.snapshot() or {}).get("cluster")
        if not cluster:
            return SAMPLE_EVERY
        sources = {h: (None if h == cluster["host"] else address)
                   for h, address in cluster.get("clickhouse", {}).items()
                   if address or h == cluster["host"]}
        holders = {}
        for host, names in cluster["hosts"].items():
            for name in names:
                holders.setdefault(name, []).append(host)
        try:
            self.cluster_lag = receive_lag(self.store, sources, holders, self.cluster_lag)
        except Exception as e:  # this host's ClickHouse away: the next try
            self.store.close()
            log.debug("monitor: receive lag: %s", first_line(e))
        return LAG_EVERY

    def _read_disks(self) -> None:
        disks = {}
        for path in (self.config.paths["state_dir"], self.config.export["dir"]):
            try:
                usage = shutil.disk_usage(path)
            except OSError:  # not created yet
                continue
            disks[path] = (usage.free, usage.total)
        with self.lock:
            self.disks = disks

    # --- what the readers see --------------------------------------------------------------

    def snapshot(self) -> Optional[dict]:
        """The last status (what `mexc status --json` prints); None before the first."""
        with self.lock:
            return self.status

    def view(self):
        """(status, ledger, disks), read together."""
        with self.lock:
            return self.status, self.ledger, dict(self.disks)

    def dashboard(self) -> dict:
        """The page's figures besides the status: rate history, timeline, export calendar."""
        with self.lock:
            rates = list(self.rates) + ([(self.bucket[0], {s: t / n for s, (t, n)
                                                           in self.bucket[1].items()})]
                                        if self.bucket else [])
            events, ledger, status = list(self.events), self.ledger, self.status
        symbols = [c["symbol"] for c in collectors(status)] if status else []
        return {
            "rates": {"ts_ms": [ts for ts, _ in rates],
                      "symbols": {s: [round(r.get(s, 0.0), 1) for _, r in rates] for s in symbols}},
            "events": events,
            "gaps": [gap._asdict() for gap in ledger.gaps[-EVENTS_KEPT:]],
            "calendar": self.calendar(symbols, ledger),
            "clickhouse_version": ledger.version,
            "store_error": ledger.error,
        }

    def calendar(self, symbols, ledger: Ledger) -> dict:
        """Hours x symbols: verified (a file in export_log), pending (not due yet, or due so
        recently that the export or our next read of export_log may still be under way),
        missing (due, no file; only from the symbol's first file or this daemon's start
        on), none."""
        now = self.clock.now_ms()
        settle = (EXPORT_GRACE + STORE_EVERY) * self.config.export["clock_speed"]
        delay = int((self.config.export["delay"] + settle) * 1000)
        hours = [hour_start(now) - i * HOUR_MS for i in range(CALENDAR_HOURS - 1, -1, -1)]
        first = {}
        for symbol, hour in ledger.exported:
            first[symbol] = min(hour, first.get(symbol, hour))

        def state(symbol, hour):
            if (symbol, hour) in ledger.exported:
                return "verified"
            if hour + HOUR_MS + delay > now:
                return "pending"
            if hour >= first.get(symbol, now) or hour + HOUR_MS > self.started_ms:
                return "missing"
            return "none"

        return {"hours": hours, "symbols": {s: [state(s, h) for h in hours] for s in symbols}}


def collectors(status: dict) -> list:
    """The collector entries of a status."""
    return [c for c in status["children"] if c["kind"] == COLLECTOR]

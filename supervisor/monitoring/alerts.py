"""Alerts for operators without Prometheus ([alerts] command, webhook).

After every monitor sample the rules below say which alerts fire now; an alert that starts
firing is sent once, and once more when it resolves (never again while it fires: that is the
deduplication).  Each notification is one JSON object:
    {"alert": "symbol_silent", "state": "firing" | "resolved", "symbol": "BTC_USDT"
     (or "child": "collector-btc", or neither), "since_ms": when this state began,
     "summary": one line for a human}
given on stdin to `[alerts] command` (run once per notification, no shell) and POSTed to
`[alerts] webhook`.  A worker thread sends them, so a slow receiver never holds up the
monitor, let alone the supervisor's loop; failures are logged.  At most
`alerts.max_per_minute` go out per minute; the rest are dropped with a log line.
The same rules, for Prometheus, are etc/prometheus/mexc-rules.yml.
"""
import collections
import json
import logging
import queue
import subprocess
import threading
import time
import urllib.request

from core.clock import EventClock, from_iso
from core.log import first_line
from core.vocabulary import COLLECTOR, TOR
from supervisor.monitoring.monitor import collectors

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT = 10.0  # seconds a command or webhook may take
QUEUE_SIZE = 1000


def firing(status: dict, ledger, disks: dict, config, event_now_ms: int) -> dict:
    """The alerts that fire for this status: {(alert, subject kind, subject): summary}."""
    alerts = {}
    silent_after, rules = config.exchange["silent_alarm"], config.alerts
    for c in collectors(status):
        if c["state"] != "running" or c["rows_written"] is None:  # no heartbeat yet
            continue
        age = c["last_message_age_s"] if c["last_message_age_s"] is not None else c["uptime_s"]
        if age >= silent_after:
            alerts[("symbol_silent", "symbol", c["symbol"])] = \
                f"{c['symbol']}: no data from the exchange for {age:.0f}s"
        if (c["spooled_rows"] or 0) > rules["spool_rows"]:
            alerts[("spool_growing", "symbol", c["symbol"])] = \
                f"{c['symbol']}: {c['spooled_rows']} rows spooled to disk (ClickHouse away?)"
    for c in status["children"]:
        if c["flapping"]:
            alerts[("collector_flapping", "child", c["name"])] = \
                f"{c['name']} keeps exiting ({c['restarts']} restarts; last: {c['last_exit']})"
        if c["kind"] in (COLLECTOR, TOR) and (c.get("tor") or {}).get("warning"):
            alerts[("tor_exits_not_separated", "symbol", c["symbol"])] = c["tor"]["warning"]
    export = status["supervisor"].get("export") or {}
    for symbol, until in (export.get("exported_until") or {}).items():
        behind = (event_now_ms - from_iso(until)) / 1000
        if behind > rules["export_behind"]:
            alerts[("export_behind", "symbol", symbol)] = \
                f"{symbol}: exported only up to {until}, {behind / 3600:.1f} h behind"
    if not status["supervisor"]["clickhouse"]["reachable"]:
        ch = status["supervisor"]["clickhouse"]
        alerts[("clickhouse_down", None, None)] = f"ClickHouse {ch['host']}:{ch['port']} " \
                                                  "does not answer; collectors buffer"
    for path, (free, size) in disks.items():
        if size and free * 100 / size < rules["disk_free_percent"]:
            alerts[("disk_full", None, None)] = f"{path}: only {free * 100 / size:.1f}% free"
    contracts = status.get("contracts")
    if contracts and contracts["failures"]:
        alerts[("contract_list_failing", None, None)] = \
            f"MEXC's contract list did not load {contracts['failures']} time(s) in a row " \
            f"({contracts['error']}); the last good list stays in force"
    for gap in ledger.gaps:
        if not gap.covered:
            alerts[("gap_not_covered", "symbol", gap.symbol)] = \
                f"{gap.symbol}: trades may be missing ({gap.reason}, not backfilled)"
    return alerts


class Alerts:
    """Call on_sample(monitor) after each sample (the monitor does); stop() at shutdown."""

    def __init__(self, config):
        self.config = config
        self.clock = EventClock(config.export["clock_speed"], config.export["clock_anchor_ms"])
        self.active = {}  # (alert, subject kind, subject) -> since_ms
        self.sent = collections.deque()  # monotonic times of the last minute's notifications
        self.outbox = queue.Queue(QUEUE_SIZE)
        self.worker = threading.Thread(target=self._deliver_all, name="alerts", daemon=True)
        self.worker.start()

    def on_sample(self, monitor) -> None:
        status, ledger, disks = monitor.view()
        now = self.clock.now_ms()
        current = firing(status, ledger, disks, self.config, now)
        now_ms = int(time.time() * 1000)
        for key, summary in current.items():
            if key not in self.active:
                self.active[key] = now_ms
                self._notify(key, "firing", now_ms, summary)
        for key in [k for k in self.active if k not in current]:
            del self.active[key]
            self._notify(key, "resolved", now_ms, "resolved")

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout` s), then end the worker."""
        try:
            self.outbox.put(None, timeout=timeout)
        except queue.Full:
            return
        self.worker.join(timeout)

    def _notify(self, key, state: str, since_ms: int, summary: str) -> None:
        alert, subject_kind, subject = key
        notification = {"alert": alert, "state": state, "since_ms": since_ms, "summary": summary}
        if subject_kind:
            notification[subject_kind] = subject
        log.log(logging.WARNING if state == "firing" else logging.INFO, "alert %s %s%s: %s",
                alert, state, f" {subject}" if subject else "", summary)
        now = time.monotonic()
        while self.sent and now - self.sent[0] > 60:
            self.sent.popleft()
        if len(self.sent) >= self.config.alerts["max_per_minute"]:
            log.warning("alert %s %s not sent: alerts.max_per_minute (%d) reached", alert,
                        state, self.config.alerts["max_per_minute"])
            return
        try:
            self.outbox.put_nowait(notification)
            self.sent.append(now)
        except queue.Full:
            log.warning("alert %s %s not sent: %d notifications still queued", alert, state,
                        QUEUE_SIZE)

    def _deliver_all(self) -> None:
        while True:
            notification = self.outbox.get()
            if notification is None:
                return
            body = json.dumps(notification).encode()
            if self.config.alerts["command"]:
                self._run_command(body, notification)
            if self.config.alerts["webhook"]:
                self._post(body, notification)

    def _run_command(self, body: bytes, notification: dict) -> None:
        command = self.config.alerts["command"]
        try:
            result = subprocess.run([command], input=body, capture_output=True,
                                    timeout=DELIVERY_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("alert command %s failed for %s: %s", command, notification["alert"],
                        first_line(e))
            return
        if result.returncode != 0:
            said = result.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
            log.warning("alert command %s exited %d for %s: %s", command, result.returncode,
                        notification["alert"], said[-1][:300])

    def _post(self, body: bytes, notification: dict) -> None:
        request = urllib.request.Request(self.config.alerts["webhook"], data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT) as response:
                response.read()
        except Exception as e:  # refused, timed out, HTTP 4xx/5xx: log it, go on
            log.warning("alert webhook failed for %s: %s", notification["alert"], first_line(e))

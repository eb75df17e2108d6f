"""The alert rules and the export calendar as pure logic: a status as `mexc status --json`
gives it, a ledger, disks; no daemon."""
import pytest

from core import config as configuration
from core.clock import HOUR_MS
from core.vocabulary import Gap
from supervisor.monitoring.alerts import firing
from supervisor.monitoring.monitor import Ledger, Monitor

NOW = 1_764_000_000_000 // HOUR_MS * HOUR_MS + 30 * 60_000  # half past an hour


def collector(symbol="BTC_USDT", **changes):
    entry = {"name": f"collector-{symbol.split('_')[0].lower()}", "kind": "collector",
             "symbol": symbol, "state": "running", "restarts": 0, "uptime_s": 100.0,
             "last_exit": None, "rows_written": 10, "last_message_age_s": 0.2,
             "spooled_rows": 0, "flapping": False, "exit_ip": None}
    return {**entry, **changes}


def status(*children, reachable=True, export=None):
    return {"supervisor": {"clickhouse": {"host": "127.0.0.1", "port": 9100,
                                          "reachable": reachable},
                           "export": export or {}},
            "children": list(children)}


@pytest.fixture
def config():
    return configuration.parse({"exchange": {"silent_alarm": 30.0}})


def test_a_healthy_daemon_fires_nothing(config):
    assert firing(status(collector(), collector("ETH_USDT")), Ledger(),
                  {"/var/lib/mexc": (50, 100)}, config, NOW) == {}


def test_each_rule(config):
    ledger = Ledger()
    ledger.gaps = [Gap("ETH_USDT", "eth", 1, 2, "disconnect", "", 0, False, 3),
                   Gap("BTC_USDT", "btc", 1, 2, "disconnect", "", 5, True, 3)]
    until = "2025-11-23T10:00:00Z"  # more than a day before NOW
    fired = firing(status(collector(last_message_age_s=31.0, spooled_rows=5),
                          collector("ETH_USDT", flapping=True),
                          reachable=False, export={"exported_until": {"BTC_USDT": until}}),
                   ledger, {"/var/lib/mexc": (5, 100)}, config, NOW)
    assert set(fired) == {("symbol_silent", "symbol", "BTC_USDT"),
                          ("spool_growing", "symbol", "BTC_USDT"),
                          ("collector_flapping", "child", "collector-eth"),
                          ("export_behind", "symbol", "BTC_USDT"),
                          ("clickhouse_down", None, None), ("disk_full", None, None),
                          ("gap_not_covered", "symbol", "ETH_USDT")}


def test_silent_counts_from_the_start_until_the_first_frame(config):
    never = collector(last_message_age_s=None, uptime_s=31.0)
    assert ("symbol_silent", "symbol", "BTC_USDT") in firing(status(never), Ledger(), {},
                                                             config, NOW)
    no_heartbeat_yet = collector(last_message_age_s=None, rows_written=None, uptime_s=99.0)
    backoff = collector(state="backoff", last_message_age_s=None)
    assert firing(status(no_heartbeat_yet, backoff), Ledger(), {}, config, NOW) == {}


def test_export_calendar(config, monkeypatch):
    monitor = Monitor(config, ask_status=lambda: None)
    monkeypatch.setattr(monitor.clock, "now_ms", lambda: NOW)
    monitor.started_ms = NOW - 3 * HOUR_MS  # the daemon runs since 2.5 hours before
    this_hour = NOW // HOUR_MS * HOUR_MS
    ledger = Ledger()
    ledger.exported = {("BTC_USDT", this_hour - HOUR_MS)}
    calendar = monitor.calendar(["BTC_USDT", "ETH_USDT"], ledger)
    assert calendar["hours"][-1] == this_hour and len(calendar["hours"]) == 24
    assert calendar["symbols"]["BTC_USDT"][-3:] == ["missing", "verified", "pending"]
    assert calendar["symbols"]["ETH_USDT"][-5:] == ["none", "missing", "missing", "missing",
                                                    "pending"]

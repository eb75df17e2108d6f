"""The gap ledger on real parts: the simulator, ClickHouse and `mexc collect` / `mexc run`.
Every stretch without a live subscription becomes one record with the right reason and
bounds: the last data row stored before it and the first one after."""
import collections
import json
import os
import signal
import time

import pytest

from core.channels import deal_without_id
from core.process import free_port
from core.vocabulary import (GAP_COLLECTOR_CRASH, GAP_COLLECTOR_RESTART, GAP_DAEMON_RESTART,
                             GAP_DISCONNECT, GAP_EXCHANGE_ERROR, GAP_STALL, GAP_TOR_RESTART)
from mexc.simulator import MexcSimulator, text_frame
from exporter.exporter import Exporter
from tests.conftest import wait_for
from tests.test_collector import microsocks, self_signed_tls, start_collector
from tests.test_exporter import H, SetClock, make_config
from tests.test_history import MINUTE, Clock
from tests.test_supervisor import Daemon
from tests.test_tor import TorDaemon

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def sim():
    with MexcSimulator(rate=6.0) as simulator:  # about 12 trades/s: a REST page is 8 s
        yield simulator


def assert_bounds(env, gap):
    """start and end are stored data rows, and the only rows stored between them are the
    trades backfill brought."""
    with env.store() as store:
        rows = [(ts, mt) for ts, mt, _m, _rts in store.rows("btc_current") if mt != "dl"]
    times = {ts for ts, _mt in rows}
    assert gap.start_ms in times and gap.end_ms in times, gap
    inside = [mt for ts, mt in rows if gap.start_ms < ts < gap.end_ms]
    assert set(inside) <= {"d"} and len(inside) <= gap.backfilled, (gap, len(inside))
    assert gap.start_ms < gap.end_ms


def assert_trades_once(env, sim, gap):
    """Every trade the simulator's market made inside the gap is stored exactly once: the
    edges by the WebSocket, the rest by backfill."""
    truth = collections.Counter(trade.rest_row for trade in sim.trades("BTC_USDT", gap.start_ms,
                                                                  gap.end_ms))

    def stored():
        with env.store() as store:
            # the WebSocket's rows carry the trade id, the REST answer's do not
            return collections.Counter((ts, mt, deal_without_id(m))
                                       for ts, mt, m, _rts in store.rows("btc_current")
                                       if mt == "d" and gap.start_ms <= ts <= gap.end_ms)
    wait_for(lambda: sum(stored().values()) >= sum(truth.values()), 20, "backfilled rows stored")
    assert stored() == truth
    assert gap.covered


def wait_gaps(env, n, what):
    return wait_for(lambda: len(env.gaps()) >= n and env.gaps(), 30, what)


def rows_after(env, sim, n):
    before = env.count()
    wait_for(lambda: env.count() >= before + n, 30, f"{n} more rows stored")


@pytest.mark.slow  # seconds of sockets or a daemon: full suite only, the quick loop stays under a minute (issue 27)
@pytest.mark.quick_on_one_clickhouse  # the collector's logic; the ledger's SQL: test_gaps_export
def test_forced_disconnect_is_one_record_with_its_close(env, sim):
    proc = start_collector(env, sim)
    rows_after(env, sim, 30)
    sim.force_disconnect()
    wait_for(lambda: sim.total_connections >= 2, 20, "a reconnect")
    [gap] = wait_gaps(env, 1, "the disconnect's record")
    assert gap.reason == GAP_DISCONNECT and gap.symbol == "BTC_USDT"
    assert_bounds(env, gap)
    assert_trades_once(env, sim, gap)
    assert proc.stop() == 0
    assert "gap recorded reason=disconnect" in proc.log()
    assert len(env.gaps()) == 1  # the first start had nothing stored before: no gap


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_an_exchange_error_before_the_close_names_the_gap(env, sim):
    proc = start_collector(env, sim)
    rows_after(env, sim, 30)
    assert sim.send_rs_error("more than 60 seconds no response, close the channel")
    wait_for(lambda: "exchange error" in proc.log(), 10, "the rs.error logged")
    sim.force_disconnect()
    [gap] = wait_gaps(env, 1, "the record")
    assert gap.reason == GAP_EXCHANGE_ERROR and "no response" in gap.detail
    assert_bounds(env, gap)
    assert_trades_once(env, sim, gap)
    assert proc.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_stall_is_a_gap_although_the_socket_stays(env, sim):
    proc = start_collector(env, sim, exchange={"silent_alarm": 1.0})
    rows_after(env, sim, 30)
    sim.stall(2.0)
    [gap] = wait_gaps(env, 1, "the stall's record")
    assert gap.reason == GAP_STALL
    assert sim.total_connections == 1
    assert_bounds(env, gap)
    # the path froze and then delivered late: the record's exchange-time bounds are those
    # of the frames on either side, and its detail says how long nothing came
    assert float(gap.detail.split()[-1].rstrip("s")) >= 1.0, gap.detail
    assert_trades_once(env, sim, gap)
    assert proc.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_a_gap_closed_by_a_run_killed_before_it_could_record_it_is_recorded_next(env, sim):
    """Run 2 starts while ClickHouse is away (the soak's case: a collector restarted just as
    an outage begins), so its start gap closes but cannot be recorded, and it is SIGKILLed.
    Its gap waits in the journal beside the spool; run 3 records it and then its own."""
    first = start_collector(env, sim)
    rows_after(env, sim, 30)
    assert first.stop() == 0
    with env.store() as store:
        last_of_first = store.newest_table_ms("btc", 2 ** 62)
    away = env.write_config(sim.url, clickhouse={"port": free_port(), "http_port": free_port()})
    second = env.mexc("collect", "--config", away, "--symbol", "BTC_USDT", name="second")
    journal = env.tmp / "state" / "spool" / "btc.gaps"
    wait_for(lambda: journal.exists() and json.loads(journal.read_text()), 20, "a journaled gap")
    wait_for(lambda: "moved to spool" in second.log(), 20, "rows spooled")
    second.kill()
    [kept] = json.loads(journal.read_text())
    assert kept["start_ms"] is None and kept["reason"] == GAP_COLLECTOR_RESTART
    third = env.mexc("collect", "--config", env.write_config(sim.url), "--symbol", "BTC_USDT",
                     name="third")
    first_gap, second_gap = wait_for(lambda: len(env.gaps()) >= 2 and sorted(
        env.gaps(), key=lambda g: g.start_ms), 30, "both records")
    assert "recording them first" in third.log()
    assert first_gap.start_ms == last_of_first and first_gap.end_ms == kept["end_ms"]
    assert first_gap.end_ms <= second_gap.start_ms < second_gap.end_ms
    assert json.loads(journal.read_text()) == []
    assert third.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_gaps_closed_while_clickhouse_is_away_keep_their_rest_answer_across_a_restart(
        env, own_clickhouse):
    """Two gaps close while ClickHouse is away; the collector is stopped before it could
    record them and starts again once the market has made more than a REST page of trades.
    The answers taken when the gaps closed (the second while the worker waited on the
    first) were kept in the journal: both gaps are covered and their trades stored once.
    (An answer asked for at the restart no longer reached back: the soak's seed 23.)"""
    env.clickhouse = own_clickhouse
    journal = env.tmp / "state" / "spool" / "btc.gaps"

    def journaled():
        return json.loads(journal.read_text()) if journal.exists() else []

    def requests():
        return sum(sim.rest_requests.values())

    with MexcSimulator(rate=20.0) as sim:  # about 40 trades/s: a REST page is 2.5 s
        first = start_collector(env, sim)
        rows_after(env, sim, 30)
        wait_for(lambda: journal.exists() and journaled() == [], 20, "the start settled")
        own_clickhouse.stop()
        for n in (1, 2):
            asked = requests()
            sim.force_disconnect()
            wait_for(lambda: len(journaled()) == n and requests() > asked, 20,
                     f"gap {n} closed and the REST API asked")
        assert first.stop() == 0
        closed_ms = max(e["end_ms"] for e in journaled())
        wait_for(lambda: len(sim.trades("BTC_USDT", since_ms=closed_ms)) > 200, 20,
                 "two REST pages of trades made since")
        own_clickhouse.start()
        second = start_collector(env, sim)
        gaps = wait_for(lambda: len(env.gaps()) >= 3 and env.gaps(), 30,
                        "both records and the restart's")
        disconnects = [g for g in gaps if g.reason == GAP_DISCONNECT]
        assert len(disconnects) == 2, gaps
        for gap in disconnects:
            assert_trades_once(env, sim, gap)
        assert second.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_a_gap_recorded_by_a_run_killed_before_clearing_its_journal_is_recorded_once(env, sim):
    """Run 2 records its start gap and is killed before the journal loses it (put back here,
    as that kill would leave it); run 3 finds the record in the ledger and writes no second."""
    first = start_collector(env, sim)
    rows_after(env, sim, 30)
    assert first.stop() == 0
    config = env.write_config(sim.url)
    second = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT", name="second")
    [gap] = wait_gaps(env, 1, "the second start's record")
    second.kill()
    journal = env.tmp / "state" / "spool" / "btc.gaps"
    journal.write_text(json.dumps([{"start_ms": None, "reason": gap.reason,
                                    "detail": gap.detail, "end_ms": gap.end_ms}]))
    third = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT", name="third")
    wait_for(lambda: len(env.gaps()) >= 2, 30, "the third start's own record")
    assert "gap already recorded" in third.log()
    assert [g.end_ms for g in env.gaps()].count(gap.end_ms) == 1
    assert len(env.gaps()) == 2
    assert json.loads(journal.read_text()) == []
    assert third.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_a_gap_open_at_the_stop_is_recorded_and_the_next_start_begins_at_its_end(env):
    """A collector stopped while a gap is open (the soak's end: the market gone; here the
    exchange itself) records it up to the stop, not left to a next start that may never
    come; the next start's gap begins where it ends (a symbol's gaps do not overlap)."""
    with MexcSimulator(rate=6.0) as sim:
        first = start_collector(env, sim)
        rows_after(env, sim, 30)
    wait_for(lambda: "gap opened reason=disconnect" in first.log(), 20, "the gap opened")
    assert first.stop() == 0
    [gap] = wait_gaps(env, 1, "the record made at the stop")
    assert gap.reason == GAP_DISCONNECT and gap.detail.endswith("open at the stop"), gap
    with env.store() as store:
        assert gap.start_ms == store.newest_table_ms("btc", 2 ** 62)
    assert gap.start_ms < gap.end_ms <= time.time() * 1000
    with MexcSimulator(rate=6.0) as sim:
        second = start_collector(env, sim)
        first_gap, start_gap = wait_for(lambda: len(env.gaps()) >= 2 and sorted(
            env.gaps(), key=lambda g: g.start_ms), 30, "the start's record")
        assert first_gap == gap and start_gap.reason == GAP_COLLECTOR_RESTART
        assert start_gap.start_ms == gap.end_ms < start_gap.end_ms
        assert second.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_a_start_after_the_last_rows_were_exported_counts_from_the_file(env):
    """The rows stored last are in an exported hour's file only (the exporter ran while the
    collector was down, as it does at a daemon's start): the gap starts at the file's last
    row, not at its hour's start, which would claim 40 minutes of rows the file holds."""
    clock = Clock(H - 20 * MINUTE)
    with MexcSimulator(rate=0, event_clock=clock) as sim:
        config = env.write_config(sim.url, exchange={"backfill": False})
        first = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT", name="first")
        wait_for(lambda: sim.streaming_to("BTC_USDT"), 20, "the first run subscribed")
        sim.send_frames("BTC_USDT", 60)
        sent = sim.expected_rows("BTC_USDT")
        wait_for(lambda: env.count() >= len(sent), 20, "the first run's rows stored")
        assert first.stop() == 0
        last_row = max(ts for ts, mt, _m in sent if mt != "dl")
        ok, files, _ = Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
        assert ok and len(files) == 1 and env.count() == 0  # the rows are in the file only
        clock.now = H + 5 * MINUTE
        second = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT", name="second")
        wait_for(lambda: sim.streaming_to("BTC_USDT"), 20, "the second run subscribed")
        sim.send_frames("BTC_USDT", 10)
        [gap] = wait_gaps(env, 1, "the second start's record")
        assert second.stop() == 0
    assert gap.reason == GAP_COLLECTOR_RESTART
    assert gap.start_ms == last_row and gap.end_ms >= H + 5 * MINUTE


@pytest.mark.slow
def test_collector_sigkill_is_a_crash_from_the_last_stored_row(env, sim):
    daemon = Daemon(env, sim, symbols=["BTC_USDT"])
    daemon.wait_flowing(["collector-btc"])
    rows_after(env, sim, 30)
    os.kill(daemon.collectors()["collector-btc"]["pid"], signal.SIGKILL)
    [gap] = wait_gaps(env, 1, "the crash's record")
    assert gap.reason == GAP_COLLECTOR_CRASH and "SIGKILL" in gap.detail
    assert_bounds(env, gap)
    assert_trades_once(env, sim, gap)
    assert daemon.proc.stop(15) == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_supervisor_sigkill_is_a_daemon_restart(env, sim):
    daemon = Daemon(env, sim, symbols=["BTC_USDT"])
    daemon.wait_flowing(["collector-btc"])
    rows_after(env, sim, 30)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    daemon.proc = env.mexc("run", "--config", daemon.config, name="daemon")
    [gap] = wait_gaps(env, 1, "the daemon restart's record")
    assert gap.reason == GAP_DAEMON_RESTART
    assert_bounds(env, gap)
    assert_trades_once(env, sim, gap)
    assert daemon.proc.stop(15) == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_tor_sigkill_is_a_tor_restart(env, sim, network):
    daemon = TorDaemon(env, sim, network, ["BTC_USDT"])
    wait_for(lambda: daemon.exits(["collector-btc"]), 90, "btc's exit")
    rows_after(env, sim, 20)
    os.kill(daemon.child("tor-btc")["pid"], signal.SIGKILL)
    [gap] = wait_gaps(env, 1, "the tor restart's record")
    assert gap.reason == GAP_TOR_RESTART and "SIGKILL" in gap.detail
    assert_bounds(env, gap)
    assert_trades_once(env, sim, gap)
    daemon.check_loopback()
    assert daemon.proc.stop(20) == 0


@pytest.mark.slow  # the quick loop backfills a gap in test_forced_disconnect_is_one_record...
def test_a_gap_longer_than_the_rest_window_is_not_covered(env, sim):
    proc = start_collector(env, sim)
    rows_after(env, sim, 30)
    assert proc.stop() == 0
    made = sim.trade("BTC_USDT", 150)  # nobody listens: more than one REST page
    proc = start_collector(env, sim)
    [gap] = wait_gaps(env, 1, "the restart's record")
    assert gap.reason == GAP_COLLECTOR_RESTART and not gap.covered
    assert gap.start_ms < made[0].t and made[-1].t < gap.end_ms
    truth = [trade.rest_row for trade in sim.trades("BTC_USDT", gap.start_ms + 1, gap.end_ms - 1)]
    with env.store() as store:
        inside = collections.Counter((ts, mt, m) for ts, mt, m, _rts in store.rows("btc_current")
                                     if mt == "d" and gap.start_ms < ts < gap.end_ms)
    assert 0 < gap.backfilled <= 100 and sum(inside.values()) == gap.backfilled
    assert inside == collections.Counter(truth[-gap.backfilled:])  # the newest, each once
    assert proc.stop() == 0


@pytest.mark.quick_on_one_clickhouse  # the collector's logic; the ledger's SQL: test_gaps_export
def test_a_stale_depth_snapshot_is_caught_and_kept_out_of_the_book(env, sim):
    proc = start_collector(env, sim)
    rows_after(env, sim, 30)
    stale = ('{"channel":"push.depth.full","symbol":"BTC_USDT","ts":%d,"data":{"asks":[[2,1]],'
             '"bids":[[1,1]],"version":7}}' % (sim.trades("BTC_USDT")[-1].t + 1))
    assert sim.send_prepared("BTC_USDT", text_frame(stale))
    wait_for(lambda: "stale version 7, not newer than" in proc.log(), 20,
             "the stale snapshot logged")
    assert proc.stop() == 0
    rows = env.rows()
    assert [mt for _ts, mt, m in rows if m == stale] == ["dl"]
    assert not [m for _ts, mt, m in rows if mt == "dp" and m == "[1,1]|[2,1]"]


@pytest.mark.slow  # the quick loop has test_wss_through_a_real_socks5_proxy and a backfill
@pytest.mark.one_clickhouse  # the collector's logic; the ledger's SQL runs on both above
def test_backfill_over_https_through_a_socks5_proxy(env, tmp_path):
    """The REST request takes the WebSocket's path: the proxy (remote DNS), our TLS, SNI."""
    context, cert = self_signed_tls(tmp_path)
    with microsocks() as (socks_port, _output):
        with MexcSimulator(rate=6.0, ssl_context=context) as sim:
            config = env.write_config(f"wss://localhost:{sim.port}/edge",
                                      exchange={"ca_file": cert})
            proc = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT",
                            "--socks", f"127.0.0.1:{socks_port}")
            rows_after(env, sim, 30)
            sim.force_disconnect()
            [gap] = wait_gaps(env, 1, "the disconnect's record")
            assert_trades_once(env, sim, gap)
            assert proc.stop() == 0
    assert "backfill request failed" not in proc.log()

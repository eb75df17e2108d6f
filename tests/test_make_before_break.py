"""Make before break (collector/overlap.py, Collector._replace): a replaced connection is
closed only once its successor delivers, every event is stored once, and the overlap leaves no
gap in the ledger.  The collector as users run it, against the simulator (and a private Tor
network), a real ClickHouse; SIGUSR1 is what the supervisor's exit guard sends."""
import collections
import os
import signal

import pytest

from collector.overlap import NEW, OLD, Overlap
from core.vocabulary import GAP_DISCONNECT
from mexc.simulator import MexcSimulator
from tests.conftest import wait_for
from tests.test_collector import start_collector

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_clickhouse]
SYMBOL = "BTC_USDT"


def deal(t, m="1|2|1"):
    return (t, "d", m, 0)


def test_each_event_is_stored_once_whichever_connection_brings_it_first():
    overlap = Overlap()
    assert overlap.admit(OLD, "deal", [deal(1), deal(2)]) == [deal(1), deal(2)]
    assert overlap.admit(NEW, "deal", [deal(2), deal(3)]) == [deal(3)]  # 2: the old one's
    assert overlap.admit(OLD, "deal", [deal(3), deal(4)]) == [deal(4)]
    assert overlap.duplicates == 2 and overlap.joined == {"deal"}
    # two equal trades in one millisecond: stored twice, whoever brings them
    assert overlap.admit(NEW, "deal", [deal(5), deal(5)]) == [deal(5), deal(5)]
    assert overlap.admit(OLD, "deal", [deal(5)]) == []
    assert overlap.admit(OLD, "deal", [deal(5), deal(5)]) == [deal(5)]  # a third one


def test_the_old_connection_goes_once_the_new_one_covers_every_channel():
    overlap = Overlap()
    overlap.admit(OLD, "ticker", [(1, "t", "x", 0)])
    overlap.admit(NEW, "deal", [deal(7)])
    assert not overlap.covered()  # the old one may still hold deals before 7; no ticker yet
    overlap.admit(OLD, "deal", [deal(6), deal(7)])
    assert not overlap.covered()  # deals joined; the ticker only on the old one
    overlap.admit(NEW, "ticker", [(2, "t", "y", 0)])
    assert not overlap.covered()
    overlap.admit(OLD, "ticker", [(2, "t", "y", 0)])
    assert overlap.covered()


def test_a_new_connection_behind_the_old_one_brings_nothing_twice_after_the_handover():
    overlap = Overlap()
    overlap.admit(OLD, "deal", [deal(1), deal(2), deal(3)])
    assert overlap.admit(NEW, "deal", [deal(2)]) == []  # joined; the old one is ahead
    assert overlap.covered()
    overlap.close(OLD)  # the collector closes the old one
    assert not overlap.finished()
    assert overlap.admit(NEW, "deal", [deal(3)]) == []  # what the old one brought last
    assert overlap.admit(NEW, "deal", [deal(4)]) == [deal(4)]
    assert overlap.finished()


def test_an_old_connection_left_alone_brings_nothing_twice_that_the_lost_new_one_brought():
    """The new connection is lost during the handover, ahead of the old one (which was
    stalled): what the old one then brings late was stored already."""
    overlap = Overlap()
    overlap.admit(OLD, "deal", [deal(1)])
    assert overlap.admit(NEW, "deal", [deal(1), deal(2), deal(3)]) == [deal(2), deal(3)]
    overlap.close(NEW)
    assert overlap.survivor == OLD and not overlap.finished()
    assert overlap.admit(OLD, "deal", [deal(2), deal(3)]) == []
    assert not overlap.finished()
    assert overlap.admit(OLD, "deal", [deal(4)]) == [deal(4)]
    assert overlap.finished()


def stored_rows(env):
    with env.store() as store:
        return [(ts, mt, m) for ts, mt, m, _rts in store.rows("btc_current")]


def assert_every_event_once(env, sim, since_ms, until_ms):
    """The trades the simulator's market made in [since_ms, until_ms], and the ticker and
    depth rows it sent (on either connection), are stored exactly once."""
    truth = collections.Counter(t.row for t in sim.trades(SYMBOL, since_ms, until_ms))
    truth.update(set(r for r in sim.expected_rows(SYMBOL)
                     if r[1] in ("t", "dp") and since_ms <= r[0] <= until_ms))

    def stored():
        return collections.Counter(r for r in stored_rows(env)
                                   if r[1] != "dl" and since_ms <= r[0] <= until_ms)
    wait_for(lambda: sum(stored().values()) >= sum(truth.values()), 20, "the events stored")
    assert stored() == truth
    return sum(n for r, n in truth.items() if r[1] == "d")


def replace_and_wait(proc, sim, n):
    """SIGUSR1, then the n-th handover done."""
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for(lambda: proc.log().count("handover done") >= n, 20, f"handover {n}")
    wait_for(lambda: sim.connections == 1, 10, "the old connection closed")


@pytest.mark.slow
def test_planned_replacements_leave_no_gap_and_no_duplicate(env):
    with MexcSimulator(rate=3.0) as sim:
        proc = start_collector(env, sim)
        wait_for(lambda: env.count() > 0, 20, "rows stored")
        wait_for(lambda: any(r[1] == "d" for r in stored_rows(env)), 20, "a trade stored")
        since_ms = min(r[0] for r in stored_rows(env) if r[1] == "d")
        for n in range(1, 4):
            replace_and_wait(proc, sim, n)
        until_ms = sim.trades(SYMBOL)[-1].t
        wait_for(lambda: max(r[0] for r in stored_rows(env) if r[1] == "d") > until_ms, 20,
                 "trades after the last handover")
        trades = assert_every_event_once(env, sim, since_ms, until_ms)
        assert trades > 10 and sim.total_connections == 4
        assert env.gaps() == []
        assert "disconnected" not in proc.log()
        assert proc.stop() == 0


@pytest.mark.slow
def test_a_move_on_a_quiet_market_is_done_after_overlap_max(env):
    """A market that makes nothing: neither connection brings data, so the handover cannot
    wait for the new one to cover the old one; after overlap_max the live new one is kept (the
    exit guard's move must complete, or the collector stays on a shared exit)."""
    with MexcSimulator(rate=3.0) as sim:
        proc = start_collector(env, sim, exchange={"overlap_max": 2.0})
        wait_for(lambda: env.count() > 0, 20, "rows stored")
        sim.stop_data()
        rows = env.count()
        replace_and_wait(proc, sim, 1)
        assert "a quiet market: neither brought data" in proc.log()
        assert sim.total_connections == 2
        assert "connection lost during the handover" not in proc.log()
        sim.trade(SYMBOL, 3)
        wait_for(lambda: env.count() >= rows + 3, 20, "trades on the new connection")
        assert env.gaps() == []
        assert proc.stop() == 0


@pytest.mark.slow
def test_a_replacement_lost_during_the_handover_leaves_the_old_connection_reading(env):
    """The server drops the new connection before it covers the old one (the market is
    quiet, overlap_max far off): the collector reads on with the old one, with no gap and
    without crashing (it did: the handover was gone when it next looked at it)."""
    with MexcSimulator(rate=3.0) as sim:
        proc = start_collector(env, sim, exchange={"overlap_max": 60.0})
        wait_for(lambda: env.count() > 0, 20, "rows stored")
        sim.stop_data()
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: sim.connections == 2 and len(sim.subscriptions) >= 6, 20,
                 "the replacement subscribed")
        assert sim.drop_newest(SYMBOL)
        wait_for(lambda: "new connection lost during the handover" in proc.log(), 20,
                 "the replacement lost")
        rows = env.count()
        sim.trade(SYMBOL, 3)
        wait_for(lambda: env.count() >= rows + 3, 20, "trades on the old connection")
        assert proc.popen.poll() is None and "Traceback" not in proc.log()
        assert sim.total_connections == 2 and env.gaps() == []
        assert proc.stop() == 0


@pytest.mark.slow
def test_without_make_before_break_a_replacement_is_a_drop_and_a_gap(env):
    """exchange.make_before_break = false: SIGUSR1 drops the connection, then dials; the
    stretch between is a ledger gap (what handover_bench measures as before)."""
    with MexcSimulator(rate=3.0) as sim:
        proc = start_collector(env, sim, exchange={"make_before_break": False})
        wait_for(lambda: env.count() > 0, 20, "rows stored")
        os.kill(proc.pid, signal.SIGUSR1)
        [gap] = wait_for(lambda: env.gaps(), 30, "the drop's record")
        assert gap.reason == GAP_DISCONNECT and gap.detail.startswith("Replaced: asked by SIGUSR1")
        assert sim.total_connections == 2 and "handover" not in proc.log()
        assert proc.stop() == 0


@pytest.mark.slow
def test_an_exit_guard_move_through_tor_leaves_no_gap(env, network, tmp_path):
    """The exit guard's move (a NEWNYM and SIGUSR1): the new connection goes through a fresh
    circuit of the collector's tor, the old one is closed once it delivers."""
    client = network.start_client(str(tmp_path / "tor-client")).wait_bootstrapped()
    with MexcSimulator(rate=3.0) as sim:
        config = env.write_config(sim.url, exchange={"connect_timeout": 30.0})
        proc = env.mexc("collect", "--config", config, "--symbol", SYMBOL, "--socks",
                        f"127.0.0.1:{client.socks_port}", name="collector")
        wait_for(lambda: env.count() > 0, 60, "rows stored")
        wait_for(lambda: any(r[1] == "d" for r in stored_rows(env)), 60, "a trade stored")
        since_ms = min(r[0] for r in stored_rows(env) if r[1] == "d")
        with client.controller() as control:
            control.command("SIGNAL NEWNYM")
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: "handover done" in proc.log(), 60, "the handover")
        assert "through a fresh circuit" in proc.log()
        until_ms = sim.trades(SYMBOL)[-1].t
        wait_for(lambda: max(r[0] for r in stored_rows(env) if r[1] == "d") > until_ms, 20,
                 "trades after the handover")
        assert_every_event_once(env, sim, since_ms, until_ms)
        wait_for(lambda: sim.connections == 1, 10, "the old connection closed")
        assert sim.total_connections == 2
        assert env.gaps() == []
        network.assert_loopback_only(extra_pids=[client.pid])
        assert proc.stop() == 0
    client.stop()

"""The gap ledger on real parts: the simulator, ClickHouse and `mexc collect` / `mexc run`.
Every stretch without a live subscription becomes one record with the right reason and
bounds: the last data row stored before it and the first one after."""
import pytest

from core.vocabulary import GAP_DISCONNECT, GAP_STALL
from mexc.simulator import MexcSimulator
from tests.conftest import wait_for
from tests.test_collector import start_collector

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def sim():
    with MexcSimulator(rate=60.0) as simulator:
        yield simulator


def recorded_gaps(env, name="btc"):
    try:
        with env.store() as store:
            return store.gaps(name)
    except Exception as e:
        if "doesn't exist" in str(e) or "Code: 60" in str(e):
            return []
        raise


def data_times(env, table="btc_current"):
    """Exchange times (ms) of the stored data rows, oldest first."""
    with env.store() as store:
        return sorted(ts for ts, mt, _m, _rts in store.rows(table) if mt != "dl")


def assert_bounds(env, gap):
    """start and end are stored data rows, and no data row was stored between them."""
    times = data_times(env)
    assert gap.start_ms in times and gap.end_ms in times, (gap, times[:3], times[-3:])
    assert not [t for t in times if gap.start_ms < t < gap.end_ms]
    assert gap.start_ms < gap.end_ms


def wait_gaps(env, n, what):
    return wait_for(lambda: len(recorded_gaps(env)) >= n and recorded_gaps(env), 30, what)


def rows_after(env, sim, n):
    before = env.count()
    wait_for(lambda: env.count() >= before + n, 30, f"{n} more rows stored")


def test_forced_disconnect_is_one_record_with_its_close(env, sim):
    proc = start_collector(env, sim, exchange={"backfill": False})
    rows_after(env, sim, 50)
    sim.force_disconnect()
    wait_for(lambda: sim.total_connections >= 2, 20, "a reconnect")
    [gap] = wait_gaps(env, 1, "the disconnect's record")
    assert gap.reason == GAP_DISCONNECT and gap.symbol == "BTC_USDT"
    assert gap.backfilled == 0 and not gap.covered
    assert_bounds(env, gap)
    assert proc.stop() == 0
    assert "gap recorded reason=disconnect" in proc.log()
    assert len(recorded_gaps(env)) == 1  # the first start had nothing stored before: no gap


def test_stall_is_a_gap_although_the_socket_stays(env, sim):
    proc = start_collector(env, sim, exchange={"backfill": False, "silent_alarm": 1.0})
    rows_after(env, sim, 50)
    sim.stall(2.5)
    [gap] = wait_gaps(env, 1, "the stall's record")
    assert gap.reason == GAP_STALL
    assert sim.total_connections == 1
    assert_bounds(env, gap)
    assert gap.end_ms - gap.start_ms >= 1000
    assert proc.stop() == 0

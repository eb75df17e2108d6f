"""Restart bookkeeping of a supervised child: backoff, flapping, hangs (pure logic); and Forked,
the supervisor's fork of a collector or the exporter (real forks)."""
import gc
import os
import signal
import time

from core.vocabulary import (GAP_COLLECTOR_CRASH, GAP_COLLECTOR_RESTART, GAP_DAEMON_RESTART,
                             ChildId)
from supervisor.children import FLAP_EXITS, Child, Forked, describe_exit, start_reason
from tests.conftest import wait_for

BTC = ChildId("collector", "btc")

SUP = {"restart_min": 1.0, "restart_max": 60.0, "heartbeat_timeout": 10.0}


class FakeProcess:
    pids = iter(range(1000, 2000))

    def __init__(self):
        self.pid = next(self.pids)
        self.running = True
        self.signals = []
        self.exitcode = 1  # when it exits

    def alive(self):
        return self.running

    def exit_description(self):
        return describe_exit(self.exitcode)

    def signal(self, signum):
        self.signals.append(signum)


def crash_and_restart(child, now):
    child.process.running = False
    child.tick(now)
    assert child.state == "backoff"
    delay = child.next_start - now
    child.tick(child.next_start)
    assert child.state == "running"
    return delay


def test_backoff_doubles_and_resets_after_a_stable_run():
    child = Child(BTC, FakeProcess, SUP, symbol="BTC_USDT")
    child.start(0.0)
    now, delays = 100.0, []
    for _ in range(3):
        delays.append(crash_and_restart(child, now))
        now += 20  # crashes 20 s apart: not stable, not flapping (fewer than 5 in 60 s)
    assert delays == [1.0, 2.0, 4.0]
    assert child.restarts == 3
    now += 100  # a long stable run resets the backoff
    assert crash_and_restart(child, now) == 1.0


def test_a_collector_that_delivered_comes_back_at_restart_min():
    """Doubling is for children that cannot get going: a collector whose heartbeat said data
    came since its start is restarted at restart_min however often it is killed, until it
    flaps; one that exits before any data still doubles."""
    child = Child(BTC, FakeProcess, SUP, symbol="BTC_USDT")
    child.start(0.0)
    now, delays = 100.0, []
    for _ in range(3):
        child.heartbeat({"connected": True, "last_data_age_s": 0.1}, now - 1)
        delays.append(crash_and_restart(child, now))
        now += 20
    assert delays == [1.0, 1.0, 1.0]
    child.heartbeat({"connected": True, "last_data_age_s": None}, now - 1)  # none since start
    assert crash_and_restart(child, now) == 2.0  # doubling from restart_min again
    assert crash_and_restart(child, now + 20) == 4.0  # no heartbeat of this process at all


def test_flapping_waits_restart_max_and_never_gives_up():
    child = Child(BTC, FakeProcess, SUP)
    child.start(0.0)
    now, delays = 10.0, []
    for _ in range(FLAP_EXITS + 2):
        delays.append(crash_and_restart(child, now))
        now = child.started_at + 0.5
    assert delays[:FLAP_EXITS - 1] == [1.0, 2.0, 4.0, 8.0]
    assert all(d == SUP["restart_max"] for d in delays[FLAP_EXITS - 1:])
    assert child.state == "running" and child.restarts == FLAP_EXITS + 2


def test_a_hung_child_is_killed_then_restarted():
    child = Child(BTC, FakeProcess, SUP)
    child.start(0.0)
    child.heartbeat({"rows": {"d": 0}}, 1.0)
    child.tick(5.0)
    assert child.process.signals == []
    child.tick(11.5)
    assert child.process.signals == [signal.SIGKILL] and child.state == "stopping"
    child.process.running = False
    child.tick(12.0)
    assert child.state == "backoff"


def test_a_child_just_started_has_three_timeouts_for_its_first_heartbeat():
    """The exporter imports pyarrow before its first heartbeat: on a loaded machine that took
    more than the 6-s heartbeat_timeout of the cluster soak, which killed it as hung."""
    child = Child(BTC, FakeProcess, SUP)
    child.start(0.0)
    child.tick(25.0)  # silent since its start, within START_GRACE (3) timeouts
    assert child.process.signals == [] and child.state == "running"
    child.heartbeat({}, 26.0)
    child.tick(35.0)
    assert child.process.signals == []
    child.tick(36.5)  # once it has beaten, one timeout as before
    assert child.process.signals == [signal.SIGKILL] and child.state == "stopping"
    child.process.running = False
    child.tick(37.0)
    child.tick(child.next_start)  # the next start has the grace again
    assert child.state == "running"
    child.tick(child.started_at + 29.0)
    assert child.state == "running"
    child.tick(child.started_at + 30.5)  # never beat: hung after 3 timeouts
    assert child.process.signals == [signal.SIGKILL] and child.state == "stopping"


def test_rates_come_from_successive_heartbeats():
    child = Child(BTC, FakeProcess, SUP)
    child.start(0.0)
    child.heartbeat({"rows": {"t": 0, "d": 10}}, 1.0)
    child.heartbeat({"rows": {"t": 2, "d": 30}}, 3.0)
    assert child.rates == {"t": 1.0, "d": 10.0}


def test_operator_restart_has_no_backoff():
    child = Child(BTC, FakeProcess, SUP)
    child.start(0.0)
    child.restart_now(5.0)
    assert child.process.signals == [signal.SIGTERM]
    child.process.running = False
    child.tick(5.1)
    assert child.state == "running" and child.restarts == 1 and not child.exit_times


def test_start_reason_names_the_gap_a_start_ends():
    reasons = []
    child = Child(BTC, lambda: (reasons.append(start_reason(child)), FakeProcess())[1], SUP)
    child.start(0.0)  # the daemon's first start of it
    crash_and_restart(child, 10.0)  # exit code 1
    child.process.exitcode = 0
    crash_and_restart(child, 20.0)
    exits = []
    child.on_exit = exits.append
    child.process.exitcode = -signal.SIGKILL
    crash_and_restart(child, 30.0)
    assert [reason for reason, _detail in reasons] == [
        GAP_DAEMON_RESTART, GAP_COLLECTOR_CRASH, GAP_COLLECTOR_RESTART, GAP_COLLECTOR_CRASH]
    assert reasons[-1][1].endswith("killed by SIGKILL") and exits == [reasons[-1][1]]


def exit_of(forked: Forked) -> str:
    wait_for(lambda: not forked.alive(), 10, "the forked child's exit")
    return forked.exit_description()


def test_a_forked_child_ends_in_its_own_code_and_never_returns_into_the_supervisor():
    assert exit_of(Forked(os._exit, (3,))) == "exit code 3"
    assert exit_of(Forked(int, ("not a number",))) == "exit code 1"  # raised
    assert exit_of(Forked(len, ((),))) == "exit code 1"  # returned: a failure too
    sleeper = Forked(time.sleep, (60,))
    assert sleeper.alive()
    sleeper.signal(signal.SIGKILL)
    assert exit_of(sleeper) == "killed by SIGKILL"
    assert gc.get_freeze_count() > 0  # the supervisor's objects stay frozen
    gc.unfreeze()  # (this test's process is no supervisor)

"""A collector on a crowded host: a silence its own process caused (it could not run, so it
sent no ping) is not held against the socket, and the host's dials (starts, reconnects,
replacements) go out at supervisor.start_rate, however many sockets are judged at once
(collector/pacing.py).  The collectors as users run them, against the simulator and a real
ClickHouse; the pure parts below."""
import os
import re
import signal
import subprocess
import sys
import time
import types
from datetime import datetime

import pytest

from collector.collector import DeadSocket
from collector.pacing import MAX_LEAD, SLACK, DialPacer, Starvation
from core.vocabulary import COLLECTOR, ChildId
from mexc.simulator import MexcSimulator
from supervisor.children import STILL_FOR, Child, process_state
from tests.conftest import wait_for

STOPPED_FOR = 8.0  # s the collector is frozen: beyond exchange.dead_after (5 s)


def test_starvation_counts_late_wakeups_and_long_work_after_a_frame_only():
    s = Starvation()
    s.after_wait(planned_end=10.0, now=10.01)  # on time: the ordinary cost of a wake-up
    s.before_wait(10.02)
    s.after_wait(planned_end=11.0, now=14.0)  # woke 3 s late
    s.before_wait(16.0)  # 2 s of work (a dial) before the next wait
    s.after_wait(planned_end=17.0, now=17.0)
    assert s.total == pytest.approx(5.0)
    assert s.since(10.5) == pytest.approx(5.0)  # a frame before both episodes
    assert s.since(13.0) == pytest.approx(2.0)  # read during the late wake-up: only the work
    assert s.since(16.5) == 0.0
    s.begin()  # a new connection: the time between the two is no one's silence
    s.before_wait(100.0)
    assert s.total == pytest.approx(5.0) and SLACK < 2.0


def test_dials_take_slots_one_interval_apart_across_collectors(tmp_path):
    path = str(tmp_path / "dials.pace")
    one, two = DialPacer(path, 4.0), DialPacer(path, 4.0)  # two collectors, one host
    assert one.reserve(100.0) == 100.0
    assert two.reserve(100.0) == 100.25
    assert one.reserve(100.1) == 100.5
    assert two.reserve(200.0) == 200.0  # the queue emptied meanwhile: at once
    # a slot far ahead was written before a reboot (the monotonic clock began again)
    assert one.reserve(200.0 - MAX_LEAD - 1) == 200.0 - MAX_LEAD - 1
    # no runtime_dir (a collector run alone): never waits
    assert DialPacer(str(tmp_path / "none" / "dials.pace"), 1.0).reserve(5.0) == 5.0


@pytest.mark.slow
@pytest.mark.one_clickhouse
def test_a_collector_that_could_not_run_does_not_judge_its_socket_dead(env):
    """A quiet market (no data, only pongs) and the collector frozen (SIGSTOP) for longer
    than dead_after: it sent no ping meanwhile, so no pong came.  Thawed, it pings again
    and keeps its socket; before, it took the silence for a dead socket and replaced it."""
    with MexcSimulator(rate=0) as sim:
        config = env.write_config(sim.url)
        proc = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT", name="collector")
        wait_for(lambda: len(sim.subscriptions) == 3 and sim.pings_received >= 1, 20,
                 "the subscriptions and a ping")
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(STOPPED_FOR)  # the fault's length, not a wait for state
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        pings = sim.pings_received
        wait_for(lambda: sim.pings_received >= pings + 2, 15, "two pings after the thaw")
        assert sim.total_connections == 1
        assert "suspect socket" not in proc.log() and "disconnected" not in proc.log()
        assert proc.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse
def test_sockets_judged_at_once_are_replaced_at_the_start_rate(env):
    """Four collectors of one host, every path frozen at once (as when the host starves or
    the exchange stalls): each judges its socket dead within the same second, and the
    replacements are dialled at supervisor.start_rate (2 a second here), not in a burst."""
    rate, symbols = 2.0, ["BTC_USDT", "ETH_USDT", "SOL_USDT", "XRP_USDT"]
    with MexcSimulator(rate=3.0) as sim:
        config = env.write_config(sim.url, symbols=symbols, supervisor={"start_rate": rate})
        os.makedirs(env.tmp / "run", exist_ok=True)  # the daemon makes it; collectors share it
        procs = [env.mexc("collect", "--config", config, "--symbol", s, name=s) for s in symbols]
        wait_for(lambda: sim.connections == len(symbols)
                 and all("confirmed" in p.log() for p in procs), 30, "every collector flowing")
        sim.stall_path(20.0)
        wait_for(lambda: sim.total_connections == 2 * len(symbols), 30, "every socket replaced")
        replaced = sorted(_connects(p.log())[1] for p in procs)
        # a connect is logged after its dial, whose length varies: one more can land in a
        # second's window than the slots hold (the bench's start-up figure says the same)
        assert max(sum(1 for t in replaced if c <= t < c + 1.0) for c in replaced) <= rate + 1
        assert replaced[-1] - replaced[0] >= (len(symbols) - 1) / rate - 0.1, replaced
        assert sum("replacement paced" in p.log() for p in procs) >= len(symbols) - 1
        for p in procs:
            assert p.stop() == 0


def _connects(log: str) -> list:
    """Times (s) of a collector's `connected url=` lines, oldest first."""
    return [datetime.strptime(m, "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            for m in re.findall(r"^(\S{23})Z? .* connected url=", log, re.M)]


def test_a_silence_is_judged_without_the_time_the_loop_could_not_run():
    from tests.test_stale_socket import judging_collector, pong  # a collector's judging parts
    collector, deal, now = judging_collector()  # data stale after 3.0 s of silence
    pong(collector, now)
    assert type(collector._verdict(now + 4.5)) is DeadSocket  # it ran: the data is overdue
    collector.starved.after_wait(planned_end=now + 1.0, now=now + 3.0)  # woke 2 s late
    assert collector._verdict(now + 4.5) is None
    assert collector._deadline(deal.last_data, 3.0) == pytest.approx(deal.last_data + 5.0)
    verdict = collector._verdict(now + 5.2)
    assert type(verdict) is DeadSocket and "2.0s this process could not run" in str(verdict)


def _pinned(code: str, nice: int) -> subprocess.Popen:
    """A Python process on CPU 0 only, at the given nice value; it prints a line when it
    runs `code`."""
    def prepare():
        os.sched_setaffinity(0, {0})
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    return subprocess.Popen([sys.executable, "-c", "print(flush=True)\n" + code],
                            stdout=subprocess.PIPE, preexec_fn=prepare)


def test_a_late_child_none_of_whose_threads_runs_is_hung_before_the_timeout():
    """Half heartbeat_timeout late: a child asleep for good and a SIGSTOPped one (no thread
    ran or waited for a CPU for STILL_FOR) are hung then; a busy one (its heartbeat thread
    kept from the GIL), and one that never beat yet (a start may wait on the disk), wait for
    the whole timeout as before."""
    def process(code):
        proc = subprocess.Popen([sys.executable, "-c", "print(flush=True)\n" + code],
                                stdout=subprocess.PIPE)
        proc.stdout.readline()  # started: its start-up is no part of what is measured
        return proc
    asleep, stopped, busy, starting = procs = [
        process("import time; time.sleep(60)"), process("while True: pass"),
        process("while True: pass"), process("import time; time.sleep(60)")]
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: process_state(f"/proc/{stopped.pid}") == "T", 10,
                 "the busy process stopped")
        children = []
        for proc in procs:
            child = Child(ChildId(COLLECTOR, str(proc.pid)), None,
                          {"heartbeat_timeout": 10.0, "restart_min": 1.0})
            child.process = types.SimpleNamespace(pid=proc.pid)
            child.last_heartbeat, child.beating = time.monotonic() - 5.5, proc is not starting
            assert not child._hung(time.monotonic())  # half the timeout late: threads read
            children.append(child)
        time.sleep(STILL_FOR + 0.2)  # the stillness's length, not a wait for state
        assert [child._hung(time.monotonic()) for child in children] == [True, True, False,
                                                                         False]
        assert [child.found_still for child in children] == [True, True, False, False]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # Python start-ups on one CPU of a loaded machine: 5-30 s
def test_a_child_starved_of_cpu_is_not_killed_as_hung_and_a_hung_one_is():
    """Two children silent past heartbeat_timeout: one runnable but kept off its CPU by a
    busier process of higher priority (a loaded host), one asleep for good (hung).  Only the
    hung one is judged hung; the starved one is judged again later."""
    starved = _pinned("while True: pass", 0)
    asleep = _pinned("import time; time.sleep(60)", 0)
    hog = None
    try:
        for proc in (starved, asleep):
            proc.stdout.readline()  # started: its start-up is no part of what is measured
        os.setpriority(os.PRIO_PROCESS, starved.pid, 19)  # now behind anyone on CPU 0
        hog = _pinned("while True: pass", -20)
        hog.stdout.readline()  # busy on CPU 0 from now on, until killed
        children = []
        for proc in (starved, asleep):
            child = Child(ChildId(COLLECTOR, str(proc.pid)), None,
                          {"heartbeat_timeout": 2.0, "restart_min": 1.0})
            child.process = types.SimpleNamespace(pid=proc.pid)
            child.last_heartbeat, child.beating = time.monotonic() - 1.5, True  # not new
            assert not child._hung(time.monotonic())  # half the timeout late: CPU wait read
            children.append(child)
        time.sleep(1.0)  # the starvation's length, not a wait for state
        assert [child._hung(time.monotonic()) for child in children] == [False, True]
    finally:
        for proc in (starved, asleep, hog):
            if proc is not None:
                proc.kill()
                proc.wait()

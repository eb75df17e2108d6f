"""Supervised children: what runs in a forked child, and each child's restart bookkeeping.

A child moves through named states; every move goes through Child._become, which logs it:

    WAITING --start--> RUNNING --exit--> BACKOFF --delay over--> RUNNING ...
    RUNNING --hung: SIGKILL--> STOPPING --exit--> BACKOFF
    RUNNING --stop or restart: SIGTERM--> STOPPING --exit--> STOPPED (stop) or BACKOFF
"""
import collections
import enum
import gc
import logging
import os
import signal
import sys
import traceback
from typing import Optional

from bus.sockets import ChildBus
from collector.collector import Collector  # imported before the fork: pages stay shared
from collector.spool import SpoolBusy
from core import log as logging_setup
from core.process import die_with_parent, set_name
from core.vocabulary import (EXPORTER, GAP_COLLECTOR_CRASH, GAP_COLLECTOR_RESTART,
                             GAP_DAEMON_RESTART)

log = logging.getLogger(__name__)

# A child up this long, or a collector that delivered market data since its start, has its
# restart backoff reset: its exit is no failure to get going, and each second a collector is
# down is a hole in its symbol's data.  Doubling is for children that cannot start; one that
# keeps exiting still waits restart_max once flapping (FLAP_EXITS within FLAP_WINDOW).
STABLE_AFTER = 60.0
# A child whose threads waited for a CPU more than this share of the time its heartbeat was
# late is starved (a loaded host), not hung: it is judged again later, not killed.
STARVED_SHARE = 0.5
# A child late with its heartbeat none of whose threads ran, or waited for a CPU, for this
# long since is hung without the rest of heartbeat_timeout: its heartbeat thread wakes at
# least once a second, so no CPU at all is a process stopped, frozen or deadlocked, never a
# busy or a starved one.  Each second sooner is a second less of its symbol's hole (a REST
# page reaches back 100 trades only).
STILL_FOR = 1.5
STILL_CPU = 0.001  # s of CPU that counts as none (a wake-up costs microseconds)
FLAP_WINDOW, FLAP_EXITS = 60.0, 5  # this many exits within the window: flapping
# A child just started has this many heartbeat timeouts for its first heartbeat: the exporter
# imports pyarrow and the export modules before it can send one (0.2 s of CPU alone, seconds
# on a loaded machine: a cluster soak's restarted exporters were killed at 6 s, 4 s into it)
START_GRACE = 3


class ChildState(str, enum.Enum):
    WAITING = "waiting"  # not started yet: a collector waits for its tor to bootstrap
    RUNNING = "running"
    STOPPING = "stopping"  # signalled; waiting for it to exit
    BACKOFF = "backoff"  # exited; starts again at next_start
    STOPPED = "stopped"  # exited and not wanted again (removed by a reload, shutting down)


def _become_child(tag: str, level: str, parent_pid: int) -> None:
    """First steps in a forked child: default signals, die with the supervisor, own log tag."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    die_with_parent(parent_pid)
    set_name(f"mexc-{tag}")
    logging_setup.setup(tag, level)


def collector_main(config, parent_pid: int, symbol, socks_port: Optional[int],
                   started_because: tuple) -> None:
    """Body of a forked collector process; with Tor, it connects through its tor's SocksPort.
    `started_because`: the (reason, detail) of the gap this start ends (start_reason())."""
    name = config.symbol(symbol).name
    _become_child(f"collector[{name}]", config.log["level"], parent_pid)
    bus = ChildBus(config.paths["runtime_dir"])
    socks_proxy = ("127.0.0.1", socks_port) if socks_port else None
    try:
        code = Collector(config, symbol, socks_proxy=socks_proxy, bus=bus,
                         started_because=started_because).run()
    except SpoolBusy as e:
        log.error("cannot start: %s", e)
        code = 1
    finally:
        bus.close()
    os._exit(code)


def exporter_main(config, parent_pid: int) -> None:
    """Body of the forked exporter process."""
    from exporter.exporter import Exporter  # after the fork: only this process needs pyarrow

    _become_child(EXPORTER, config.log["level"], parent_pid)
    bus = ChildBus(config.paths["runtime_dir"])
    try:
        code = Exporter(config, bus=bus).run()
    finally:
        bus.close()
    os._exit(code)


class ChildProcess:
    """A forked child of this process, by pid: alive(), exit_description(), signal()."""

    def __init__(self, pid: int):
        self.pid = pid
        self.exitcode = None

    def alive(self) -> bool:
        if self.exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere, status lost: gone (as subprocess has it)
                pid, status = self.pid, 0
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode is None

    def exit_description(self) -> str:
        return describe_exit(self.exitcode)

    def signal(self, signum) -> None:
        if self.alive():
            os.kill(self.pid, signum)


class Forked(ChildProcess):
    """A child forked from the supervisor, running `target(*args)` (which ends with os._exit()).

    The supervisor's memory stays shared with the child until either writes to a page, so:
    - everything the supervisor holds is frozen for the garbage collector before each fork, and
      stays frozen: the child's collections never walk those objects, and neither do the
      supervisor's own (which would rewrite every page a restarted collector still shares with
      it: 14 MiB private instead of 9 a minute after a restart).  A cycle frozen and dropped
      later is never freed: a few KB per symbol a reload removes.
    - only the young generations are collected first: a full collection frees holes all over
      shared pages, where the child's new objects then land, copying a page each (0.3 MiB).
    - a bare os.fork(): multiprocessing's start-up in the child made 0.1 MiB more private.
    Collectors are forked by the fork server (supervisor/forkserver.py), itself a Forked."""

    def __init__(self, target, args):
        for stream in (sys.stdout, sys.stderr):  # or the child writes their buffers again
            stream.flush()
        gc.collect(1)
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            run_child(target, args)
        super().__init__(pid)


def run_child(target, args) -> None:
    """The forked child's whole life: it never returns into the supervisor's code."""
    try:
        target(*args)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)  # target exits with its own code; reaching here is a failure


class Subprocess:
    """A child that is another program (clickhouse-server, tor), started by `server.start()`."""

    def __init__(self, server, wait: bool = True):
        server.start(wait=wait)
        self.server = server
        self.pid = server.process.pid

    def alive(self) -> bool:
        return self.server.process.poll() is None

    @property
    def exitcode(self) -> Optional[int]:
        return self.server.process.returncode

    def exit_description(self) -> str:
        return describe_exit(self.exitcode)

    def signal(self, signum) -> None:
        if self.alive():
            self.server.process.send_signal(signum)


def start_reason(child: "Child", first: Optional[tuple] = None) -> tuple:
    """Why a child is being started, as a gap reason and detail: its first start under this
    daemon ends a daemon restart (the daemon was down, or the symbol was just added), or
    `first` when given (a delisted contract listed again); a start after a clean exit (exit
    code 0: a restart asked for) a collector restart; any other a crash (a signal, SIGKILL
    included, or a failure exit)."""
    if child.restarts == 0:
        return first or (GAP_DAEMON_RESTART, "daemon started")
    if child.exit_code == 0:
        return GAP_COLLECTOR_RESTART, child.last_exit
    return GAP_COLLECTOR_CRASH, child.last_exit or "unknown exit"


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "running"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def process_state(proc_dir: str) -> str:
    """The one-letter state (R running, S asleep, T stopped...) in proc_dir/stat: after the
    command's closing parenthesis, which a command name may contain."""
    with open(f"{proc_dir}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def thread_times(pid: int) -> dict:
    """thread id -> (s it ran, s it waited on the run queue, whether it is runnable now), from
    /proc/PID/task/*; {} where the kernel does not tell."""
    found = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                ran, waited = (int(n) / 1e9 for n in f.read().split()[:2])
            state = process_state(f"/proc/{pid}/task/{task}")
        except (OSError, IndexError, ValueError):
            continue
        found[task] = (ran, waited, state == "R")
    return found


def kept_from_cpu(before: dict, after: dict, elapsed: float) -> float:
    """The longest one thread was kept from a CPU between two thread_times() readings
    `elapsed` s apart: its wait on the run queue, or, for one runnable at the second reading,
    the time it did not run (the kernel counts a wait only once it is over)."""
    longest = 0.0
    for task, (ran, waited, runnable) in after.items():
        ran_before, waited_before, _ = before.get(task, (0.0, 0.0, False))
        longest = max(longest, waited - waited_before,
                      elapsed - (ran - ran_before) if runnable else 0.0)
    return longest


class Child:
    """One supervised slot (a collector, the exporter, a tor, the managed ClickHouse): its
    process, its state, and when it may start again.  `child_id` is a ChildId; `name` its
    text (`collector-btc`)."""

    def __init__(self, child_id, spawn, sup: dict, symbol: Optional[str] = None,
                 heartbeats: bool = True):
        self.child_id, self.name, self.kind = child_id, str(child_id), child_id.kind
        self.symbol = symbol
        self.spawn = spawn  # () -> a process object with pid, alive(), signal(), exit_description()
        self.sup = sup
        self.heartbeats = heartbeats
        self.process = None
        # (when, thread_times() then) once its heartbeat is half a timeout late
        self.late_since = None
        self.still_since = None  # (when, thread_times() then): the window _still reads
        self.found_still = False  # the last hang verdict was _still's (for its log line)
        self.state = ChildState.WAITING
        self.restarts = 0
        self.started_at = None
        self.delay = sup["restart_min"]
        self.next_start = 0.0
        self.exit_times = collections.deque(maxlen=FLAP_EXITS)
        self.last_exit = None  # how the last process ended, for people: "pid 12 exit code 0"
        self.exit_code: Optional[int] = None  # ... and for code: its exit code (< 0: a signal)
        self.last_heartbeat = None
        self.beating = False  # a heartbeat came since the process started
        self.stats = {}
        self.rates = {}
        self.first_data_ms = None  # a collector's first data under this child, kept over exits
        self.wanted = True  # False once removed from the config or shutting down
        self.restart_at_once = False  # set by `restart NAME`: no backoff, not a crash
        self.kill_deadline = None
        self.on_exit = None  # called with last_exit when the process exited and will restart

    def _become(self, state: ChildState, why: str, level: int = logging.INFO) -> None:
        """The one place a child changes state, and its log line."""
        self.state = state
        log.log(level, "%s %s -> %s", self.name, why, state.value)

    def start(self, now: float) -> None:
        """Start the process; a failure (a program missing, a disk full) is logged and
        retried with the usual backoff, never fatal to the supervisor."""
        try:
            self.process = self.spawn()
        except Exception as e:
            self.last_exit, self.exit_code, self.started_at = f"start failed: {e}", None, now
            self._schedule_restart(now, f"failed to start: {e}")
            return
        self.running(now, f"started pid={self.process.pid}")

    def running(self, now: float, why: str) -> None:
        """The process is up (start() calls this; so does a caller that started it itself)."""
        self.started_at = now
        self.last_heartbeat = now  # grace: a fresh child has START_GRACE timeouts to report
        self.beating = False
        self.kill_deadline = None
        self._become(ChildState.RUNNING, why)

    def heartbeat(self, stats: dict, now: float) -> None:
        previous, previous_time = self.stats, self.last_heartbeat
        self.stats, self.last_heartbeat, self.beating = stats, now, True
        if self.first_data_ms is None:
            self.first_data_ms = stats.get("first_data_ms")
        if previous.get("rows") and stats.get("rows") and now > previous_time:
            span = now - previous_time
            self.rates = {mt: round((stats["rows"][mt] - previous["rows"].get(mt, 0)) / span, 1)
                          for mt in stats["rows"]}

    def tick(self, now: float) -> None:
        """Notice an exit or a hang; start again when the backoff allows."""
        if self.state in (ChildState.RUNNING, ChildState.STOPPING) and not self.process.alive():
            self._exited(now)
        elif self.state is ChildState.RUNNING and self.heartbeats and self._hung(now):
            self.process.signal(signal.SIGKILL)
            self._become(ChildState.STOPPING, f"pid={self.process.pid} sent no heartbeat for "
                         f"{now - self.last_heartbeat:.0f}s" + ("" if self.beating else
                                                               " since its start")
                         + (f" and none of its threads ran for {STILL_FOR:.1f}s"
                            if self.found_still else "")
                         + ": hung, killing it", logging.ERROR)
        elif self.state is ChildState.STOPPING and self.kill_deadline and now >= self.kill_deadline:
            log.warning("%s pid=%d did not stop in time: killing it", self.name, self.process.pid)
            self.process.signal(signal.SIGKILL)
            self.kill_deadline = None
        if self.state is ChildState.BACKOFF and self.wanted and now >= self.next_start:
            self.restarts += 1
            self.start(now)

    def _hung(self, now: float) -> bool:
        """No heartbeat for heartbeat_timeout (START_GRACE times that for the first one), and
        not for want of a CPU: from half the timeout on, the child's wait on the run queue is
        read, and a child that waited for more than STARVED_SHARE of the time since is judged
        again later.  One that has beaten before and, half the timeout late, sits still for
        STILL_FOR (_still) is hung then."""
        timeout = self.sup["heartbeat_timeout"] * (1 if self.beating else START_GRACE)
        silent = now - self.last_heartbeat
        self.found_still = False
        if silent <= timeout / 2:
            self.late_since = self.still_since = None
            return False
        if self.late_since is None:
            self.late_since = (now, thread_times(self.process.pid))
        if silent <= timeout:
            self.found_still = self.beating and self._still(now)
            return self.found_still
        since, times_then = self.late_since
        times = thread_times(self.process.pid)
        waited = kept_from_cpu(times_then, times, now - since)
        if waited <= STARVED_SHARE * (now - since):
            return True
        log.warning("%s pid=%d sent no heartbeat for %.0fs, but waited %.1fs of the last %.1fs "
                    "for a CPU: starved, not hung", self.name, self.process.pid, silent, waited,
                    now - since)
        self.late_since = (now, times)
        return False

    def _still(self, now: float) -> bool:
        """For the last STILL_FOR at least, not one of the late child's threads ran or waited
        for a CPU.  Read over windows from when it was found late: a window in which it
        ran starts the next one."""
        since, times_then = self.still_since or self.late_since
        if now - since < STILL_FOR:
            return False
        times = thread_times(self.process.pid)
        ran = sum(r - times_then.get(task, (0.0, 0.0, False))[0]
                  for task, (r, _waited, _runnable) in times.items())
        if (times_then and times and ran < STILL_CPU
                and kept_from_cpu(times_then, times, now - since) < STILL_CPU):
            return True
        self.still_since = (now, times)
        return False

    def _exited(self, now: float) -> None:
        self.exit_code = self.process.exitcode
        self.last_exit = f"pid {self.process.pid} {self.process.exit_description()}"
        delivered = self._delivered()
        self.stats, self.rates = {}, {}
        if not self.wanted:
            self._become(ChildState.STOPPED, f"stopped ({self.last_exit})")
            return
        if self.on_exit is not None:
            self.on_exit(self.last_exit)
        if self.restart_at_once:
            self.restart_at_once, self.next_start = False, now
            self._become(ChildState.BACKOFF, f"{self.last_exit}; restarting now as asked")
        else:
            self._schedule_restart(now, self.last_exit, delivered)

    def _schedule_restart(self, now: float, why: str, delivered: bool = False) -> None:
        if delivered or (self.started_at is not None and now - self.started_at >= STABLE_AFTER):
            self.delay = self.sup["restart_min"]
        self.exit_times.append(now)
        flapping = len(self.exit_times) == FLAP_EXITS and now - self.exit_times[0] <= FLAP_WINDOW
        delay = self.sup["restart_max"] if flapping else self.delay
        self.next_start = now + delay
        # a flapping child stays at the longest delay until it runs stably again
        self.delay = self.sup["restart_max"] if flapping else min(delay * 2, self.sup["restart_max"])
        self._become(ChildState.BACKOFF, f"{why}; restarting in {delay:.1f}s"
                     + (f" (flapping: {FLAP_EXITS} exits in {now - self.exit_times[0]:.0f}s)"
                        if flapping else ""), logging.ERROR if flapping else logging.WARNING)

    def _delivered(self) -> bool:
        """A heartbeat of this process said market data came since it started (collectors)."""
        return self.beating and self.stats.get("last_data_age_s") is not None

    def restart_now(self, now: float) -> None:
        """Operator's `restart NAME`: stop it; it comes back at once, no backoff."""
        if self.state is ChildState.RUNNING:
            self.process.signal(signal.SIGTERM)
            self.kill_deadline, self.restart_at_once = now + 10, True
            self._become(ChildState.STOPPING, "restart: SIGTERM sent")
        self.next_start = now

    def reconnect(self, now: float) -> None:
        """A collector's connection moved to a fresh circuit: SIGUSR1 makes it dial the new
        one before it drops the old one (make before break); a child not running starts."""
        if self.state is ChildState.RUNNING:
            self.process.signal(signal.SIGUSR1)
            log.info("%s: SIGUSR1 sent (a new connection through a fresh circuit)", self.name)
        else:
            self.restart_now(now)

    def stop(self, now: float, timeout: float) -> None:
        self.wanted = False
        if self.state is ChildState.RUNNING:
            self.process.signal(signal.SIGTERM)
            self.kill_deadline = now + timeout
            self._become(ChildState.STOPPING, "stop: SIGTERM sent")
        elif self.state in (ChildState.BACKOFF, ChildState.WAITING):
            self._become(ChildState.STOPPED, "stop: not running")

    def describe(self, now: float) -> dict:
        """This child's entry in `mexc status --json`."""
        running = self.state in (ChildState.RUNNING, ChildState.STOPPING)
        entry = {
            "name": self.name, "kind": self.kind, "symbol": self.symbol,
            "pid": self.process.pid if running else None, "state": self.state.value,
            "restarts": self.restarts,
            "uptime_s": round(now - self.started_at, 1) if running else None,
            "last_exit": self.last_exit, "last_exit_code": self.exit_code,
            "next_start_in_s": round(max(0.0, self.next_start - now), 1)
            if self.state is ChildState.BACKOFF else None,
            "heartbeat_age_s": round(now - self.last_heartbeat, 1)
            if running and self.heartbeats else None,
            "msgs_per_s": self.rates,
            "exit_ip": None,
        }
        for key in ("rows_written", "buffered_rows", "spooled_rows", "last_message_age_s",
                    "last_data_age_s",
                    "connected", "reconnects", "handovers", "errors", "insert_errors", "held",
                    "rows",
                    "frames"):
            entry[key] = self.stats.get(key)
        entry["flapping"] = self.flapping(now)
        return entry

    def flapping(self, now: float) -> bool:
        """FLAP_EXITS exits within FLAP_WINDOW, and not running stably since the last one."""
        return (len(self.exit_times) == FLAP_EXITS
                and self.exit_times[-1] - self.exit_times[0] <= FLAP_WINDOW
                and not (self.state is ChildState.RUNNING and self.started_at is not None
                         and now - self.started_at >= STABLE_AFTER))

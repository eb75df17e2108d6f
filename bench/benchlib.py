"""What the benchmarks in bench/ share: a private ClickHouse in a temporary directory, configs,
the simulator CLI, `mexc` processes under test with their logs, peak-memory sampling, spawned
helper processes, machine info, the figure / value / goal / result table and main().

The scripts run as `python bench/<name>.py`, which puts bench/ (this file's directory) on
sys.path, wherever they are started from; importing this module puts the repository root there
too, so `mexc`, `collector`, `tests` ... are this checkout's.  Spawned processes
(multiprocessing "spawn") inherit that sys.path.  This module must not import pytest (through
tests.conftest) at the top: spawned children import the scripts, and with them this module.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # for mexc, collector, tests.* ...; also in spawned processes

import psutil  # noqa: E402

from bus import sockets  # noqa: E402
from supervisor.clickhouse import ManagedClickHouse  # noqa: E402
from core.store import Store  # noqa: E402

MEXC = os.path.join(os.path.dirname(sys.executable), "mexc")
MIB = 1024 * 1024
FLOW_TIMEOUT = 90.0  # s for a daemon's collectors to all store rows
# Variables that would let the daemon talk to a systemd or journald outside the bench.
FOREIGN_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "MEXC_CONFIG")


class BenchError(Exception):
    pass


def die_with_parent() -> None:
    """Runs in a child before exec: SIGTERM it if the bench dies without cleaning up."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def percentile(ordered: list, q: float) -> float:
    """Nearest rank."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def stop_process(popen: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, wait up to `timeout` s (reading what is left in its pipes), then SIGKILL."""
    if popen.poll() is None:
        popen.terminate()
    try:
        popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.communicate()


# --- the bench's world: ClickHouse, temp dir, configs ----------------------------------------

class World:
    """A temporary directory with a private ClickHouse server in it, and configs for it."""

    def __init__(self, directory: str, clickhouse: ManagedClickHouse):
        self.dir = directory
        self.clickhouse = clickhouse

    @classmethod
    def start(cls, stack: contextlib.ExitStack, prefix: str, server: str = "ch18") -> "World":
        """A fresh temporary directory and ClickHouse (one of the tests' SERVERS), both removed
        when `stack` closes."""
        from tests.chdb_server import SERVERS

        directory = tempfile.mkdtemp(prefix=prefix)
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        clickhouse = SERVERS[server](os.path.join(directory, "clickhouse"))
        stack.callback(clickhouse.stop)
        clickhouse.start()
        return cls(directory, clickhouse)

    def ch_section(self, database: str) -> dict:
        return {"host": "127.0.0.1", "port": self.clickhouse.port,
                "http_port": self.clickhouse.http_port, "database": database,
                "user": "default", "password": "", "managed": False}

    def config_data(self, database: str, symbols: list, **sections) -> dict:
        """A config (as parsed TOML) with its own database and export, state and runtime dirs
        in <dir>/<database>/, tor off; `sections` add to (or make) sections."""
        run_dir = os.path.join(self.dir, database)
        os.makedirs(run_dir, exist_ok=True)
        data = {
            "symbols": symbols,
            "clickhouse": self.ch_section(database),
            "tor": {"enabled": False},
            "export": {"dir": os.path.join(run_dir, "export")},
            "paths": {"state_dir": os.path.join(run_dir, "state"),
                      "runtime_dir": os.path.join(run_dir, "run")},
            "log": {"level": "info"},
            "http": {"listen": ""},
        }
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values}
        return data

    def write_config(self, data: dict) -> str:
        """`data` as <its run dir>/mexc.toml; returns the path."""
        from tests.conftest import toml_dump  # not at the top: it imports pytest

        path = os.path.join(os.path.dirname(data["paths"]["state_dir"]), "mexc.toml")
        with open(path, "w") as f:
            f.write(toml_dump(data))
        return path

    def store(self, database: str = "default") -> Store:
        """A store session (close it when done)."""
        return Store(self.ch_section(database))

    def client(self):
        """A clickhouse-driver client for the bench's own measurement queries (they name
        their tables); disconnect() it when done."""
        return self.store().client


# --- processes: the simulator, `mexc` commands, spawned helpers ------------------------------

def start_simulator(rate: float, *options: str,
                    priority: int = 0) -> tuple[subprocess.Popen, str]:
    """The simulator CLI (`python -m mexc.simulator`); --rate is frames/s per subscribed
    stream (3 per collector), `options` more of its arguments (--processes ...), `priority`
    its nice value (below 0: ahead of what the bench measures).  Returns the process and the
    URL from its `LISTENING` line."""
    def prepare():
        die_with_parent()
        if priority:
            os.setpriority(os.PRIO_PROCESS, 0, priority)

    popen = subprocess.Popen([sys.executable, "-m", "mexc.simulator", "--port", "0",
                              "--rate", str(rate), *options], cwd=ROOT,
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             preexec_fn=prepare)
    line = popen.stdout.readline()
    if not line.startswith("LISTENING "):
        popen.kill()
        popen.wait()
        raise BenchError(f"simulator did not start: {line!r}")
    return popen, line.split()[1]


def stop_simulator(popen: subprocess.Popen) -> None:
    stop_process(popen, 10)


class LoggedProcess:
    """A process under test with its stdout and stderr in a log file; `what` names it in
    errors."""

    def __init__(self, argv: list, log_path: str, what: str, stop_timeout: float, **popen):
        self.log_path, self.what, self.stop_timeout = log_path, what, stop_timeout
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, **popen)
        self.pid = self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(f"{self.what} exited with code {self.popen.returncode}:\n"
                             f"{self.log_tail()}")

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def log_text(self, offset: int = 0) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def log_tail(self, lines: int = 15) -> str:
        return "".join(self.log_text().splitlines(True)[-lines:])

    def stop(self) -> None:
        """SIGTERM and wait up to stop_timeout s, then SIGKILL."""
        stop_process(self.popen, self.stop_timeout)


class Daemon(LoggedProcess):
    """`mexc run --config X` running this checkout's code (PYTHONPATH=<repository root>), with
    no systemd or journald variables; stdout and stderr (its children's too) in daemon.log next
    to the config.  `name` (if any) prefixes its errors."""

    def __init__(self, config: str, runtime_dir: str, n_collectors: int, name: str = ""):
        self.config, self.runtime_dir, self.n, self.name = config, runtime_dir, n_collectors, name
        self.label = f"{name}: " if name else ""
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        # This checkout's code, also packages the editable install does not list (yet).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        self.env = env
        super().__init__([MEXC, "run", "--config", config],
                         os.path.join(os.path.dirname(config), "daemon.log"),
                         f"{self.label}mexc run", stop_timeout=20, env=env,
                         preexec_fn=die_with_parent)
        self.process = psutil.Process(self.pid)
        self.seen = {}  # pid -> psutil.Process of every child seen, to reap leftovers

    def status(self):
        """The status request's result, or None while nobody answers."""
        try:
            reply = sockets.request(self.runtime_dir, "status", timeout=3.0)
        except sockets.NotRunning:
            return None
        if not reply["ok"]:
            raise BenchError(f"{self.label}status request failed: {reply}")
        return reply["result"]

    @staticmethod
    def collectors(status: dict) -> dict:
        """name -> the status entry of each collector."""
        return {c["name"]: c for c in status["children"] if c["kind"] == "collector"}

    def children(self) -> dict:
        """pid -> psutil.Process of the supervisor's children now (zombies included)."""
        found = {p.pid: p for p in self.process.children()}
        self.seen.update(found)
        return found

    def wait_flowing(self, timeout: float = FLOW_TIMEOUT) -> dict:
        """Wait until all collectors run, are connected and have stored rows; the status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            status = self.status()
            if status is not None:
                self.children()
                collectors = self.collectors(status)
                if len(collectors) == self.n and all(
                        c["state"] == "running" and c["connected"] and c["rows_written"]
                        for c in collectors.values()):
                    return status
            time.sleep(0.2)
        raise BenchError(f"{self.label}collectors not all storing rows after {timeout:.0f}s:\n"
                         f"{self.log_tail()}")

    def kill_and_time(self, pid: int, client, table: str, wait_new_pid, timeout: float,
                      poll: float = 0.01, phase: float = 0.2) -> dict:
        """SIGKILL a child; seconds until wait_new_pid(self, known pids, kill_t) returns its
        successor's (pid, seconds) and until a query sees a row received after the kill."""
        # A status request wakes the supervisor's loop, which then sleeps up to its tick:
        # killing right after one would always meet the same phase of that loop.
        time.sleep(random.uniform(0, phase))
        known = set(self.children())
        rows_at_kill = client.execute(f"SELECT count() FROM {table}")[0][0]
        kill_wall, kill_t = time.time(), time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid, new_pid_s = wait_new_pid(self, known, kill_t)
        kill_ms = int(kill_wall * 1000)  # rts is int(time.time() * 1000): old rows are <= this
        sql = f"SELECT max(rts), count() FROM {table}"
        while True:
            asked = time.monotonic()
            newest, count = client.execute(sql)[0]
            if newest > kill_ms and count > rows_at_kill:
                break
            self.check_alive()
            if asked > kill_t + timeout:
                raise BenchError(f"{self.label}no new row in {table} {timeout:.0f}s after the "
                                 f"kill:\n{self.log_tail()}")
            time.sleep(max(0.0, asked + poll - time.monotonic()))
        first_rts = client.execute(f"SELECT min(rts) FROM {table} WHERE rts > {kill_ms}")[0][0]
        return {"old_pid": pid, "new_pid": new_pid, "new_pid_s": new_pid_s,
                "first_row_s": asked - kill_t, "first_received_s": first_rts / 1000 - kill_wall,
                "kill_wall": kill_wall}

    def stop(self) -> None:
        """SIGTERM and wait (the daemon promises 15 s); SIGKILL after 20; then any child left."""
        if self.popen.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.children()
        super().stop()
        for child in self.seen.values():  # psutil checks the pid was not reused
            with contextlib.suppress(psutil.Error):
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()


def _child_main(target, args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends this process
    target(*args)


def spawn(target, *args, name: str) -> tuple:
    """target(*args, pipe) in a spawned daemon process that ignores SIGINT:
    (process, this end of the pipe)."""
    context = multiprocessing.get_context("spawn")
    pipe, child_end = context.Pipe()
    process = context.Process(target=_child_main, args=(target, (*args, child_end)), name=name,
                              daemon=True)
    process.start()
    return process, pipe


def receive(pipe, process, timeout: float, what: str, who: str):
    """The next object from a spawned process (`who` in errors), waiting up to timeout s."""
    try:
        if pipe.poll(timeout):
            return pipe.recv()
        died = not process.is_alive()
    except EOFError:  # its end of the pipe is closed: it has exited or is exiting
        process.join(5)
        died = True
    if died:
        raise BenchError(f"{who} died (exit code {process.exitcode}) while waiting for {what}")
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


class PeakMemory(threading.Thread):
    """Peak RSS (and with uss=True USS: psutil memory_full_info) of one process, sampled every
    `interval` s until stop()."""

    def __init__(self, pid: int, interval: float, uss: bool = False):
        super().__init__(name="memory-sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.interval, self.uss = interval, uss
        self.peak_rss = self.peak_uss = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                info = self.process.memory_full_info() if self.uss else self.process.memory_info()
            except psutil.Error:
                return
            self.peak_rss = max(self.peak_rss, info.rss)
            if self.uss:
                self.peak_uss = max(self.peak_uss, info.uss)

    def stop(self) -> None:
        self.done.set()
        self.join()


# --- report ----------------------------------------------------------------------------------

def machine_info(world: World, **extra) -> dict:
    """CPUs, CPU model, Python and ClickHouse versions, plus `extra` (e.g. library versions)."""
    client = world.client()
    try:
        clickhouse_version = client.execute("SELECT version()")[0][0]
    finally:
        client.disconnect()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
            "python": platform.python_version(), "clickhouse": clickhouse_version, **extra}


def print_machine(machine: dict, *libraries: str) -> None:
    """The `machine:` line; memory if machine_info had memory_gib, then the versions of
    `libraries` (keys of `machine`, shown with "-" for "_")."""
    memory = f"{machine['memory_gib']:.0f} GiB, " if "memory_gib" in machine else ""
    versions = "".join(f", {key.replace('_', '-')} {machine[key]}" for key in libraries)
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {memory}Python "
          f"{machine['python']}, ClickHouse {machine['clickhouse']}{versions}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(rows: list, value_width: int, goal_width: int) -> None:
    """rows of (figure, value, goal, verdict or "") under a figure / value / goal / result
    header."""
    width = max(len(row[0]) for row in rows)
    print(f"{'figure':<{width}}  {'value':>{value_width}}  {'goal':<{goal_width}}  result")
    for name, value, goal, result in rows:
        print(f"{name:<{width}}  {value:>{value_width}}  {goal:<{goal_width}}  {result}".rstrip())


def print_json(machine: dict, result: dict) -> None:
    print(json.dumps({"machine": machine, **result}, sort_keys=True))


# --- main ------------------------------------------------------------------------------------

def parse_args(parser, argv=None):
    """`parser`'s arguments plus --json."""
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    return parser.parse_args(argv)


def main(name: str, run, args) -> int:
    """run(args) -> exit code; a BenchError -> 1 with its message, Ctrl-C -> 130."""
    logging.getLogger("clickhouse_driver").setLevel(logging.ERROR)  # start-up probes
    interrupted = threading.Event()

    def on_sigint(_signum, _frame):
        interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        return run(args)
    except BaseException as e:
        # Ctrl-C reaches ClickHouse and every process the bench started too: whatever fails
        # next is its echo.
        if interrupted.is_set():
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, BenchError):
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        raise

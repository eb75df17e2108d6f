"""Real parts for the tests: a private ClickHouse server, config files, mexc processes.

Everything listens on 127.0.0.1 only.  Waiting is done by polling with a deadline (`wait_for`).
"""
import fcntl
import itertools
import os
import shutil
import signal
import subprocess
import sys
import termios
import time
import uuid

import psutil
import pytest

from supervisor.clickhouse import ManagedClickHouse
from core.store import UNKNOWN_DATABASE, UNKNOWN_TABLE, Refused, Store
from tests import chdb_server
from tests.chdb_server import SERVERS
from tests.cluster_bed import ClusterBed, ClusterBedError
from tests.tor_network import TorNetwork

MEXC = os.path.join(os.path.dirname(sys.executable), "mexc")
TOR_KEY_CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "tor-keys")


def wait_for(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
    """Poll until predicate() is truthy; return its value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_gone(pids, timeout: float, what: str = "processes") -> None:
    """Poll until no process of `pids` is left (a zombie counts as gone: it only waits for its
    parent, init for an orphan, to reap it)."""
    def left():
        return [pid for pid in pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    try:
        wait_for(lambda: not left(), timeout, f"every process of {what} gone")
    except AssertionError as e:
        raise AssertionError(f"{e}; left: {left()}") from None


def kill_left(pids) -> None:
    """SIGKILL what a failed test left of `pids` (the machine is shared)."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def toml_dump(data: dict) -> str:
    """Just enough TOML for test configs: top-level scalars/lists, then one level of tables."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


# The two soaks, the heaviest files, run one after the other on one worker.
SOAKS = ("test_soak.py", "test_cluster_soak.py")


def pytest_xdist_make_scheduler(config, log):
    """Two workers (pytest-xdist, setup.cfg's -n 2) share the files: each file's tests run on
    one worker, in order, so its module fixtures start once and tests that build on the one
    before still do, and the soaks share one worker.  Each worker starts its own ClickHouse
    servers and Tor network, ports are free ones, databases a test's own and each cluster bed
    picks a subnet of its own, so the workers never meet.  (xdist's own `--dist loadgroup`
    does not group under pytest 9: its group suffix on the node id is lost.)"""
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "soaks" if os.path.basename(file) in SOAKS else file
    return FileScheduling(config, log)


def pytest_generate_tests(metafunc):
    """Every test touching ClickHouse runs against each of SERVERS; those marked
    one_clickhouse need *a* ClickHouse, not a particular release, and run on the first.  Those
    marked quick_on_one_clickhouse run on each too, but only the first run is quick: the
    quick loop (-m "not slow") runs them once.  Those marked
    one_clickhouse_per(argname, values, ids=...) run once per value, the values given to the
    servers in turn (the first value to the first server, ...): every release and every value
    runs, not every pair."""
    if "clickhouse" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker
        first, *others = SERVERS
        per = marked("one_clickhouse_per")
        if per:
            argname, values = per.args
            ids = per.kwargs.get("ids", [str(value) for value in values])
            kinds = [kind for kind, _ in zip(itertools.cycle(SERVERS), values)]
            pairs = [pytest.param(kind, value, id=f"{kind}-{name}")
                     for kind, value, name in zip(kinds, values, ids)]
            metafunc.parametrize(["clickhouse", argname], pairs, indirect=["clickhouse"],
                                 scope="session")
            return
        if marked("one_clickhouse"):
            servers = [first]
        elif marked("quick_on_one_clickhouse"):
            servers = [first] + [pytest.param(kind, marks=pytest.mark.slow) for kind in others]
        else:
            servers = list(SERVERS)
        metafunc.parametrize("clickhouse", servers, indirect=True, scope="session")


def start_server(kind: str, directory: str) -> ManagedClickHouse:
    if shutil.which("clickhouse-server") is None:
        pytest.fail("clickhouse-server is not installed: run ./setup --test", pytrace=False)
    if kind == "ch26" and not chdb_server.available():
        pytest.fail("chdb-core is not installed: run ./setup --test", pytrace=False)
    return SERVERS[kind](directory).start()


@pytest.fixture(scope="session")
def clickhouse(request, tmp_path_factory):
    """A server shared by the session, one of SERVERS (the test's parameter)."""
    server = start_server(request.param, str(tmp_path_factory.mktemp(request.param)))
    yield server
    server.stop()


class World:
    """One test's world: its own database on the shared server and its own state dir."""

    def __init__(self, tmp_path, clickhouse):
        self.tmp = tmp_path
        self.clickhouse = clickhouse
        self.database = "t_" + uuid.uuid4().hex[:10]
        self.procs = []

    def ch_section(self) -> dict:
        return {"host": "127.0.0.1", "port": self.clickhouse.port,
                "http_port": self.clickhouse.http_port, "database": self.database,
                "user": "default", "password": "", "managed": False}

    def write_config(self, url: str, symbols=("BTC_USDT",), **sections) -> str:
        data = {
            "symbols": list(symbols),
            "exchange": {"url": url, "reconnect_min": 0.2, "reconnect_max": 2.0},
            "clickhouse": self.ch_section(),
            "collector": {"stats_interval": 2.0},
            "tor": {"enabled": False},
            "export": {"dir": str(self.tmp / "export")},
            "paths": {"state_dir": str(self.tmp / "state"), "runtime_dir": str(self.tmp / "run")},
            "log": {"level": "debug"},
            "http": {"listen": ""},  # tests run side by side: the dashboard's tests pick a port
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        path = self.tmp / "mexc.toml"
        path.write_text(toml_dump(data))
        return str(path)

    def store(self) -> Store:
        """A session with this test's database (close it when done)."""
        return Store(self.ch_section())

    def query(self, sql: str):
        with self.store() as store:
            return store.client.execute(sql)

    def ms(self, column: str = "ts") -> str:
        """SQL for a time column as integer milliseconds, on either server."""
        with self.store() as store:
            return store.features.ms(column)

    def rows(self, table: str = "btc_current", rts: bool = False):
        """Stored rows as (ts ms, mt, m), with rts ms too when asked; missing table -> []."""
        try:
            with self.store() as store:
                return [row if rts else row[:3] for row in store.rows(table)]
        except Refused as e:
            if e.code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
                return []
            raise

    def gaps(self, name: str = "btc"):
        """The gap ledger's records of one symbol; missing table -> []."""
        try:
            with self.store() as store:
                return store.gaps(name)
        except Refused as e:
            if e.code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
                return []
            raise

    def count(self, table: str = "btc_current") -> int:
        return len(self.rows(table))

    def mexc(self, *args, name: str = "mexc", extra_env=None) -> "Proc":
        proc = Proc([MEXC, *args], self.tmp / f"{name}-{len(self.procs)}.log", extra_env)
        self.procs.append(proc)
        return proc

    def cleanup(self):
        for proc in self.procs:
            proc.kill()
        try:
            self.query(f"DROP DATABASE IF EXISTS {self.database}")
        except Exception:
            pass


class Proc:
    """A mexc process as a user starts it; its output goes to a log file we can read."""

    def __init__(self, argv, log_path, extra_env=None):
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env={**os.environ, **(extra_env or {})})
        self.pid = self.popen.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def signal(self, signum) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.popen.args} still running after {timeout}s; log:\n"
                                 f"{self.log()[-3000:]}") from None

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self.log_file.close()


class Terminal:
    """A command run as a user runs it in a terminal: it leads the session of a pseudo-terminal
    of its own, so Ctrl-C typed there (`type`), and closing the terminal (`hang_up`: SIGHUP,
    then EIO on every write) reach it as they would."""

    CTRL_C = b"\x03"

    def __init__(self, argv):
        self.master, slave = os.openpty()
        self.modes_at_start = self.modes()
        self.popen = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                      start_new_session=True, preexec_fn=self._take_terminal)
        os.close(slave)
        os.set_blocking(self.master, False)
        self.pid = self.popen.pid
        self.output = b""

    @staticmethod
    def _take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def read(self) -> str:
        """Everything shown so far (a terminal ends lines in CR LF)."""
        while self.master is not None:
            try:
                chunk = os.read(self.master, 65536)
            except BlockingIOError:
                break
            except OSError:  # EIO: nothing holds the terminal open any more
                chunk = b""
            if not chunk:
                break
            self.output += chunk
        return self.output.decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def modes(self) -> list:
        """The terminal's modes (termios), as a program that changed them would leave them."""
        return termios.tcgetattr(self.master)

    def hang_up(self) -> None:
        os.close(self.master)
        self.master = None

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            self.read()  # a full terminal would block its writes
            time.sleep(0.05)
        self.read()
        try:
            return self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.popen.args} still running after {timeout}s; output:\n"
                                 f"{self.read()[-3000:]}") from None

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        if self.master is not None:
            self.hang_up()


@pytest.fixture
def env(tmp_path, clickhouse):
    world = World(tmp_path, clickhouse)
    yield world
    world.cleanup()


@pytest.fixture(scope="module")
def cluster_bed(tmp_path_factory):
    """Three hosts in network namespaces, each with its ClickHouse 18.16, and a ZooKeeper
    (tests/cluster_bed.py); one per test module, torn down even when its tests fail."""
    bed = ClusterBed(str(tmp_path_factory.mktemp("cluster-bed")))
    try:
        bed.start()
    except ClusterBedError as e:
        pytest.fail(f"cluster bed: {e}", pytrace=False)
    yield bed
    bed.stop()


@pytest.fixture
def own_clickhouse(tmp_path, clickhouse):
    """A ClickHouse server of this test's own, which it may stop and start (of the same
    release as the session's)."""
    server = type(clickhouse)(str(tmp_path / "own-clickhouse")).start()
    yield server
    server.stop()


class TorNetworks:
    """The session's private Tor network (3 authorities, 3 exits on loopback), brought up
    when a test first needs it and shared by every test module that uses one (a bring-up
    costs 10-30 s); one a test killed an exit of is stopped after that test, and the next
    test gets a fresh one with every exit alive."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.current = None
        self.failure = None  # a bring-up that failed fails every test after it at once

    def get(self) -> TorNetwork:
        if self.failure is not None:
            raise self.failure
        if self.current is None:
            self.current = TorNetwork(str(self.tmp_path_factory.mktemp("tornet")),
                                      n_authorities=3, n_exits=3, key_cache_dir=TOR_KEY_CACHE)
            try:
                self.current.start(timeout=90)
            except Exception as e:
                self.current, self.failure = None, e
                raise
        return self.current

    def stop_if_spent(self) -> None:
        """After each test: a network with a killed exit, or whose watcher saw a socket off
        loopback (and killed it), is stopped (stop() raises on the latter)."""
        if self.current is not None and (self.current.violations or any(
                relay.killed for relay in self.current.exits)):
            self.stop()

    def stop(self) -> None:
        if self.current is not None:
            network, self.current = self.current, None
            network.stop()


@pytest.fixture(scope="session")
def tor_networks(tmp_path_factory):
    networks = TorNetworks(tmp_path_factory)
    yield networks
    networks.stop()


@pytest.fixture
def network(tor_networks):
    """The private Tor network (TorNetworks), every exit alive."""
    yield tor_networks.get()
    tor_networks.stop_if_spent()

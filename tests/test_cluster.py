"""Assignment and failover (issue 22 item 2) on the cluster bed: three real daemons (`mexc run`
in each host's namespace, tor off), replicas 2, four symbols, ZooKeeper as the bed runs it.

Each host reaches its own exchange: a simulator on the host's loopback, as each region reaches
MEXC over its own path, so a host cut off from the others and from ZooKeeper still collects.
The tests share the bed and the daemons and run in file order; each leaves the cluster as it
found it (every symbol live on its two assigned hosts)."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException

from bus import sockets
from cluster.assignment import assign
from tests.conftest import MEXC, toml_dump, wait_for

pytestmark = pytest.mark.slow

SYMBOLS = {"BTC_USDT": "btc", "ETH_USDT": "eth", "SOL_USDT": "sol", "XRP_USDT": "xrp"}
NAMES = sorted(SYMBOLS.values())
REPLICAS = 2
SESSION_TIMEOUT = 4.0
ROOT = "/mexc"
SIM_PORT = 18765  # every host's own simulator, on its own loopback
COUNT_ROWS = """
import sys
from clickhouse_driver import Client
client = Client(host=sys.argv[1], port=9000, connect_timeout=3)
print(client.execute(f"SELECT count() FROM mexc.{sys.argv[2]}_current")[0][0])
"""


class Host:
    """One host's daemon as a user runs it: `mexc run --config` in its namespace."""

    def __init__(self, bed, host, tmp):
        self.bed, self.name, self.address = bed, host.name, host.address
        self.dir = tmp / host.name
        self.dir.mkdir()
        self.runtime_dir = str(self.dir / "run")
        self.config = self.dir / "mexc.toml"
        self.config.write_text(toml_dump({
            "symbols": list(SYMBOLS),
            "exchange": {"url": f"ws://127.0.0.1:{SIM_PORT}/edge", "reconnect_min": 0.2,
                         "reconnect_max": 1.0},
            "clickhouse": {"host": host.address, "port": 9000, "http_port": 8123,
                           "database": "mexc", "managed": False},
            "collector": {"stats_interval": 5.0},
            "supervisor": {"heartbeat_timeout": 5.0},
            "tor": {"enabled": False},
            "export": {"dir": str(self.dir / "export")},
            "paths": {"state_dir": str(self.dir / "state"), "runtime_dir": self.runtime_dir},
            "http": {"listen": ""},
            "cluster": {"host": host.name, "zookeeper": bed.zookeeper.hosts,
                        "clickhouse": f"{host.address}:9000", "replicas": REPLICAS,
                        "root": ROOT, "session_timeout": SESSION_TIMEOUT},
        }))
        self.simulator = bed.popen(host.name, [sys.executable, "-m", "mexc.simulator", "--port",
                                               str(SIM_PORT), "--rate", "20"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.simulator.stdout.readline().startswith(b"LISTENING")
        self.daemon = None
        self.log_path = self.dir / "daemon.log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # a session of its own: killpg takes it all
            self.daemon = self.bed.popen(self.name, [MEXC, "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to the daemon's process group: supervisor and collectors at once."""
        os.killpg(self.daemon.pid, signal.SIGKILL)
        self.daemon.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self):
        try:
            return sockets.request(self.runtime_dir, "status", timeout=3)["result"]
        except sockets.NotRunning:
            return None

    def collectors(self) -> set:
        status = self.status()
        return {c["name"].split("-", 1)[1] for c in status["children"]
                if c["kind"] == "collector" and c["state"] != "stopping"} if status else set()

    def rows(self, name: str) -> int:
        """Rows of a symbol in this host's own ClickHouse, asked from inside the host (it
        answers there while the host is cut off)."""
        done = self.bed.python(self.name, COUNT_ROWS, self.address, name, timeout=20)
        return int(done.stdout) if done.returncode == 0 else -1


@pytest.fixture(scope="module")
def cluster(cluster_bed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    hosts = {h.name: Host(cluster_bed, h, tmp) for h in cluster_bed.hosts}
    for host in hosts.values():
        host.start()
    zk = KazooClient(hosts=cluster_bed.zookeeper.hosts, timeout=10.0,
                     connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 0.5})
    zk.start(timeout=15)
    yield Cluster(cluster_bed, hosts, zk)
    zk.stop()
    zk.close()
    running = [host.daemon for host in hosts.values() if host.daemon.poll() is None]
    for daemon in running:  # all at once: each takes seconds to stop
        daemon.terminate()
    for daemon in running:
        daemon.wait(20)


class Cluster:
    def __init__(self, bed, hosts, zk):
        self.bed, self.hosts, self.zk = bed, hosts, zk

    def live(self) -> dict:
        """{name: hosts whose copy is live}, as ZooKeeper has it."""
        result = {}
        for name in NAMES:
            path = f"{ROOT}/live/{name}"
            result[name] = set(self.zk.get_children(path)) if self.zk.exists(path) else set()
        return result

    def registered(self) -> set:
        path = f"{ROOT}/hosts"
        return set(self.zk.get_children(path)) if self.zk.exists(path) else set()

    def settled(self, hosts) -> bool:
        """Every symbol live on exactly its assigned hosts, and collected only there."""
        wanted = {n: set(h) for n, h in assign(NAMES, hosts, REPLICAS).items()}
        try:
            seen = self.registered(), self.live()
        except KazooException:  # this test's own session, lost while ZooKeeper was down
            return False
        return (seen == (set(hosts), wanted)
                and all(self.hosts[h].collectors() == {n for n in NAMES if h in wanted[n]}
                        for h in hosts))

    def wait_settled(self, hosts=("h1", "h2", "h3"), timeout=30.0, what="the cluster settled"):
        try:
            wait_for(lambda: self.settled(hosts), timeout, what, interval=0.2)
        except AssertionError:
            raise AssertionError(f"{what}: live {self.live()}, registered {self.registered()}, "
                                 + ", ".join(f"{h}: {sorted(self.hosts[h].collectors())}"
                                             for h in hosts)) from None


class Sampler(threading.Thread):
    """Samples ZooKeeper's live nodes every 50 ms; `fewest` is each symbol's least count."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.stopped, self.samples = cluster, threading.Event(), 0
        self.fewest = {n: len(h) for n, h in cluster.live().items()}

    def run(self):
        while not self.stopped.wait(0.05):
            try:
                live = self.cluster.live()
            except KazooException:  # counted as a sample missed: `samples` says how many ran
                continue
            for name, hosts in live.items():
                self.fewest[name] = min(self.fewest[name], len(hosts))
            self.samples += 1

    def stop(self) -> dict:
        self.stopped.set()
        self.join()
        return self.fewest


def test_every_symbol_on_two_hosts_evenly_with_rows_in_each_holder(cluster):
    cluster.wait_settled(timeout=40)
    live = cluster.live()
    per_host = sorted(sum(1 for n in NAMES if h in live[n]) for h in cluster.hosts)
    assert per_host == [2, 3, 3]  # 4 symbols x 2 copies on 3 hosts
    for name, holders in live.items():
        for h in holders:
            wait_for(lambda: cluster.hosts[h].rows(name) > 0, 20, f"{name} rows on {h}")
        for h in set(cluster.hosts) - holders:
            assert name not in cluster.hosts[h].collectors()
    for h, host in cluster.hosts.items():
        # each symbol's last take or release: a start may take what a later joiner's
        # copies then relieve it of; a take is recorded once the collector delivers
        def held_here():
            last = cluster.bed.host(h).query(
                "SELECT name, argMax(held, ts) FROM mexc.cluster_holdings WHERE host = %(h)s "
                "GROUP BY name", {"h": h})
            return {n for n, held in last if held} == {n for n in NAMES if h in live[n]}
        wait_for(held_here, 10, f"{h}'s holdings recorded")
        status = host.status()["cluster"]
        assert status["host"] == h and status["zookeeper"] == "connected"
        assert not status["frozen"] and set(status["hosts"]) == {"h1", "h2", "h3"}


def test_a_killed_host_fails_over_and_its_return_never_lowers_the_copies(cluster):
    cluster.wait_settled()
    victim = cluster.hosts["h3"]
    began = time.monotonic()
    victim.kill()
    cluster.wait_settled(("h1", "h2"), what="h3's symbols taken by h1 and h2")
    failover = time.monotonic() - began
    print(f"failover after SIGKILL: {failover:.1f}s (session timeout {SESSION_TIMEOUT}s)")
    assert failover < 30
    for h in ("h1", "h2"):
        assert "host h3 gone; 2 live copies wanted" in cluster.hosts[h].log()

    sampler = Sampler(cluster)
    sampler.start()
    victim.start()
    cluster.wait_settled(what="h3 back with its symbols")
    fewest = sampler.stop()
    print(f"h3's return: fewest live copies per symbol {fewest} in {sampler.samples} samples")
    assert fewest == {n: 2 for n in NAMES} and sampler.samples >= 20
    assert any("released (live on" in cluster.hosts[h].log() for h in ("h1", "h2"))


def test_a_host_cut_off_keeps_collecting_and_its_extra_copies_go_after_restore(cluster):
    cluster.wait_settled()
    cut = cluster.hosts["h2"]
    before = {n: cut.rows(n) for n in NAMES if n in cut.collectors()}
    collectors = cut.collectors()
    cluster.bed.cut("h2")
    try:
        cluster.wait_settled(("h1", "h3"), what="h2's symbols taken by h1 and h3")
        # h2 goes on with what it ran, and its rows keep arriving in its own ClickHouse
        wait_for(lambda: all(cut.rows(n) > before[n] for n in before), 20, "h2's rows growing")
        assert cut.collectors() == collectors
        status = cut.status()["cluster"]
        assert status["frozen"] and status["zookeeper"] in ("suspended", "lost")
    finally:
        cluster.bed.restore("h2")
    cluster.wait_settled(what="the extra copies released after h2's return")
    assert "assignment frozen (running " in cut.log()


def test_zookeeper_down_freezes_assignment_and_collection_goes_on(cluster):
    cluster.wait_settled()
    held = {h: host.collectors() for h, host in cluster.hosts.items()}
    rows = {h: {n: host.rows(n) for n in held[h]} for h, host in cluster.hosts.items()}
    logs = {h: len(host.log()) for h, host in cluster.hosts.items()}
    cluster.bed.zookeeper.stop()
    try:
        down = time.monotonic()
        wait_for(lambda: all((host.status() or {}).get("cluster", {}).get("frozen")
                             for host in cluster.hosts.values()), 15, "every host frozen")
        while time.monotonic() - down < 15:  # the outage: nothing may start or stop meanwhile
            assert {h: host.collectors() for h, host in cluster.hosts.items()} == held
            time.sleep(0.5)
        for h, host in cluster.hosts.items():
            assert all(host.rows(n) > rows[h][n] for n in held[h]), f"{h}'s rows stopped"
            assert "ASSIGNMENT FROZEN" in _status_text(host)
    finally:
        cluster.bed.zookeeper.start()
    cluster.wait_settled(what="the cluster as before ZooKeeper stopped")
    assert {h: host.collectors() for h, host in cluster.hosts.items()} == held
    for h, host in cluster.hosts.items():
        since = host.log()[logs[h]:]
        assert " taken (" not in since and " released (" not in since, since


def test_a_host_started_without_zookeeper_collects_everything_then_hands_back_the_extras(
        cluster):
    cluster.wait_settled()
    host = cluster.hosts["h1"]
    host.daemon.terminate()
    assert host.daemon.wait(20) == 0
    cluster.bed.zookeeper.stop()
    try:
        host.start()
        wait_for(lambda: host.collectors() == set(NAMES), 30, "h1 collecting every symbol")
        assert "collecting every symbol until it is" in host.log()
        assert host.status()["cluster"]["frozen"]
    finally:
        cluster.bed.zookeeper.start()
    cluster.wait_settled(what="h1's extra copies released once ZooKeeper answered")
    assert " released (live on " in host.log()


def test_a_host_that_stops_releases_what_it_held(cluster):
    """SIGTERM: every symbol it collected gets a release in its cluster_holdings, so the
    merge does not count it as covering them while it is down (nor does a SIGKILLed host:
    its next start releases what it does not take again, with a gap from its last row)."""
    cluster.wait_settled()
    host = cluster.hosts["h1"]
    held = host.collectors()
    host.daemon.terminate()
    assert host.daemon.wait(30) == 0
    last = dict(cluster.bed.host("h1").query(
        "SELECT name, argMax(held, ts) FROM mexc.cluster_holdings WHERE host = 'h1' "
        "GROUP BY name"))
    assert held and all(last[name] == 0 for name in held), (held, last)
    host.start()
    cluster.wait_settled(what="h1 back with its symbols")


def _status_text(host) -> str:
    done = subprocess.run([MEXC, "status", "--config", str(host.config)], capture_output=True,
                          text=True, timeout=20)
    return done.stdout


def test_a_managed_clickhouse_in_a_cluster_serves_the_peers_and_loopback(tmp_path):
    """clickhouse.managed in a cluster: the server listens on cluster.clickhouse's address
    (127.0.0.2 here) for the other hosts, and on loopback for this host's own processes."""
    from clickhouse_driver import Client

    from core import config as configuration
    from supervisor.clickhouse import ManagedClickHouse
    from core.process import free_port

    port = free_port()
    cfg = configuration.parse({"clickhouse": {"port": port, "http_port": free_port(),
                                              "password": "secret"},
                               "cluster": {"host": "h1", "zookeeper": "127.0.0.1:2181",
                                           "clickhouse": f"127.0.0.2:{port}"}})
    server = ManagedClickHouse.from_config(cfg, str(tmp_path / "ch")).start()
    try:
        for address in ("127.0.0.2", "127.0.0.1"):
            client = Client(host=address, port=port, password="secret", connect_timeout=3)
            assert client.execute("SELECT 1") == [(1,)]
            client.disconnect()
    finally:
        server.stop()

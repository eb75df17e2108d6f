"""Tor on the cluster bed (tests/cluster_bed.py, `tor=True`): two hosts, each `mexc run` in its
namespace with one tor per collector, as in production, joined to the bed's private Tor network
(authorities and exits each in a namespace of its own on the bridge).  Each host keeps its own
collectors on distinct exits, the simulator sees those exits' addresses and never a host's, rows
are stored, and no tor of the bed has a socket outside the bed."""
import signal
import subprocess

import pytest

from bus import sockets
from tests.cluster_bed import CH_HTTP_PORT, CH_PORT, ClusterBed, ClusterBedError
from tests.conftest import MEXC, toml_dump, wait_for
from tests.tor_network import process_sockets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SYMBOLS = {"BTC_USDT": "btc", "ETH_USDT": "eth"}
HOSTS = ("h1", "h2")


@pytest.fixture(scope="module")
def tor_bed(tmp_path_factory):
    bed = ClusterBed(str(tmp_path_factory.mktemp("cluster-tor")), n_hosts=len(HOSTS), tor=True,
                     exits_per_host=3)
    try:
        bed.start(90)
    except ClusterBedError as e:
        pytest.fail(f"cluster bed with Tor: {e}", pytrace=False)
    yield bed
    bed.stop()


class TorHost:
    """`mexc run` with Tor on in a bed host's namespace."""

    def __init__(self, bed, name, tmp_path, sim):
        self.bed, self.host = bed, bed.host(name)
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.runtime_dir = str(self.dir / "run")
        self.config = str(self.dir / "mexc.toml")
        with open(self.config, "w") as f:
            f.write(toml_dump({
                "symbols": list(SYMBOLS),
                "exchange": {"url": sim.url, "reconnect_min": 0.2, "reconnect_max": 1.0},
                "clickhouse": {"host": self.host.address, "port": CH_PORT,
                               "http_port": CH_HTTP_PORT, "managed": False, "database": "mexc"},
                "tor": {"enabled": True, "exit_check_interval": 1.0, "bootstrap_timeout": 60.0,
                        "torrc_extra": bed.torrc_extra(name)},
                "export": {"dir": str(self.dir / "export")},
                "paths": {"state_dir": str(self.dir / "state"), "runtime_dir": self.runtime_dir},
                "http": {"listen": ""},
                "cluster": {"host": name, "zookeeper": bed.zookeeper.hosts,
                            "clickhouse": f"{self.host.address}:{CH_PORT}", "replicas": 2,
                            "root": "/mexc-tor", "session_timeout": 4.0},
            }))
        self.log_path = self.dir / "daemon.log"
        with open(self.log_path, "wb") as log:
            self.proc = bed.popen(name, [MEXC, "run", "--config", self.config], stdout=log,
                                  stderr=subprocess.STDOUT)

    def status(self):
        try:
            return sockets.request(self.runtime_dir, "status", timeout=3)["result"]
        except sockets.NotRunning:
            return None

    def distinct_exits(self):
        """{collector: exit address} once every collector has an exit and no two share one."""
        status = self.status() or {"children": []}
        ips = {c["name"]: c["exit_ip"] for c in status["children"]
               if c["kind"] == "collector" and c.get("exit_ip")}
        return ips if len(ips) == len(SYMBOLS) and len(set(ips.values())) == len(ips) else None

    def tor_pids(self):
        return {c["pid"] for c in self.status()["children"] if c["kind"] == "tor" and c["pid"]}

    def rows(self, name):
        try:
            return self.host.query(f"SELECT count() FROM mexc.{name}_current")[0][0]
        except Exception:
            return 0


def test_each_hosts_collectors_leave_by_distinct_exits_of_its_own(tor_bed, tmp_path):
    bed = tor_bed
    sim = bed.start_simulator(rate=20.0)
    hosts = [TorHost(bed, name, tmp_path, sim) for name in HOSTS]
    try:
        exits = {h.host.name: wait_for(h.distinct_exits, 120, f"{h.host.name}'s distinct exits")
                 for h in hosts}
        peers = {address for address, _port in sim.peer_addresses}
        for h in hosts:
            mine = set(exits[h.host.name].values())
            assert mine <= {e.address for e in h.host.exits}, (h.host.name, mine)
            assert mine <= peers, "the simulator did not see the exits the daemon reports"
            assert h.host.address not in peers, f"{h.host.name} reached the exchange directly"
        for h in hosts:
            for name in SYMBOLS.values():
                wait_for(lambda: h.rows(name) > 20, 60, f"rows of {name} on {h.host.name}")
        # containment, from /proc: every socket of every process in the bed, the relays and
        # each host's own tors among them
        assert bed.assert_contained() > 0
        tors = set(bed.tor_pids())
        relays = {r.pid for r in bed.tor_network.authorities + bed.tor_network.exits}
        daemons_tors = set().union(*(h.tor_pids() for h in hosts))
        assert relays <= tors and daemons_tors <= tors
        assert len(daemons_tors) == len(HOSTS) * len(SYMBOLS)
        assert all(process_sockets(pid) for pid in daemons_tors)
    finally:
        for h in hosts:
            h.proc.send_signal(signal.SIGTERM)
        codes = [h.proc.wait(30) for h in hosts]
    assert codes == [0] * len(HOSTS)

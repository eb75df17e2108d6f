"""The cluster bed (tests/cluster_bed.py): three hosts in network namespaces, each with its
ClickHouse 18.16, one ZooKeeper, the simulator; what the cluster (issue 22) will stand on.

The tests share one bed and run in file order: the link test reuses the replicated table and
the ZooKeeper members of the tests before it."""
import json
import os
import signal
import subprocess
import sys

import pytest
from clickhouse_driver.errors import Error as ClickHouseError
from kazoo.client import KazooClient

from tests.cluster_bed import NAME, ClusterBed, bed_lock, ip, remove_stale
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

DB = "bed"
MEMBERS = "/bed/members"
# Keeps an ephemeral node for its host for as long as it runs, across lost sessions (kazoo
# makes a new session after an expiry; the node of the old one is gone).
MEMBER = """
import sys, time
from kazoo.client import KazooClient
hosts, path = sys.argv[1:3]
zk = KazooClient(hosts=hosts, timeout=2.0,
                 connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 0.5})
zk.start(timeout=10)
said = False
while True:
    try:
        if zk.connected and zk.exists(path) is None:
            zk.create(path, ephemeral=True, makepath=True)
        if not said:
            print("joined", path, flush=True)
            said = True
    except Exception:
        pass
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def zk(cluster_bed):
    """A kazoo client in the test process (reaches ZooKeeper over the bridge)."""
    client = KazooClient(hosts=cluster_bed.zookeeper.hosts, timeout=5.0)
    client.start(timeout=15)
    yield client
    client.stop()
    client.close()


@pytest.fixture(scope="module")
def members(cluster_bed):
    """One MEMBER process inside each host, holding /bed/members/<host>."""
    procs = {h.name: cluster_bed.popen(h.name, [sys.executable, "-c", MEMBER,
                                               cluster_bed.zookeeper.hosts,
                                               f"{MEMBERS}/{h.name}"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for h in cluster_bed.hosts}
    for name, proc in procs.items():
        line = proc.stdout.readline().decode()
        assert line.startswith("joined"), f"{name}'s member did not join: {line!r}"
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


def live_members(zk):
    return set(zk.get_children(MEMBERS)) if zk.exists(MEMBERS) else set()


def replicated_table(host):
    host.query(f"CREATE DATABASE IF NOT EXISTS {DB}")
    host.query(f"CREATE TABLE IF NOT EXISTS {DB}.rep (id UInt64, origin String) "
               f"ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{DB}/rep', "
               f"'{{replica}}') ORDER BY id")


def ids(host, table="rep"):
    return sorted(row[0] for row in host.query(f"SELECT id FROM {DB}.{table}"))


def test_hosts_have_their_own_addresses_and_servers(cluster_bed):
    names = [h.name for h in cluster_bed.hosts]
    addresses = {h.address for h in cluster_bed.hosts}
    assert names == ["h1", "h2", "h3"] and len(addresses) == 3
    for h in cluster_bed.hosts:
        assert dict(h.query("SELECT macro, substitution FROM system.macros")) == \
            {"shard": "01", "replica": h.name}
        assert h.query("SELECT version()")[0][0].startswith("18.16")
        # the server runs inside the host's namespace, not in the test's
        assert h.clickhouse.process.pid in [int(p) for p in ip(
            "netns", "pids", h.netns).stdout.split()]
        # a namespace reaches its own bed and nothing else: no route out
        outside = cluster_bed.exec(h.name, ["ip", "route", "get", "192.0.2.1"])
        assert outside.returncode != 0 and "unreachable" in outside.stderr


def test_an_insert_on_one_host_replicates_to_every_other(cluster_bed):
    h1, h2, h3 = cluster_bed.hosts
    for h in cluster_bed.hosts:
        replicated_table(h)
    h1.query(f"INSERT INTO {DB}.rep VALUES", [(1, "h1"), (2, "h1"), (3, "h1")])
    for h in (h2, h3):
        wait_for(lambda: ids(h) == [1, 2, 3], 15, f"h1's rows on {h.name}")
    h3.query(f"INSERT INTO {DB}.rep VALUES", [(4, "h3")])
    for h in (h1, h2):
        wait_for(lambda: ids(h) == [1, 2, 3, 4], 15, f"h3's row on {h.name}")
    replicas = h2.query(f"SELECT is_readonly, total_replicas, active_replicas "
                        f"FROM system.replicas WHERE database = '{DB}' AND table = 'rep'")
    assert replicas == [(0, 3, 3)]


def test_any_host_reads_every_hosts_rows(cluster_bed):
    for i, h in enumerate(cluster_bed.hosts):
        h.query(f"CREATE DATABASE IF NOT EXISTS {DB}")
        h.query(f"CREATE TABLE {DB}.own (id UInt64, origin String) ENGINE = MergeTree "
                f"ORDER BY id")
        h.query(f"INSERT INTO {DB}.own SELECT number + {100 * i}, '{h.name}' FROM numbers({i + 1})")
    every = ",".join(h.address for h in cluster_bed.hosts)
    for h in cluster_bed.hosts:
        through_cluster = h.query(f"SELECT origin, count() FROM cluster('bed', {DB}, own) "
                                  f"GROUP BY origin ORDER BY origin")
        assert through_cluster == [("h1", 1), ("h2", 2), ("h3", 3)]
        through_remote = h.query(f"SELECT count() FROM remote('{every}', {DB}, own)")
        assert through_remote == [(6,)]


def test_zookeeper_is_reached_from_every_host(cluster_bed, zk, members):
    assert wait_for(lambda: live_members(zk) == {"h1", "h2", "h3"}, 10,
                    "an ephemeral node from every host")
    # each host's session comes from its own address
    connections = cluster_bed.zookeeper.four_letter("cons")
    for h in cluster_bed.hosts:
        assert f"/{h.address}:" in connections


def test_a_cut_link_expires_the_hosts_session_and_hides_it_until_restored(
        cluster_bed, zk, members):
    h1, h2, h3 = cluster_bed.hosts
    wait_for(lambda: live_members(zk) == {"h1", "h2", "h3"}, 10, "every member")
    reach_h2 = f"SELECT count() FROM remote('{h2.address}', system.one)"
    assert h1.query(reach_h2) == [(1,)]

    cluster_bed.cut("h2")
    try:
        wait_for(lambda: live_members(zk) == {"h1", "h3"}, 15, "h2's ephemeral node expired")
        with pytest.raises(ClickHouseError):
            h1.query(reach_h2, timeout=10, settings={"connect_timeout_with_failover_ms": 300})
        h1.query(f"INSERT INTO {DB}.rep VALUES", [(5, "h1 during the cut")])
        wait_for(lambda: ids(h3) == [1, 2, 3, 4, 5], 15, "the row on h3 during the cut")
    finally:
        cluster_bed.restore("h2")

    wait_for(lambda: live_members(zk) == {"h1", "h2", "h3"}, 20, "h2 back in ZooKeeper")
    wait_for(lambda: _answers(h1, reach_h2), 15, "h2 reachable from h1 again")
    wait_for(lambda: ids(h2) == [1, 2, 3, 4, 5], 30, "h2 caught up the row inserted meanwhile")
    wait_for(lambda: h2.query(f"SELECT is_readonly FROM system.replicas "
                              f"WHERE database = '{DB}' AND table = 'rep'") == [(0,)],
             30, "h2's replica writable again")


def test_zookeeper_and_a_server_stopped_and_started_again(cluster_bed, zk, members):
    h1, h2, h3 = cluster_bed.hosts
    h3.clickhouse.stop()
    h1.query(f"INSERT INTO {DB}.rep VALUES", [(6, "h1 while h3 is down")])
    h3.clickhouse.start()
    wait_for(lambda: ids(h3) == [1, 2, 3, 4, 5, 6], 30, "h3 caught up after its restart")

    cluster_bed.zookeeper.stop()
    with pytest.raises(ClickHouseError):          # no ZooKeeper: replicated inserts refused
        h1.query(f"INSERT INTO {DB}.rep VALUES", [(7, "no ZooKeeper")], timeout=20)
    cluster_bed.zookeeper.start()
    wait_for(lambda: _inserts(h1, 8), 30, "h1 writable again once ZooKeeper is back")
    wait_for(lambda: live_members(zk) == {"h1", "h2", "h3"}, 20, "every member back")
    for h in (h2, h3):
        wait_for(lambda: ids(h) == [1, 2, 3, 4, 5, 6, 8], 30, f"row 8 on {h.name}")


def _inserts(host, id_) -> bool:
    try:
        host.query(f"INSERT INTO {DB}.rep VALUES", [(id_, "after ZooKeeper's restart")])
        return True
    except ClickHouseError:
        return False


def _answers(host, sql) -> bool:
    try:
        return host.query(sql, timeout=2) == [(1,)]
    except ClickHouseError:
        return False


SIMULATOR_CLIENT = """
import json, sys, urllib.request, websocket
ws_url, rest_url = sys.argv[1:3]
ws = websocket.create_connection(ws_url, timeout=5)
ws.send(json.dumps({"method": "ping"}))
pong = json.loads(ws.recv())
ws.close()
with urllib.request.urlopen(rest_url + "/api/v1/contract/deals/BTC_USDT?limit=5", timeout=5) as r:
    deals = json.loads(r.read())
print(json.dumps({"pong": pong.get("channel"), "deals": len(deals["data"])}))
"""


def test_the_simulator_answers_inside_a_host(cluster_bed):
    simulator = cluster_bed.start_simulator()
    simulator.open_market("BTC_USDT")
    simulator.trade("BTC_USDT", 3)
    done = cluster_bed.python("h3", SIMULATOR_CLIENT, simulator.url, simulator.rest_url)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["pong"] == "pong" and answer["deals"] >= 3
    h3 = cluster_bed.host("h3").address
    assert [host for host, _port in simulator.peer_addresses] == [h3]
    assert simulator.rest_requests == {h3: 1}


def test_nothing_in_the_bed_talks_outside_it(cluster_bed, zk, members):
    assert cluster_bed.assert_contained() > 10     # servers, ZooKeeper, members: all checked


def _leftovers(prefix):
    names = ip("netns", "list").stdout + ip("-o", "link", "show").stdout
    return [n for n in names.split() if n.startswith(prefix + "-")]


def test_stop_leaves_nothing_behind(tmp_path):
    bed = ClusterBed(str(tmp_path), n_hosts=1).start()
    pids = bed.pids()
    assert pids and _leftovers(bed.prefix)
    bed.stop()
    assert _leftovers(bed.prefix) == []
    assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []


OWNER = """
import sys
from tests.cluster_bed import ClusterBed
bed = ClusterBed(sys.argv[1], n_hosts=1).start()
print(bed.prefix, *bed.pids(), flush=True)
sys.stdin.read()
"""


def test_a_killed_owners_bed_is_removed_by_the_next(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__)))})
    try:
        prefix, *pids = owner.stdout.readline().decode().split()
        assert NAME.match(prefix + "-") and _leftovers(prefix)
    except BaseException:
        owner.kill()
        raise
    # the bed lock: a bed of another process (pytest-xdist's other worker) starting once the
    # owner is dead would remove the leftovers first
    with bed_lock():
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # its servers die with it (PR_SET_PDEATHSIG); its namespaces and devices stay...
        wait_for(lambda: not [p for p in pids if os.path.exists(f"/proc/{p}")], 20,
                 "the killed bed's processes gone")
        assert _leftovers(prefix)
        # ...until the next bed starts, or anyone calls remove_stale()
        removed = remove_stale()
    assert _leftovers(prefix) == [] and f"{prefix}-h1" in removed

"""What the cluster exporter's tick costs, and the retention (docs/cluster.md "One merged
archive", "Pruning"), on the cluster bed: two ClusterArchives in this process, as hosts h1 and
h2 (each with the bed's ClickHouse of that host, the bed's ZooKeeper), merge and pull hours of
small real copies through the real ZooKeeper and remote().

- Once every hour is settled, a tick reads one ZooKeeper node per symbol plus the live hosts
  and sends two ClickHouse queries, however many hours the archive has (before: a few reads
  and a query per hour, and every merged file hashed at the start); a restart examines no
  settled hour again.
- Hours past cluster.retention_hours lose their nodes and hour_copies rows; a late copy of one
  is refused (logged), and the merged file stays as it was.
- `mexc gaps` and `mexc verify` answer from the hosts that answer, name the one that does not
  and exit 3; verify judges "no recent data" on each host that holds a symbol."""
import json
import logging
import os
import subprocess
import time

import pyarrow as pa
import pytest
from clickhouse_driver import Client

from cluster.exports import hour_label
from core import archive, config as configuration
from core.clock import HOUR_MS, hour_start
from core.store import Store
from core.vocabulary import GAP_DAEMON_RESTART, Gap
from exporter import parquet_files
from exporter.cluster_archive import ClusterArchive, copies_dir
from tests.cluster_bed import CH_PORT
from tests.conftest import MEXC, toml_dump, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SYMBOL, NAME = "BTC_USDT", "btc"
HOSTS = ("h1", "h2")


class Counted:
    """ZooKeeper reads of one kazoo client, and ClickHouse queries of this process."""

    def __init__(self, zk, monkeypatch):
        self.zk_reads = self.ch_queries = 0
        for method in ("get", "get_children", "exists"):
            monkeypatch.setattr(zk, method, self._counting(getattr(zk, method), "zk_reads"))
        monkeypatch.setattr(Client, "execute",
                            self._counting_unbound(Client.execute, "ch_queries"))

    def _counting(self, call, counter):
        def counted(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return call(*args, **kwargs)
        return counted

    def _counting_unbound(self, call, counter):
        def counted(client, *args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return call(client, *args, **kwargs)
        return counted

    def cost(self, tick):
        zk, ch = self.zk_reads, self.ch_queries
        tick()
        return self.zk_reads - zk, self.ch_queries - ch


def host_config(bed, host, tmp_path, root, retention_hours=0, symbols=(SYMBOL,)):
    address = bed.host(host).address
    path = tmp_path / host / "mexc.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_dump({
        "symbols": list(symbols),
        "clickhouse": {"host": address, "port": CH_PORT, "managed": False,
                       "database": root.strip("/").replace("-", "_")},
        "export": {"dir": str(tmp_path / host / "export")},
        "paths": {"state_dir": str(tmp_path / host / "state")},
        "tor": {"enabled": False},
        "cluster": {"host": host, "zookeeper": bed.zookeeper.hosts, "root": root,
                    "clickhouse": f"{address}:{CH_PORT}", "export_wait": 0.0,
                    "retention_hours": retention_hours},
    }))
    return configuration.load(str(path))


class Host:
    def __init__(self, config, path):
        self.config, self.path = config, path
        self.store = Store(config.clickhouse, timeout=30.0)
        self.store.setup([s.name for s in config.symbols], clustered=True)
        self.state_dir = os.path.join(config.paths["state_dir"], "exporter")
        os.makedirs(self.state_dir, exist_ok=True)
        self.archive = None
        self.start()

    def start(self):
        self.archive = ClusterArchive(self.config, self.store, state_dir=self.state_dir)

    def stop(self):
        self.archive.stop()

    def export_copy(self, hour, rows):
        """This host's copy of the hour, `rows` trades (ids shared with the other host's)."""
        path = archive.hour_path(copies_dir(self.config.export["dir"]), NAME, hour)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        table = pa.table([pa.array([hour + i * 1000 for i in range(rows)], pa.int64())
                          .cast(pa.timestamp("ms", tz="UTC")),
                          pa.array(["d"] * rows).dictionary_encode()
                          .cast(pa.dictionary(pa.int8(), pa.string())),
                          pa.array([f"1|2|1|{hour // 1000 + i}" for i in range(rows)]),
                          pa.array([hour + i * 1000 + 5 for i in range(rows)], pa.int64())
                          .cast(pa.timestamp("ms", tz="UTC"))], schema=parquet_files.SCHEMA)
        sha = parquet_files.write_hour(path, table, SYMBOL, hour)
        self.archive.copy_exported(SYMBOL, NAME, hour, path, rows, sha)

    def hour_copies(self, where):
        return self.store.client.execute(
            f"SELECT count() FROM {self.config.clickhouse['database']}.hour_copies "
            f"WHERE {where}")[0][0]

    def merged_file(self, hour):
        path = archive.hour_path(self.config.export["dir"], NAME, hour)
        return parquet_files.sha256(path) if os.path.exists(path) else None


@pytest.fixture
def hosts(cluster_bed, tmp_path, request):
    root = f"/tick-{request.node.name[5:25]}"
    made = {}

    def make(**options):
        for host in HOSTS:
            made[host] = Host(host_config(cluster_bed, host, tmp_path, root, **options),
                              str(tmp_path / host / "mexc.toml"))
        return made
    yield make
    for host in made.values():
        host.stop()
        host.store.close()


def settle(hosts, hours, timeout=120):
    """Tick both hosts until each holds the merged file of every hour, the same bytes."""
    def settled():
        for host in hosts.values():
            host.archive.exported_before(hours[-1] + HOUR_MS)
            host.archive.tick(host.config.symbols)
        files = [{hour: host.merged_file(hour) for hour in hours} for host in hosts.values()]
        return None not in files[0].values() and files[0] == files[1] and all(
            not host.archive.hours.unsettled.get(NAME) for host in hosts.values())
    wait_for(settled, timeout, "every hour merged and held by both hosts", interval=0.2)


def test_a_settled_archive_costs_a_tick_the_same_at_any_age(hosts, monkeypatch):
    hosts = hosts()
    h1 = hosts["h1"]
    counted = Counted(h1.archive.nodes.zk, monkeypatch)
    now = hour_start(int(time.time() * 1000))
    figures = {}
    for n in (4, 24):
        hours = [now - (n - i) * HOUR_MS for i in range(n)]
        for hour in hours:
            for host in hosts.values():
                if not host.merged_file(hour):
                    host.export_copy(hour, 3)
        settle(hosts, hours)
        h1.archive.tick(h1.config.symbols)  # reads the entries of the last merges and pulls
        figures[n] = counted.cost(lambda: h1.archive.tick(h1.config.symbols))
    print(f"one tick with every hour settled (ZooKeeper reads, ClickHouse queries): "
          f"{figures[4]} with 4 hours, {figures[24]} with 24")
    assert figures[4] == figures[24] and figures[24][0] <= 2 and figures[24][1] <= 1, figures

    h1.stop()  # a restart: the cursor and the unsettled hours come from the state file
    h1.start()
    counted = Counted(h1.archive.nodes.zk, monkeypatch)
    first = counted.cost(lambda: h1.archive.tick(h1.config.symbols))
    print(f"the first tick after a restart: {first}")
    assert first[0] <= 4 and first[1] <= 5, first  # 3 of them: CREATE TABLE IF NOT EXISTS

    # a late copy of an old hour is still merged in: its change-log entry names the hour
    late = hours[0]
    before = h1.merged_file(late)
    hosts["h2"].export_copy(late, 5)
    settle(hosts, hours)
    assert h1.merged_file(late) != before
    assert parquet_files.read(archive.hour_path(h1.config.export["dir"], NAME, late)
                              ).num_rows == 5


def test_a_lock_node_left_by_a_lost_connection_does_not_stop_the_merge(hosts, caplog):
    """kazoo leaves its contender node behind when an acquire times out while the connection
    is lost, and the session outlives the loss: before, that node stood before every later
    acquire of every host, and the hour stayed unmerged until the daemon stopped."""
    hosts = hosts()
    h1 = hosts["h1"]
    hour = hour_start(int(time.time() * 1000)) - HOUR_MS
    nodes = h1.archive.nodes
    nodes.start()
    nodes.zk.create(f"{nodes.root}/hours/{NAME}/{hour_label(hour)}/lock/"
                    f"{'0' * 32}__lock__", b"h1", ephemeral=True, sequence=True, makepath=True)
    with caplog.at_level(logging.WARNING, logger="cluster.exports"):
        for host in hosts.values():
            host.export_copy(hour, 3)
        settle(hosts, [hour], timeout=30)
    assert "a lock node this host left behind" in caplog.text
    assert h1.merged_file(hour) == hosts["h2"].merged_file(hour)


def test_hours_past_the_retention_are_pruned_and_a_late_copy_of_one_refused(hosts, caplog):
    hosts = hosts()
    now = hour_start(int(time.time() * 1000))
    hours = [now - i * HOUR_MS for i in range(6, 0, -1)]  # 6 to 1 hours ago
    h1, h2 = hosts["h1"], hosts["h2"]
    for hour in hours:
        for host in hosts.values():
            host.export_copy(hour, 3)
    settle(hosts, hours)
    with caplog.at_level(logging.INFO, logger="exporter.cluster_archive"):
        for host in hosts.values():  # the retention, 3 hours, takes effect
            host.archive.cluster["retention_hours"] = 3
            host.archive.tick(host.config.symbols)
    boundary = now - 3 * HOUR_MS
    zk = h1.archive.nodes.zk
    root = h1.config.cluster["root"]
    left = sorted(zk.get_children(f"{root}/hours/{NAME}"))
    assert left == [hour_label(h) for h in hours if h >= boundary], left
    assert "pruned 3 hour nodes of btc before" in caplog.text
    for host in hosts.values():  # the mutation runs in the background
        wait_for(lambda: host.hour_copies(f"hour < {boundary}") == 0, 30,
                 f"{host.config.cluster['host']}'s hour_copies rows of pruned hours gone")
        assert host.hour_copies(f"hour >= {boundary}") == 2 * 3  # a copy and the merged file
    files = {hour: h1.merged_file(hour) for hour in hours}
    assert None not in files.values()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="exporter.cluster_archive"):
        h2.export_copy(hours[0], 7)  # late rows of a pruned hour
        for host in hosts.values():
            host.archive.tick(host.config.symbols)
    assert f"late copy of btc {hour_label(hours[0])} refused, not merged" in caplog.text
    assert not zk.exists(f"{root}/hours/{NAME}/{hour_label(hours[0])}")
    assert {hour: h1.merged_file(hour) for hour in hours} == files
    assert h2.store.logged_file(SYMBOL, hours[0])[0] == files[hours[0]]


def test_gaps_and_verify_judge_each_holding_host_and_name_one_unreachable(cluster_bed, hosts):
    """btc held by h2 only, eth by h1 only (cluster_holdings): h1's stale btc rows are no
    failure; with h2's ClickHouse stopped, `mexc gaps` and `mexc verify` on h1 answer from h1,
    name h2 on one stderr line and exit 3 (partial); a stale symbol its holder holds fails."""
    hosts = hosts(symbols=("BTC_USDT", "ETH_USDT"))
    h1, h2 = hosts["h1"], hosts["h2"]
    zk = h1.archive.nodes
    zk.start()
    root = h1.config.cluster["root"]
    for host in hosts.values():  # membership as the daemons write it
        zk.zk.create(f"{root}/hosts/{host.config.cluster['host']}", json.dumps(
            {"clickhouse": host.config.cluster["clickhouse"]}).encode(), ephemeral=True,
            makepath=True)
    now = int(time.time() * 1000)
    h1.store.insert_rows("btc_current", [(now - HOUR_MS, "d", "1|2|1|1", now - HOUR_MS)])
    h1.store.insert_rows("eth_current", [(now, "d", "1|2|1|2", now)])
    h2.store.insert_rows("btc_current", [(now, "d", "1|2|1|1", now)])
    h1.store.record_holding("eth", "h1", now - 60_000, True)
    h2.store.record_holding("btc", "h2", now - 60_000, True)
    for host in hosts.values():
        h = host.config.cluster["host"]
        host.store.record_gaps([Gap("BTC_USDT", "btc", now - 50_000, now - 40_000 + len(h),
                                    GAP_DAEMON_RESTART, h, 0, False, now)])

    def mexc(*argv):
        return subprocess.run([MEXC, *argv, "--config", h1.path], capture_output=True,
                              text=True, timeout=60)

    verify = mexc("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "btc_current: 1 records (t: 0, d: 1, dp: 0): not held here (held by h2)" \
        in verify.stdout
    listed = json.loads(mexc("gaps", "--json").stdout)
    assert sorted(g["host"] for g in listed) == ["h1", "h2"]

    h2_server = cluster_bed.host("h2").clickhouse
    h2_server.stop()
    try:
        gaps = mexc("gaps", "--json")
        assert gaps.returncode == 3, gaps.stderr
        assert [g["host"] for g in json.loads(gaps.stdout)] == ["h1"]
        assert gaps.stderr.startswith("mexc: warning: host h2 unreachable (") \
            and gaps.stderr.count("\n") == 1 and "its gaps are missing" in gaps.stderr
        verify = mexc("verify")
        assert verify.returncode == 3, verify.stdout + verify.stderr
        assert verify.stderr.startswith("mexc: warning: host h2 unreachable (") \
            and verify.stderr.count("\n") == 1, verify.stderr
        assert "not checked: h2" in verify.stdout
    finally:
        h2_server.start()
    print(f"h2's ClickHouse stopped: mexc gaps and verify exit 3; {gaps.stderr.strip()[:120]}")

    h1.store.record_holding("btc", "h1", now - 30_000, True)  # h1 holds btc: stale is stale
    verify = mexc("verify")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "❌ btc_current on h1, which holds it: no data in the last 5 minutes" in verify.stdout
    assert "on h2" not in verify.stdout

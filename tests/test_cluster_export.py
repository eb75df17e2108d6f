"""One merged archive, stored more than once (issue 22 item 3), on the cluster bed: real
daemons (`mexc run`) in two hosts' namespaces, each with its own ClickHouse 18.16, collect the
same symbol from the simulator; the daemons are stopped and started again.
Every trade the market made while a host collected is in the merged archive exactly once, the
archive is the same bytes on both hosts, logged with the same sha256 in each host's
export_log, a host's hole the other covered is no gap, and the stretch when neither collected
is the archive's only gap.  Each daemon registers itself (`{root}/hosts/{host}`, its
membership) while it runs."""
import collections
import contextlib
import json
import os
import signal
import subprocess
import time

import pyarrow as pa
import pytest
from kazoo.client import KazooClient

from core import archive
from core.archive import GAPS_KEY, gaps_from_json
from core.clock import HOUR_MS, EventClock, hour_start
from core.store import Store
from core.vocabulary import GAP_DAEMON_RESTART
from exporter import parquet_files
from exporter.cluster_archive import CLUSTER_KEY
from exporter.merge import joined
from mexc import history
from tests.cluster_bed import CH_HTTP_PORT, CH_PORT
from tests.conftest import MEXC, toml_dump, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SPEED = 120.0  # an hour in 30 s
# The event minute at the start (it was the wall clock's, so the first hour ended 0 to 30 s
# later): the first hour ends 10 s later, when every exporter waits for it (one that started
# after it waited 30 s for the next).
FIRST_MINUTE = 40
ROOT = "/mexc-test"
HOSTS = ("h1", "h2")


class HostDaemon:
    """`mexc run` in a bed host's namespace, with a config of its own."""

    def __init__(self, bed, host, tmp_path, sim, clock, symbol="BTC_USDT"):
        self.bed, self.host = bed, bed.host(host)
        self.symbol, self.name = symbol, symbol.split("_")[0].lower()
        self.dir = tmp_path / host
        self.dir.mkdir()
        self.config = str(self.dir / "mexc.toml")
        self.export_dir = str(self.dir / "export")
        with open(self.config, "w") as f:
            f.write(toml_dump({
                "symbols": [symbol],
                "exchange": {"url": sim.url.replace("127.0.0.1", bed.gateway),
                             "reconnect_min": 0.2, "reconnect_max": 1.0},
                "clickhouse": {"host": self.host.address, "port": CH_PORT,
                               "http_port": CH_HTTP_PORT, "managed": False,
                               "database": "mexc"},
                "tor": {"enabled": False},
                "export": {"dir": self.export_dir, "clock_speed": SPEED,
                           "clock_anchor_ms": clock.anchor_ms, "delay": 30.0},
                "paths": {"state_dir": str(self.dir / "state"),
                          "runtime_dir": str(self.dir / "run")},
                "http": {"listen": ""},
                "cluster": {"host": host, "zookeeper": bed.zookeeper.hosts,
                            "clickhouse": f"{self.host.address}:{CH_PORT}", "root": ROOT,
                            "export_wait": 20.0},
            }))
        self.proc = None
        self.runs = 0

    def start(self):
        self.runs += 1
        log = open(self.dir / f"run{self.runs}.log", "wb")
        self.proc = self.bed.popen(self.host.name, [MEXC, "run", "--config", self.config],
                                   stdout=log, stderr=subprocess.STDOUT)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0

    def log(self):
        return "".join((self.dir / f"run{n}.log").read_text(errors="replace")
                       for n in range(1, self.runs + 1))

    def rows(self):
        try:
            return self.host.query(f"SELECT count() FROM mexc.{self.name}_current")[0][0]
        except Exception:
            return 0

    def received_since(self, wall_ms):
        """Has a row received from wall_ms on been stored?"""
        try:
            newest = self.host.query(f"SELECT max(rts) FROM mexc.{self.name}_current")[0][0]
            return (newest or 0) >= wall_ms
        except Exception:
            return False

    def first_row_ms(self):
        return self.host.query(f"SELECT min(ts) FROM mexc.{self.name}_current")[0][0]

    def gaps(self):
        """This host's gap ledger, oldest first."""
        with Store({"host": self.host.address, "port": CH_PORT, "database": "mexc",
                    "user": "default", "password": ""}) as store:
            return store.gaps(self.name)

    def export_log(self):
        """{hour: sha256} of the latest entry per hour."""
        return {hour: sha for hour, sha in self.host.query(
            "SELECT hour_start, argMax(sha256, export_time) FROM mexc.export_log "
            "WHERE symbol = %(s)s GROUP BY hour_start", {"s": self.symbol})}

    def files(self):
        """{file name: sha256} of the merged files in export.dir."""
        if not os.path.isdir(self.export_dir):
            return {}
        return {name: parquet_files.sha256(os.path.join(self.export_dir, name))
                for name in os.listdir(self.export_dir) if name.endswith(".parquet")}


def clock_at_minute(minute):
    """An event clock that is now at `minute` past an hour (the next such moment): the first
    hour ends as soon after the start as every exporter is sure to be waiting for it."""
    wall = int(time.time() * 1000)
    start = hour_start(wall) + minute * 60_000
    if start < wall:
        start += HOUR_MS
    # now = anchor + (wall - anchor) * SPEED
    return EventClock(SPEED, int((wall * SPEED - start) / (SPEED - 1)))


def hour_path(hour):
    return f"{ROOT}/hours/btc/{time.strftime('%Y%m%d_%H00', time.gmtime(hour // 1000))}"


def merged_node(zk, hour):
    path = f"{hour_path(hour)}/merged"
    return json.loads(zk.get(path)[0]) if zk.exists(path) else {}


def copies(zk, hour, field="sha256"):
    """{host: sha256 (or another field)} of the hour's copies registered (a host's "none"
    left out)."""
    path = f"{hour_path(hour)}/copies"
    nodes = [json.loads(zk.get(f"{path}/{host}")[0]) for host in zk.get_children(path)]
    return {node["host"]: node[field] for node in nodes if not node.get("none")}


def trade_rows(path):
    table = parquet_files.read(path)
    table = table.filter(pa.compute.equal(table.column("mt").cast(pa.string()), "d"))
    return [(ts, m, host) for ts, m, host in zip(
        table.column("ts").cast(pa.int64()).to_pylist(), table.column("m").to_pylist(),
        table.column("host").cast(pa.string()).to_pylist())]


def test_two_hosts_one_archive_every_trade_once_and_only_uncovered_time_a_gap(cluster_bed,
                                                                            tmp_path):
    """h2 stopped for ten minutes (h1 covers it: no gap), then h1 stopped, h2 stopped, h1
    started, h2 started: between h2's stop and h1's start no host collected, and that
    stretch, only it, is the archive's gap."""
    bed = cluster_bed
    zk = KazooClient(hosts=bed.zookeeper.hosts, timeout=5.0)
    zk.start(timeout=15)
    clock = clock_at_minute(FIRST_MINUTE)
    sim = bed.start_simulator(rate=20, event_clock=clock.now_ms)
    daemons = {h: HostDaemon(bed, h, tmp_path, sim, clock) for h in HOSTS}
    h1, h2 = daemons["h1"], daemons["h2"]

    def event_minutes(n):
        until = clock.now_ms() + n * 60_000
        wait_for(lambda: clock.now_ms() >= until, 60, f"{n} event minutes")

    def restart(daemon):
        began = int(time.time() * 1000)
        daemon.start()
        wait_for(lambda: daemon.received_since(began), 60, f"{daemon.host.name} collects")

    try:
        for daemon in daemons.values():
            daemon.start()
        first_hour = hour_start(clock.now_ms())
        wait_for(lambda: all(d.rows() > 50 for d in daemons.values()), 60, "both hosts collect")
        wait_for(lambda: h2.files(), 90, "a merged hour on h2")
        h2.stop()  # its rows of the hour go into its copy when it is back: a late copy
        event_minutes(10)
        restart(h2)
        event_minutes(10)
        h1.stop()
        event_minutes(10)
        h2.stop()
        event_minutes(16)  # nobody collects
        restart(h1)
        event_minutes(10)
        restart(h2)
        back_at = clock.now_ms()
        wait_for(lambda: clock.now_ms() > hour_start(back_at) + HOUR_MS + 60_000, 60,
                 "a whole hour of both after the last return")
        last_hour = hour_start(clock.now_ms()) - HOUR_MS  # the market goes on: verify wants it
        hours = list(range(first_hour, last_hour + 1, HOUR_MS))
        names = {archive.file_name("btc", hour) for hour in hours}

        def settled():
            """Every hour merged from every copy and held by both hosts, and the hour after
            the last exported (its rotation exports the last hour's late rows: the rows the
            collectors held during the rotation, a second of wall time, 2 event minutes)."""
            h1_files = {n: sha for n, sha in h1.files().items() if n in names}
            return len(h1_files) == len(hours) and merged_node(zk, last_hour + HOUR_MS) and all(
                set(merged_node(zk, hour).get("holders", ())) == set(HOSTS)
                and merged_node(zk, hour)["copies"] == copies(zk, hour)
                and merged_node(zk, hour)["ledgers"] == copies(zk, hour, "ledger")
                for hour in hours
            ) and all({n: sha for n, sha in d.files().items() if n in names} == h1_files
                      for d in daemons.values())
        wait_for(settled, 150, "every hour merged and held by both hosts")

        # the same bytes on both hosts, as each export_log says
        files = {n: sha for n, sha in h1.files().items() if n in names}
        for daemon in daemons.values():
            assert {n: sha for n, sha in daemon.files().items() if n in names} == files
            logged = daemon.export_log()
            assert {logged[hour] for hour in hours} == set(files.values())

        # the stretch no host collected: from h2's last row before its second stop to h1's
        # first row after its return, by the hosts' own ledgers
        h1_gap = [g for g in h1.gaps() if g.reason == GAP_DAEMON_RESTART]
        h2_gaps = [g for g in h2.gaps() if g.reason == GAP_DAEMON_RESTART]
        assert len(h1_gap) == 1 and len(h2_gaps) == 2, (h1_gap, h2_gaps)
        uncovered = (h2_gaps[1].start_ms, h1_gap[0].end_ms)
        assert h1_gap[0].start_ms < uncovered[0] < uncovered[1] < h2_gaps[1].end_ms

        metadata = {n: parquet_files.metadata(os.path.join(h1.export_dir, n)) for n in files}
        archived_gaps = [g for n in sorted(files) for g in gaps_from_json(metadata[n][GAPS_KEY])]
        assert joined([(g.start_ms, g.end_ms) for g in archived_gaps]) == [uncovered]
        assert all(not g.covered and "h1 daemon_restart" in g.detail
                   and "h2 daemon_restart" in g.detail for g in archived_gaps)
        complete = [n for n in files if metadata[n][parquet_files.COMPLETENESS_KEY] == b"1.000000"]
        assert len(complete) == len(files) - len({hour_start(t) for t in uncovered})
        holes = [hole for n in sorted(files)
                 for hole in json.loads(metadata[n][CLUSTER_KEY])["holes"]]
        first_h2_hole = [hole for hole in holes if hole["host"] == "h2"
                         and hole["end_ms"] <= h2_gaps[0].end_ms]
        assert first_h2_hole and all(hole["covered_by"] == ["h1"] for hole in first_h2_hole)

        # every trade the market made while a host collected: in the archive exactly once;
        # of those inside the stretch only what the REST backfill still had, each once
        # (from the first trade sent to a host: the market opens on the first subscription,
        # and its first push may come before that subscription is live)
        first_sent = min(ts for ts, mt, _m in sim.expected_rows("BTC_USDT") if mt == "d")
        truth = sim.trades("BTC_USDT", first_sent, last_hour + HOUR_MS - 1)
        archived = collections.Counter(
            (ts, "|".join(m.split("|")[:3])) for name in sorted(files)
            for ts, m, _host in trade_rows(os.path.join(h1.export_dir, name)))
        assert max(archived.values()) == 1, "a trade twice"
        made = {(t.t, t.rest_row[2]) for t in truth}
        assert set(archived) <= made
        outside = {key for key in made if not uncovered[0] < key[0] < uncovered[1]}
        assert outside <= set(archived), sorted(outside - set(archived))[:5]
        inside = made - outside
        assert len(inside) > 100 and 0 < len(set(archived) & inside) <= 200
        trade_hosts = {host for name in files
                       for _ts, _m, host in trade_rows(os.path.join(h1.export_dir, name))}
        assert trade_hosts == set(HOSTS)

        # `mexc gaps` on any host: every host's gaps, and who collected during each
        listed = json.loads(bed.exec("h1", [MEXC, "gaps", "--json", "--config", h1.config],
                                     timeout=60).stdout)
        assert sorted((g["host"], g["start_ms"], g["covered_by"]) for g in listed) == sorted(
            [("h1", h1_gap[0].start_ms, ["h2"]), ("h2", h2_gaps[0].start_ms, ["h1"]),
             ("h2", h2_gaps[1].start_ms, ["h1"])])

        for daemon in daemons.values():
            verify = bed.exec(daemon.host.name, [MEXC, "verify", "--config", daemon.config],
                              timeout=60)
            assert verify.returncode == 0, verify.stdout + verify.stderr
            assert "merged hours, the same sha256 on h1, h2" in verify.stdout
            assert "h2 daemon_restart" in verify.stdout and "covered by h1" in verify.stdout
            assert "no host covered" in verify.stdout
            assert "Traceback" not in daemon.log()
    finally:
        for daemon in daemons.values():
            if daemon.proc and daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
                daemon.proc.wait(30)
        zk.stop()
        zk.close()


def test_a_host_that_takes_a_symbol_covers_it_from_its_first_row_not_its_start(cluster_bed,
                                                                            tmp_path):
    """h1 collects and stops; h2 starts for the first time (no row of it before): the
    cluster's gap runs from h1's last row to h2's first row.  h2 covers nothing while it
    connects: a take counted from the collector's start made that stretch no gap (cluster
    soak seed 11: a collector killed on one host while another was starting the symbol and
    the third was cut off, and the merged file had no gap there)."""
    bed = cluster_bed
    clock = clock_at_minute(FIRST_MINUTE)
    sim = bed.start_simulator(rate=20, event_clock=clock.now_ms)
    # a symbol of its own: h2 has no row of it from an earlier test on the bed
    daemons = {h: HostDaemon(bed, h, tmp_path, sim, clock, "ETH_USDT") for h in HOSTS}
    h1, h2 = daemons["h1"], daemons["h2"]

    def start(daemon):
        began = int(time.time() * 1000)
        daemon.start()
        wait_for(lambda: daemon.received_since(began), 60, f"{daemon.host.name} collects")

    try:
        start(h1)
        wait_for(lambda: h1.rows() > 300, 60, "h1 collects a while")  # beyond a heartbeat
        h1.stop()
        start(h2)
        start(h1)
        h1_gap = wait_for(lambda: [g for g in h1.gaps() if g.reason == GAP_DAEMON_RESTART],
                          30, "h1's gap recorded")
        assert len(h1_gap) == 1 and not h2.gaps(), (h1_gap, h2.gaps())
        expected = [(h1_gap[0].start_ms, h2.first_row_ms())]
        archive = history.Archive.from_config(h2.config)
        found = []

        def cluster_gaps():
            found[:] = [(g.start_ms, g.end_ms) for g in archive.gaps(
                "ETH_USDT", h1_gap[0].start_ms - 60_000, clock.now_ms())]
            return found == expected
        with contextlib.suppress(AssertionError):
            wait_for(cluster_gaps, 20, "the cluster's gap")
        assert found == expected
    finally:
        for daemon in daemons.values():
            if daemon.proc and daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
                daemon.proc.wait(30)

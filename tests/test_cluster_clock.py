"""Hosts whose clocks are 2 s off (issue 22 item 5), on the cluster bed: two real daemons
(`mexc run`) collect the same symbol from the simulator, each whole daemon (supervisor,
collectors, exporter) with its wall clock moved by libfaketime, h1's 2 s behind the machine's,
h2's 2 s ahead (only the daemons: their ClickHouse, ZooKeeper and the simulator keep the
machine's clock).  h2 stops (h1 covers it), then h1 stops too, then both start again.
Every trade the market made while a host collected is in the merged archive exactly once, the
archive is the same bytes on both hosts, the archive's only gap is exactly the stretch no host
collected (by the hosts' ledgers, in exchange time), and `mexc verify` is clean on both hosts.
Of a trade both hosts got, the archive keeps h1's row: "the earliest receive time wins" goes
by the hosts' clocks.

The bed's market runs 120 times faster than the wall clock (an hour in 30 s), and so does each
daemon's event clock (export.clock_speed), from its own wall clock: a host 2 s off is 4 event
minutes off, as every other wall-clock span of the bed (a daemon's start and stop, a
collector's connect) is 120 times longer in event time.  So are its receive times and its
holdings (cluster_holdings); its hours rotate 4 event minutes early or late."""
import collections
import json
import os
import subprocess
import time

import pytest
from kazoo.client import KazooClient

from core.archive import GAPS_KEY, gaps_from_json
from core.clock import HOUR_MS, EventClock, hour_start
from core.vocabulary import GAP_DAEMON_RESTART
from exporter import parquet_files
from exporter.cluster_archive import CLUSTER_KEY, copies_dir
from tests.conftest import MEXC, wait_for
from tests.test_cluster_export import (HOSTS, SPEED, HostDaemon, copies, hour_path, joined,
                                       merged_node, trade_rows)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SKEW_MS = {"h1": -2000, "h2": 2000}  # each host's clock ahead of the machine's
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
SLEEP_FIX = os.path.join(os.path.dirname(__file__), "skewed_clock")  # its sitecustomize


class SkewedDaemon(HostDaemon):
    """HostDaemon whose whole daemon runs `skew_ms` off (libfaketime), registering itself in
    ZooKeeper as a user's daemon does."""

    def __init__(self, bed, host, tmp_path, sim, clock, skew_ms=0):
        super().__init__(bed, host, tmp_path, sim, clock)
        self.skew_ms = skew_ms

    def start(self):
        self.runs += 1
        env = dict(os.environ)
        if self.skew_ms:
            env.update(LD_PRELOAD=FAKETIME, FAKETIME=f"{self.skew_ms / 1000:+g}",
                       FAKETIME_DONT_FAKE_MONOTONIC="1",  # timeouts and waits keep working
                       PYTHONPATH=os.pathsep.join(filter(None, (SLEEP_FIX,
                                                                env.get("PYTHONPATH")))))
        with open(self.dir / f"run{self.runs}.log", "wb") as log:
            self.proc = self.bed.popen(self.host.name, [MEXC, "run", "--config", self.config],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self):
        self.proc.terminate()
        assert self.proc.wait(30) == 0


def market_anchor(now_ms: int) -> int:
    """The anchor that puts the market's event time at the start of the next hour now: the
    whole story then fits in one or two hours, whichever minute the test starts at."""
    next_hour = hour_start(now_ms) + HOUR_MS
    return int(now_ms - (next_hour - now_ms) / (SPEED - 1))


def test_hosts_2s_off_lose_nothing_and_the_archive_gaps_are_exact(cluster_bed, tmp_path):
    if not os.path.exists(FAKETIME):
        pytest.fail("faketime is not installed: run ./setup --test", pytrace=False)
    bed = cluster_bed
    zk = KazooClient(hosts=bed.zookeeper.hosts, timeout=5.0)
    zk.start(timeout=15)
    clock = EventClock(SPEED, market_anchor(int(time.time() * 1000)))
    sim = bed.start_simulator(rate=20, event_clock=clock.now_ms)
    daemons = {h: SkewedDaemon(bed, h, tmp_path, sim, clock, SKEW_MS[h]) for h in HOSTS}
    h1, h2 = daemons["h1"], daemons["h2"]
    began = time.monotonic()

    def event_minutes(n):
        until = clock.now_ms() + n * 60_000
        wait_for(lambda: clock.now_ms() >= until, 60, f"{n} event minutes")

    def start(*hosts):
        since = int(time.time() * 1000)
        for daemon in hosts:
            daemon.start()
        for daemon in hosts:  # a row received since, by its own clock
            wait_for(lambda: daemon.received_since(since + daemon.skew_ms), 60,
                     f"{daemon.host.name} collects")

    try:
        first_hour = hour_start(clock.now_ms())
        start(h1, h2)
        h2.stop()  # h1 covers alone
        event_minutes(4)
        h1.stop()  # nobody collects; h1's release stamped 2 s before its last row
        event_minutes(4)
        start(h1, h2)
        end = clock.now_ms() + 2 * 60_000  # trades counted up to here
        event_minutes(2)
        hours = list(range(first_hour, hour_start(end) + 1, HOUR_MS))
        names = {f"btc_{time.strftime('%Y%m%d_%H00', time.gmtime(h // 1000))}.parquet"
                 for h in hours}

        def settled():
            """Both hosts spoke for every hour (a copy or none), each hour merged from every
            copy and held by both, the same bytes on both."""
            h1_files = {n: sha for n, sha in h1.files().items() if n in names}
            return len(h1_files) == len(hours) and all(
                set(zk.get_children(f"{hour_path(hour)}/copies")) == set(HOSTS)
                and set(merged_node(zk, hour).get("holders", ())) == set(HOSTS)
                and merged_node(zk, hour)["copies"] == copies(zk, hour)
                and merged_node(zk, hour)["ledgers"] == copies(zk, hour, "ledger")
                for hour in hours
            ) and {n: sha for n, sha in h2.files().items() if n in names} == h1_files
        wait_for(settled, 150, "every hour merged and held by both hosts")
        print(f"settled {time.monotonic() - began:.1f}s after the start, {len(hours)} hours")

        # the same bytes on both hosts, as each export_log says
        files = {n: sha for n, sha in h1.files().items() if n in names}
        for daemon in daemons.values():
            logged = daemon.export_log()
            assert {logged[hour] for hour in hours} == set(files.values())

        # the clocks really are off: h1's receive time of a trade both got, 4 s before h2's
        rts = {}
        for h, daemon in daemons.items():
            for name in files:
                path = os.path.join(copies_dir(daemon.export_dir), name)
                if not os.path.exists(path):  # a host down for a whole hour has no copy of it
                    continue
                copy = parquet_files.read(path)
                for m, r in zip(copy.column("m").to_pylist(),
                                copy.column("rts").cast("int64").to_pylist()):
                    if m.count("|") == 3:
                        rts.setdefault(m.rsplit("|", 1)[1], {})[h] = r
        both = {trade_id for trade_id, r in rts.items() if len(r) == 2}
        offsets = sorted(rts[trade_id]["h1"] - rts[trade_id]["h2"] for trade_id in both)
        median = offsets[len(offsets) // 2]
        print(f"h1 - h2 receive time of {len(offsets)} trades both got: median {median} ms")
        assert len(offsets) > 100 and abs(median - (SKEW_MS["h1"] - SKEW_MS["h2"])) < 500

        # the stretch no host collected: from h1's last row before its stop to the first row
        # either got after, by their ledgers (exchange time: no host's clock in it)
        h1_gaps = [g for g in h1.gaps() if g.reason == GAP_DAEMON_RESTART]
        h2_gaps = [g for g in h2.gaps() if g.reason == GAP_DAEMON_RESTART]
        assert len(h1_gaps) == 1 and len(h2_gaps) == 1, (h1_gaps, h2_gaps)
        uncovered = (h1_gaps[0].start_ms, min(h1_gaps[0].end_ms, h2_gaps[0].end_ms))
        assert h2_gaps[0].start_ms < uncovered[0] < uncovered[1]

        metadata = {n: parquet_files.metadata(os.path.join(h1.export_dir, n)) for n in files}
        archived_gaps = [g for n in sorted(files) for g in gaps_from_json(metadata[n][GAPS_KEY])]
        print(f"archive gaps {[(g.start_ms, g.end_ms) for g in archived_gaps]}, "
              f"no host live {uncovered}")
        assert joined([(g.start_ms, g.end_ms) for g in archived_gaps]) == [uncovered]
        holes = [hole for n in sorted(files)
                 for hole in json.loads(metadata[n][CLUSTER_KEY])["holes"]]
        h2_hole = [x for x in holes if x["host"] == "h2" and x["start_ms"] == h2_gaps[0].start_ms]
        assert h2_hole and h2_hole[0]["covered_by"] == ["h1"], holes

        # every trade the market made while a host collected: in the archive exactly once;
        # of those no host received only what the REST backfill still had, each once
        first_sent = min(ts for ts, mt, _m in sim.expected_rows("BTC_USDT") if mt == "d")
        made = {(t.t, t.rest_row[2]) for t in sim.trades("BTC_USDT", first_sent, end)}
        rows = [row for name in sorted(files)
                for row in trade_rows(os.path.join(h1.export_dir, name))]
        archived = collections.Counter((ts, "|".join(m.split("|")[:3])) for ts, m, _h in rows
                                       if first_sent <= ts <= end)
        assert max(archived.values()) == 1, "a trade twice"
        assert set(archived) <= made
        outside = {key for key in made if not uncovered[0] < key[0] < uncovered[1]}
        assert outside <= set(archived), sorted(outside - set(archived))[:5]
        inside = made - outside
        print(f"trades made {len(made)}, archived {len(archived)}, while no host was live "
              f"{len(inside)} ({len(set(archived) & inside)} backfilled); rows by host "
              f"{collections.Counter(h for _ts, _m, h in rows)}")
        assert len(inside) > 20 and len(set(archived) & inside) <= 200
        kept = {m.rsplit("|", 1)[1]: host for _ts, m, host in rows if m.count("|") == 3}
        assert {kept[trade_id] for trade_id in both} == {"h1"}

        # h2, ahead, rotated each hour 4 event minutes early: its next rotation adds the rows
        # it got after that to its copy as late rows, and the hour is merged again (the same
        # bytes here: h1 had them); verify names both holders once both hold that version
        verified = {}

        def clean(daemon):
            done = bed.exec(daemon.host.name, [MEXC, "verify", "--config", daemon.config],
                            timeout=60)
            verified[daemon.host.name] = done.stdout + done.stderr
            return done.returncode == 0 and "merged hours, the same sha256 on h1, h2" in done.stdout
        try:
            wait_for(lambda: all([clean(d) for d in daemons.values()]), 60, "verify clean")
        except AssertionError:
            raise AssertionError(verified) from None
        assert all("Traceback" not in daemon.log() for daemon in daemons.values())
    finally:
        for daemon in daemons.values():
            if daemon.proc and daemon.proc.poll() is None:
                daemon.proc.terminate()
                daemon.proc.wait(30)
        zk.stop()
        zk.close()

"""Cluster soak: several `mexc run` hosts under seeded host, network, ZooKeeper and ClickHouse
faults, then every row of every host counted against the market's truth.

Run from the repository root, as root (the bed makes network namespaces):

    .venv/bin/python bench/cluster_soak.py [--minutes M] [--seed S] [--rate R] [--hosts N]
                                           [--symbols K] [--replicas R] [--tor] [--single-host]
                                           [--json]

Exit status 0 only when no row is doubled, no row or trade is missing that a live replica
should have stored, every cluster gap (no replica live) has a gap record, the merged archive
is whole (below), every host's export and SIGTERM stop exit 0, and every failover finishes
within 60 s.

What runs
---------
* the cluster bed (tests/cluster_bed.py): `--hosts` hosts (3) as network namespaces, each with
  its own ClickHouse 18.16, and one ZooKeeper;
* the MEXC simulator in this process on the bed's bridge, every host's exchange: one market,
  whose trades (`sim.trades`) are the truth, and which records what reached each host's
  connections (`sim.expected_rows_to(address)`); its event clock runs an hour every
  `--hour-seconds` (30) wall seconds, as the daemons' exporters do;
* `mexc run` in each host's namespace with `[cluster]` (replicas 2, session timeout 4 s),
  `--symbols` symbols (6), tor off;
* with `--tor`, the bed's private Tor network (tests/cluster_bed.py, `tor=True`): 3 directory
  authorities and, per host, as many exit relays as symbols, each relay in a namespace of its
  own on the bridge; each host's daemon runs one tor per collector in its namespace, pinned
  to its own exits (`ExitNodes`), and keeps its collectors on distinct exits.  The simulator
  then sees a host's connections and REST requests from its exits' addresses, and counts a
  host by those.  The bed's watcher checks every tor socket in the bed every 0.25 s; at the
  end every socket in the bed must be on its subnet or loopback (a failure otherwise), and
  `mexc verify` on each host checks its IP separation.

Faults (seeded; soaklib/cluster.py build_cluster_schedule)
----------------------------------------------------------
Cluster faults, each in a slot of the run to itself (at least one of each per run; durations
scaled down for runs under 10 minutes and to fit their slot, never below 8 s; in runs too
short for that, under about 2 minutes, a ClickHouse outage shares a ZooKeeper outage's slot):
  kill_host          a host SIGKILLed, daemon and collectors (its process group) and then its
                     ClickHouse, for 20-120 s, then started again
  cut_host           a host's network cut (its veth down) for 10-90 s: it loses the exchange,
                     ZooKeeper and the other hosts, and keeps its own ClickHouse
  zookeeper_outage   ZooKeeper stopped for 30-60 s: assignment frozen, collection goes on
  clickhouse_outage  a host's ClickHouse stopped 10-60 s: its collectors buffer and spool
  two_hosts_down     two hosts SIGKILLed at once for 20-60 s: the third takes every symbol
Per host, as the one-host soak injects them (soaklib/faults.py), on a symbol the host runs:
kill_collector, stop_collector, kill_exporter, stop_exporter, disconnect (that host's
connections dropped by the exchange), with `--tor` kill_tor and stop_tor (a tor of a symbol
the host runs SIGKILLed, or SIGSTOPped for 1-10 s); on the market: stall, burst, junk, huge.

Failover time: from a host lost (killed, cut) until every symbol it held is live on as many
other hosts as can hold it (min(replicas, hosts left)), read from ZooKeeper every 0.2 s.  The
faults begin once the status sampler has seen every copy up, and a host loss waits (20 s at
most) until every host holds its share again, so that each loss moves symbols.

Counting (soaklib/cluster_accounting.py): each host as the one-host soak counts its daemon
(its own rows: its copies in export.dir/copies/ and its tables), then per symbol the union of
every host's rows against the truth: missing while a replica was live (a failure), made while
none was (trades: never sent, backfilled, left, each left inside some host's gap record or a
failure), cluster holes with and without a record, doubled rows.

The event clock's anchor puts an event hour's end about when the market stops, so the last
hour is exported at once.  The merged archive (soaklib/cluster_archive.py; docs/cluster.md
"One merged archive"): after the last export (`mexc export --once` on every host at once),
the soak waits (at most 240 s) until every host's tables are empty, every copy is
registered in ZooKeeper as it is on disk, and every hour is merged from every copy's current
version and held by every host; then `mexc verify` runs on every host (its "no data in the
last 5 minutes" lines are excused: the market has stopped, and a host collects only the
symbols it holds).  A failure is any merged file on fewer than min(replicas, hosts) hosts,
with different bytes on two hosts or not the version ZooKeeper names (except a host holding
the version settled before the stop where a newer one was merged during the stop: a stopping
host records the gaps open then); an event twice in one merged file (a trade by its trade
id, else by (ts, m); depth and tickers by (ts, m)); a row some host stored of a merged hour
missing from its file, or one in it no host stored, or whose `host` column names a host that
did not store it; dead letters not each host's own once; a cluster hole in a merged hour
outside every gap of the merged files (`mexc.gaps`); any other `mexc verify` failure; or no
settling by the deadline.

With `--single-host`, bench/soak.py then runs with the same seed, minutes and rate (and
`--tor`), and its trades missing before and after backfill are printed beside the cluster's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from soaklib import ROOT
from soaklib.cluster import ClusterSoak, build_cluster_schedule
from soaklib.cluster_accounting import ClusterReport, account, to_json
from soaklib.common import MARKETS, SoakError, say


def single_host(args) -> dict:
    """bench/soak.py with the same seed, minutes and rate: its trades missing before and after
    backfill."""
    say("the one-host soak with the same seed")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--minutes",
                           str(args.minutes), "--seed", str(args.seed), "--rate",
                           str(args.rate), "--json"] + (["--tor"] if args.tor else []),
                          capture_output=True, text=True,
                          timeout=args.minutes * 60 * 3 + 900, cwd=ROOT)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    total = lambda key: sum(s["ledger"][key] for s in report["symbols"])  # noqa: E731
    return {"minutes": args.minutes, "rate": args.rate, "passed": report["passed"],
            "trades": total("trades"), "before": total("missing_before_backfill"),
            "after": total("missing_after_backfill")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="length of the fault phase (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="simulator events/s per stream, three streams per symbol (20)")
    parser.add_argument("--hosts", type=int, default=3, help="hosts on the bed (3)")
    parser.add_argument("--symbols", type=int, default=6, choices=range(1, len(MARKETS) + 1),
                        metavar=f"1..{len(MARKETS)}", help="symbols collected (6)")
    parser.add_argument("--replicas", type=int, default=2, help="cluster.replicas (2)")
    parser.add_argument("--hour-seconds", type=float, default=30.0,
                        help="wall seconds per event hour (30)")
    parser.add_argument("--tor", action="store_true",
                        help="each host's collectors through tors of their own, on the bed's "
                             "private Tor network")
    parser.add_argument("--single-host", action="store_true",
                        help="then run bench/soak.py with the same seed for the comparison")
    parser.add_argument("--schedule", action="store_true",
                        help="print the fault schedule and exit")
    parser.add_argument("--keep", action="store_true", help="keep the work dir even on success")
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0.5:
        parser.error("--minutes must be more than 0.5")
    if args.hosts < 3:
        parser.error("--hosts must be 3 or more (two hosts down at once leaves one)")
    if args.schedule:
        for fault in build_cluster_schedule(args.seed, args.minutes,
                                            [f"h{i + 1}" for i in range(args.hosts)], args.tor):
            print(f"{fault.at:7.1f}s  {fault}")
        return 0
    report = ClusterReport(args.seed, args.minutes, args.rate, args.hosts, args.symbols,
                           args.replicas, args.hour_seconds)
    soak = ClusterSoak(args, report)
    started = time.monotonic()
    try:
        soak.start()
        schedule = build_cluster_schedule(args.seed, args.minutes, list(soak.hosts), args.tor)
        say(f"{len(schedule)} faults over {args.minutes:g} min")
        soak.run_schedule(schedule, args.minutes * 60.0)
        say("fault phase over")
        soak.finish()
        account(soak)
        report.runtime_s = time.monotonic() - started
        report.judge()
    except SoakError as e:
        report.failures.append(f"soak aborted: {e}")
    except BaseException as e:
        report.failures.append(f"soak aborted: {type(e).__name__}: {e}")
        raise
    finally:
        soak.cleanup()
    print(report.text(), flush=True)
    if args.single_host:  # its verdict is its own: the line says PASS or FAIL
        try:
            report.single_host = single_host(args)
            print(report.single_host_line(), flush=True)
        except Exception as e:
            print(f"side by side: bench/soak.py failed: {type(e).__name__}: {e}", flush=True)
    if args.json:
        print(to_json(report), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

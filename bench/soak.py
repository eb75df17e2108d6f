"""Fault-injection soak: the whole daemon under a seeded storm of faults, then every row counted.

Run from the repository root:

    .venv/bin/python bench/soak.py [--minutes M] [--seed S] [--tor]
                                   [--managed | --clickhouse ch26] [--json]

Exit status 0 only when the daemon lost and doubled nothing it could have kept (see "What counts
as loss" below), every Parquet file is sound and holds only its hour, and the daemon is healthy
at the end.  `--minutes 60` is the long run; the default (3) and the test's 1.2 are short ones.

What runs (all on 127.0.0.1, nothing else is contacted)
--------------------------------------------------------
* the MEXC simulator (mexc/simulator/) in this process, `--rate` frames/s per stream (three
  streams per symbol), its event clock the same accelerated EventClock the daemon's exporter
  uses (export.clock_speed / clock_anchor_ms): an event hour passes every `--hour-seconds`
  wall seconds, so hourly rotations and Parquet files happen every few seconds;
* ClickHouse: our own server (clickhouse.managed = false): Debian's 18.16, or with
  `--clickhouse ch26` a current release (chdb-core, tests/chdb_server.py); or with `--managed`
  the daemon's own;
* `mexc run` with three collectors (BTC_USDT, ETH_USDT, SOL_USDT) and the exporter; export.dir
  is a small tmpfs when `mount -t tmpfs` works (root), else a plain directory;
* with `--tor` a private Tor network (tests/tor_network.py: authorities and exits on
  127.0.0.0/8, never the public network) and one daemon tor per collector; every tor socket
  is checked to be loopback-only while the soak runs and at the end.

Faults (a schedule of (time, fault) drawn from --seed; soaklib/schedule.py)
--------------------------------------------------------------------------
  kill_collector / stop_collector   SIGKILL; SIGSTOP..SIGCONT, short (1-3 s) or longer than
                                    supervisor.heartbeat_timeout (the supervisor kills it)
  kill_exporter / stop_exporter     the same for the exporter
  kill_tor / stop_tor               (--tor) the same for a collector's tor
  clickhouse_outage                 ClickHouse stopped 10-60 s (scaled down for short runs) and
                                    started again; with --managed SIGKILLed (the daemon restarts it)
  disk_full                         export.dir full (a filler file on the tmpfs; without tmpfs the
                                    directory is replaced by a file) for a while
  reload                            SIGHUP with one symbol removed, later SIGHUP with it back; some
                                    reloads first try an invalid file (it must be rejected)
  kill_supervisor                   SIGKILL of `mexc run`, then `mexc run` again
  disconnect / stall                the simulator drops every connection / sends nothing for 1-3 s
                                    or for longer than exchange.dead_after
  burst                             one symbol gets a second's worth of frames at 100x the rate
  junk / huge                       non-JSON, unknown channel, wrong field types, gzip deals, bad
                                    binary frames; a push of several MB
ClickHouse outages, full disks, reloads and supervisor kills are "exclusive": each has a slot of
the run to itself.  The lighter faults fall anywhere except around a supervisor kill; one
process has one fault at a time, and after a kill (or a stop long enough to be taken for a
hang) it is left alone for 20 s (five exits a minute would be flapping, by design).

What counts as loss, and why
----------------------------
The simulator records every frame whose sendall() completed, as the rows a correct collector
must store, in send order (`expected_rows`).  A data row's `ts` is its event time, unique per
symbol, so a data row is identified by (symbol, ts); its content must be the (mt, m) sent.
Stored = the union of every Parquet file and the live {name}_current / _previous tables (and a
{name}_fresh a crash might leave).  Per symbol:

* duplicates: a data row stored more than once.  Always a failure.
* corrupt: a stored row whose content differs from what was sent with that ts.  Always a failure.
* lost: sent, not stored.  Rows can be lost without a bug only while the symbol's connection is
  down or its collector dies: a SIGKILLed collector takes with it the rows in its memory (its
  batch, its insert queue: everything not yet in ClickHouse or its spool) and the bytes still in
  the socket buffers, and a dropped connection loses what was in flight.  So a status sampler
  (once a second) records *outage windows* per symbol: from the last sample that saw the
  collector connected in its previous (pid, reconnects) epoch - 1.5 s of heartbeat staleness
  (or from the fault, when a planned fault on that collector came first) until the first
  sample that sees it connected again (+0.5 s); and from the daemon's start until a collector
  is first seen connected.  Windows are mapped from wall time to event time
  with the same EventClock, with 0.5 s of slack on each side, and then extended backwards over
  the contiguous run (in send order) of lost rows that reaches the window, never across a stored
  row: a collector stores rows strictly in the order received and its spool keeps the oldest
  rows, so what a kill costs is exactly such a run (how far a window was extended is reported).
  Two exceptions, both bounded and both from the gap ledger's records: a deal stored inside a
  ledger gap reaching into the window came from REST backfill, not live, and is stepped over
  for up to 2.5 s before the window (a SIGKILL's allowance: latency_target plus the insert in
  flight); and a dead_socket gap's silence before the window is explained back to the gap's
  start, at most dead_after + a ping + 1 s (a silent socket is found only dead_after after its
  last frame, and the status sampler sees it only then).
  Lost rows inside windows are reported: rows, and "gap seconds" (for each run of consecutive
  lost rows, the wall time from its first to its last, summed).
  Rows sent on a connection after a newer connection for the same symbol had subscribed are
  lost on a superseded connection, reported apart and not a failure: a collector leaves a
  connection before it opens the next, so nobody reads these.  (A SIGKILLed tor's exit stream
  can stay open at the exit relay for seconds, once 52 s, and the simulator's sendall() keeps
  completing into the loopback kernel buffers, long after the collector is connected again
  through the new tor and its window has closed.)  The simulator tells them apart
  (orphaned_rows).
  A lost row outside every window is a failure.  ClickHouse outages, full disks, exporter
  crashes, rotations, short stops, short stalls, bursts and bad frames open no window: they
  must cost nothing.
* unrecorded: a stored data row the simulator did not record.  A sendall() that fails half way
  (the connection is being torn down) may still deliver complete frames; inside a window that is
  expected, outside one it is a failure.
* backfilled: a stored trade row no WebSocket sent but the simulator's market made (its truth,
  `sim.trades()`): the collector fetched it over REST after a gap.  Not a failure; counted.
* the gap ledger (table `gaps`, read back with Store.gaps): every outage window after the
  symbol's first stored row must overlap a ledger record of that symbol, else a failure.
  Against the truth, per symbol: trades made inside windows, those no WebSocket sent (missing
  before backfill) and those stored nowhere (missing after backfill).  A gap is "reachable"
  when a REST answer the simulator served after the gap's end reached back to its start (or
  listed every trade there was): a trade missing inside a reachable gap, or inside one the
  ledger calls covered, is a failure.  Longer gaps (more trades than a REST answer holds at
  the soak's trade rate) lose trades by design, reported (soaklib/ledger.py).
* dead letters (mt = 'dl', no event time): the multiset of texts stored must equal the one sent
  (a bad binary frame's text is the collector's own `binary:<hex>`, matched by prefix), except
  that injections made inside an outage window of their symbol may be missing.

Windows that are not explained by a planned fault are listed as unplanned reconnects or
daemon-initiated restarts (a collector restarted after exiting 0, e.g. by the Tor exit
separation, which makes it reconnect through a new circuit); a collector that restarted without
a planned cause and did not exit 0 is an unplanned crash, a failure.  The longest window per
symbol is reported; one over LONG_WINDOW (60 s, longer than any single fault keeps a collector
away) keeps the work dir with its logs, but is not a failure by itself.

At the end: every fault undone, the daemon healthy again, then sim.stop_data(), the collectors
drained (nothing buffered, spooled or held), `mexc export --once` (exit 0 required), 20 fresh
frames per symbol (so `mexc verify`'s "data in the last 5 minutes" check finds rows in
{name}_current, which the rotations every few seconds keep emptying) and `mexc verify --config`
(exit 0 required), counts settled, the daemon's health checked (status answers, every child
running and connected, no restart in the last 5 s), SIGTERM (the daemon must exit 0 within
15 s), then every file and table read back (each file readable, mt never null, every ts inside
the file's hour): the daemon is stopped first, or its rotations would move rows from the tables
to the files while they are read.
"""
from __future__ import annotations

import argparse
import sys

# bench/ (this script's directory) is on sys.path; soaklib puts the repository root there too.
from soaklib.common import SoakError
from soaklib.report import to_json
from soaklib.world import Soak
from tests.chdb_server import SERVERS

# The parts, one concern each, are in bench/soaklib/ (its docstring lists them).


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="length of the fault phase (default 3; the long run is 60)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--tor", action="store_true",
                        help="collectors through their tors on a private Tor network")
    parser.add_argument("--managed", action="store_true",
                        help="the daemon runs ClickHouse itself (clickhouse.managed = true)")
    parser.add_argument("--clickhouse", choices=sorted(SERVERS), default="ch18",
                        help="the external server: ch18 Debian's clickhouse-server (default), "
                             "ch26 a current release (chdb-core); not with --managed")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="simulator frames/s per stream, three streams per symbol (100)")
    # Longer than any outage the schedule injects (about 14 s at most): an event hour with no
    # data at all would be a real collection gap, which `mexc verify` rightly reports.
    parser.add_argument("--hour-seconds", type=float, default=20.0,
                        help="wall seconds per event hour (20)")
    parser.add_argument("--no-tmpfs", action="store_true",
                        help="no tmpfs for export.dir: a full disk is export.dir replaced by a "
                             "file for a while")
    parser.add_argument("--keep", action="store_true", help="keep the work dir even on success")
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0.5:
        parser.error("--minutes must be more than 0.5")
    if args.managed and args.clickhouse != "ch18":
        parser.error("--managed runs clickhouse-server (clickhouse.binary): no --clickhouse")
    soak = Soak(args)
    try:
        report = soak.run()
    except SoakError as e:
        soak.report.failures.append(f"soak aborted: {e}")
        report = soak.report
    except BaseException as e:
        soak.report.failures.append(f"soak aborted: {type(e).__name__}: {e}")
        raise
    finally:
        soak.cleanup()
    print(report.text(), flush=True)
    if args.json:
        print(to_json(report), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

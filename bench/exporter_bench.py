"""Benchmark of the exporter: one hour of rows to Parquet (time, memory, size), and how long
collectors hold their rows while the daemon rotates tables.

Run from the repository root:

    .venv/bin/python bench/exporter_bench.py [--rows N] [--rotation-seconds S]
                                             [--servers ch18,ch26] [--mix live|book] [--json]

Each part runs once per server (default both of the tests' servers: Debian's 18.16 and a
current release from chdb-core, tests/chdb_server.py), and the report ends with the export
figures side by side.

Everything listens on 127.0.0.1: a private ClickHouse in a temporary directory, the simulator
CLI (`python -m mexc.simulator`) in a process of its own, and the daemon as users run it.

Export.  N rows (default 1,000,000) of the live mix, made by the simulator's own frame
generator (mexc/simulator/feed.py): ~70% deals `price|volume|direction`, 25% depth rows with 20+20
levels `[p,a],...|[p,a],...` (~670 chars), 5% ticker; ts spread evenly over the last complete
UTC hour (plus 0-3 ms of jitter, so the rows are not exactly sorted), rts = ts + 2..12 ms.
With --mix book the rows are a whole book's unmerged increments instead (`bu`, one per
version, 1-3 levels each: mexc/simulator/book.py), as exchange.book = "full" stores them; an
hour of ETH_USDT at its live ~2,200 frames/s is about 8,000,000 such rows.
They go into btc_current in BATCH_ROWS-row columnar inserts (clickhouse-driver).  The table's
size on disk is then the size of its data directory, <clickhouse>/data/data/<db>/btc_current/
(system.parts knows nothing of StripeLog on 18.16).  Then ONE `Exporter(config).cycle()` runs
in a spawned child process, with a fixed clock 61 s after the end of that hour: it rotates the
table, writes, verifies and logs the hour's file and drops the previous table.  Figures:
  - the cycle's wall time, measured in the child around cycle() (imports and start-up
    excluded);
  - its phases: the same rows go into a second database, whose cycle runs under cProfile in a
    second child; each phase is the cumulative time of one function in that profile (the
    exporter's rotation and hour export, Store.move_back, parquet_files.to_table, verify and
    sha256).  The profiler slows the cycle down, so its total is shown next to the unprofiled
    one and the phases are that cycle's seconds, not shares of the unprofiled one;
  - the child's peak RSS: the larger of its ru_maxrss at the end and psutil samples taken by
    the parent every RSS_POLL s (the child's RSS after its imports is shown too);
  - the Parquet file's bytes against the ClickHouse table's bytes;
  - the reference: the same N rows in a third database, rotated into its previous table, and
    ClickHouse's own `FORMAT Parquet` of the exporter's hour query (Store.hour_stream) written
    to a file, timed from the request to the last byte on disk; only servers that have the
    format (not 18.16).

Rotation pause.  The daemon (`mexc run --config X`, this checkout's code) with three symbols,
tor off, clickhouse.managed = false (the private server), the simulator at --rate
SIMULATOR_RATE frames/s per stream as exchange.url, and an accelerated event clock
(export.clock_speed = 600 anchored now: an hour passes every 6 s; export.delay = 5).  Once
every collector stores rows, it runs --rotation-seconds (default 60, ~10 rotations); the
daemon's log (all children log to its stderr) then gives, per rotation and collector, how long
the collector held its rows (`writing again: rotation=... ended after X.XXs`, 10 ms
resolution), and per rotation the exporter's own swap time (`rotated ... in X.XXXs`).  At the
end `mexc status --json --config X` must answer and show every child running, no restarts,
ClickHouse reachable and no export errors.  Note: the simulator stamps rows with the wall
clock, so every accelerated "hour" exports into the file of the real current hour (the late-row
merge path: old file read back and rewritten), and the tables are small (seconds of data), so
the swap here is cheaper than with a real hour's table -- the export part reports the rotation
step for N rows as well.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import json
import logging
import os
import pstats
import random
import re
import resource
import subprocess
import sys
import time

# bench/ (this script's directory) is on sys.path; benchlib puts the repository root there too.
import benchlib
import psutil

from benchlib import MEXC, MIB, BenchError, PeakMemory, percentile, verdict
from core.store import current_table
from mexc.simulator import book_update_rows, live_mix_rows

HOUR_MS = 3_600_000
SYMBOL, NAME = "BTC_USDT", "btc"
DAEMON_SYMBOLS = ["BTC_USDT", "ETH_USDT", "SOL_USDT"]
ROW_KINDS = ("d", "dp", "t", "bu")  # live mix: ~70% deals, 25% depth, 5% ticker; or book
MIXES = {"live": live_mix_rows, "book": book_update_rows}
MIX = ["live"]  # --mix
BATCH_ROWS = 50_000
RSS_POLL = 0.02
SIMULATOR_RATE = 200.0  # frames/s per (symbol, channel) stream
CLOCK_SPEED, EXPORT_DELAY = 600.0, 5.0
GOAL_EXPORT_S, GOAL_RSS_MIB, GOAL_HOLD_P99_MS = 2.0, 350.0, 200.0
GOAL_BY_SERVER = {"ch18": 1.5, "ch26": 1.0}  # export cycle s (26.x: and within 2x of the ref)

# The steps of a cycle read from its profile: key -> what the report calls it ("  " = a part
# of the step above it).
PHASES = {
    "rotate": "rotate (swaps, then move back)",
    "move_back": "  of which move back (INSERT SELECT)",
    "commit": "stream, write and commit the file",
    "to_table": "  of which batches -> file schema",
    "verify": "  of which verify (read back)",
    "sha256": "  of which sha256",
}
# key -> (module, function): the function whose cumulative time in the profile is the phase
PHASE_FUNCTIONS = {
    "rotate": ("exporter.exporter", "_rotate"),
    "move_back": ("core.store", "move_back"),
    "commit": ("exporter.exporter", "_export_hour"),
    "to_table": ("exporter.parquet_files", "to_table"),
    "verify": ("exporter.parquet_files", "verify"),
    "sha256": ("exporter.parquet_files", "sha256"),
}

HOLD_LINE = re.compile(r"(collector\[\w+\]) writing again: rotation=(\S+) ended after ([\d.]+)s")
ROTATED_LINE = re.compile(r" rotated (\S+) in ([\d.]+)s")
TROUBLE_LINE = re.compile(r"Traceback|hold timed out|no hold from|no rotate_done|"
                          r"export cycle incomplete")


# --- the bench's world: ClickHouse, temp dir, configs ----------------------------------------

class World(benchlib.World):
    def table_bytes(self, database: str, table: str) -> int:
        """Bytes of a table's data directory (StripeLog: data.bin, index.mrk, sizes.json)."""
        path = os.path.join(self.clickhouse.directory, "data", "data", database, table)
        if not os.path.isdir(path):  # an Atomic database keeps its tables under store/
            client = self.client()
            try:
                found = client.execute("SELECT data_paths FROM system.tables WHERE "
                                       "database = %(d)s AND name = %(t)s",
                                       {"d": database, "t": table})
            finally:
                client.disconnect()
            path = found[0][0][0] if found and found[0][0] else path
        if not os.path.isdir(path):
            raise BenchError(f"no data directory for {database}.{table} at {path}")
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# --- export: rows, the child process, the figures ---------------------------------------------

def row_batches(n: int, hour_ms: int, seed: int = 1):
    """n rows of the live mix over the hour from hour_ms, as columnar batches
    (ts, mt, m, rts) of up to BATCH_ROWS rows.  Row texts come from the simulator's feed."""
    rng = random.Random(seed)
    rows = MIXES[MIX[0]](n, SYMBOL, seed)
    for start in range(0, n, BATCH_ROWS):
        ts, mt, m, rts = [], [], [], []
        for i, (kind, text) in zip(range(start, min(n, start + BATCH_ROWS)), rows):
            stamp = min(hour_ms + i * HOUR_MS // n + rng.randrange(4), hour_ms + HOUR_MS - 1)
            ts.append(stamp)
            mt.append(kind)
            m.append(text)
            rts.append(stamp + rng.randrange(2, 13))
        yield ts, mt, m, rts


def insert_hour(world: World, database: str, n: int, hour_ms: int) -> dict:
    """The hour's rows into btc_current; the table's size on disk afterwards."""
    store = world.store(database)
    insert_s, mix = 0.0, dict.fromkeys(ROW_KINDS, 0)
    texts = 0
    try:
        store.setup([NAME])
        for columns in row_batches(n, hour_ms):
            started = time.perf_counter()
            store.insert_rows(current_table(NAME), list(zip(*columns)))
            insert_s += time.perf_counter() - started
            for kind in columns[1]:
                mix[kind] += 1
            texts += sum(len(text) for text in columns[2])
        count = store.count(current_table(NAME))
    finally:
        store.close()
    if count != n:
        raise BenchError(f"{database}.btc_current has {count} rows after the insert, "
                         f"expected {n}")
    return {"insert_s": insert_s, "mix": mix, "avg_text_bytes": texts / max(1, n),
            "table_bytes": world.table_bytes(database, current_table(NAME))}


class FixedClock:
    """The exporter's clock, stopped at one moment (tests' SetClock)."""

    def __init__(self, now_ms: int):
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now

    def wall_seconds_until(self, _event_ms: int) -> float:
        return 0.0


def phase_seconds(profile: cProfile.Profile) -> dict:
    """key -> cumulative seconds of the phase's function in the profile (0 if never called);
    a function is known by its module's file and its name."""
    functions = pstats.Stats(profile).get_stats_profile().func_profiles
    phases = {}
    for key, (module, name) in PHASE_FUNCTIONS.items():
        found = functions.get(name)
        if found is not None and found.file_name != importlib.import_module(module).__file__:
            raise BenchError(f"the profile's {name} is in {found.file_name}, not in {module}")
        phases[key] = found.cumtime if found is not None else 0.0
    return phases


def export_child(config_data: dict, now_ms: int, profile: bool, pipe) -> None:
    """Spawned process: one Exporter cycle; sends its result, wall time and memory, and with
    `profile` the cycle runs under cProfile and its phases are sent too."""
    logging.basicConfig(level=logging.WARNING, format="export child: %(message)s")
    from core import config as configuration
    from exporter.exporter import Exporter

    config = configuration.parse(config_data, "bench")
    exporter = Exporter(config, clock=FixedClock(now_ms))
    profiler = cProfile.Profile() if profile else None
    baseline_rss = psutil.Process().memory_info().rss
    pipe.send("ready")
    pipe.recv()  # the parent's RSS sampler is running
    started = time.perf_counter()
    if profiler is None:
        ok, files, error = exporter.cycle()
    else:
        ok, files, error = profiler.runcall(exporter.cycle)
    seconds = time.perf_counter() - started
    exporter.store.close()
    pipe.send({"ok": ok, "files": files, "error": error, "seconds": seconds,
               "phases": None if profiler is None else phase_seconds(profiler),
               "baseline_rss": baseline_rss,
               "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def run_export_child(config_data: dict, now_ms: int, profile: bool = False) -> dict:
    process, pipe = benchlib.spawn(export_child, config_data, now_ms, profile,
                                   name="export-child")
    try:
        receive(pipe, process, 120, "the export child to start")
        sampler = PeakMemory(process.pid, RSS_POLL)
        sampler.start()
        try:
            pipe.send("go")
            result = receive(pipe, process, 600, "the export cycle")
        finally:
            sampler.stop()
        process.join(30)
    finally:
        if process.is_alive():
            process.terminate()
            process.join(5)
    result["sampled_rss"] = sampler.peak_rss
    return result


def receive(pipe, process, timeout: float, what: str):
    return benchlib.receive(pipe, process, timeout, what, "the export child")


def export_cycle(world: World, database: str, n: int, hour: int, profile: bool = False):
    """The hour's n rows into `database`, then one export cycle in a child: (what
    insert_hour says, the child's result, the file written)."""
    import pyarrow.parquet as pq

    inserted = insert_hour(world, database, n, hour)
    data = world.config_data(database, [SYMBOL])
    result = run_export_child(data, hour + HOUR_MS + 61_000, profile)
    if not result["ok"] or len(result["files"]) != 1:
        raise BenchError(f"export cycle failed: ok={result['ok']} files={result['files']} "
                         f"error={result['error']}")
    path = result["files"][0]
    rows = pq.read_metadata(path).num_rows
    if rows != n:
        raise BenchError(f"{path} has {rows} rows, expected {n}")
    return inserted, result, path


def reference_s(world: World, n: int, hour: int) -> float | None:
    """Seconds for ClickHouse's own FORMAT Parquet of the hour's n rows into a file; None
    where the server has no Parquet output."""
    from urllib.error import HTTPError

    database = "bench_export_reference"
    insert_hour(world, database, n, hour)
    path = os.path.join(world.dir, "reference.parquet")
    with world.store(database) as store:
        store.swap(NAME)
        started = time.perf_counter()
        try:
            with store.hour_stream(NAME, hour, "Parquet") as response, open(path, "wb") as f:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
        except HTTPError:
            return None
        seconds = time.perf_counter() - started
    import pyarrow.parquet as pq

    if pq.read_metadata(path).num_rows != n:
        raise BenchError(f"the reference file has {pq.read_metadata(path).num_rows} rows")
    return seconds


def export_run(world: World, n: int) -> dict:
    """The measured cycle (time, memory, sizes); then the same rows again in another database,
    exported under cProfile for the phases; then the reference."""
    hour = int(time.time() * 1000) // HOUR_MS * HOUR_MS - HOUR_MS  # the last complete hour
    inserted, result, path = export_cycle(world, "bench_export", n, hour)
    _inserted, profiled, _path = export_cycle(world, "bench_export_profiled", n, hour,
                                              profile=True)
    with world.store() as store:
        http_format = store.features.http_format
    return {**inserted, "rows": n, "file": os.path.basename(path), "http_format": http_format,
            "reference_s": reference_s(world, n, hour),
            "file_bytes": os.path.getsize(path), "cycle_s": result["seconds"],
            "phases": profiled["phases"], "profiled_cycle_s": profiled["seconds"],
            "baseline_rss": result["baseline_rss"],
            "peak_rss": max(result["maxrss"], result["sampled_rss"]),
            "maxrss": result["maxrss"], "sampled_rss": result["sampled_rss"]}


# --- rotation pause: the daemon with an accelerated clock -------------------------------------

class Daemon(benchlib.Daemon):
    def status_cli(self) -> tuple[int, dict | None, str]:
        """`mexc status --json --config X` as an operator runs it: (exit code, JSON, stderr)."""
        done = subprocess.run([MEXC, "status", "--json", "--config", self.config],
                              capture_output=True, text=True, timeout=30, env=self.env)
        try:
            return done.returncode, json.loads(done.stdout), done.stderr
        except ValueError:
            return done.returncode, None, done.stderr + done.stdout


def healthy(code: int, status: dict | None) -> tuple[bool, str]:
    """The status answer of a daemon that is fine: every child running, never restarted,
    ClickHouse reachable, no export errors."""
    if code != 0 or status is None:
        return False, f"mexc status exited with {code}"
    problems = [f"{c['name']} {c['state']} restarts={c['restarts']}" for c in status["children"]
                if c["state"] != "running" or c["restarts"]]
    supervisor = status["supervisor"]
    if not supervisor["clickhouse"]["reachable"]:
        problems.append("clickhouse not reachable")
    errors = (supervisor.get("export") or {}).get("errors")
    if errors:
        problems.append(f"exporter errors={errors}: {supervisor['export'].get('last_error')}")
    if problems:
        return False, "; ".join(problems)
    kinds = sorted(c["kind"] for c in status["children"])
    return True, f"{len(kinds)} children running ({', '.join(kinds)}), no restarts, no errors"


def rotation_run(world: World, seconds: float, stack: contextlib.ExitStack) -> dict:
    simulator, url = benchlib.start_simulator(SIMULATOR_RATE)
    stack.callback(benchlib.stop_simulator, simulator)
    data = world.config_data(
        "bench_rotation", DAEMON_SYMBOLS,
        exchange={"url": url, "reconnect_min": 0.2, "reconnect_max": 2.0},
        export={"clock_speed": CLOCK_SPEED, "clock_anchor_ms": int(time.time() * 1000),
                "delay": EXPORT_DELAY})
    daemon = Daemon(world.write_config(data), data["paths"]["runtime_dir"], len(DAEMON_SYMBOLS))
    stack.callback(daemon.stop)
    daemon.wait_flowing()
    offset = daemon.log_size()
    time.sleep(seconds)
    daemon.check_alive()
    code, status, stderr = daemon.status_cli()
    ok, health = healthy(code, status)
    if not ok and stderr:
        health += f" ({stderr.strip()})"
    text = daemon.log_text(offset)
    return {**rotation_figures(text), "seconds": seconds, "healthy": ok, "health": health,
            "exported_files": len(os.listdir(data["export"]["dir"]))
            if os.path.isdir(data["export"]["dir"]) else 0}


def rotation_figures(log_text: str) -> dict:
    holds = [(who, rotation, float(s)) for who, rotation, s in HOLD_LINE.findall(log_text)]
    swaps = sorted(float(s) for _names, s in ROTATED_LINE.findall(log_text))
    if not holds:
        raise BenchError("no collector logged the end of a hold (`writing again: rotation=`)")
    ms = sorted(s * 1000 for _who, _r, s in holds)
    rotations = {rotation for _who, rotation, _s in holds}
    return {
        "rotations": len(rotations), "exporter_rotations": len(swaps), "holds": len(holds),
        "hold_p50_ms": percentile(ms, 0.50), "hold_p99_ms": percentile(ms, 0.99),
        "hold_max_ms": ms[-1],
        "swap_p50_ms": percentile(swaps, 0.50) * 1000 if swaps else None,
        "swap_max_ms": swaps[-1] * 1000 if swaps else None,
        "trouble_lines": [line for line in log_text.splitlines() if TROUBLE_LINE.search(line)],
    }


# --- report ----------------------------------------------------------------------------------

def machine_info(world: World) -> dict:
    import clickhouse_driver
    import pyarrow

    return benchlib.machine_info(world, memory_gib=psutil.virtual_memory().total / 1024 ** 3,
                                 pyarrow=pyarrow.__version__,
                                 clickhouse_driver=clickhouse_driver.__version__)


def report_rows(e: dict, r: dict | None) -> list:
    peak = e["peak_rss"] / MIB
    export = [
        (f"export cycle, {e['rows']:,} rows, s", f"{e['cycle_s']:.2f}", f"< {GOAL_EXPORT_S:g}",
         verdict(e["cycle_s"] < GOAL_EXPORT_S)),
        ("export child peak RSS, MiB", f"{peak:.0f}", f"< {GOAL_RSS_MIB:.0f}",
         verdict(peak < GOAL_RSS_MIB)),
        ("export child RSS before the cycle, MiB", f"{e['baseline_rss'] / MIB:.0f}", "", ""),
        ("ClickHouse table on disk, MB", f"{e['table_bytes'] / 1e6:.1f}", "", ""),
        ("Parquet file, MB", f"{e['file_bytes'] / 1e6:.1f}", "<= table",
         verdict(e["file_bytes"] <= e["table_bytes"])),
    ]
    return export if r is None else export + [
        ("collector hold per rotation p50, ms", f"{r['hold_p50_ms']:.0f}", "", ""),
        ("collector hold per rotation p99, ms", f"{r['hold_p99_ms']:.0f}",
         f"< {GOAL_HOLD_P99_MS:.0f}", verdict(r["hold_p99_ms"] < GOAL_HOLD_P99_MS)),
        ("collector hold per rotation max, ms", f"{r['hold_max_ms']:.0f}", "", ""),
        ("exporter swap (rotated ... in) p50, ms",
         "-" if r["swap_p50_ms"] is None else f"{r['swap_p50_ms']:.1f}", "", ""),
        ("exporter swap (rotated ... in) max, ms",
         "-" if r["swap_max_ms"] is None else f"{r['swap_max_ms']:.1f}", "", ""),
        ("daemon healthy at the end", "yes" if r["healthy"] else "no", "yes",
         verdict(r["healthy"])),
    ]


def print_report(e: dict, r: dict | None, machine: dict) -> None:
    benchlib.print_machine(machine, "pyarrow", "clickhouse_driver")
    print(f"export over: {e['http_format'] or 'native protocol rows'}")
    mix = ", ".join(f"{kind} {count / e['rows']:.0%}" for kind, count in e["mix"].items()
                    if count)
    print(f"export: {e['rows']:,} rows ({mix}; {e['avg_text_bytes']:.0f} B average m) inserted "
          f"in {e['insert_s']:.1f}s ({e['rows'] / e['insert_s']:,.0f} rows/s) -> {e['file']}")
    print(f"  peak RSS: ru_maxrss {e['maxrss'] / MIB:.0f} MiB, sampled every "
          f"{RSS_POLL * 1000:.0f} ms {e['sampled_rss'] / MIB:.0f} MiB")
    print(f"  file / table: {e['file_bytes'] / e['table_bytes']:.2f}")
    print(f"  phases of the same cycle under cProfile ({e['profiled_cycle_s']:.3f}s there, "
          f"{e['cycle_s']:.3f}s without):")
    accounted = sum(s for k, s in e["phases"].items() if not PHASES[k].startswith(" "))
    steps = [(PHASES[k], s) for k, s in e["phases"].items()]
    for label, seconds in steps + [("rest (connect, EXISTS, DROP, state, log)",
                                    e["profiled_cycle_s"] - accounted)]:
        print(f"  {label:<40} {seconds:6.3f}s")
    if r is None:
        benchlib.print_table(report_rows(e, r), value_width=8, goal_width=8)
        return
    print(f"rotation: {r['seconds']:.0f} s of `mexc run` with {len(DAEMON_SYMBOLS)} collectors, "
          f"simulator {SIMULATOR_RATE:g} frames/s per stream, clock x{CLOCK_SPEED:g}: "
          f"{r['rotations']} rotations seen by collectors, {r['exporter_rotations']} by the "
          f"exporter, {r['holds']} holds ({r['holds'] / max(1, r['rotations']):.1f} per "
          f"rotation), {r['exported_files']} files")
    print(f"  status at the end: {r['health']}")
    for line in r["trouble_lines"][:10]:
        print(f"  log: {line}")
    print()
    benchlib.print_table(report_rows(e, r), value_width=8, goal_width=8)


# --- main ------------------------------------------------------------------------------------

def print_side_by_side(runs: dict) -> None:
    """The export figures of every server, with ClickHouse's own Parquet output as the
    reference."""
    print(f"\nexport of one hour, {next(iter(runs.values()))[0]['rows']:,} rows, side by side:")
    print(f"{'server':<28} {'over':<12} {'cycle s':>8} {'reference s':>12} {'cycle/ref':>10}  goal")
    for server, (e, _r, machine) in runs.items():
        ref, cycle, goal = e["reference_s"], e["cycle_s"], GOAL_BY_SERVER.get(server, GOAL_EXPORT_S)
        met = cycle < goal and (ref is None or cycle <= 2 * ref)
        ref_text, ratio = ("-", "-") if ref is None else (f"{ref:.2f}", f"{cycle / ref:.2f}")
        print(f"{server + ' ' + machine['clickhouse']:<28} {e['http_format'] or 'native':<12} "
              f"{cycle:>8.2f} {ref_text:>12} {ratio:>10}  "
              f"< {goal:g} s{'' if ref is None else ', <= 2x ref'}: {verdict(met)}")


def run(args) -> int:
    runs = {}
    for server in args.servers:
        with contextlib.ExitStack() as stack:
            world = World.start(stack, f"mexc-bench-{server}-", server)
            export = export_run(world, args.rows)
            rotation = (rotation_run(world, args.rotation_seconds, stack)
                        if args.rotation_seconds > 0 else None)
            runs[server] = (export, rotation, machine_info(world))
    for server, (export, rotation, machine) in runs.items():
        print(f"=== {server}")
        print_report(export, rotation, machine)
    print_side_by_side(runs)
    if args.json:
        benchlib.print_json(runs[args.servers[0]][2], {
            server: {**{f"export_{k}": v for k, v in export.items()},
                     **{f"rotation_{k}": v for k, v in (rotation or {}).items()},
                     "clickhouse": machine["clickhouse"]}
            for server, (export, rotation, machine) in runs.items()})
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows in the exported hour (default 1,000,000)")
    parser.add_argument("--rotation-seconds", type=float, default=60.0,
                        help="length of the daemon run (default 60: ~10 rotations; 0: none)")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=["ch18", "ch26"],
                        help="comma-separated servers of tests/chdb_server.py SERVERS "
                             "(default ch18,ch26)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="live",
                        help="rows of the live mix, or a whole book's increments (default live)")
    args = benchlib.parse_args(parser, argv)
    MIX[0] = args.mix
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    return benchlib.main("exporter_bench", run, args)


if __name__ == "__main__":
    sys.exit(main())

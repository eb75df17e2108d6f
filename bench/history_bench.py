"""Benchmark of mexc.history: a day of BTC-like trades from the hourly archive to a typed table.

Run from the repository root:

    .venv/bin/python bench/history_bench.py [--trades N] [--rounds R] [--no-books] [--json]

The archive.  24 hourly files, written with the exporter's own HourFile (zstd, row groups of
exporter.ROW_GROUP_ROWS rows) into a temporary directory, holding N trades (default
1,000,000, about a busy BTC_USDT day) spread evenly over the day, their prices a random walk
around 115,000.0 spelled by the simulator's decimal_text in its mix of styles (plain, padded,
exponent), volumes 1..5000, sides 1/2; rts = ts + 2..12 ms.  Unless --no-books, the files
also hold the live mix's other rows in its proportions (CHANNEL_WEIGHTS: for every 2.8 trades
one depth row of 20+20 levels and 0.2 ticker rows), cycled from a pool the simulator
generated, so a reader has to skip them as it would in a real archive.

The figures, each the median (and the best) of R rounds, the rounds taking turns, each in a
fresh spawned process (so its peak RSS, VmHWM, is its own; the peak after its imports is shown
too), wall time and CPU time (all threads; steadier than wall time on a loaded machine):
  - reference: pyarrow.parquet.read_table of the 24 files at once (pyarrow reads them in
    parallel) and a filter to mt = 'd': the same rows, untyped (ts, m text, rts), with the
    same library and no typing;
  - Archive.trades (offline, the files only): typed float64 price/volume, side category;
  - the same with exact=True (decimal128);
  - Archive.bars at 1 minute over the day (reads and types the trades, then groups).
Goal: trades() under 1 s for 1 M trades, and within 2.5x of the reference.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

import benchlib  # puts the repository root on sys.path
import pyarrow

from core import archive
from core.clock import HOUR_MS
from core.store import rows_batch
from exporter import parquet_files
from exporter.exporter import ROW_GROUP_ROWS
from mexc.simulator import decimal_text, live_mix_rows, style_cycle

DAY_START = 1_763_942_400_000  # 2025-11-24T00:00:00Z
BOOK_POOL = 20_000  # distinct depth rows generated; the day's depth rows cycle through them
GOAL_SECONDS = 1.0


def trade_texts(n: int, rng: random.Random):
    """n `price|volume|direction` texts, BTC-like, in the simulator's spellings."""
    styles = style_cycle(rng)
    price = 1_153_098  # units of 0.1
    for _ in range(n):
        price += rng.randint(-3, 3)
        volume = 1 + int(rng.random() ** 3 * 5000)
        yield (f"{decimal_text(price, 1, next(styles))}|{decimal_text(volume, 0, next(styles))}"
               f"|{rng.randint(1, 2)}")


def write_archive(directory: str, trades: int, books: bool) -> int:
    """The day's 24 files; returns the rows written (all types)."""
    rng = random.Random(7)
    texts = trade_texts(trades, rng)
    others = _other_rows() if books else iter(())
    per_hour, written = trades // 24, 0
    for hour in range(24):
        start = DAY_START + hour * HOUR_MS
        n = per_hour if hour < 23 else trades - 23 * per_hour
        rows = [("d", next(texts)) for _ in range(n)]
        if books:  # per 2.8 trades one depth row and 0.2 ticker rows (the live mix)
            rows += list(itertools.islice(others, int(n * 1.2 / 2.8)))
            rng.shuffle(rows)
        ts = [start + i * HOUR_MS // len(rows) for i in range(len(rows))]
        table = parquet_files.to_table([rows_batch(
            [(t, mt, m, t + rng.randint(2, 12)) for t, (mt, m) in zip(ts, rows)])])
        path = archive.hour_path(directory, "btc", start)
        hour_file = parquet_files.HourFile(path, "BTC_USDT", start, table.num_rows)
        for offset in range(0, table.num_rows, ROW_GROUP_ROWS):
            hour_file.write(table.slice(offset, ROW_GROUP_ROWS))
        hour_file.commit()
        written += table.num_rows
    return written


def _other_rows():
    """Depth and ticker rows of the live mix, cycled from a pool."""
    pool = [(mt, m) for mt, m in live_mix_rows(BOOK_POOL * 4) if mt != "d"]
    return itertools.cycle(pool)


# --- the measured work, each in a process of its own ------------------------------------------

def reference(directory: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
    table = pq.read_table(paths, columns=["ts", "mt", "m", "rts"])  # files read in parallel
    return table.filter(pc.equal(table.column("mt"), "d")).num_rows


def typed(directory: str, exact: bool) -> int:
    from mexc import history

    return history.Archive(directory).trades("BTC_USDT", DAY_START, DAY_START + 24 * HOUR_MS,
                                             exact=exact).num_rows


def bars(directory: str) -> int:
    from mexc import history

    return history.Archive(directory).bars("BTC_USDT", DAY_START,
                                           DAY_START + 24 * HOUR_MS).num_rows


WORK = {"reference": (reference, ()), "trades": (typed, (False,)),
        "trades_exact": (typed, (True,)), "bars": (bars, ())}


def measure_child(directory: str, work: str, pipe) -> None:
    function, extra = WORK[work]
    import pyarrow  # noqa: F401  (imports are not part of the figure)
    import mexc.history  # noqa: F401

    rss_after_imports = _max_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = function(directory, *extra)
    pipe.send({"seconds": time.perf_counter() - started, "rows": rows,
               "cpu_seconds": time.process_time() - cpu_started,  # every thread's
               "peak_rss": _max_rss(), "rss_after_imports": rss_after_imports})


def _max_rss() -> int:
    """Peak RSS of this process image (VmHWM: ru_maxrss would carry the parent's over the
    fork that starts a spawned child)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(directory: str, rounds: int) -> dict:
    """{work: figures}; the rounds take turns (reference, trades, ... then again), so a
    change in the machine's load falls on every figure alike."""
    results = {work: [] for work in WORK}
    for _ in range(rounds):
        for work in WORK:
            process, pipe = benchlib.spawn(measure_child, directory, work, name=work)
            results[work].append(benchlib.receive(pipe, process, 300, work, f"the {work} child"))
            process.join(10)
    return {work: _summary(runs) for work, runs in results.items()}


def _summary(runs: list) -> dict:
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "best_seconds": min(r["seconds"] for r in runs),
            "all_seconds": [round(r["seconds"], 3) for r in runs],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "rows": runs[0]["rows"],
            "peak_rss_mib": statistics.median(r["peak_rss"] for r in runs) / benchlib.MIB,
            "rss_after_imports_mib": runs[0]["rss_after_imports"] / benchlib.MIB}


def run(args) -> int:
    directory = tempfile.mkdtemp(prefix="history-bench-")
    try:
        started = time.monotonic()
        rows = write_archive(directory, args.trades, not args.no_books)
        size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        print(f"archive: 24 files, {rows:,} rows ({args.trades:,} trades), {size / 1e6:.1f} MB, "
              f"written in {time.monotonic() - started:.1f}s")
        figures = measure(directory, args.rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ref, trades = figures["reference"], figures["trades"]
    if trades["rows"] != ref["rows"] or ref["rows"] != args.trades:
        raise benchlib.BenchError(f"rows differ: reference {ref['rows']}, trades "
                                  f"{trades['rows']}, written {args.trades}")
    ratio = trades["seconds"] / ref["seconds"]
    rows_table = [
        (f"{work} ({f['rows']:,} rows)",
         f"{f['seconds']:.2f} s (best {f['best_seconds']:.2f}, CPU {f['cpu_seconds']:.2f}), "
         f"{f['peak_rss_mib']:.0f} MiB peak RSS ({f['rss_after_imports_mib']:.0f} after imports)",
         goal, result)
        for work, f, goal, result in (
            ("reference: read + filter, untyped", ref, "baseline", ""),
            ("trades, float64", trades, f"< {GOAL_SECONDS:.0f} s for 1 M",
             benchlib.verdict(trades["seconds"] < GOAL_SECONDS) if args.trades >= 10**6
             else ""),
            ("trades, exact decimals", figures["trades_exact"], "", ""),
            ("bars 1m (1,440)", figures["bars"], "", ""))]
    cpu_ratio = trades["cpu_seconds"] / ref["cpu_seconds"]
    rows_table.append(("trades / reference", f"{ratio:.2f}x (CPU {cpu_ratio:.2f}x)", "< 2.5x",
                       benchlib.verdict(ratio < 2.5)))
    machine = {"nproc": len(os.sched_getaffinity(0)), "python": platform.python_version(),
               "pyarrow": pyarrow.__version__, "load_average": os.getloadavg()[0]}
    print(f"machine: {machine['nproc']} CPUs, Python {machine['python']}, pyarrow "
          f"{machine['pyarrow']}, load average {machine['load_average']:.1f} at the end")
    print(f"medians of {args.rounds} rounds, each in a fresh process; CPU: user + system "
          f"seconds of all its threads")
    benchlib.print_table(rows_table, 62, 14)
    if args.json:
        benchlib.print_json(machine, {"figures": figures, "trades_over_reference": ratio,
                                      "trades_over_reference_cpu": cpu_ratio})
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=1_000_000, help="trades in the day")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--no-books", action="store_true",
                        help="files of trades only (no depth and ticker rows to skip)")
    args = benchlib.parse_args(parser, argv)
    return benchlib.main("history_bench", run, args)


if __name__ == "__main__":
    sys.exit(main())

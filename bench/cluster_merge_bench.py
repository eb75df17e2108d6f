"""Benchmark of a cluster's merge (issue 22): one symbol-hour of N rows from two hosts merged
into one file, beside a single host's export of the same hour, measured in one run.

Run from the repository root:

    .venv/bin/python bench/cluster_merge_bench.py [--rows N] [--server ch18] [--json]

One private ClickHouse (tests/chdb_server.py SERVERS, default Debian's 18.16) on 127.0.0.1.

The hour: N rows (default 1,000,000) of the live mix from the simulator's feed, as
exporter_bench.py makes them (row_batches: ~70% deals with their trade id, 25% depth, 5%
ticker, ts spread over the last complete UTC hour).

Baseline, the single-host export: the rows go into btc_current of database `single`, then ONE
`Exporter(config).cycle()` in this process with a clock 61 s after the hour: rotate, stream
the hour over HTTP, write, verify, log, drop.  Timed around cycle().

The merge: host A's copy is that file.  Host B's copy is the same hour as another host sees
it: the rows of a 6-minute outage (20:00-26:00 into the hour) missing, the 100 trades before
its end without their trade id (REST backfill), every rts 0-4 ms later or earlier.  Both
copies are written as hour files first (not timed).  Then, as ClusterArchive does on the
merging host:
  - B's copy through ClickHouse: Store.put_hour_file on B's side, Store.hour_file on A's
    (here both on the one server: the remote() hop between hosts is not in it);
  - read both copies (pyarrow);
  - merge.merge (the figure the issue asks for);
  - write the merged file (HourFile: zstd, fsync, read back and verified, sha256).
The merged file must hold exactly N rows (A holds every event): otherwise the bench fails.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys
import time

# bench/ (this script's directory) is on sys.path; benchlib puts the repository root there too.
import benchlib
import pyarrow as pa
import pyarrow.parquet as pq

from benchlib import MIB, BenchError, machine_info
from core import archive, store
from core.channels import deal_without_id
from core.clock import HOUR_MS, hour_start
from core.config import load
from exporter import merge, parquet_files
from exporter.exporter import Exporter
from exporter_bench import NAME, SYMBOL, FixedClock, World, insert_hour

OUTAGE = (20 * 60_000, 26 * 60_000)  # ms into the hour host B missed
REST_TRADES = 100  # trades before the outage's end B stored from REST: no trade id


def single_export(world: World, n: int, hour: int) -> dict:
    inserted = insert_hour(world, "single", n, hour)
    config = load(world.write_config(world.config_data("single", [SYMBOL])))
    exporter = Exporter(config, clock=FixedClock(hour + HOUR_MS + 61_000))
    started = time.perf_counter()
    ok, files, error = exporter.cycle()
    seconds = time.perf_counter() - started
    if not ok or len(files) != 1:
        raise BenchError(f"the single-host export failed: {error or files}")
    return {"path": files[0], "export_s": seconds, "insert_s": inserted["insert_s"],
            "file_bytes": os.path.getsize(files[0])}


def host_b_copy(table: pa.Table, hour: int, directory: str) -> str:
    """The hour as host B has it (see the module docstring), written as an hour file."""
    rng = random.Random(2)
    ts = table.column("ts").cast(pa.int64()).to_pylist()
    mt = table.column("mt").cast(pa.string()).to_pylist()
    m = table.column("m").to_pylist()
    rts = table.column("rts").cast(pa.int64()).to_pylist()
    outage = (hour + OUTAGE[0], hour + OUTAGE[1])
    backfilled = [i for i in range(len(ts)) if mt[i] == "d" and outage[0] <= ts[i] < outage[1]]
    rest = set(backfilled[-REST_TRADES:])
    rows = [(ts[i], mt[i], deal_without_id(m[i]) if i in rest else m[i],
             rts[i] + rng.randint(-4, 4))
            for i in range(len(ts)) if i in rest or not outage[0] <= ts[i] < outage[1]]
    path = os.path.join(directory, archive.file_name(NAME, hour))
    parquet_files.write_hour(path, parquet_files.to_table([store.rows_batch(rows)]), SYMBOL,
                             hour)
    return path


def cluster_merge(world: World, a_path: str, hour: int) -> dict:
    copies_dir = os.path.join(world.dir, "host-b")
    os.makedirs(copies_dir)
    b_path = host_b_copy(parquet_files.read(a_path), hour, copies_dir)
    b_sha, b_rows = parquet_files.sha256(b_path), pq.ParquetFile(b_path).metadata.num_rows
    figures = {"b_rows": b_rows, "b_bytes": os.path.getsize(b_path)}
    session = world.store("single")
    try:
        session.create_cluster_tables()
        started = time.perf_counter()
        with open(b_path, "rb") as f:
            session.put_hour_file(NAME, hour, store.COPY, "b", b_sha, b_rows, f.read())
        figures["put_s"] = time.perf_counter() - started
        started = time.perf_counter()
        data = session.hour_file(NAME, hour, store.COPY, "b", b_sha)
        figures["get_s"] = time.perf_counter() - started
    finally:
        session.close()
    started = time.perf_counter()
    copies = [("a", parquet_files.read(a_path)), ("b", pq.read_table(io.BytesIO(data)))]
    figures["read_s"] = time.perf_counter() - started
    started = time.perf_counter()
    merged = merge.merge(copies)
    figures["merge_s"] = time.perf_counter() - started
    path = os.path.join(world.dir, "merged.parquet")
    started = time.perf_counter()
    hour_file = parquet_files.HourFile(path, SYMBOL, hour, merged.num_rows,
                                       schema=parquet_files.MERGED_SCHEMA)
    hour_file.write(merged)
    hour_file.commit()
    figures["write_s"] = time.perf_counter() - started
    figures["merged_rows"], figures["merged_bytes"] = merged.num_rows, os.path.getsize(path)
    figures["from_b"] = merged.column("host").cast(pa.string()).to_pylist().count("b")
    return figures


def run(args) -> int:
    hour = hour_start(int(time.time() * 1000)) - HOUR_MS
    with contextlib.ExitStack() as stack:
        world = World.start(stack, "mexc-bench-merge-", args.server)
        single = single_export(world, args.rows, hour)
        merged = cluster_merge(world, single["path"], hour)
        machine = machine_info(world)
    if merged["merged_rows"] != args.rows:
        raise BenchError(f"the merged file has {merged['merged_rows']:,} rows, expected "
                         f"{args.rows:,} (host A holds every event)")
    total = merged["get_s"] + merged["read_s"] + merged["merge_s"] + merged["write_s"]
    benchlib.print_machine(machine)
    print(f"hour: {args.rows:,} rows; host B's copy {merged['b_rows']:,} rows "
          f"({merged['b_bytes'] / MIB:.1f} MiB), a 6-minute outage, {REST_TRADES} trades "
          f"from REST")
    rows = [
        ("single-host export of the hour (cycle), s", f"{single['export_s']:.2f}", "", ""),
        ("merge of 2 copies, total (get + read + merge + write), s", f"{total:.2f}", "", ""),
        ("  B's copy out of ClickHouse (hour_file), s", f"{merged['get_s']:.2f}", "", ""),
        ("  read both copies, s", f"{merged['read_s']:.2f}", "", ""),
        ("  merge.merge, s", f"{merged['merge_s']:.2f}", "", ""),
        ("  write + verify the merged file, s", f"{merged['write_s']:.2f}", "", ""),
        ("merge total / single-host export", f"{total / single['export_s']:.2f}", "", ""),
        ("B's copy into ClickHouse (put_hour_file, on B), s", f"{merged['put_s']:.2f}", "",
         ""),
        ("merged rows (= the hour's)", f"{merged['merged_rows']:,}", "", ""),
        ("  of them B's (earlier rts)", f"{merged['from_b']:,}", "", ""),
        ("file MiB: single / merged", f"{single['file_bytes'] / MIB:.1f} / "
                                      f"{merged['merged_bytes'] / MIB:.1f}", "", ""),
    ]
    benchlib.print_table(rows, value_width=11, goal_width=1)
    if args.json:
        benchlib.print_json(machine, {"rows": args.rows, **{f"single_{k}": v for k, v in
                                                           single.items() if k != "path"},
                                      **{f"merge_{k}": v for k, v in merged.items()},
                                      "merge_total_s": total})
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows in the hour (default 1,000,000)")
    parser.add_argument("--server", default="ch18",
                        help="a server of tests/chdb_server.py SERVERS (default ch18)")
    return benchlib.main("cluster_merge_bench", run, benchlib.parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of a whole-book collector: CPU per frame at ETH's live unmerged rate.

Run from the repository root:

    .venv/bin/python bench/fullbook_bench.py [--rate 2200] [--seconds 20] [--json]

The simulator (in this process) makes whole-book events of BTC_USDT paced to `rate` unmerged
push.depth frames/s (mexc/simulator/book.py: 1-3 versions an event, a frame per version).
Two clients subscribe to the same stream, so they receive the same frames, byte for byte:
  a. baseline: a bare websocket-client loop (recv_data() and a count), in a process of its own
     (this script with --baseline URL), which reports its CPU seconds from its first frame to
     its last;
  b. `mexc collect` with exchange.book = "full" (book_merge false, the shipped snapshot
     interval), its CPU seconds (psutil: user + system, every thread: parse, continuity check,
     the writer's inserts) from just before the stream starts until ClickHouse holds a `bu` row
     for every frame sent.
CPU per frame = CPU seconds / frames; ratio = b / a.  Goal (issue 24): ratio <= 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import benchlib
import psutil
import websocket

from benchlib import MEXC, BenchError, verdict
from mexc.simulator import MexcSimulator

SYMBOL, TABLE = "BTC_USDT", "btc_current"
TICK = 0.01  # s between the driver's batches of events
GOAL_RATIO = 2.0
FRAMES_PER_EVENT = 2.0  # 1-3 versions an event, unmerged: a frame each


def baseline(url: str) -> None:
    """The bare loop: print 'frames cpu_seconds' once no frame came for 2 s."""
    ws = websocket.create_connection(url, skip_utf8_validation=True, timeout=30)
    ws.send(json.dumps({"method": "sub.depth", "param": {"symbol": SYMBOL, "compress": False}}))
    ws.recv_data()  # the ack
    print("subscribed", flush=True)
    ws.recv_data()
    first, frames = time.process_time(), 1
    ws.settimeout(2.0)
    last = first
    try:
        while True:
            ws.recv_data()
            frames += 1
            last = time.process_time()
    except websocket.WebSocketTimeoutException:
        pass
    print(frames - 1, last - first, flush=True)  # CPU from the first frame to the last


def drive(sim: MexcSimulator, rate: float, seconds: float) -> None:
    """Book events at rate / FRAMES_PER_EVENT a second for `seconds`, in TICK batches."""
    per_tick, owed = rate / FRAMES_PER_EVENT * TICK, 0.0
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        owed += per_tick
        sim.book_events(SYMBOL, int(owed))
        owed -= int(owed)
        tick += 1
        time.sleep(max(0.0, start + tick * TICK - time.monotonic()))


def stored_increments(world) -> int:
    client = world.client()
    try:
        return client.execute(f"SELECT count() FROM bench_fullbook.{TABLE} WHERE mt = 'bu'")[0][0]
    finally:
        client.disconnect()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        world = benchlib.World.start(stack, "mexc-fullbook-bench-")
        sim = stack.enter_context(MexcSimulator(rate=0))
        with world.store("bench_fullbook") as store:
            store.setup(["btc"])
        config = world.write_config(world.config_data(
            "bench_fullbook", [{"symbol": SYMBOL, "book": "full"}],
            exchange={"url": sim.url, "rest_url": sim.rest_url}))
        collector = benchlib.LoggedProcess([MEXC, "collect", "--config", config, "--symbol",
                                            SYMBOL], os.path.join(world.dir, "collector.log"),
                                           "collector", stop_timeout=15)
        stack.callback(collector.stop)
        bare = subprocess.Popen([sys.executable, __file__, "--baseline", sim.url],
                                stdout=subprocess.PIPE, text=True)
        stack.callback(bare.kill)
        if bare.stdout.readline().strip() != "subscribed":
            raise BenchError("the baseline client did not subscribe")
        deadline = time.monotonic() + 30
        while sum(1 for s, c in sim.subscriptions if c == "depth") < 2:
            collector.check_alive()
            if time.monotonic() > deadline:
                raise BenchError("the collector did not subscribe to sub.depth")
            time.sleep(0.05)
        first_version = sim.true_books(SYMBOL, [2**62])[0][0]
        sim.book_events(SYMBOL, 5)  # the collector's first snapshot, before the CPU counts
        while stored_increments(world) < 5:
            time.sleep(0.1)
        time.sleep(1.0)
        version, stored = sim.true_books(SYMBOL, [2**62])[0][0], stored_increments(world)
        before = cpu_seconds(collector.pid)
        started = time.monotonic()
        drive(sim, args.rate, args.seconds)
        driven = time.monotonic() - started
        frames = sim.true_books(SYMBOL, [2**62])[0][0] - version
        while stored_increments(world) < stored + frames:
            collector.check_alive()
            if time.monotonic() - started > args.seconds + 60:
                raise BenchError("the collector did not store every increment")
            time.sleep(0.05)
        collector_cpu = cpu_seconds(collector.pid) - before
        bare_frames, bare_cpu = bare.stdout.readline().split()
        sent = sim.true_books(SYMBOL, [2**62])[0][0] - first_version - 1  # after its first
        if int(bare_frames) != sent:
            raise BenchError(f"the baseline received {bare_frames} of {sent} frames")
        machine = benchlib.machine_info(world, websocket_client=websocket.__version__)
    per_frame = collector_cpu / frames * 1e6
    bare_per_frame = float(bare_cpu) / int(bare_frames) * 1e6
    ratio = per_frame / bare_per_frame
    benchlib.print_machine(machine, "websocket_client")
    print(f"{frames:,} unmerged push.depth frames in {driven:.1f} s "
          f"({frames / driven:,.0f} frames/s), the same frames to both clients")
    print()
    benchlib.print_table([
        ("baseline: bare websocket-client, CPU µs/frame", f"{bare_per_frame:.1f}", "", ""),
        ("collector (book = full), CPU µs/frame", f"{per_frame:.1f}", "", ""),
        ("collector / baseline", f"{ratio:.2f}", f"<= {GOAL_RATIO:.0f}",
         verdict(ratio <= GOAL_RATIO)),
        ("collector CPU at this rate, % of a core", f"{collector_cpu / driven * 100:.1f}", "",
         ""),
    ], value_width=7, goal_width=5)
    if args.json:
        benchlib.print_json(machine, {"frames": frames, "seconds": driven,
                                      "baseline_cpu_us_per_frame": bare_per_frame,
                                      "collector_cpu_us_per_frame": per_frame, "ratio": ratio})
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2200.0,
                        help="unmerged frames/s (default 2,200, ETH_USDT live)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length (default 20)")
    parser.add_argument("--baseline", metavar="URL", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.baseline:
        baseline(args.baseline)
        return 0
    return benchlib.main("fullbook_bench", run, benchlib.parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())

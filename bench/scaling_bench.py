"""Benchmark of how `mexc run` scales with the number of symbols: CPU and memory per symbol.

Run from the repository root:

    /tmp/venv/bin/python bench/scaling_bench.py [--symbols 1,3,10,30] [--seconds 20] [--json]

Everything listens on 127.0.0.1: a private ClickHouse in a temporary directory, the simulator
CLI (`python -m mexc.simulator --rate RATE`) and, for each N in --symbols, a fresh daemon
(`mexc run --config ...`, tor.enabled = false, clickhouse.managed = false, the shipped
[collector], [supervisor] and [export] settings) with symbols S01_USDT .. SNN_USDT.  RATE is
5 frames/s per stream (three streams per symbol: deals, depth, ticker), about what live
BTC_USDT sends.

Once every collector is connected and has stored rows, and SETTLE s later, for --seconds:
CPU% of each process (psutil, averaged over the window; 100 % = one core) and at the end its
USS and RSS (psutil memory_full_info): the supervisor, each collector, the exporter and
ClickHouse.  "total" is the daemon's tree plus ClickHouse; the simulator (the load generator)
is shown on its own and not counted.  "per symbol" is the total divided by N; "marginal" is
the least-squares slope over the N's, the cost of one more symbol.

Baseline, measured in the same run before any daemon starts, over the same window: the whole
machine's CPU (psutil.cpu_percent, in % of a core) with only the idle ClickHouse of the bench
running (anything else on the machine is counted too: the background the figures stand on), the
idle ClickHouse's CPU and USS, and the USS / RSS of a bare Python interpreter
(`python -c "import time; time.sleep(...)"`).  USS counts a shared-library page as private
while no other process maps it, so a lone process's USS includes its libraries.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

# bench/ (this script's directory) is on sys.path; benchlib puts the repository root there too.
import benchlib
import psutil

from benchlib import MIB, BenchError, Daemon

RATE = 5.0  # simulator frames/s per (symbol, channel) stream
SETTLE = 5.0  # s between "all collectors store rows" and the window


def symbols(n: int) -> list:
    return [f"S{i:02d}_USDT" for i in range(1, n + 1)]


def sample(processes: dict, seconds: float) -> dict:
    """role -> list of (cpu %, uss MiB, rss MiB), one per process; CPU over `seconds`."""
    for group in processes.values():
        for p in group:
            p.cpu_percent(None)
    time.sleep(seconds)
    result = {}
    for role, group in processes.items():
        result[role] = []
        for p in group:
            cpu, memory = p.cpu_percent(None), p.memory_full_info()
            result[role].append((cpu, memory.uss / MIB, memory.rss / MIB))
    return result


def baseline(world: benchlib.World, seconds: float) -> dict:
    bare = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds + 30})"],
                            preexec_fn=benchlib.die_with_parent)
    try:
        time.sleep(1.0)
        psutil.cpu_percent(None)
        found = sample({"clickhouse": [psutil.Process(world.clickhouse.process.pid)],
                        "bare": [psutil.Process(bare.pid)]}, seconds)
        machine_cpu = psutil.cpu_percent(None) * len(psutil.cpu_percent(None, percpu=True))
    finally:
        benchlib.stop_process(bare, 5)
    (ch_cpu, ch_uss, _), = found["clickhouse"]
    (_, bare_uss, bare_rss), = found["bare"]
    return {"machine_cpu_percent": machine_cpu, "clickhouse_cpu_percent": ch_cpu,
            "clickhouse_uss_mib": ch_uss, "bare_python_uss_mib": bare_uss,
            "bare_python_rss_mib": bare_rss}


def scaling_run(world: benchlib.World, url: str, simulator, n: int, seconds: float) -> dict:
    name = f"bench_scale_{n}"
    data = world.config_data(name, symbols(n), exchange={"url": url})
    with contextlib.ExitStack() as stack:
        daemon = Daemon(world.write_config(data), data["paths"]["runtime_dir"], n, name)
        stack.callback(daemon.stop)
        daemon.wait_flowing()
        time.sleep(SETTLE)
        status = daemon.status()
        before = {c["name"]: c["restarts"] for c in status["children"]}
        processes = {"supervisor": [daemon.process],
                     "clickhouse": [psutil.Process(world.clickhouse.process.pid)],
                     "simulator": [psutil.Process(simulator.pid)]}
        for child in status["children"]:
            if child.get("pid"):
                processes.setdefault(child["kind"], []).append(psutil.Process(child["pid"]))
        if len(processes.get("collector", [])) != n:
            raise BenchError(f"{name}: {n} collectors configured, "
                             f"{len(processes.get('collector', []))} running")
        found = sample(processes, seconds)
        restarted = [c["name"] for c in daemon.status()["children"]
                     if c["restarts"] != before.get(c["name"], 0)]
        daemon.check_alive()
    counted = [row for role, rows in found.items() if role != "simulator" for row in rows]
    total_cpu = sum(row[0] for row in counted)
    total_uss = sum(row[1] for row in counted)
    return {
        "symbols": n,
        "total_cpu_percent": total_cpu, "cpu_percent_per_symbol": total_cpu / n,
        "total_uss_mib": total_uss, "uss_mib_per_symbol": total_uss / n,
        "supervisor_rss_mib": found["supervisor"][0][2],
        "supervisor_cpu_percent": found["supervisor"][0][0],
        "collector_uss_mib_median": statistics.median(row[1] for row in found["collector"]),
        "collector_cpu_percent_median": statistics.median(row[0] for row in found["collector"]),
        "exporter_uss_mib": sum(row[1] for row in found.get("exporter", [])),
        "clickhouse_cpu_percent": found["clickhouse"][0][0],
        "clickhouse_uss_mib": found["clickhouse"][0][1],
        "simulator_cpu_percent": found["simulator"][0][0],
        "restarted": restarted,
    }


def slope(xs: list, ys: list) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


COLUMNS = [("symbols", "symbols", "{:d}"), ("CPU %", "total_cpu_percent", "{:.1f}"),
           ("CPU %/sym", "cpu_percent_per_symbol", "{:.2f}"),
           ("USS MiB", "total_uss_mib", "{:.0f}"), ("USS MiB/sym", "uss_mib_per_symbol", "{:.1f}"),
           ("sup RSS", "supervisor_rss_mib", "{:.1f}"), ("sup CPU %", "supervisor_cpu_percent",
                                                          "{:.1f}"),
           ("coll USS med", "collector_uss_mib_median", "{:.1f}"),
           ("coll CPU med", "collector_cpu_percent_median", "{:.1f}"),
           ("exp USS", "exporter_uss_mib", "{:.1f}"), ("CH CPU %", "clickhouse_cpu_percent",
                                                      "{:.1f}"),
           ("CH USS", "clickhouse_uss_mib", "{:.0f}"), ("sim CPU %", "simulator_cpu_percent",
                                                       "{:.1f}")]


def print_report(result: dict, machine: dict, args) -> None:
    benchlib.print_machine(machine, "psutil")
    print(f"simulator {RATE:g} frames/s per stream (3 streams per symbol), {args.seconds:g} s "
          f"window {SETTLE:g} s after all collectors store rows; total = daemon tree + "
          "ClickHouse (not the simulator); MiB, % of a core")
    b = result["baseline"]
    benchlib.print_table([
        ("[baseline] machine CPU before any daemon (other load included), % of a core",
         f"{b['machine_cpu_percent']:.1f}", "", ""),
        ("[baseline] idle ClickHouse CPU %, USS MiB",
         f"{b['clickhouse_cpu_percent']:.1f}, {b['clickhouse_uss_mib']:.0f}", "", ""),
        ("[baseline] bare Python process USS / RSS, MiB",
         f"{b['bare_python_uss_mib']:.1f} / {b['bare_python_rss_mib']:.1f}", "", ""),
    ], value_width=9, goal_width=4)
    print()
    rows = result["runs"]
    widths = [max(len(head), *(len(fmt.format(r[key])) for r in rows))
              for head, key, fmt in COLUMNS]
    print("  ".join(f"{head:>{w}}" for (head, _, _), w in zip(COLUMNS, widths)))
    for r in rows:
        print("  ".join(f"{fmt.format(r[key]):>{w}}" for (_, key, fmt), w in zip(COLUMNS, widths)))
    m = result["marginal"]
    print(f"marginal cost of one more symbol (slope): {m['cpu_percent']:.2f} % of a core, "
          f"{m['uss_mib']:.1f} MiB USS "
          f"(= {m['uss_mib'] / b['bare_python_uss_mib']:.2f} bare Python processes)")
    restarted = {r["symbols"]: r["restarted"] for r in rows if r["restarted"]}
    if restarted:
        print(f"note: children restarted during the window: {restarted}")


def run(args) -> int:
    ns = [int(n) for n in args.symbols.split(",")]
    with contextlib.ExitStack() as stack:
        world = benchlib.World.start(stack, "mexc-scbench-")
        base = baseline(world, args.seconds)
        simulator, url = benchlib.start_simulator(RATE)
        stack.callback(benchlib.stop_simulator, simulator)
        runs = [scaling_run(world, url, simulator, n, args.seconds) for n in ns]
        machine = benchlib.machine_info(world, psutil=psutil.__version__)
    marginal = {"cpu_percent": slope(ns, [r["total_cpu_percent"] for r in runs]),
                "uss_mib": slope(ns, [r["total_uss_mib"] for r in runs])}
    result = {"rate": RATE, "seconds": args.seconds, "baseline": base, "runs": runs,
              "marginal": marginal}
    print_report(result, machine, args)
    if args.json:
        benchlib.print_json(machine, result)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", default="1,3,10,30",
                        help="comma-separated symbol counts (default 1,3,10,30)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="sampling window per count (default 20)")
    return benchlib.main("scaling_bench", run, benchlib.parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())

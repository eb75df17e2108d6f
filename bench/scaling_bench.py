"""Benchmark of how `mexc run` scales with the number of symbols: CPU, memory and latency per
symbol, beside a minimal reference collector measured in the same run.

Run from the repository root:

    .venv/bin/python bench/scaling_bench.py [--symbols 10,30,100,200] [--tor-symbols 30,60]
        [--seconds 20] [--json]

Everything listens on 127.0.0.1: a private ClickHouse in a temporary directory, the simulator
CLI (`python -m mexc.simulator --rate RATE --processes 3`, at nice -10: see SIMULATOR_PROCESSES;
no idle timeout: the reference sends no pings)
and, for each N in --symbols, one after the other:
- mexc: a fresh daemon (`mexc run --config ...`, tor.enabled = false, clickhouse.managed =
  false, the shipped [collector], [supervisor] and [export] settings) with symbols S001_USDT ..;
- reference: bench/reference_collector.py with the same symbols (one forked process per symbol:
  receive, parse, insert every 0.5 s, nothing else), the floor a collector can hardly go under.
Then, for each N in --tor-symbols, mexc with tor on: one tor per collector, joined to a private
Tor network on loopback (tests/tor_network.py: 3 authorities, TOR_EXITS exits), with an idle
client tor of that network sampled beside it; every tor's sockets must stay on loopback.
RATE is 5 frames/s per stream (three streams per symbol: deals, depth, ticker), about what live
BTC_USDT sends.

Once every collector has stored rows, and SETTLE s later, for --seconds: CPU% of each process
(psutil, averaged over the window; 100 % = one core) and at the end its USS and RSS (psutil
memory_full_info).  "total" is the collectors' tree (mexc: the daemon and all its children)
plus ClickHouse; the simulator (the load generator) is shown on its own and not counted.
"per symbol" is the total divided by N; "marginal" is the least-squares slope over the N's, the
cost of one more symbol.  Latency, during the same window: receive -> queryable, i.e. for each
row of PROBES tables spread over the symbols, the time a SELECT polling every PROBE_EVERY s
first saw it minus its receive time (rts); up to PROBE_EVERY of it is the polling itself.  The
probe's own queries cost ClickHouse the same for every N and both kinds (the slope drops it).

Start-up (mexc only), from the daemon's log: seconds from its `starting` line to the last
collector's `connected` line, and the most collectors that connected within any one second,
replacements included (supervisor.start_rate, shipped 10, paces starts and every dial).  From
the collectors' status around the window: the frames a second each symbol received (15 due:
whether the simulator kept up) and the sockets replaced.  The daemon runs with its dashboard on, as
shipped (http.listen on a free loopback port): the monitor asks the status every 2 s, and
during the window /api/status and /api/dashboard are fetched every 2 s, as an open dashboard
does, and /metrics every 15 s, as a Prometheus would (a scrape costs the supervisor about
60 ms of CPU at 300 symbols: prometheus_client formats some 7,500 samples).

Baseline, measured in the same run before any daemon starts, over the same window: the whole
machine's CPU (psutil.cpu_percent, in % of a core) with only the idle ClickHouse of the bench
running (anything else on the machine is counted too: the background the figures stand on), the
idle ClickHouse's CPU and USS, and the USS / RSS of a bare Python interpreter
(`python -c "import time; time.sleep(...)"`).  USS counts a shared-library page as private
while no other process maps it, so a lone process's USS includes its libraries.  "machine" in
each row is the whole machine's CPU during that window: on a shared machine, CPU-seconds per
process hold up under other load, latency does not; compare mexc with the reference of the
same N (measured back to back).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime

# bench/ (this script's directory) is on sys.path; benchlib puts the repository root there too.
import benchlib
import psutil

from benchlib import MIB, BenchError, Daemon
from core.process import free_port
from tests.tor_network import TorNetwork, TorNetworkError

RATE = 5.0  # simulator frames/s per (symbol, channel) stream
CONNECTED = re.compile(r" collector\[(\w+)\] connected url=")  # a collector's dial, in its log
# The load generator must keep up, or the bench measures it instead of mexc: one process makes
# every symbol's events in one thread under one GIL, and at 300 symbols on a loaded 2-core
# machine it got a tenth of a core and sent 0.1-0.7 of the 15 frames/s a symbol was due (the
# collectors then judged their silent sockets dead, and each replacement added load).  So it
# runs as SIMULATOR_PROCESSES processes (python -m mexc.simulator --processes), each symbol's
# market in one of them, at nice SIMULATOR_PRIORITY: ahead of what is measured, whose CPU
# time is counted whenever it runs.
SIMULATOR_PROCESSES = 3
SIMULATOR_PRIORITY = -10
# The reference collector sends no pings, and the simulator closes a connection without one
# for its --idle-timeout (MEXC's 60 s): a reference start-up of over a minute on a loaded
# machine lost 69 of 300 connections before the window.
SIMULATOR_IDLE_TIMEOUT = 3600
SETTLE = 5.0  # s between "all collectors store rows" and the window
PROBES = 4  # tables whose rows the latency probe follows
PROBE_EVERY = 0.1  # s between the probe's polls
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_collector.py")
KEY_CACHE = os.path.join(benchlib.ROOT, ".pytest_cache", "tor-keys")  # shared with the tests
TOR_FLOW_TIMEOUT = 300.0  # s for N tors to bootstrap and their collectors to store rows
# Exit relays of the private network.  One per collector would let every exit be distinct,
# but a network of 60 exits did not form on a loaded 2-core machine within minutes; with
# fewer, the daemon's exit separation is off (tor.separation_retries = 0: it would restart
# collectors in vain), which costs nothing once exits are distinct anyway.
TOR_EXITS = 8


def symbols(n: int) -> list:
    return [f"S{i:03d}_USDT" for i in range(1, n + 1)]


def table(symbol: str) -> str:
    return f"{symbol.split('_', 1)[0].lower()}_current"


class LatencyProbe(threading.Thread):
    """Receive -> queryable of every new row of a few tables: polls `SELECT rts` for rows newer
    than the last seen, and keeps (time seen - rts) in ms until stop()."""

    def __init__(self, world: benchlib.World, database: str, names: list):
        super().__init__(name="latency-probe", daemon=True)
        step = max(1, len(names) // PROBES)
        self.tables = [f"{database}.{table(s)}" for s in names[::step][:PROBES]]
        self.store = world.store(database)
        self.latencies_ms = []
        self.done = threading.Event()

    def run(self) -> None:
        ms = self.store.features.ms("rts")
        newest = {t: self.store.client.execute(f"SELECT max({ms}) FROM {t}")[0][0]
                  for t in self.tables}
        while not self.done.wait(PROBE_EVERY):
            for t in self.tables:
                found = self.store.client.execute(f"SELECT {ms} FROM {t} WHERE {ms} > {newest[t]}")
                seen = time.time() * 1000
                if found:
                    self.latencies_ms += [seen - rts for rts, in found]
                    newest[t] = max(rts for rts, in found)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        self.store.close()
        ordered = sorted(self.latencies_ms)
        if not ordered:
            raise BenchError(f"the latency probe saw no new row in {self.tables}")
        return {"latency_p50_ms": benchlib.percentile(ordered, 0.5),
                "latency_p99_ms": benchlib.percentile(ordered, 0.99),
                "latency_rows": len(ordered)}


def sample(processes: dict, seconds: float) -> dict:
    """role -> list of (cpu %, uss MiB, rss MiB), one per process; CPU over `seconds`;
    "machine": the whole machine's CPU over the same window (% of a core)."""
    for group in processes.values():
        for p in group:
            p.cpu_percent(None)
    psutil.cpu_percent(None)
    time.sleep(seconds)
    result = {"machine": psutil.cpu_percent(None) * psutil.cpu_count()}
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
        found = sample({"clickhouse": [psutil.Process(world.clickhouse.process.pid)],
                        "bare": [psutil.Process(bare.pid)]}, seconds)
    finally:
        benchlib.stop_process(bare, 5)
    (ch_cpu, ch_uss, _), = found["clickhouse"]
    (_, bare_uss, bare_rss), = found["bare"]
    return {"machine_cpu_percent": found["machine"], "clickhouse_cpu_percent": ch_cpu,
            "clickhouse_uss_mib": ch_uss, "bare_python_uss_mib": bare_uss,
            "bare_python_rss_mib": bare_rss}


def measure(world: benchlib.World, database: str, names: list, processes: dict,
            seconds: float) -> tuple:
    """(samples, latency) over one window, with the latency probe running through it."""
    probe = LatencyProbe(world, database, names)
    probe.start()
    try:
        found = sample(processes, seconds)
    finally:
        latency = probe.stop()
    return found, latency


def mexc_run(world: benchlib.World, url: str, simulator, n: int, seconds: float,
             network: TorNetwork = None, idle_tor=None) -> dict:
    """One daemon with n symbols; with `network`, tor on (one tor per collector, joined to
    the private network) and `idle_tor` (a bootstrapped client carrying nothing) sampled too."""
    name = f"bench_scale_{n}" + ("_tor" if network else "")
    tor = {"enabled": True, "torrc_extra": network.torrc_extra(),
           "separation_retries": 0} if network else {}
    port = free_port()
    data = world.config_data(name, symbols(n), exchange={"url": url}, tor=tor,
                             http={"listen": f"127.0.0.1:{port}"})
    with contextlib.ExitStack() as stack:
        daemon = Daemon(world.write_config(data), data["paths"]["runtime_dir"], n, name)
        stack.callback(daemon.stop)
        daemon.wait_flowing(timeout=(TOR_FLOW_TIMEOUT if network else benchlib.FLOW_TIMEOUT) + n)
        time.sleep(SETTLE)
        status = daemon.status()
        before = {c["name"]: c["restarts"] for c in status["children"]}
        processes = {"supervisor": [daemon.process],
                     "clickhouse": [psutil.Process(world.clickhouse.process.pid)],
                     "simulator": simulator_processes(simulator)}
        if idle_tor is not None:
            processes["idle tor"] = [psutil.Process(idle_tor.pid)]
        for child in status["children"]:
            if child.get("pid"):
                processes.setdefault(child["kind"], []).append(psutil.Process(child["pid"]))
        listed = {p.pid for group in processes.values() for p in group}
        # the daemon's children status does not list (the fork server) count too
        processes["other"] = [p for p in daemon.process.children() if p.pid not in listed]
        if len(processes.get("collector", [])) != n:
            raise BenchError(f"{name}: {n} collectors configured, "
                             f"{len(processes.get('collector', []))} running")
        if network:
            network.watch(*(p.pid for p in processes.get("tor", [])))
        started = time.monotonic()
        with Scraper(port):
            found, latency = measure(world, name, symbols(n), processes, seconds)
        after = daemon.status()
        restarted = [c["name"] for c in after["children"]
                     if c["restarts"] != before.get(c["name"], 0)]
        delivered = delivery(Daemon.collectors(status), Daemon.collectors(after),
                             time.monotonic() - started)
        exits = {c.get("exit_ip") for c in Daemon.collectors(daemon.status()).values()}
        daemon.check_alive()
    result = summary("mexc+tor" if network else "mexc", n, found, latency, restarted)
    result.update(start_up(daemon.log_path))
    result.update(delivered)
    if network:
        result["distinct_exits"] = len(exits - {None})
    return result


def reference_run(world: benchlib.World, url: str, simulator, n: int, seconds: float) -> dict:
    name = f"bench_reference_{n}"
    parent = subprocess.Popen(
        [sys.executable, REFERENCE, "--url", url, "--port", str(world.clickhouse.port),
         "--database", name, *symbols(n)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        preexec_fn=benchlib.die_with_parent)
    try:
        started = 0
        deadline = time.monotonic() + benchlib.FLOW_TIMEOUT + n
        while started < n:  # each child writes one byte once connected with its table made
            if not parent.stdout.read(1) or time.monotonic() > deadline:
                raise BenchError(f"{name}: {started} of {n} reference collectors started")
            started += 1
        time.sleep(SETTLE)
        me = psutil.Process(parent.pid)
        processes = {"supervisor": [me], "collector": me.children(),
                     "clickhouse": [psutil.Process(world.clickhouse.process.pid)],
                     "simulator": simulator_processes(simulator)}
        found, latency = measure(world, name, symbols(n), processes, seconds)
        if parent.poll() is not None:
            raise BenchError(f"{name}: the reference collectors exited ({parent.returncode})")
    finally:
        benchlib.stop_process(parent, 10)
    return summary("reference", n, found, latency, [])


def simulator_processes(simulator) -> list:
    parent = psutil.Process(simulator.pid)
    return [parent, *parent.children()]


def delivery(before: dict, after: dict, seconds: float) -> dict:
    """From the collectors' status before and after the window: the frames a second a symbol
    received (what the simulator delivered; RATE per stream is due) and the sockets replaced
    (handovers and reconnects) meanwhile."""
    def total(status, key):
        return sum(c.get(key) or 0 for c in status.values())

    return {"frames_per_s_per_symbol": (total(after, "frames") - total(before, "frames"))
            / seconds / max(1, len(after)),
            "replaced_in_window": sum(total(after, k) - total(before, k)
                                      for k in ("handovers", "reconnects"))}


class Scraper(threading.Thread):
    """What an open dashboard (its two requests every 2 s) and a Prometheus (every 15 s) ask."""

    def __init__(self, port: int):
        super().__init__(name="scraper", daemon=True)
        self.base, self.done = f"http://127.0.0.1:{port}", threading.Event()

    def run(self) -> None:
        next_scrape = time.monotonic()
        while not self.done.wait(2.0):
            paths = ["/api/status", "/api/dashboard"]
            if time.monotonic() >= next_scrape:
                paths.append("/metrics")
                next_scrape = time.monotonic() + 15.0
            for path in paths:
                with urllib.request.urlopen(self.base + path, timeout=10) as answer:
                    answer.read()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.done.set()
        self.join()


def start_up(log_path: str) -> dict:
    """From the daemon's log: start -> every collector connected (its first connect; s), the
    most collector starts (the supervisor's pacing) and connects (a start's dial, or a
    reconnect's or replacement's: all paced) in 1 s, and how many connects there were."""
    def when(line):
        return datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S.%f").timestamp()

    with open(log_path, errors="replace") as f:
        everything = f.read().splitlines()
    lines = [line for line in everything if line[:4].isdigit()]  # not a traceback's lines
    started = next(when(line) for line in lines if " starting pid=" in line)
    first, connects = {}, []
    for line in lines:
        found = CONNECTED.search(line)
        if found:
            connects.append(when(line))
            first.setdefault(found.group(1), connects[-1])
    starts = sorted(when(line) for line in lines
                    if " collector-" in line and " started pid=" in line)
    return {"connected_after_s": max(first.values()) - started,
            "starts_span_s": starts[-1] - starts[0], "connects": len(connects),
            "log_tracebacks": sum(line.startswith("Traceback") for line in everything),
            "max_starts_per_s": _most_in_a_second(starts),
            "max_connects_per_s": _most_in_a_second(sorted(connects))}


def _most_in_a_second(times: list) -> int:
    return max(sum(1 for t in times if c <= t < c + 1.0) for c in times)


def summary(kind: str, n: int, found: dict, latency: dict, restarted: list) -> dict:
    counted = [row for role, rows in found.items()
               if role not in ("simulator", "machine", "idle tor") for row in rows]
    tors, idle = found.get("tor", []), found.get("idle tor", [])
    total_cpu = sum(row[0] for row in counted)
    total_uss = sum(row[1] for row in counted)
    return {
        "kind": kind, "symbols": n, "machine_cpu_percent": found["machine"],
        "total_cpu_percent": total_cpu, "cpu_percent_per_symbol": total_cpu / n,
        "total_uss_mib": total_uss, "uss_mib_per_symbol": total_uss / n,
        "supervisor_rss_mib": found["supervisor"][0][2],
        "supervisor_cpu_percent": found["supervisor"][0][0],
        "collector_uss_mib_median": statistics.median(row[1] for row in found["collector"]),
        "collector_cpu_percent_median": statistics.median(row[0] for row in found["collector"]),
        "exporter_uss_mib": sum(row[1] for row in found.get("exporter", [])),
        "other_uss_mib": sum(row[1] for row in found.get("other", [])),
        "clickhouse_cpu_percent": found["clickhouse"][0][0],
        "clickhouse_uss_mib": found["clickhouse"][0][1],
        "simulator_cpu_percent": sum(row[0] for row in found["simulator"]),
        "tor_cpu_percent_median": statistics.median(row[0] for row in tors) if tors else 0.0,
        "tor_uss_mib_median": statistics.median(row[1] for row in tors) if tors else 0.0,
        "idle_tor_cpu_percent": idle[0][0] if idle else 0.0,
        "idle_tor_uss_mib": idle[0][1] if idle else 0.0,
        **latency,
        "restarted": restarted,
    }


def slope(xs: list, ys: list) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


COLUMNS = [("kind", "kind", "{}"), ("symbols", "symbols", "{:d}"),
           ("machine %", "machine_cpu_percent", "{:.0f}"),
           ("CPU %", "total_cpu_percent", "{:.1f}"),
           ("CPU %/sym", "cpu_percent_per_symbol", "{:.2f}"),
           ("USS MiB", "total_uss_mib", "{:.0f}"), ("USS MiB/sym", "uss_mib_per_symbol", "{:.1f}"),
           ("p50 ms", "latency_p50_ms", "{:.0f}"), ("p99 ms", "latency_p99_ms", "{:.0f}"),
           ("sup RSS", "supervisor_rss_mib", "{:.1f}"),
           ("sup CPU %", "supervisor_cpu_percent", "{:.1f}"),
           ("coll USS med", "collector_uss_mib_median", "{:.1f}"),
           ("coll CPU med", "collector_cpu_percent_median", "{:.2f}"),
           ("exp USS", "exporter_uss_mib", "{:.1f}"),
           ("other USS", "other_uss_mib", "{:.1f}"),
           ("CH CPU %", "clickhouse_cpu_percent", "{:.1f}"),
           ("CH USS", "clickhouse_uss_mib", "{:.0f}"),
           ("sim CPU %", "simulator_cpu_percent", "{:.1f}"),
           ("tor CPU med", "tor_cpu_percent_median", "{:.2f}"),
           ("tor USS med", "tor_uss_mib_median", "{:.1f}"),
           ("idle tor CPU", "idle_tor_cpu_percent", "{:.2f}"),
           ("idle tor USS", "idle_tor_uss_mib", "{:.1f}")]
KINDS = ("mexc", "reference", "mexc+tor")



def print_report(result: dict, machine: dict, args) -> None:
    benchlib.print_machine(machine, "psutil")
    print(f"simulator {RATE:g} frames/s per stream (3 streams per symbol), {args.seconds:g} s "
          f"window {SETTLE:g} s after all collectors store rows; total = collectors' tree + "
          "ClickHouse (not the simulator); MiB, % of a core; latency = receive -> queryable "
          f"(polled every {PROBE_EVERY * 1000:.0f} ms); machine = whole machine's CPU in the "
          "window (other engineers' load included)")
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
    for r in rows:
        if "connected_after_s" in r:
            print(f"{r['kind']} {r['symbols']}: start-up: every collector connected "
                  f"{r['connected_after_s']:.1f} s after the daemon's start (the starts took "
                  f"{r['starts_span_s']:.1f} s); in any second at most "
                  f"{r['max_starts_per_s']} collector starts and {r['max_connects_per_s']} "
                  f"of the {r['connects']} connects; in the window each symbol received "
                  f"{r['frames_per_s_per_symbol']:.1f} frames/s ({3 * RATE:g} due) and "
                  f"{r['replaced_in_window']} sockets were replaced")
    for kind, m in result["marginal"].items():
        print(f"{kind}: marginal cost of one more symbol (slope): {m['cpu_percent']:.2f} % of a "
              f"core, {m['uss_mib']:.1f} MiB USS "
              f"(= {m['uss_mib'] / b['bare_python_uss_mib']:.2f} bare Python processes)")
    exits = {r["symbols"]: r["distinct_exits"] for r in rows if "distinct_exits" in r}
    if exits:
        print(f"tor: {TOR_EXITS} exits, separation off; distinct exit IPs among the collectors "
              f"{exits}; every tor socket stayed on "
              f"loopback ({result['loopback_sockets']} sockets checked at the end)")
    if "tor_error" in result:
        print(f"tor: no figures: {result['tor_error'].splitlines()[0]}")
    tracebacks = {r["symbols"]: r["log_tracebacks"] for r in rows if r.get("log_tracebacks")}
    if tracebacks:
        print(f"note: tracebacks in the daemon's log: {tracebacks}")
    restarted = {r["symbols"]: r["restarted"] for r in rows if r["restarted"]}
    if restarted:
        print(f"note: children restarted during the window: {restarted}")


def tor_runs(world: benchlib.World, url: str, simulator, ns: list, seconds: float,
             stack: contextlib.ExitStack) -> tuple:
    """mexc with tor on for each N, on one private network of TOR_EXITS exits, beside an idle
    client tor; (runs, sockets checked for loopback-only at the end)."""
    network = TorNetwork(os.path.join(world.dir, "tornet"), n_exits=TOR_EXITS,
                         key_cache_dir=KEY_CACHE)
    stack.callback(network.stop)
    try:
        network.start(timeout=TOR_FLOW_TIMEOUT)
        idle = network.start_client(os.path.join(world.dir, "idle-tor")).wait_bootstrapped(120)
        runs = [mexc_run(world, url, simulator, n, seconds, network, idle) for n in ns]
        return runs, network.assert_loopback_only(extra_pids=[idle.pid])
    except TorNetworkError as e:
        raise BenchError(f"private Tor network: {e}") from None


def run(args) -> int:
    ns = [int(n) for n in args.symbols.split(",") if n]
    tor_ns = [int(n) for n in args.tor_symbols.split(",") if n]
    result = {"rate": RATE, "seconds": args.seconds}
    with contextlib.ExitStack() as stack:
        world = benchlib.World.start(stack, "mexc-scbench-")
        result["baseline"] = baseline(world, args.seconds)
        simulator, url = benchlib.start_simulator(
            RATE, "--processes", str(SIMULATOR_PROCESSES),
            "--idle-timeout", str(SIMULATOR_IDLE_TIMEOUT), priority=SIMULATOR_PRIORITY)
        stack.callback(benchlib.stop_simulator, simulator)
        runs = []
        for n in ns:  # back to back, so both meet about the same background load
            runs.append(mexc_run(world, url, simulator, n, args.seconds))
            runs.append(reference_run(world, url, simulator, n, args.seconds))
        if tor_ns:
            try:  # a private network of many tors may fail to form: keep what was measured
                tor, result["loopback_sockets"] = tor_runs(world, url, simulator, tor_ns,
                                                           args.seconds, stack)
                runs += tor
            except BenchError as e:
                result["tor_error"] = str(e)
        machine = benchlib.machine_info(world, psutil=psutil.__version__)
    result["runs"] = runs
    result["marginal"] = {}
    for kind in KINDS:
        of_kind = [r for r in runs if r["kind"] == kind]
        if of_kind:
            xs = [r["symbols"] for r in of_kind]
            result["marginal"][kind] = {
                "cpu_percent": slope(xs, [r["total_cpu_percent"] for r in of_kind]),
                "uss_mib": slope(xs, [r["total_uss_mib"] for r in of_kind])}
    print_report(result, machine, args)
    if args.json:
        benchlib.print_json(machine, result)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", default="10,30,100,200",
                        help="comma-separated symbol counts (default 10,30,100,200)")
    parser.add_argument("--tor-symbols", default="30,60",
                        help="comma-separated symbol counts with tor on, on a private Tor "
                             "network on loopback (default 30,60; empty: none)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="sampling window per count (default 20)")
    return benchlib.main("scaling_bench", run, benchlib.parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())

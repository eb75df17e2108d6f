"""Benchmark of `mexc run`: the supervisor's idle cost, the memory of its forked collectors, and
how long a killed collector takes to store rows again.

Run from the repository root:

    .venv/bin/python bench/supervisor_bench.py [--idle-seconds S] [--repetitions N] [--json]

Everything listens on 127.0.0.1: a private ClickHouse in a temporary directory, the simulator
CLI (`python -m mexc.simulator`) in a process of its own, and the daemon as users run it
(`mexc run --config ...`) with a config written for each run: its own database, state and
runtime dir, clickhouse.managed = false (the private server), tor.enabled = false, the
simulator as exchange.url, and the shipped [collector] and [supervisor] settings.  Symbols are
BTC_USDT plus generated S02_USDT, S03_USDT, ... (tables btc_current, s02_current, ...).  The
daemon runs this checkout's code (PYTHONPATH=<repository root>).

Idle.  With 3 and then 20 collectors and the simulator at IDLE_RATE frames/s per stream (three
streams per collector), once every collector is connected and has stored rows, and SETTLE s
later: the supervisor's RSS (psutil, every SAMPLE_INTERVAL s) and its CPU% (psutil, averaged
over the window; 100 % = one core) over --idle-seconds.  At the end of the window, per
process: USS, PSS and RSS (psutil memory_full_info), reported for the collectors as median and
max, and summed over the tree: the supervisor and all its descendants, the collectors and any
other child (an exporter), which is also shown on its own.  Then the round trip of a `status`
request (bus.sockets.request), median of STATUS_ROUNDS.  Note: USS counts a page of a shared
library as private while no other process on the host maps it, so the supervisor's USS
includes the library pages only it touches unless some unrelated process maps them too.

Restart.  With 3 collectors and the simulator at RESTART_RATE frames/s per stream, per
repetition on a freshly started daemon (so the restart backoff is the one a crash after stable
running gets, supervisor.restart_min): SIGKILL collector-btc (pid from the status request),
then
  a. kill -> new pid: the supervisor's children (psutil) are polled every POLL s until a new
     one appears; the status request must then report it as collector-btc.  (Polling `status`
     itself every 10 ms would wake the supervisor's loop each time and hide its TICK.)
  b. kill -> first stored row: `SELECT max(rts), count() FROM <db>.btc_current` every POLL s
     until max(rts) is later than the kill and count() has grown; the time the successful
     query was issued.  rts is the local receive time, so only the new process has such rows.
The kill comes a random 0..KILL_PHASE s after the status request that named the victim (a
request wakes the supervisor's loop, so a kill right after one would always meet the loop at
the same phase).  The daemon's log (UTC timestamps to the ms) and min(rts) of the new rows
break the time down: exit noticed, fork, connected, first frame received, first row
queryable.  Then the new collector is killed again as soon as its heartbeat says it has
collected since its start (status: last_data_age_s), a second exit within a minute: a
collector that was collecting comes back at restart_min (before 2026-12-07 the delay doubled);
that figure has no goal.

Dashboard.  The supervisor's CPU (psutil cpu_times over --dashboard-seconds; 100 % = one core)
with DASHBOARD_COLLECTORS collectors at IDLE_RATE, three ways, rounds alternating:
  off   http.listen = "" and no alerts: no monitor thread, the daemon as before the dashboard
  on    the dashboard served (the monitor samples the status every 2 s), nobody looking
  page  the same with the page open: api/status and api/dashboard every 2 s, as the page polls
Goal: page within 2x of off.  --parts picks idle, restart, dashboard (default: all).
"""
from __future__ import annotations

import argparse
import calendar
import contextlib
import re
import statistics
import sys
import threading
import time
import urllib.request

# bench/ (this script's directory) is on sys.path; benchlib puts the repository root there too.
import benchlib
import psutil

from benchlib import MIB, BenchError, Daemon, verdict
from core.process import free_port

VICTIM = "collector-btc"

IDLE_RATE, RESTART_RATE = 5.0, 100.0  # simulator frames/s per (symbol, channel) stream
SETTLE = 3.0  # s between "all collectors store rows" and a measurement
SAMPLE_INTERVAL = 0.5
STATUS_ROUNDS = 20
POLL = 0.01
KILL_PHASE = 1.0  # s; the kill comes a random 0..KILL_PHASE s after the last status request
RESTART_TIMEOUT = 60.0
GOAL_USS_MIB, GOAL_RESTART_S = 25.0, 2.0
DASHBOARD_COLLECTORS, PAGE_EVERY, DASHBOARD_ROUNDS, GOAL_PAGE_RATIO = 30, 2.0, 2, 2.0
PARTS = ("idle", "restart", "dashboard")


def symbols(n: int) -> list:
    return ["BTC_USDT"] + [f"S{i:02d}_USDT" for i in range(2, n + 1)]


# --- the daemon ------------------------------------------------------------------------------

def start_daemon(world: benchlib.World, name: str, n_collectors: int, url: str,
                 listen: str = "") -> Daemon:
    """`mexc run` with n collectors on a config of its own (database, state and runtime dir
    <name>, the simulator at `url`, the dashboard on `listen`); its output and its
    children's in <name>/daemon.log."""
    data = world.config_data(name, symbols(n_collectors), exchange={"url": url},
                             http={"listen": listen})
    return Daemon(world.write_config(data), data["paths"]["runtime_dir"], n_collectors, name)


# --- idle: supervisor cost and collector memory ----------------------------------------------

def idle_run(world: benchlib.World, url: str, n: int, seconds: float) -> dict:
    with contextlib.ExitStack() as stack:
        daemon = start_daemon(world, f"bench_idle_{n}", n, url)
        stack.callback(daemon.stop)
        daemon.wait_flowing()
        time.sleep(SETTLE)
        before = daemon.collectors(daemon.status())
        supervisor = daemon.process
        children = [p for p in supervisor.children(recursive=True)
                    if p.status() != psutil.STATUS_ZOMBIE]
        rss, cpu = sample_window(supervisor, children, seconds)
        memory = {p.pid: p.memory_full_info() for p in [supervisor, *children]}
        names = {p.pid: p.name() for p in children}
        after = daemon.collectors(daemon.status())
        restarted = [name for name, c in after.items() if c["pid"] != before[name]["pid"]]
        if restarted:
            raise BenchError(f"{daemon.name}: {', '.join(restarted)} restarted while idle:\n"
                             f"{daemon.log_tail()}")
        round_trips = status_round_trips(daemon)
    collectors = {c["pid"] for c in before.values()}
    return idle_figures(n, supervisor.pid, collectors, names, rss, cpu, memory, round_trips)


def sample_window(supervisor, children: list, seconds: float) -> tuple[list, dict]:
    """Supervisor RSS every SAMPLE_INTERVAL s; CPU% of every process over the whole window."""
    processes = [supervisor, *children]
    for p in processes:
        p.cpu_percent(None)
    rss = []
    deadline = time.monotonic() + seconds
    while True:
        rss.append(supervisor.memory_info().rss)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(SAMPLE_INTERVAL, left))
    return rss, {p.pid: p.cpu_percent(None) for p in processes}


def status_round_trips(daemon: Daemon) -> list:
    """Milliseconds per status request, STATUS_ROUNDS of them back to back."""
    times = []
    for _ in range(STATUS_ROUNDS):
        started = time.perf_counter()
        if daemon.status() is None:
            raise BenchError(f"{daemon.name}: no answer to a status request")
        times.append((time.perf_counter() - started) * 1000)
    return times


def idle_figures(n: int, supervisor_pid: int, collector_pids: set, names: dict, rss: list,
                 cpu: dict, memory: dict, round_trips: list) -> dict:
    """Figures of one idle window.  The tree is the supervisor and all its descendants: the
    collectors and any other child (e.g. an exporter), which is also shown on its own."""
    collectors = [pid for pid in memory if pid in collector_pids]
    others = [pid for pid in memory if pid != supervisor_pid and pid not in collector_pids]
    if len(collectors) != n:
        raise BenchError(f"{n} collectors configured, {len(collectors)} found in the tree")

    def mib(field, pids):
        return [getattr(memory[pid], field) / MIB for pid in pids]

    return {
        "collectors": n,
        "supervisor_rss_mib_max": max(rss) / MIB,
        "supervisor_rss_mib_mean": statistics.mean(rss) / MIB,
        "supervisor_uss_mib": memory[supervisor_pid].uss / MIB,
        "supervisor_pss_mib": memory[supervisor_pid].pss / MIB,
        "supervisor_cpu_percent": cpu[supervisor_pid],
        "collector_uss_mib": mib("uss", collectors),
        "collector_pss_mib": mib("pss", collectors),
        "collector_rss_mib": mib("rss", collectors),
        "collector_cpu_percent": [cpu[pid] for pid in collectors],
        "other_children": sorted(names[pid] for pid in others),
        "other_children_uss_mib": sum(mib("uss", others)),
        "tree_uss_mib": sum(mib("uss", memory)),
        "tree_pss_mib": sum(mib("pss", memory)),
        "tree_rss_mib": sum(mib("rss", memory)),
        "status_round_trip_ms": statistics.median(round_trips),
    }


# --- restart: kill -> new pid -> first stored row --------------------------------------------

def restart_run(world: benchlib.World, url: str, repetition: int) -> tuple[dict, dict]:
    """On a fresh daemon: a first kill of collector-btc, then a second once it collects again."""
    with contextlib.ExitStack() as stack:
        daemon = start_daemon(world, f"bench_restart_{repetition}", 3, url)
        stack.callback(daemon.stop)
        daemon.wait_flowing()
        time.sleep(SETTLE)
        client = world.client()
        stack.callback(client.disconnect)
        table = f"{daemon.name}.btc_current"
        first = kill_and_measure(daemon, client, table)
        wait_collecting(daemon)
        second = kill_and_measure(daemon, client, table)
    return first, second


def wait_collecting(daemon: Daemon) -> None:
    """Until the victim's heartbeat says market data came since its start."""
    deadline = time.monotonic() + RESTART_TIMEOUT
    while daemon.collectors(daemon.status())[VICTIM].get("last_data_age_s") is None:
        if time.monotonic() > deadline:
            raise BenchError(f"{daemon.name}: {VICTIM} reported no data since its start:\n"
                             f"{daemon.log_tail()}")
        daemon.check_alive()
        time.sleep(0.1)


def kill_and_measure(daemon: Daemon, client, table: str) -> dict:
    victim = daemon.collectors(daemon.status())[VICTIM]
    if victim["state"] != "running":
        raise BenchError(f"{daemon.name}: {VICTIM} is {victim['state']}, not running")
    timing = daemon.kill_and_time(victim["pid"], client, table, wait_for_new_pid,
                                  RESTART_TIMEOUT, POLL, KILL_PHASE)
    steps = log_steps(daemon, victim["pid"], timing["new_pid"], timing.pop("kill_wall"))
    return {**timing, **steps}


def wait_for_new_pid(daemon: Daemon, known: set, kill_t: float) -> tuple[int, float]:
    """Poll the supervisor's children until a new one appears that status names VICTIM."""
    known = set(known)
    deadline = kill_t + RESTART_TIMEOUT
    while time.monotonic() < deadline:
        new = set(daemon.children()) - known
        if new:
            seen = time.monotonic() - kill_t
            reported = daemon.collectors(daemon.status())[VICTIM]["pid"]
            if reported in new:
                return reported, seen
            known |= new  # another child (re)started meanwhile
        daemon.check_alive()
        time.sleep(POLL)
    raise BenchError(f"{daemon.name}: no new {VICTIM} {RESTART_TIMEOUT:.0f}s after the kill:\n"
                     f"{daemon.log_tail()}")


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z \S+\s+(\S+) (.*)$")


def log_steps(daemon: Daemon, old_pid: int, new_pid: int, kill_wall: float) -> dict:
    """Seconds from the kill to the daemon's log lines about it (log time is cut to the ms)."""
    name = VICTIM.split("-", 1)[1]
    steps = {"noticed_s": None, "restart_delay_s": None, "forked_s": None, "connected_s": None}
    with open(daemon.log_path, errors="replace") as f:
        for line in f:
            match = LOG_LINE.match(line)
            if not match:
                continue
            stamp, millis, tag, message = match.groups()
            at = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
            since = at - kill_wall
            if since < -0.001:
                continue
            if tag == "supervisor" and f"{VICTIM} pid {old_pid} killed" in message:
                steps["noticed_s"] = since
                delay = re.search(r"restarting in ([\d.]+)s", message)
                steps["restart_delay_s"] = float(delay.group(1)) if delay else None
            elif tag == "supervisor" and f"started {VICTIM} pid={new_pid}" in message:
                steps["forked_s"] = since
            elif (tag == f"collector[{name}]" and message.startswith("connected url=")
                  and steps["connected_s"] is None):
                steps["connected_s"] = since
    return steps


# --- dashboard: supervisor CPU with the page open --------------------------------------------

def dashboard_run(world: benchlib.World, url: str, seconds: float, round_: int) -> dict:
    """Supervisor CPU% off, on, and with the page open (see the module docstring)."""
    figures = {}
    with contextlib.ExitStack() as stack:
        daemon = start_daemon(world, f"bench_dash_off_{round_}", DASHBOARD_COLLECTORS, url)
        stack.callback(daemon.stop)
        daemon.wait_flowing()
        time.sleep(SETTLE)
        figures["off"] = cpu_percent(daemon.process, seconds)
    port = free_port()
    with contextlib.ExitStack() as stack:
        daemon = start_daemon(world, f"bench_dash_on_{round_}", DASHBOARD_COLLECTORS, url,
                              listen=f"127.0.0.1:{port}")
        stack.callback(daemon.stop)
        daemon.wait_flowing()
        time.sleep(SETTLE)
        figures["on"] = cpu_percent(daemon.process, seconds)
        page = threading.Event()
        poller = threading.Thread(target=poll_like_the_page, args=(port, page), daemon=True)
        poller.start()
        stack.callback(poller.join)
        stack.callback(page.set)
        figures["page"] = cpu_percent(daemon.process, seconds)
    return figures


def cpu_percent(process, seconds: float) -> float:
    """The process's CPU over a window of `seconds`, % of one core."""
    before, started = process.cpu_times(), time.monotonic()
    time.sleep(seconds)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return used / (time.monotonic() - started) * 100


def poll_like_the_page(port: int, stop: threading.Event) -> None:
    while not stop.is_set():
        for path in ("/api/status", "/api/dashboard"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                r.read()
        stop.wait(PAGE_EVERY)


def dashboard_rows(rounds: list) -> list:
    medians = {k: statistics.median(r[k] for r in rounds) for k in ("off", "on", "page")}
    ratio = medians["page"] / max(medians["off"], 1e-9)
    n = DASHBOARD_COLLECTORS
    return [
        (f"[{n} collectors] supervisor CPU, http off (before), %", f"{medians['off']:.2f}",
         "", ""),
        (f"[{n} collectors] supervisor CPU, dashboard on, %", f"{medians['on']:.2f}", "", ""),
        (f"[{n} collectors] supervisor CPU, page open, %", f"{medians['page']:.2f}", "", ""),
        (f"[{n} collectors] page open / http off", f"{ratio:.2f}",
         f"<= {GOAL_PAGE_RATIO:g}", verdict(ratio <= GOAL_PAGE_RATIO)),
    ]


# --- report ----------------------------------------------------------------------------------

def restart_figures(kills: list, label: str) -> dict:
    figures = {}
    for key in ("new_pid_s", "first_row_s", "noticed_s", "restart_delay_s", "forked_s",
                "connected_s", "first_received_s"):
        values = [k[key] for k in kills if k[key] is not None]
        figures[f"{label}_{key}"] = values
        figures[f"{label}_{key}_median"] = statistics.median(values) if values else None
        figures[f"{label}_{key}_max"] = max(values) if values else None
    return figures


def pair(values: list, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} / {fmt.format(max(values))}"


def idle_rows(f: dict) -> list:
    n = f["collectors"]
    uss_max = max(f["collector_uss_mib"])
    return [
        (f"[{n} collectors] supervisor RSS mean / max, MiB",
         f"{f['supervisor_rss_mib_mean']:.1f} / {f['supervisor_rss_mib_max']:.1f}", "", ""),
        (f"[{n} collectors] supervisor USS, MiB", f"{f['supervisor_uss_mib']:.1f}", "", ""),
        (f"[{n} collectors] supervisor CPU, % of a core", f"{f['supervisor_cpu_percent']:.1f}",
         "", ""),
        (f"[{n} collectors] collector USS median / max, MiB", pair(f["collector_uss_mib"]),
         f"< {GOAL_USS_MIB:.0f}", verdict(uss_max < GOAL_USS_MIB)),
        (f"[{n} collectors] collector PSS median / max, MiB", pair(f["collector_pss_mib"]), "", ""),
        (f"[{n} collectors] collector RSS median / max, MiB", pair(f["collector_rss_mib"]), "", ""),
        (f"[{n} collectors] collector CPU median / max, %", pair(f["collector_cpu_percent"]),
         "", ""),
        (f"[{n} collectors] other children ({', '.join(f['other_children']) or 'none'}) "
         "USS, MiB", f"{f['other_children_uss_mib']:.1f}", "", ""),
        (f"[{n} collectors] tree USS total, MiB", f"{f['tree_uss_mib']:.1f}", "", ""),
        (f"[{n} collectors] tree PSS total, MiB", f"{f['tree_pss_mib']:.1f}", "", ""),
        (f"[{n} collectors] tree RSS sum, MiB", f"{f['tree_rss_mib']:.1f}", "", ""),
        (f"[{n} collectors] status request round trip, ms",
         f"{f['status_round_trip_ms']:.1f}", "", ""),
    ]


def restart_rows(r: dict) -> list:
    def seconds(key):
        return pair(r[key], "{:.2f}")

    return [
        ("[restart] kill -> new pid median / max, s", seconds("first_new_pid_s"), "", ""),
        ("[restart] kill -> first stored row median / max, s", seconds("first_first_row_s"),
         f"< {GOAL_RESTART_S:.1f}", verdict(r["first_first_row_s_max"] < GOAL_RESTART_S)),
        ("[restart] 2nd kill once collecting: kill -> new pid, s", seconds("second_new_pid_s"),
         "", ""),
        ("[restart] 2nd kill once collecting: kill -> first row, s",
         seconds("second_first_row_s"), "", ""),
    ]


def print_breakdown(r: dict) -> None:
    steps = [("exit noticed by the supervisor", "noticed_s"), ("fork (log)", "forked_s"),
             ("new pid seen", "new_pid_s"), ("websocket connected (log)", "connected_s"),
             ("first frame received (min rts)", "first_received_s"),
             ("first row queryable", "first_row_s")]
    print("restart breakdown, seconds after the SIGKILL (median / max):")
    for label in ("first", "second"):
        delays = sorted(set(r[f"{label}_restart_delay_s"]))
        print(f"  {label} kill (restart delay logged: "
              f"{', '.join(f'{d:.1f}s' for d in delays) or '?'})")
        for text, key in steps:
            values = r[f"{label}_{key}"]
            shown = pair(values, "{:.3f}") if values else "-"
            print(f"    {text:<34} {shown}")


def print_report(result: dict, machine: dict, args) -> None:
    benchlib.print_machine(machine, "psutil")
    if "idle_3" in result:
        print(f"idle: simulator {IDLE_RATE:g} frames/s per stream (3 streams per collector), "
              f"{args.idle_seconds:g} s window after {SETTLE:g} s settling")
    if "restart" in result:
        print(f"restart: 3 collectors, simulator {RESTART_RATE:g} frames/s per stream, "
              f"SIGKILL {VICTIM}, {args.repetitions} repetitions on fresh daemons, polls every "
              f"{POLL * 1000:.0f} ms")
    if "dashboard" in result:
        print(f"dashboard: {DASHBOARD_COLLECTORS} collectors, simulator {IDLE_RATE:g} frames/s "
              f"per stream, {args.dashboard_seconds:g} s windows, median of "
              f"{DASHBOARD_ROUNDS} rounds: " + "; ".join(
                  f"off {r['off']:.2f} on {r['on']:.2f} page {r['page']:.2f}"
                  for r in result["dashboard"]))
    print()
    if "restart" in result:
        print_breakdown(result["restart"])
        print()
    rows = [*(idle_rows(result["idle_3"]) + idle_rows(result["idle_20"])
              if "idle_3" in result else []),
            *(restart_rows(result["restart"]) if "restart" in result else []),
            *(dashboard_rows(result["dashboard"]) if "dashboard" in result else [])]
    benchlib.print_table(rows, value_width=13, goal_width=6)
    print("(goals apply to the max; the restart figures are for a crash after stable running)")


# --- main ------------------------------------------------------------------------------------

def run(args) -> int:
    parts, result = args.parts.split(","), {}
    if set(parts) - set(PARTS):
        raise BenchError(f"--parts: choose from {', '.join(PARTS)}")
    with contextlib.ExitStack() as stack:
        world = benchlib.World.start(stack, "mexc-sbench-")

        with contextlib.ExitStack() as idle_stack:
            simulator, url = benchlib.start_simulator(IDLE_RATE)
            idle_stack.callback(benchlib.stop_simulator, simulator)
            if "idle" in parts:
                result.update({f"idle_{n}": idle_run(world, url, n, args.idle_seconds)
                               for n in (3, 20)})
            if "dashboard" in parts:
                result["dashboard"] = [dashboard_run(world, url, args.dashboard_seconds, i)
                                       for i in range(1, DASHBOARD_ROUNDS + 1)]

        if "restart" in parts:
            simulator, url = benchlib.start_simulator(RESTART_RATE)
            stack.callback(benchlib.stop_simulator, simulator)
            kills = [restart_run(world, url, i) for i in range(1, args.repetitions + 1)]
            result["restart"] = {**restart_figures([k[0] for k in kills], "first"),
                                 **restart_figures([k[1] for k in kills], "second")}
        machine = benchlib.machine_info(world, psutil=psutil.__version__)
    print_report(result, machine, args)
    if args.json:
        benchlib.print_json(machine, result)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="length of each idle window (default 10)")
    parser.add_argument("--repetitions", type=int, default=5,
                        help="restart measurements (default 5)")
    parser.add_argument("--dashboard-seconds", type=float, default=20.0,
                        help="length of each dashboard CPU window (default 20)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    return benchlib.main("supervisor_bench", run, benchlib.parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the daemon's Tor instances on a private Tor network: bootstrap, memory, recovery
from a killed tor, and a collector's throughput through Tor.

Run from the repository root:

    .venv/bin/python bench/tor_bench.py [--repetitions N] [--frames N] [--rounds R] [--json]

Everything stays on loopback: a private ClickHouse in a temporary directory, the simulator CLI
(`python -m mexc.simulator`) at RATE frames/s per stream, and a private Tor network
(tests/tor_network.py: 3 directory authorities and 3 exit relays on 127.0.1.x / 127.0.2.x,
never the public network; relay keys cached in .pytest_cache/tor-keys like the tests do).  The
daemon runs as users run it (`mexc run --config ...`, this checkout's code) with 3 symbols
(BTC_USDT, ETH_USDT, SOL_USDT), clickhouse.managed = false, and
`[tor] enabled = true, torrc_extra = <the network's lines>, exit_check_interval = 1.0`; the
shipped [exchange], [collector] and [supervisor] settings otherwise.  Every tor pid the daemon
reports is handed to the network's socket watcher (every 0.25 s) and checked again before each
daemon stops; the run ends with network.assert_loopback_only() over every tor still running:
the network's relays, the bench's tor client and the last daemon's tors (that daemon is kept
running for it).

Per repetition, on a state dir of its own:
  1. cold start: `mexc run` on a fresh state_dir.  Seconds from the Popen to, per tor, the
     daemon's `tor[<name>] bootstrapped in X.Xs` line (the daemon polls bootstrap progress on
     the control port every 0.5 s; tor's own `Bootstrapped 100%` line is shown too), and to
     the first status reply with three distinct exit IPs (polled every STATUS_POLL s; the
     exits are read every exit_check_interval, and collectors that share an exit get new
     circuits first: counted from the log's "shares exit" lines).
  2. tor RSS (and USS) per instance: psutil on the tor pids from status, SETTLE s after every
     collector stores rows.
  3. SIGTERM, then a warm start: the same config, so the same state_dir and tor
     DataDirectories; the same figures.
  4. on that warm daemon (fresh, so the restart backoff is supervisor.restart_min), SETTLE s
     later and a random 0..KILL_PHASE s after a status request: SIGKILL tor-btc, then poll
     `SELECT max(rts), count() FROM <db>.btc_current` every POLL s until a row received after
     the kill (rts > kill time) is stored.  The daemon's log breaks it down: exit noticed, tor
     restarted, tor bootstrapped, collector disconnected / reconnect attempts / connected,
     first frame received (min rts).

Throughput (first, before any daemon runs).  collector_bench's frame sender (pre-encoded
live-mix frames, all sent at once to each client that subscribes) and `mexc collect --symbol
BTC_USDT` (collector_bench's config), alternating: direct, and with `--socks
127.0.0.1:<SocksPort>` of a tor client joined to the private network (network.start_client),
whose circuits run client -> guard -> middle -> exit, all on this machine.  Frames/s stored,
timed from the first frame sent until count() reaches the rows the frames must become; the
ratio tor / direct of the medians.  The CPU the tor processes used during the tor rounds is
shown against the transfer time, and the tor client's memory for comparison with the daemon's
tors (its torrc is tests/tor_network.py's: GeoIPFile /dev/null).
"""
from __future__ import annotations

import argparse
import calendar
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time

# bench/ (this script's directory) is on sys.path; benchlib puts the repository root there too.
import benchlib
import collector_bench
import psutil

from benchlib import MEXC, MIB, BenchError, Daemon, verdict
from tests.tor_network import TOR, TorNetwork, TorNetworkError

SYMBOLS = ["BTC_USDT", "ETH_USDT", "SOL_USDT"]
NAMES = ["btc", "eth", "sol"]  # the tors' names: tor-btc ... and tor[btc] in the log
VICTIM = "btc"
KEY_CACHE = os.path.join(benchlib.ROOT, ".pytest_cache", "tor-keys")  # shared with the tests

RATE = 100.0  # simulator frames/s per stream (three streams per collector)
EXIT_CHECK_INTERVAL = 1.0
SETTLE = 3.0  # s between "every collector stores rows" and a measurement
STATUS_POLL = 0.1
POLL = 0.01
KILL_PHASE = 1.0  # s; the kill comes a random 0..KILL_PHASE s after the last status request
START_TIMEOUT = 120.0  # s for a daemon to reach three distinct exits and store rows
RECOVERY_TIMEOUT = 120.0  # s for rows after a tor kill
NETWORK_TIMEOUT = 120.0


# --- the daemon with its tors ----------------------------------------------------------------

class TorWorld(collector_bench.World):
    """The bench's ClickHouse and temp dir; collectors run direct or through `socks_port`."""

    socks_port = None

    def collector(self, config: str) -> benchlib.LoggedProcess:
        if self.socks_port is None:
            return super().collector(config)
        return benchlib.LoggedProcess(
            [MEXC, "collect", "--config", config, "--symbol", collector_bench.SYMBOL,
             "--socks", f"127.0.0.1:{self.socks_port}"],
            os.path.join(os.path.dirname(config), "collector.log"), "collector via tor",
            stop_timeout=15)


class TorPids:
    """Every tor the daemons started: watched by the network's socket watcher as they appear."""

    def __init__(self, network: TorNetwork):
        self.network = network
        self.processes = {}  # pid -> psutil.Process (is_running() also checks the pid's age)

    def add(self, status: dict) -> list:
        """The tor pids in a status reply (now watched); returns them."""
        pids = [c["pid"] for c in status["children"] if c["kind"] == "tor" and c["pid"]]
        for pid in pids:
            if pid not in self.processes:
                with contextlib.suppress(psutil.Error):
                    self.processes[pid] = psutil.Process(pid)
                self.network.watch(pid)
        return pids

    def running(self) -> list:
        return [pid for pid, p in self.processes.items() if p.is_running()]


def daemon_config(world: TorWorld, network: TorNetwork, database: str, url: str) -> dict:
    return world.config_data(database, SYMBOLS, exchange={"url": url},
                             tor={"enabled": True, "torrc_extra": network.torrc_extra(),
                                  "exit_check_interval": EXIT_CHECK_INTERVAL})


def tor_entries(status: dict) -> dict:
    """name (btc, ...) -> the status entry of its tor."""
    return {c["name"].split("-", 1)[1]: c for c in status["children"] if c["kind"] == "tor"}


def distinct_exits(status: dict):
    """{collector name: exit ip} when every collector has an exit and all differ, else None."""
    ips = {name: c["exit_ip"] for name, c in Daemon.collectors(status).items()}
    if len(ips) == len(SYMBOLS) and all(ips.values()) and len(set(ips.values())) == len(ips):
        return ips
    return None


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z \S+\s+(\S+) (.*)$")


def log_events(daemon: Daemon, offset: int) -> list:
    """(wall time, tag, message) of the daemon's log lines from `offset` (times to the ms)."""
    events = []
    for line in daemon.log_text(offset).splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp, millis, tag, message = match.groups()
            at = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
            events.append((at, tag, message))
    return events


def first_event(events: list, since: float, tag: str, pattern: str):
    """(seconds after `since`, regex match) of the first line with `tag` matching, or None."""
    for at, event_tag, message in events:
        if at >= since - 0.001 and event_tag == tag:
            match = re.search(pattern, message)
            if match:
                return at - since, match
    return None


# --- 1-3: bootstrap and memory ----------------------------------------------------------------

def start_daemon(world: TorWorld, data: dict, tors: TorPids, kind: str) -> tuple:
    """`mexc run` on `data`'s config; waits for three distinct exits and stored rows, SETTLE s,
    then reads the tors' memory.  Returns (daemon, figures); the caller stops the daemon."""
    config = world.write_config(data)
    log_path = os.path.join(os.path.dirname(config), "daemon.log")
    offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    data_dirs = [os.path.join(data["paths"]["state_dir"], "tor", name, "data") for name in NAMES]
    kept = sum(os.path.exists(os.path.join(d, "cached-consensus")) for d in data_dirs)
    started = time.time()
    daemon = Daemon(config, data["paths"]["runtime_dir"], len(SYMBOLS),
                    f"{data['clickhouse']['database']} ({kind})")
    try:
        return daemon, measure_start(daemon, tors, kind, started, offset, kept)
    except BaseException:
        daemon.stop()
        raise


def measure_start(daemon: Daemon, tors: TorPids, kind: str, started: float, offset: int,
                  kept: int) -> dict:
    distinct_s, exits = wait_distinct_exits(daemon, tors, started)
    status = daemon.wait_flowing(START_TIMEOUT)
    flowing_s = time.time() - started
    tors.add(status)
    time.sleep(SETTLE)
    status = daemon.status()
    tors.add(status)
    memory = tor_memory(status)
    events = log_events(daemon, offset)

    def per_tor(pattern: str) -> dict:
        """name -> (seconds after the start, match) of its first line matching, or None."""
        return {name: first_event(events, started, "supervisor", pattern.format(name=name))
                for name in NAMES}

    figures = {
        "kind": kind, "cached_consensus_kept": kept, "distinct_exits_s": distinct_s,
        "exits": exits, "flowing_s": flowing_s,
        "separations": sum("shares exit" in m for _, tag, m in events if tag == "supervisor"),
        **memory,
    }
    for key, pattern in (("tor_started_s", r"tor\[{name}\] starting pid="),
                         ("tor_done_s", r"tor\[{name}\] Bootstrapped 100%"),
                         ("bootstrapped_s", r"tor\[{name}\] bootstrapped in ([\d.]+)s")):
        figures[key] = {name: found and found[0] for name, found in per_tor(pattern).items()}
    figures["bootstrap_logged_s"] = {  # the daemon's own figure: from its tor's start
        name: found and float(found[1].group(1))
        for name, found in per_tor(r"tor\[{name}\] bootstrapped in ([\d.]+)s").items()}
    if None in figures["bootstrapped_s"].values():
        raise BenchError(f"{daemon.name}: a bootstrap line is missing from {daemon.log_path}")
    return figures


def wait_distinct_exits(daemon: Daemon, tors: TorPids, started: float) -> tuple:
    """Seconds from `started` to the status request that first showed three distinct exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        daemon.check_alive()
        asked = time.time()
        status = daemon.status()
        if status is not None:
            tors.add(status)
            ips = distinct_exits(status)
            if ips:
                return asked - started, ips
        time.sleep(max(0.0, asked + STATUS_POLL - time.time()))
    raise BenchError(f"{daemon.name}: no three distinct exits after {START_TIMEOUT:.0f}s:\n"
                     f"{daemon.log_tail()}")


def tor_memory(status: dict) -> dict:
    rss, uss = {}, {}
    for name, entry in tor_entries(status).items():
        info = psutil.Process(entry["pid"]).memory_full_info()
        rss[name], uss[name] = info.rss / MIB, info.uss / MIB
    return {"rss_mib": rss, "uss_mib": uss}


def check_loopback(network: TorNetwork, daemon: Daemon, tors: TorPids) -> None:
    status = daemon.status()
    if status is not None:
        network.assert_loopback_only(extra_pids=tors.add(status))


# --- 4: SIGKILL of a daemon's tor -> the collector's next stored row --------------------------

def kill_tor(daemon: Daemon, client, table: str, tors: TorPids) -> dict:
    status = daemon.status()
    victim = tor_entries(status)[VICTIM]
    collector_pid = Daemon.collectors(status)[f"collector-{VICTIM}"]["pid"]
    timing = daemon.kill_and_time(victim["pid"], client, table, wait_new_tor,
                                  RECOVERY_TIMEOUT, POLL, KILL_PHASE)
    kill_wall = timing.pop("kill_wall")
    status = daemon.status()
    tors.add(status)
    collector_kept = Daemon.collectors(status)[f"collector-{VICTIM}"]["pid"] == collector_pid
    return {**timing, "collector_kept": collector_kept,
            **kill_steps(daemon, victim["pid"], timing["new_pid"], kill_wall)}


def wait_new_tor(daemon: Daemon, known: set, kill_t: float) -> tuple:
    """Poll the supervisor's children (not status: it wakes the loop) for the new tor."""
    known = set(known)
    deadline = kill_t + RECOVERY_TIMEOUT
    while time.monotonic() < deadline:
        new = set(daemon.children()) - known
        if new:
            seen = time.monotonic() - kill_t
            pid = tor_entries(daemon.status())[VICTIM]["pid"]
            if pid in new:
                return pid, seen
            known |= new
        daemon.check_alive()
        time.sleep(POLL)
    raise BenchError(f"{daemon.name}: no new tor-{VICTIM} {RECOVERY_TIMEOUT:.0f}s after the "
                     f"kill:\n{daemon.log_tail()}")


def kill_steps(daemon: Daemon, old_pid: int, new_pid: int, kill_wall: float) -> dict:
    """Seconds from the kill to the daemon's log lines about it."""
    events = log_events(daemon, 0)
    collector = f"collector[{VICTIM}]"
    steps = {}

    def at(tag, pattern):
        found = first_event(events, kill_wall, tag, pattern)
        return found[0] if found else None

    steps["noticed_s"] = at("supervisor", f"tor-{VICTIM} pid {old_pid} killed")
    found = first_event(events, kill_wall, "supervisor",
                        f"tor-{VICTIM} pid {old_pid} .*restarting in ([\\d.]+)s")
    steps["restart_delay_s"] = float(found[1].group(1)) if found else None
    steps["tor_started_s"] = at("supervisor", f"started tor-{VICTIM} pid={new_pid}")
    steps["tor_done_s"] = at("supervisor", f"tor\\[{VICTIM}\\] Bootstrapped 100%")
    steps["bootstrapped_s"] = at("supervisor", f"tor\\[{VICTIM}\\] bootstrapped in")
    steps["disconnected_s"] = at(collector, "^disconnected: ")
    steps["connected_s"] = at(collector, "^connected url=")
    # what the collector did in between: its attempts (after each backoff) and their failures
    attempts, failures = [], []
    for when, tag, message in events:
        since = when - kill_wall
        if (tag != collector or since < -0.001 or steps["connected_s"] is None
                or since > steps["connected_s"]):
            continue
        match = re.match(r"reconnecting in ([\d.]+)s", message)
        if match:
            attempts.append(since + float(match.group(1)))
        elif message.startswith("disconnected: "):
            failures.append(message[len("disconnected: "):].split(":", 1)[0])
    steps["attempts_s"], steps["failures"] = attempts, failures
    return steps


# --- throughput: a collector through Tor vs direct --------------------------------------------

def tor_cpu_seconds(pids: list) -> dict:
    """pid -> user + system CPU seconds so far."""
    seconds = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            seconds[pid] = times.user + times.system
    return seconds


def throughput(world: TorWorld, network: TorNetwork, tor_client, sender, rounds: int) -> dict:
    direct, through_tor, cpu = [], [], []
    relays = [r.pid for r in network.authorities + network.exits]
    for i in range(1, rounds + 1):
        world.socks_port = None
        direct.append(collector_bench.collector_round(world, sender, f"bench_tor_direct_{i}"))
        world.socks_port = tor_client.socks_port
        before = tor_cpu_seconds([tor_client.pid] + relays)
        through_tor.append(collector_bench.collector_round(world, sender, f"bench_tor_via_{i}"))
        after = tor_cpu_seconds([tor_client.pid] + relays)
        transfer = sender.n_frames / through_tor[-1]["frames_per_s"]
        used = {pid: after[pid] - before[pid] for pid in before if pid in after}
        cpu.append({"client": used.get(tor_client.pid, 0.0) / transfer * 100,
                    "relay_max": max(used[p] for p in relays if p in used) / transfer * 100,
                    "all": sum(used.values()) / transfer * 100})
        world.socks_port = None
    direct_fps = statistics.median(r["frames_per_s"] for r in direct)
    tor_fps = statistics.median(r["frames_per_s"] for r in through_tor)
    frame_bytes = sender.bytes / sender.n_frames
    return {
        "frames": sender.n_frames, "rows": sender.rows, "avg_frame_bytes": frame_bytes,
        "direct_frames_per_s": direct_fps, "tor_frames_per_s": tor_fps,
        "tor_mb_per_s": tor_fps * frame_bytes / 1e6, "ratio": tor_fps / direct_fps,
        "rounds_direct_frames_per_s": [r["frames_per_s"] for r in direct],
        "rounds_tor_frames_per_s": [r["frames_per_s"] for r in through_tor],
        "tor_cpu_percent_client": statistics.median(c["client"] for c in cpu),
        "tor_cpu_percent_relay_max": statistics.median(c["relay_max"] for c in cpu),
        "tor_cpu_percent_all": statistics.median(c["all"] for c in cpu),
    }


# --- report ----------------------------------------------------------------------------------

def values(starts: list, key: str) -> list:
    return [v for s in starts for v in s[key].values() if v is not None]


def figures(starts: list, kills: list, tp: dict, loopback: dict) -> dict:
    result = {"starts": starts, "kills": kills, "throughput": tp, "loopback": loopback}
    for kind in ("cold", "warm"):
        group = [s for s in starts if s["kind"] == kind]
        for key in ("bootstrapped_s", "tor_done_s", "bootstrap_logged_s", "rss_mib", "uss_mib"):
            numbers = values(group, key)
            result[f"{kind}_{key}_median"] = statistics.median(numbers)
            result[f"{kind}_{key}_max"] = max(numbers)
        for key in ("distinct_exits_s", "flowing_s"):
            result[f"{kind}_{key}_median"] = statistics.median(s[key] for s in group)
            result[f"{kind}_{key}_max"] = max(s[key] for s in group)
    for key in ("new_pid_s", "first_row_s", "first_received_s", "connected_s",
                "bootstrapped_s", "tor_done_s"):
        numbers = [k[key] for k in kills if k[key] is not None]
        result[f"kill_{key}_median"] = statistics.median(numbers) if numbers else None
        result[f"kill_{key}_max"] = max(numbers) if numbers else None
    result["kill_collectors_restarted"] = sum(not k["collector_kept"] for k in kills)
    return result


def print_starts(starts: list) -> None:
    print("daemon starts, seconds after `mexc run` (per tor btc / eth / sol; the daemon's own "
          "\"bootstrapped in\" figure in brackets):")
    for s in starts:
        def each(key, fmt="{:.1f}"):
            return " / ".join("-" if s[key][n] is None else fmt.format(s[key][n]) for n in NAMES)

        print(f"  {s['kind']:<4} tor started {each('tor_started_s', '{:.2f}')};  "
              f"tor says 100% {each('tor_done_s')};  daemon sees it {each('bootstrapped_s')} "
              f"[{each('bootstrap_logged_s')}]")
        print(f"       3 distinct exits {s['distinct_exits_s']:.1f} "
              f"({s['separations']} new circuits for a shared exit), all storing rows "
              f"{s['flowing_s']:.1f};  tor RSS {each('rss_mib')} MiB, USS {each('uss_mib')} MiB"
              + (f";  cached-consensus kept in {s['cached_consensus_kept']} of 3"
                 if s["kind"] == "warm" else ""))


def print_kills(kills: list) -> None:
    steps = [("tor exit noticed by the supervisor", "noticed_s"),
             ("collector disconnected (log)", "disconnected_s"),
             ("new tor started (log)", "tor_started_s"),
             ("new tor pid seen", "new_pid_s"),
             ("tor says Bootstrapped 100% (log)", "tor_done_s"),
             ("daemon sees it bootstrapped (log)", "bootstrapped_s"),
             ("collector connected (log)", "connected_s"),
             ("first frame received (min rts)", "first_received_s"),
             ("first row queryable", "first_row_s")]
    print(f"SIGKILL of tor-{VICTIM}, seconds after the kill "
          f"({', '.join(f'#{i}' for i in range(1, len(kills) + 1))}):")
    for text, key in steps:
        shown = "  ".join("-" if k[key] is None else f"{k[key]:6.2f}" for k in kills)
        print(f"  {text:<36} {shown}")
    for i, k in enumerate(kills, 1):
        # failures[0] is the connection the kill broke; failures[j] ended attempt j
        tried = [f"{at:.2f}s ({k['failures'][j] if j < len(k['failures']) else 'ok'})"
                 for j, at in enumerate(k["attempts_s"], 1)]
        print(f"  #{i}: restart delay {k['restart_delay_s']}s; lost: {k['failures'][0]}; "
              f"collector attempts at {', '.join(tried) or '-'}; pid kept: "
              f"{'yes' if k['collector_kept'] else 'NO'}")


def print_report(f: dict, machine: dict, args) -> None:
    tp = f["throughput"]
    benchlib.print_machine(machine, "tor", "psutil")
    print(f"private Tor network: 3 authorities + 3 exits on 127.0.0.0/8, up in "
          f"{f['network_up_s']:.1f} s; the daemon: {len(SYMBOLS)} collectors, simulator "
          f"{RATE:g} frames/s per stream, exit_check_interval {EXIT_CHECK_INTERVAL:g} s, "
          f"{args.repetitions} repetitions (cold start, warm start, tor kill)")
    print(f"throughput: {tp['frames']:,} frames ({tp['avg_frame_bytes']:.0f} B average) -> "
          f"{tp['rows']:,} rows per round, {args.rounds} round(s) each; frames/s direct "
          + "  ".join(f"{v:,.0f}" for v in tp["rounds_direct_frames_per_s"]) + ", via tor "
          + "  ".join(f"{v:,.0f}" for v in tp["rounds_tor_frames_per_s"]))
    print(f"  tor CPU while carrying it, % of a core: client {tp['tor_cpu_percent_client']:.0f}, "
          f"busiest relay {tp['tor_cpu_percent_relay_max']:.0f}, all tors "
          f"{tp['tor_cpu_percent_all']:.0f}")
    print(f"  the bench's tor client (tests/tor_network.py torrc, GeoIPFile /dev/null like the "
          f"daemon's): RSS {tp['client_rss_mib']:.1f} MiB, USS {tp['client_uss_mib']:.1f} MiB "
          f"once bootstrapped, RSS {tp['client_rss_after_mib']:.1f} MiB after the tor rounds")
    print()
    print_starts(f["starts"])
    print()
    print_kills(f["kills"])
    print()
    lb = f["loopback"]
    print(f"loopback check passed: network.assert_loopback_only() at the end checked "
          f"{lb['sockets']} sockets of {lb['pids_checked']} tor processes (the network's 6 "
          f"relays, the bench's tor client, the last daemon's {lb['daemon_tors_running']} tors); "
          f"all {lb['daemon_tor_pids']} tor pids the daemons ever had were checked by the "
          f"network's watcher every 0.25 s while they ran and before each daemon stopped")
    print()
    def spread(key: str, fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(f[key + '_median'])} / {fmt.format(f[key + '_max'])}"

    warm_ok = f["warm_bootstrapped_s_median"] < f["cold_bootstrapped_s_median"]
    rows = [
        ("cold start -> tor bootstrapped (daemon log) median / max, s",
         spread("cold_bootstrapped_s"), "", ""),
        ("warm start -> tor bootstrapped (daemon log) median / max, s",
         spread("warm_bootstrapped_s"), "< cold", verdict(warm_ok)),
        ("cold start -> tor's own Bootstrapped 100% median / max, s",
         spread("cold_tor_done_s"), "", ""),
        ("warm start -> tor's own Bootstrapped 100% median / max, s",
         spread("warm_tor_done_s"), "", ""),
        ("cold start -> 3 distinct exit IPs median / max, s",
         spread("cold_distinct_exits_s"), "", ""),
        ("warm start -> 3 distinct exit IPs median / max, s",
         spread("warm_distinct_exits_s"), "", ""),
        ("tor RSS per instance (cold) median / max, MiB", spread("cold_rss_mib"), "", ""),
        ("tor RSS per instance (warm) median / max, MiB", spread("warm_rss_mib"), "", ""),
        ("tor USS per instance (warm) median / max, MiB", spread("warm_uss_mib"), "", ""),
        ("SIGKILL tor -> new tor pid median / max, s", spread("kill_new_pid_s", "{:.2f}"), "",
         ""),
        ("SIGKILL tor -> first stored row median / max, s",
         spread("kill_first_row_s", "{:.2f}"), "", ""),
        ("SIGKILL tor -> collectors restarted", f"{f['kill_collectors_restarted']}", "0",
         verdict(f["kill_collectors_restarted"] == 0)),
        ("collector direct, stored frames/s", f"{tp['direct_frames_per_s']:,.0f}", "", ""),
        ("collector via tor, stored frames/s", f"{tp['tor_frames_per_s']:,.0f}", "", ""),
        ("collector via tor, MB/s of frames", f"{tp['tor_mb_per_s']:.1f}", "", ""),
        ("via tor / direct", f"{tp['ratio']:.2f}", "", ""),
        ("every tor socket on loopback", "yes", "yes", "PASS"),
    ]
    benchlib.print_table(rows, value_width=13, goal_width=6)


# --- main ------------------------------------------------------------------------------------

def repetition(world: TorWorld, network: TorNetwork, url: str, tors: TorPids, client,
               i: int, stack: contextlib.ExitStack) -> tuple:
    """Cold start, warm start and a tor kill on one state dir: ([cold, warm], kill).  The warm
    daemon is left running, stopped when `stack` closes."""
    data = daemon_config(world, network, f"bench_tor_{i}", url)
    daemon, cold = start_daemon(world, data, tors, "cold")
    try:
        check_loopback(network, daemon, tors)
    finally:
        daemon.stop()
    daemon, warm = start_daemon(world, data, tors, "warm")
    stack.callback(daemon.stop)
    table = f"{data['clickhouse']['database']}.{VICTIM}_current"
    kill = kill_tor(daemon, client, table, tors)
    check_loopback(network, daemon, tors)
    return [cold, warm], kill


def tor_version() -> str:
    out = subprocess.run([TOR, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"Tor version (\S+?)\.?$", out, re.M)
    return match.group(1) if match else "?"


def run(args) -> int:
    try:
        with contextlib.ExitStack() as stack:
            sender = collector_bench.FrameSender(args.frames)  # encodes while the rest starts
            stack.callback(sender.stop)
            world = TorWorld.start(stack, "mexc-torbench-")

            network_started = time.monotonic()
            network = TorNetwork(os.path.join(world.dir, "tornet"), key_cache_dir=KEY_CACHE)
            stack.callback(network.stop)  # its own tors and clients
            network.start(timeout=NETWORK_TIMEOUT)
            network_up_s = time.monotonic() - network_started

            tor_client = network.start_client(os.path.join(world.dir, "tor-client"))
            tor_client.wait_bootstrapped(60)
            client_before = psutil.Process(tor_client.pid).memory_full_info()
            sender.wait_ready()
            tp = throughput(world, network, tor_client, sender, args.rounds)
            client_after = psutil.Process(tor_client.pid).memory_full_info()
            tp.update(client_rss_mib=client_before.rss / MIB,
                      client_uss_mib=client_before.uss / MIB,
                      client_rss_after_mib=client_after.rss / MIB)

            simulator, url = benchlib.start_simulator(RATE)
            stack.callback(benchlib.stop_simulator, simulator)
            tors = TorPids(network)
            client = world.client()
            stack.callback(client.disconnect)
            starts, kills = [], []
            for i in range(1, args.repetitions + 1):
                with contextlib.ExitStack() as repetition_stack:
                    pair_of_starts, kill = repetition(world, network, url, tors, client, i,
                                                      repetition_stack)
                    starts += pair_of_starts
                    kills.append(kill)
                    if i == args.repetitions:  # the last daemon runs until the final check
                        stack.enter_context(repetition_stack.pop_all())

            # every tor started here or by a daemon that still runs: the network's relays and
            # client (network.pids()), the last daemon's tors; the others were checked by the
            # watcher for as long as they ran
            extra = tors.running() + [tor_client.pid]
            checked = network.assert_loopback_only(extra_pids=extra)
            loopback = {"sockets": checked, "daemon_tors_running": len(tors.running()),
                        "pids_checked": len(set(network.pids()) | set(extra)),
                        "daemon_tor_pids": len(tors.processes)}
            machine = benchlib.machine_info(world, tor=tor_version(), psutil=psutil.__version__)
    except TorNetworkError as e:
        raise BenchError(f"private Tor network: {e}") from None
    result = figures(starts, kills, tp, loopback)
    result["network_up_s"] = network_up_s
    print_report(result, machine, args)
    if args.json:
        benchlib.print_json(machine, result)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3,
                        help="cold start + warm start + tor kill, each on a fresh state dir "
                             "(default 3)")
    parser.add_argument("--frames", type=int, default=300_000,
                        help="frames per throughput round (default 300,000)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="throughput rounds of each kind, direct and via tor (default 1)")
    args = benchlib.parse_args(parser, argv)
    if args.repetitions < 1 or args.rounds < 1 or args.frames < 1:
        parser.error("--repetitions, --rounds and --frames must be at least 1")
    return benchlib.main("tor_bench", run, args)


if __name__ == "__main__":
    sys.exit(main())

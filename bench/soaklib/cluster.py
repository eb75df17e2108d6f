"""The cluster soak's world (bench/cluster_soak.py is its entry point and manual): the cluster
bed (tests/cluster_bed.py: hosts as network namespaces, one ClickHouse each, ZooKeeper), one
simulator every host reaches as its market, one `mexc run` per host; the status sampler that
keeps each host's outage windows per symbol (windows.track, as the one-host soak does); the
schedule of faults, per host and for the cluster; failover times; the end.

Each host is a HostRun: to the one-host soak's fault injectors (faults.py) and accounting
(accounting.py) it looks like a one-host Soak whose market sent it only what reached its own
connections (HostMarket)."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import types
from typing import Dict, List, Optional

import logging

import psutil
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from core.clock import HOUR_MS, EventClock
from tests.cluster_bed import ClusterBed
from tests.conftest import toml_dump

from . import ROOT
from . import faults as host_faults
from .accounting import EVENT_SLACK
from .cluster_archive import ArchiveFigures, settle, verify
from .common import (HEARTBEAT_TIMEOUT, MARKETS, MEXC, SoakError, daemon_config,
                     on_every_host, say, wait_for)
from .schedule import Fault, light_duration
from .schedule import run as run_faults
from .windows import STALE, Event, Link, Window, name_causes, track

STATUS_EVERY = 1.0  # s between status samples of each host
SESSION_TIMEOUT = 4.0  # cluster.session_timeout: a host gone is replaced this long after
ZK_ROOT = "/mexc"
QUIET_END = 5.0  # s at the end of the fault phase with no fault active
FAILOVER_DEADLINE = 60.0  # s; a failover not done by then is reported as not done
# s from the start to the market's stop besides the fault phase: the bed, every symbol live,
# everything back after the faults (7.5-8 s on a quiet machine)
SET_UP = 10.0
ZK_WAIT = 5.0  # s the soak waits for an answer of ZooKeeper
SETTLE_BEFORE_LOSS = 20.0  # s a host loss waits at most for the cluster to settle first
UP_FIRST = STALE + 2 * EVENT_SLACK + 0.5  # s a copy is seen up before the first fault

# Cluster faults, each in a slot of the run to itself: kind -> one per this many minutes (at
# least one per run), its duration in s (long run; short runs scale it down, never below the
# floor: a cut shorter than the session timeout moves nothing), and the recovery after it.
CLUSTER_FAULTS = {
    "kill_host": (4.0, (20.0, 120.0), 12.0),
    "cut_host": (4.0, (10.0, 90.0), 12.0),
    "zookeeper_outage": (6.0, (30.0, 60.0), 8.0),
    "clickhouse_outage": (5.0, (10.0, 60.0), 5.0),
    "two_hosts_down": (8.0, (20.0, 60.0), 15.0),
}
FLOOR = 2.0 * SESSION_TIMEOUT
# per-host and market faults of the one-host soak that make sense here: kind -> per minute
LIGHT_FAULTS = {"kill_collector": 1.0, "stop_collector": 1.0, "kill_exporter": 0.3,
                "stop_exporter": 0.3, "disconnect": 0.5, "stall": 0.3, "burst": 0.5,
                "junk": 1.5, "huge": 0.3}
TOR_FAULTS = {"kill_tor": 0.5, "stop_tor": 0.5}  # with --tor, as the one-host soak has them
PER_SYMBOL = ("kill_collector", "stop_collector", "kill_tor", "stop_tor")  # a symbol the host
# runs, picked when due
PER_HOST = PER_SYMBOL + ("kill_exporter", "stop_exporter", "disconnect")
# fault kind -> does it take down every symbol of its host (False: only fault.target's)
CONNECTION_FAULTS = {"kill_host": True, "cut_host": True, "two_hosts_down": True,
                     "disconnect": True, "stall": True, "kill_collector": False,
                     "stop_collector": False, "kill_tor": False, "stop_tor": False}
logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # a line per retry while ZooKeeper is out


def build_cluster_schedule(seed: int, minutes: float, hosts: List[str],
                           tor: bool = False) -> List[Fault]:
    """Faults of one run, sorted; Fault.target is a host ("h2"; "h1+h3" for two hosts down;
    "" for ZooKeeper and the market's stall).  The same seed and arguments give the same list;
    with tor, the same list plus the tor faults (drawn after the others)."""
    rng = random.Random(seed)
    span = minutes * 60.0
    scale = min(1.0, max(0.25, minutes / 10.0))  # full durations from 10 minutes on
    kinds = [kind for kind, (every, _d, _r) in CLUSTER_FAULTS.items()
             for _ in range(max(1, round(minutes / every)))]
    rng.shuffle(kinds)
    # Too short a run for a slot each (the CI's minute): each ClickHouse outage shares a
    # ZooKeeper outage's slot, starting a second after it.  The two are independent (one
    # freezes the assignment, the other makes a host's collectors spool), and both are undone
    # within the slot; host losses keep slots to themselves (a failover needs ZooKeeper).
    shared = min(kinds.count("clickhouse_outage"), kinds.count("zookeeper_outage")) \
        if (span - QUIET_END) / len(kinds) < FLOOR + max(r for *_x, r in CLUSTER_FAULTS.values()) \
        else 0
    for _ in range(shared):
        kinds.remove("clickhouse_outage")
    slot = (span - QUIET_END) / len(kinds)
    faults = []
    for i, kind in enumerate(kinds):
        _every, (low, high), recovery = CLUSTER_FAULTS[kind]
        duration = max(FLOOR, min(rng.uniform(low, high) * scale, slot - recovery))
        at = i * slot + rng.uniform(0.0, max(0.0, slot - duration - recovery))
        target = ("+".join(sorted(rng.sample(hosts, 2))) if kind == "two_hosts_down"
                  else "" if kind == "zookeeper_outage" else rng.choice(hosts))
        faults.append(Fault(round(at, 2), kind, target, round(duration, 2)))
        if kind == "zookeeper_outage" and shared:
            shared -= 1
            faults.append(Fault(round(at + 1.0, 2), "clickhouse_outage", rng.choice(hosts),
                                round(max(FLOOR, duration - 1.0), 2)))
    light = {**LIGHT_FAULTS, **(TOR_FAULTS if tor else {})}
    for kind, per_minute in light.items():
        for _ in range(max(1, round(per_minute * minutes * rng.uniform(0.7, 1.3)))):
            duration = light_duration(kind, rng)
            at = rng.uniform(3.0, max(3.0, span - QUIET_END - duration))
            target = rng.choice(hosts) if kind in PER_HOST else ""
            faults.append(Fault(round(at, 2), kind, target, round(duration, 2)))
    return sorted(faults)


def aligned_anchor(now_ms: int, speed: float, after_s: float) -> int:
    """The event clock's anchor that ends an event hour `after_s` wall seconds from now, when
    the soak stops the market: its last hour is then exported at once, not up to an hour's
    wall seconds later (the CI's 30).  The anchor lies before now by at most that much."""
    if speed <= 1.0:
        return now_ms
    at = now_ms + after_s * 1000.0
    event = now_ms + (at - now_ms) * speed  # at, on the clock anchored now
    return int(now_ms - (-event) % HOUR_MS / (speed - 1.0))  # 1 ms earlier: speed - 1 later


class HostMarket:
    """The simulator as one host saw it: rows sent on that host's connections, REST answers
    given to its addresses, the market's truth as it is.  A host's addresses are its own and,
    with Tor, its exits' (the bed gives each host exits of its own, so the simulator, which
    knows a connection by its peer address, keeps each host's rows apart)."""

    def __init__(self, sim, addresses: List[str]):
        self.sim, self.addresses = sim, list(addresses)

    def expected_rows(self, symbol=None) -> list:
        per_address = [rows for rows in (self.sim.expected_rows_to(a, symbol)
                                         for a in self.addresses) if rows]
        if len(per_address) <= 1:
            return per_address[0] if per_address else []
        # several exits: in send order, which is the order of the event times (dead letters,
        # without one, last)
        return sorted((row for rows in per_address for row in rows),
                      key=lambda row: (row[0] is None, row[0] or 0))

    def trades(self, symbol: str) -> list:
        return self.sim.trades(symbol)

    def rest_answers(self, symbol=None) -> list:
        return [a for a in self.sim.rest_answers(symbol) if a.ip in self.addresses]

    def force_disconnect(self) -> None:
        for address in self.addresses:
            self.sim.force_disconnect(address)

    def orphaned_rows(self, symbol) -> set:
        # The simulator's "superseded" is per symbol across every client; without Tor a host's
        # collector leaves a connection before it opens the next, so no row is orphaned.
        return set()


class HostRun(host_faults.Daemon):
    """One host's daemon and what the soak saw of it."""

    def __init__(self, soak: "ClusterSoak", host):
        self.soak, self.bed_host = soak, host
        self.name, self.address = host.name, host.address
        self.dir = os.path.join(soak.dir, host.name)
        os.makedirs(self.dir)
        self.config_path = os.path.join(self.dir, "mexc.toml")
        self.runtime_dir = os.path.join(self.dir, "run")
        self.export_dir = os.path.join(self.dir, "export")
        self.state_dir = os.path.join(self.dir, "state")
        os.makedirs(self.export_dir)
        self.names = soak.names
        self.sim = HostMarket(soak.sim, [self.address] + [e.address for e in host.exits])
        self.speed, self.anchor = soak.speed, soak.anchor
        self.args, self.rng = soak.args, soak.rng
        self.daemons: List[subprocess.Popen] = []
        self.down = False  # killed by the soak (its status is not asked meanwhile)
        self.links = {n: Link(window=Window(n, start=time.time(), causes=["startup"]))
                      for n in self.names}
        self.absent: Dict[str, bool] = {n: True for n in self.names}  # at the window's opening
        self.windows: List[Window] = []
        self.events: List[Event] = []
        self.ledger: Dict[str, list] = {}
        self.injections: list = []
        self.stopped_pids = set()
        self.child_pids: Dict[int, float] = {}
        self.held: set = set()  # symbols whose collector ran at the last sample
        self.report = types.SimpleNamespace(  # what accounting.read_files/read_tables fill in
            files=0, file_rows=0, bad_files=[], temp_files_left=0, temp_file_names=[],
            fresh_rows=0, faults_skipped=soak.report.faults_skipped)

    # --- the daemon ------------------------------------------------------------------------

    def ch_section(self) -> dict:
        return {"host": self.address, "port": 9000, "http_port": 8123, "database": "soak",
                "user": "default", "password": "", "managed": False}

    def write_config(self) -> None:
        data = daemon_config(self, self.names, self.soak.sim.url)
        data["http"] = {"listen": ""}
        if self.args.tor:
            # bootstrap_timeout as shipped (120 s): at a load average of 200 (other benches)
            # 60 s restarted every tor before it was done, again and again
            data["tor"] = {"enabled": True, "exit_check_interval": 1.0, "bootstrap_timeout": 120.0,
                           "torrc_extra": self.soak.bed.torrc_extra(self.name)}
        data["cluster"] = {"host": self.name, "zookeeper": self.soak.bed.zookeeper.hosts,
                           "clickhouse": f"{self.address}:9000", "replicas": self.args.replicas,
                           "root": ZK_ROOT, "session_timeout": SESSION_TIMEOUT}
        with open(self.config_path, "w") as f:
            f.write(toml_dump(data))

    def start_daemon(self) -> None:
        log = open(os.path.join(self.dir, f"daemon-{len(self.daemons)}.log"), "wb")
        # a session of its own: killpg takes supervisor and collectors at once
        self.daemons.append(self.soak.bed.popen(
            self.name, [MEXC, "run", "--config", self.config_path], stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": ROOT}))
        log.close()
        self.down = False

    @property
    def daemon(self) -> subprocess.Popen:
        return self.daemons[-1]

    def kill(self) -> None:
        """SIGKILL the whole host: the daemon's process group, then its ClickHouse (after the
        collectors are gone, as power lost a moment later would)."""
        self.down = True
        try:
            os.killpg(self.daemon.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.daemon.wait(10)
        server = self.bed_host.clickhouse
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)

    def revive(self) -> None:
        server = self.bed_host.clickhouse
        if server.process is None or server.process.poll() is not None:
            server.start(60)
        self.start_daemon()

    # --- what faults.py asks of a soak ------------------------------------------------------

    def note(self, fault: Fault, note: str = "") -> Event:
        return self.soak.note(fault, note, host=self)

    # --- sampling ----------------------------------------------------------------------------

    def sample(self, status: dict, now: float) -> None:
        soak = self.soak
        sup = status["supervisor"]
        soak.rss("supervisor", sup.get("rss_bytes"))
        for c in status["children"]:
            soak.rss(c["kind"], c.get("rss_bytes"))
            if c["pid"] and c["pid"] not in self.child_pids:
                try:
                    self.child_pids[c["pid"]] = psutil.Process(c["pid"]).create_time()
                except psutil.Error:
                    pass
        collectors = {c["symbol"]: c for c in status["children"] if c["kind"] == "collector"
                      and c["state"] != "stopping"}
        self.held = {n for n in self.names if MARKETS[n] in collectors}
        for name in self.names:
            link, c = self.links[name], collectors.get(MARKETS[name])
            opening = link.window is None
            window = track(link, name, c, now)
            if opening and link.window is not None:
                self.absent[name] = c is None
            if window is not None:
                self.explain(window)
                self.windows.append(window)

    def explain(self, window: Window) -> None:
        """The planned faults behind a window, its start pulled back to the first of them; a
        window of a collector that was not running is a symbol this host did not hold."""
        if window.causes:  # startup
            return
        name_causes(window, self.events + self.soak.market_events, CONNECTION_FAULTS,
                    HEARTBEAT_TIMEOUT)
        if not window.causes:
            window.causes.append("not held" if self.absent[window.symbol] else "unplanned")
            if not self.absent[window.symbol]:
                what = f"{self.name} {window.symbol}: " + (
                    f"collector restarted ({window.last_exit})" if window.restarted
                    else "reconnected")
                self.soak.report.unplanned.append(what)
                say(f"unplanned: {what}")

    def close_windows(self, now: float) -> None:
        """Windows still open at the end (symbols this host does not hold then)."""
        for link in self.links.values():
            if link.window is not None:
                link.window.end = now
                if not link.window.causes:
                    link.window.causes.append("not held")
                self.windows.append(link.window)
                link.window = None


@dataclasses.dataclass
class Failover:
    kind: str
    victims: str
    seconds: Optional[float]  # None: not done within FAILOVER_DEADLINE
    symbols: int
    # s from the loss to the victims' return, when they came back before the others had
    # taken over (then seconds is None; judged only if later than FAILOVER_GOAL,
    # cluster_accounting.py)
    back_first: Optional[float] = None


class ClusterSoak:
    def __init__(self, args, report):
        self.args, self.report = args, report
        self.names = list(MARKETS)[:args.symbols]
        self.rng = random.Random(args.seed * 7919 + 1)
        self.dir = tempfile.mkdtemp(prefix="mexc-cluster-soak-")
        self.speed = 3600.0 / args.hour_seconds
        self.anchor = aligned_anchor(int(time.time() * 1000), self.speed,
                                     args.minutes * 60.0 + SET_UP)
        self.clock = EventClock(self.speed, self.anchor)
        self.bed: Optional[ClusterBed] = None
        self.sim = None
        self.hosts: Dict[str, HostRun] = {}
        self.zk: Optional[KazooClient] = None
        self.zk_root = ZK_ROOT
        self.stop_sent: Dict[str, float] = {}  # host -> wall s its SIGTERM was sent
        self.settled_versions: Dict[tuple, str] = {}  # (name, hour) -> merged sha256, settled
        self.exits_apart_live = False  # with --tor: IP separation held while the market traded
        self.lock = threading.Lock()
        self.market_events: List[Event] = []  # stalls: every host's connections
        self.events: List[Event] = []
        self.injections: list = []
        self.injectors: List[threading.Thread] = []
        self.failovers: List[Failover] = []
        self.watchers: List[threading.Thread] = []
        self.peak_rss: Dict[str, int] = collections.defaultdict(int)
        self.sampler_stop = threading.Event()
        self.sampler: Optional[threading.Thread] = None

    # --- setting up ------------------------------------------------------------------------

    def start(self) -> None:
        # with Tor, as many exits per host as symbols: a host holding every one (two hosts
        # down) keeps each on an exit of its own
        self.bed = ClusterBed(os.path.join(self.dir, "bed"), self.args.hosts, tor=self.args.tor,
                              exits_per_host=self.args.symbols).start(
                                  240 if self.args.tor else 120)
        say(f"bed up: {len(self.bed.hosts)} hosts, zookeeper {self.bed.zookeeper.hosts}"
            + (f", a Tor network of {len(self.bed.tor_network.authorities)} authorities and "
               f"{len(self.bed.tor_network.exits)} exits" if self.args.tor else "")
            + f" ({self.bed.start_seconds:.1f}s)")
        self.sim = self.bed.start_simulator(rate=self.args.rate, event_clock=self.clock.now_ms,
                                            seed=self.args.seed)
        for h in self.bed.hosts:
            self.hosts[h.name] = HostRun(self, h)
            self.hosts[h.name].write_config()
        self.zk = KazooClient(hosts=self.bed.zookeeper.hosts, timeout=10.0,
                              connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 0.5})
        self.zk.start(timeout=15)
        for host in self.hosts.values():
            host.start_daemon()
        self.sampler = threading.Thread(target=self._sample_loop, name="status-sampler",
                                        daemon=True)
        self.sampler.start()
        wait_for(lambda: self.settled(exactly=True), 300 if self.args.tor else 180,
                 f"every symbol live on exactly {self.copies()} hosts", 0.5)
        # and the sampler has seen each host's copies up a while: a fault before that merges
        # into the startup windows, whose stretch needs no record (seed 7 lost h1 and h2 at
        # 0.0 s: its cluster holes, 288 and 276 trades left, were taken for the start)
        wait_for(self.sampled_up, 60, "the status sampler seeing every copy up", 0.5)
        say(f"cluster up: {self.live()}; work dir {self.dir}")

    def sampled_up(self) -> bool:
        """Every copy seen up long enough that a loss's window, which opens STALE before the
        last sample that saw it up and is EVENT_SLACK wider, cannot touch its startup one."""
        with self.lock:
            return all(host.held and all(
                host.links[n].window is None and host.links[n].last_up - max(
                    (w.end for w in host.windows if w.symbol == n), default=0.0) > UP_FIRST
                for n in host.held) for host in self.hosts.values())

    def copies(self, alive: Optional[int] = None) -> int:
        return min(self.args.replicas, len(self.hosts) if alive is None else alive)

    def live(self, exclude=()) -> Dict[str, set]:
        """{name: hosts whose copy is live}, as ZooKeeper has it; raises when ZooKeeper does not
        answer within ZK_WAIT (kazoo's own calls wait for ever: a ZooKeeper that did not come
        back after its outage, on a machine at a load of 300, held the schedule for minutes)."""
        asked = {name: self.zk.get_children_async(f"{ZK_ROOT}/live/{name}")
                 for name in self.names}
        deadline, result = time.monotonic() + ZK_WAIT, {}
        for name, answer in asked.items():
            try:
                hosts = set(answer.get(timeout=max(0.0, deadline - time.monotonic())))
            except NoNodeError:
                hosts = set()
            result[name] = hosts - set(exclude)
        return result

    def settled(self, exactly: bool = False) -> bool:
        """Every symbol live on its copies (exactly: and no more, the extras released)."""
        try:
            live = self.live()
        except Exception:  # our own session, lost while ZooKeeper was down
            return False
        return all(len(h) == self.copies() if exactly else len(h) >= self.copies()
                   for h in live.values())

    def balanced(self) -> bool:
        """Settled exactly, and every host holds copies (just back, a host holds none while the
        others still hold every symbol twice)."""
        try:
            live = self.live()
        except Exception:
            return False
        return (all(len(h) == self.copies() for h in live.values())
                and all(any(host in h for h in live.values()) for host in self.hosts))

    def rss(self, kind: str, value) -> None:
        if value:
            self.peak_rss[kind] = max(self.peak_rss[kind], value)

    def _sample_loop(self) -> None:
        while not self.sampler_stop.wait(STATUS_EVERY):
            for host in self.hosts.values():
                if host.down:
                    continue
                status = host.status(timeout=2.0)
                if status is not None:
                    with self.lock:
                        host.sample(status, time.time())
                self.process_rss("clickhouse", host.bed_host.clickhouse.process)
            self.process_rss("zookeeper", self.bed.zookeeper.process)

    def process_rss(self, kind: str, process: Optional[subprocess.Popen]) -> None:
        if process is not None and process.poll() is None:
            try:
                self.rss(kind, psutil.Process(process.pid).memory_info().rss)
            except psutil.Error:
                pass

    # --- recording and injecting -------------------------------------------------------------

    def note(self, fault: Fault, note: str = "", host: Optional[HostRun] = None) -> Event:
        event = Event(time.time(), fault.kind, fault.target, fault.duration, note)
        with self.lock:
            self.events.append(event)
            if host is not None:
                host.events.append(event)
            elif fault.kind == "stall":
                self.market_events.append(event)
        say(f"{host.name + ' ' if host else ''}{fault}{': ' + note if note else ''}")
        return event

    def streaming(self, symbol: str) -> bool:
        """Some host's connection is subscribed to symbol (faults.inject sends to it)."""
        return self.sim.streaming_to(symbol)

    def measure_failover(self, kind: str, victims: List[str], held: set,
                         returned: threading.Event) -> None:
        """Time from the host(s) lost until every symbol they held is live on as many other
        hosts as the survivors can give (ZooKeeper's live nodes, read every 0.2 s); or until
        `returned` is set, if the victims come back first (a takeover can take longer than
        a short outage: a copy is live at its first data, none comes in a market stall)."""
        began = time.monotonic()
        wanted = self.copies(len(self.hosts) - len(victims))
        try:
            live = self.live(exclude=victims)
            held = {n for n in held if len(live[n]) < wanted}  # the others have their copies
        except Exception:
            pass
        if not held:
            say(f"{kind} {'+'.join(victims)}: no symbol to move")
            return

        def watch():
            seconds = back_first = None
            while time.monotonic() - began < FAILOVER_DEADLINE:
                try:
                    live = self.live(exclude=victims)
                    if all(len(live[n]) >= wanted for n in held):
                        seconds = time.monotonic() - began
                        break
                except Exception:
                    pass
                if returned.wait(0.2):
                    back_first = time.monotonic() - began
                    break
            self.failovers.append(Failover(kind, "+".join(victims), seconds, len(held),
                                           back_first))
            say(f"failover after {kind} {'+'.join(victims)}: " + (
                f"{seconds:.1f}s ({len(held)} symbols)" if seconds is not None
                else f"not done when {'+'.join(victims)} came back after {back_first:.1f}s"
                if back_first is not None else f"NOT DONE within {FAILOVER_DEADLINE:.0f}s"))
        thread = threading.Thread(target=watch, name="failover", daemon=True)
        thread.start()
        self.watchers.append(thread)

    # --- the faults ----------------------------------------------------------------------------

    def lose_hosts(self, fault: Fault, cut: bool):
        # A host lost before the last one's return has settled may hold nothing yet (seeds 7
        # and 18, CI: h1 cut just after its restart, "no symbol to move", no failover to
        # measure): wait, a while at most, until every host holds its share again.
        try:
            wait_for(self.balanced, SETTLE_BEFORE_LOSS,
                     "every symbol on exactly its copies, every host with its share", 0.2)
        except SoakError as e:
            say(f"{fault}: {e}; injected anyway")
        victims = [self.hosts[h] for h in fault.target.split("+")]
        try:  # what they hold, by ZooKeeper (the sampler may not have seen a host back yet)
            held = {n for n, hosts in self.live().items() if hosts & {v.name for v in victims}}
        except Exception:
            held = set().union(*(v.held for v in victims))
        for v in victims:
            if cut:
                self.bed.cut(v.name)
            else:
                v.kill()
        event = victims[0].note(fault, "network cut" if cut else "daemon and clickhouse SIGKILLed")
        for v in victims[1:]:  # one fault, in each victim's record
            v.events.append(event)
        returned = threading.Event()
        self.measure_failover(fault.kind, [v.name for v in victims], held, returned)

        def back():
            returned.set()
            for v in victims:
                if cut:
                    self.bed.restore(v.name)
                else:
                    v.revive()
                say(f"{v.name} back ({'network restored' if cut else 'started again'})")
        return back

    def inject_fault(self, fault: Fault):
        kind = fault.kind
        if kind in ("kill_host", "two_hosts_down"):
            return self.lose_hosts(fault, cut=False)
        if kind == "cut_host":
            return self.lose_hosts(fault, cut=True)
        if kind == "zookeeper_outage":
            self.bed.zookeeper.stop()
            self.note(fault, "zookeeper stopped")

            def back():
                self.bed.zookeeper.start()
                say("zookeeper started again")
            return back
        if kind == "clickhouse_outage":
            host = self.hosts[fault.target]
            host.bed_host.clickhouse.stop()
            host.note(fault, "clickhouse stopped")

            def back():
                host.bed_host.clickhouse.start(60)
                say(f"{host.name} clickhouse started again")
            return back
        if kind == "disconnect":
            host = self.hosts[fault.target]
            host.note(fault)
            host.sim.force_disconnect()
            return None
        if kind in PER_HOST:  # the one-host soak's injectors, on this host
            host = self.hosts[fault.target]
            if host.down:
                raise SoakError(f"{host.name} is down")
            target = ""
            if kind in PER_SYMBOL:
                if not host.held:
                    raise SoakError(f"{host.name} runs no collector")
                target = self.rng.choice(sorted(host.held))
            return host_faults.FAULTS[kind](host, Fault(fault.at, kind, target, fault.duration))
        if kind in ("burst", "junk", "huge"):
            fault = Fault(fault.at, kind, self.rng.choice(self.names), fault.duration)
        return host_faults.FAULTS[kind](self, fault)  # stall, burst, junk, huge: the market

    def run_schedule(self, schedule: List[Fault], span: float) -> None:
        run_faults(schedule, span, self.inject_fault, self.report.faults_skipped)
        for thread in self.injectors + self.watchers:
            thread.join(FAILOVER_DEADLINE)

    # --- the end -------------------------------------------------------------------------------

    def restore(self) -> None:
        for host in self.hosts.values():
            for pid in list(host.stopped_pids):
                host.signal_pid(pid, signal.SIGCONT)
            self.bed.restore(host.name)
            if host.down or host.daemon.poll() is not None:
                host.revive()
        if self.bed.zookeeper.process is None or self.bed.zookeeper.process.poll() is not None:
            self.bed.zookeeper.start()

    def drained(self) -> bool:
        for host in self.hosts.values():
            status = host.status()
            if status is None:
                return False
            for c in status["children"]:
                if c["kind"] == "collector" and (c["state"] != "running" or c.get(
                        "buffered_rows") or c.get("spooled_rows") or c.get("held")):
                    return False
        return True

    def export_once(self) -> None:
        """`mexc export --once` on every host at once, as operators of several hosts would."""
        def export(host: HostRun) -> None:
            result = subprocess.run([MEXC, "export", "--once", "--config", host.config_path],
                                    capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "PYTHONPATH": ROOT})
            self.report.export_once_exits[host.name] = result.returncode
            with open(os.path.join(host.dir, "export-once.txt"), "w") as f:
                f.write(result.stdout + result.stderr)
            said = (result.stdout + result.stderr).strip().splitlines()
            say(f"{host.name} mexc export --once: exit {result.returncode}"
                + (f": {said[-1][:300]}" if result.returncode and said else ""))
        on_every_host(self.hosts.values(), export)

    def finish(self) -> None:
        """Everything back, every symbol on its copies, data stopped and drained, exported,
        the daemons stopped; then everything is read back and counted (ClusterAccounting)."""
        self.restore()
        wait_for(self.settled, 120, "every symbol live on its copies again", 0.5)
        time.sleep(2.0)
        if self.args.tor:  # while the market trades: a move to another exit needs data
            self.wait_exits_apart()
        self.sim.stop_data()
        stopped = time.time()
        say("data stopped; draining")
        wait_for(self.drained, 180, "every host drained (nothing buffered, spooled or held)", 0.5)
        self.export_once()
        wait_for(self.drained, 60, "the last rows stored", 0.5)
        # the merged archive: the last hours exported, merged and pulled everywhere, verified
        self.report.archive = ArchiveFigures()
        settle(self, self.report.archive)
        verify(self, self.report.archive)
        if self.args.tor:
            self.check_tor()
        time.sleep(2.0)
        self.sampler_stop.set()
        self.sampler.join(10)
        now = time.time()
        for host in self.hosts.values():
            host.close_windows(now)
            # After the market stopped nothing was made or sent: a connection replaced then (a
            # stale socket, pongs late through a tor on a loaded machine) lost nothing, and a
            # "hole" of such windows on every host was none (Tor, seed 7: 10 of them).
            host.windows = [w for w in host.windows if w.start < stopped]
        self.write_timeline()
        for host in self.hosts.values():
            began = time.monotonic()
            self.stop_sent[host.name] = time.time()
            host.daemon.terminate()
            try:
                self.report.stop_exits[host.name] = host.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.report.stop_exits[host.name] = None
            self.report.stop_seconds[host.name] = round(time.monotonic() - began, 1)
        self.report.peak_rss_mb = {k: v / 2**20 for k, v in self.peak_rss.items() if v}
        for e in self.events:
            self.report.faults[e.kind] = self.report.faults.get(e.kind, 0) + 1
        seconds = [f.seconds for f in self.failovers if f.seconds is not None]
        self.report.failovers = [dataclasses.asdict(f) for f in self.failovers]
        if seconds:
            self.report.failover_median = statistics.median(seconds)
            self.report.failover_max = max(seconds)

    def wait_exits_apart(self, timeout: float = 60.0) -> None:
        """Each host's IP separation, checked while the market still trades: until every
        host's collectors are on distinct exits (a failure if not within `timeout`).  Once
        the market has stopped, a collector whose replacement connection (a stale socket's)
        landed on another's exit cannot be moved: the move is make before break, and a new
        connection that brings no data is dropped after overlap_max, again and again (seed 7:
        ltc beside eth on h2 for the last minute, so `mexc verify` said 3 IPs for 4
        collectors); its IP separation line is then not counted (cluster_archive.verify)."""
        def apart(host: HostRun) -> bool:
            status = host.status() or {"children": []}
            ips = [c["exit_ip"] for c in status["children"] if c["kind"] == "collector"]
            return bool(ips) and all(ips) and len(set(ips)) == len(ips)
        try:
            wait_for(lambda: all(apart(h) for h in self.hosts.values()), timeout,
                     "each host's collectors on distinct exits", 1.0)
            self.exits_apart_live = True
            say("each host's collectors on distinct exits while the market trades")
        except SoakError as e:
            self.report.failures.append(f"IP separation: {e}")

    def check_tor(self) -> None:
        """Every socket in the bed, every tor's among them (the relays, each host's own), on
        the bed's subnet or loopback: now, and at each of the Tor network's watcher's checks
        (every 0.25 s) since it started."""
        network = self.bed.tor_network
        tors = self.bed.tor_pids()
        relays = len(network.authorities) + len(network.exits)
        try:
            checked = self.bed.assert_contained()
            self.report.tor = (f"tor: {len(network.authorities)} authorities, "
                               f"{len(network.exits)} exits, {len(tors) - relays} tors of the "
                               f"hosts at the end; every socket in the bed on its subnet or "
                               f"loopback ({checked} checked now, and every tor's every 0.25 s)")
        except Exception as e:
            self.report.tor = "tor: traffic outside the bed"
            self.report.failures.append(f"{e}"[:600])
        say(self.report.tor)

    def write_timeline(self) -> None:
        """Every host's windows and faults, for a reader of a kept work dir."""
        timeline = {h.name: {"windows": [dataclasses.asdict(w) for w in h.windows],
                             "events": [dataclasses.asdict(e) for e in h.events]}
                    for h in self.hosts.values()}
        timeline["market"] = [dataclasses.asdict(e) for e in self.market_events]
        with open(os.path.join(self.dir, "timeline.json"), "w") as f:
            json.dump(timeline, f, indent=1)

    def cleanup(self) -> None:
        self.sampler_stop.set()
        if self.zk is not None:
            try:
                self.zk.stop()
                self.zk.close()
            except Exception:
                pass
        for host in self.hosts.values():
            for pid in list(host.stopped_pids):
                host.signal_pid(pid, signal.SIGCONT)
            for daemon in host.daemons:
                if daemon.poll() is None:
                    daemon.terminate()
                    try:
                        daemon.wait(20)
                    except subprocess.TimeoutExpired:
                        os.killpg(daemon.pid, signal.SIGKILL)
        if self.bed is not None:
            self.bed.stop()  # every process left in its namespaces, then the namespaces
        keep = self.args.keep or not self.report.passed
        if keep:
            say(f"work dir kept: {self.dir} (hN/daemon-*.log, hN/export/, bed/)")
        else:
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)

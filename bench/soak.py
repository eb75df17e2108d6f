"""Fault-injection soak: the whole daemon under a seeded storm of faults, then every row counted.

Run from the repository root:

    /tmp/venv/bin/python bench/soak.py [--minutes M] [--seed S] [--tor] [--managed] [--json]

Exit status 0 only when the daemon lost and doubled nothing it could have kept (see "What counts
as loss" below), every Parquet file is sound and holds only its hour, and the daemon is healthy
at the end.  `--minutes 60` is the long run; the default (3) and the test's 2 are short ones.

What runs (all on 127.0.0.1, nothing else is contacted)
--------------------------------------------------------
* the MEXC simulator (mexc/simulator.py) in this process, `--rate` frames/s per stream (three
  streams per symbol), its event clock the same accelerated EventClock the daemon's exporter
  uses (export.clock_speed / clock_anchor_ms): an event hour passes every `--hour-seconds`
  wall seconds, so hourly rotations and Parquet files happen every few seconds;
* ClickHouse: our own ManagedClickHouse (clickhouse.managed = false), or with `--managed` the
  daemon's own;
* `mexc run` with three collectors (BTC_USDT, ETH_USDT, SOL_USDT) and the exporter; export.dir
  is a small tmpfs when `mount -t tmpfs` works (root), else a plain directory;
* with `--tor` a private Tor network (tests/tor_network.py: authorities and exits on
  127.0.0.0/8, never the public network) and one daemon tor per collector; every tor socket
  is checked to be loopback-only while the soak runs and at the end.

Faults (a schedule of (time, fault) drawn from --seed; `build_schedule`)
------------------------------------------------------------------------
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
  Lost rows inside windows are reported: rows, and "gap seconds" (for each run of consecutive
  lost rows, the wall time from its first to its last, summed).
  A lost row outside every window is a failure.  ClickHouse outages, full disks, exporter
  crashes, rotations, short stops, short stalls, bursts and bad frames open no window: they
  must cost nothing.
* unrecorded: a stored data row the simulator did not record.  A sendall() that fails half way
  (the connection is being torn down) may still deliver complete frames; inside a window that is
  expected, outside one it is a failure.
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
import bisect
import calendar
import collections
import dataclasses
import heapq
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for tests.*

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bus import sockets  # noqa: E402
from core.clickhouse_server import ManagedClickHouse  # noqa: E402
from core.clock import HOUR_MS, EventClock  # noqa: E402
from core.process import free_port  # noqa: E402
from core.store import Store  # noqa: E402
from mexc.simulator import MexcSimulator  # noqa: E402
from tests.conftest import Proc, toml_dump  # noqa: E402

# clickhouse-driver logs every refused connect with a traceback; outages are on purpose here
logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)

MEXC = os.path.join(os.path.dirname(sys.executable), "mexc")
SYMBOLS = {"btc": "BTC_USDT", "eth": "ETH_USDT", "sol": "SOL_USDT"}

# Daemon settings that make faults show quickly (seconds).
HEARTBEAT_TIMEOUT = 6.0  # supervisor.heartbeat_timeout: a SIGSTOP longer than this is a hang
DEAD_AFTER = 6.0  # exchange.dead_after: a stall longer than this makes collectors reconnect
PING_INTERVAL = 2.0
MAX_BUFFERED_ROWS = 5000  # small, so a ClickHouse outage spools rows to disk
EXPORT_DELAY = 60.0  # event seconds after each hour

STATUS_EVERY = 1.0  # s between status samples
STALE = 1.5  # s a heartbeat (every 1 s) can be older than the status that shows it
END_SLACK = 0.5  # s added to the end of a window
EVENT_SLACK = 0.5  # wall s on each side of a window when mapped to event time
BURST_FACTOR = 100  # a burst is one second of frames at this many times the rate
KILL_SPACING = 20.0  # s between two kills/long stops of one collector
# s; no single fault keeps a collector away this long, so such a window is reported (not failed:
# a slow tor bootstrap on the small test network is one cause) and the work dir is kept
LONG_WINDOW = 60.0
QUIET_END = 5.0  # s at the end of the fault phase in which no fault is active

# kind -> faults per minute; every kind happens at least once per run
LIGHT_FAULTS = {
    "kill_collector": 1.0, "stop_collector": 1.0, "kill_exporter": 0.4, "stop_exporter": 0.4,
    "kill_tor": 0.5, "stop_tor": 0.5, "disconnect": 0.4, "stall": 0.4, "burst": 1.0,
    "junk": 2.0, "huge": 0.4,
}
TOR_FAULTS = ("kill_tor", "stop_tor")
# kind -> one per this many minutes (at least one per run); each gets a slot of its own
EXCLUSIVE_FAULTS = {"clickhouse_outage": 5.0, "disk_full": 6.0, "reload": 5.0,
                    "kill_supervisor": 10.0}
# s after an exclusive fault ends before its slot may end (the daemon recovers meanwhile)
RECOVERY = {"clickhouse_outage": 8.0, "disk_full": 3.0, "reload": 8.0, "kill_supervisor": 20.0}
# faults that may take a symbol's connection down: kind -> affects every symbol?
CONNECTION_FAULTS = {"kill_collector": False, "stop_collector": False, "kill_tor": False,
                     "stop_tor": False, "reload": False, "disconnect": True, "stall": True,
                     "kill_supervisor": True}

FILE_RE = re.compile(r"^([a-z0-9_]+)_(\d{8})_(\d{2})00\.parquet$")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise SoakError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class SoakError(Exception):
    """The soak itself could not go on (not a finding about the data)."""


# --- the schedule --------------------------------------------------------------------------------

@dataclass(order=True)
class Fault:
    at: float  # seconds after the fault phase began
    kind: str
    target: str = ""  # a symbol's short name (btc), when the fault has one
    duration: float = 0.0  # how long it lasts (stops, outages, full disk, a symbol removed)

    def __str__(self) -> str:
        return (f"{self.kind}{' ' + self.target if self.target else ''}"
                f"{f' for {self.duration:.1f}s' if self.duration else ''}")


def _exclusive_duration(kind: str, rng: random.Random, minutes: float) -> float:
    scale = min(1.0, max(0.25, minutes / 20.0))  # 10-60 s in long runs, 2.5-15 s in 2 minutes
    if kind == "clickhouse_outage":
        return rng.uniform(10.0, 60.0) * scale
    if kind == "disk_full":
        return rng.uniform(10.0, 40.0) * scale
    if kind == "reload":
        return rng.uniform(3.0, 10.0)
    return 0.0


def _light_duration(kind: str, rng: random.Random) -> float:
    long = rng.random() < 0.5
    if kind == "stop_collector":
        return HEARTBEAT_TIMEOUT + rng.uniform(1, 3) if long else rng.uniform(1, 3)
    if kind == "stop_exporter":
        return rng.uniform(1, HEARTBEAT_TIMEOUT + 3)
    if kind == "stop_tor":
        return rng.uniform(1, DEAD_AFTER + 4)
    if kind == "stall":
        return DEAD_AFTER + rng.uniform(1, 3) if long else rng.uniform(1, 3)
    return 0.0


def _process(kind: str, target: str) -> Optional[str]:
    """The daemon child a fault signals, if any."""
    for suffix, child in (("_collector", f"collector-{target}"), ("_tor", f"tor-{target}"),
                          ("_exporter", "exporter")):
        if kind.endswith(suffix):
            return child
    return None


def build_schedule(seed: int, minutes: float, names, tor: bool) -> List[Fault]:
    """The faults of one run, sorted by time; the same seed and arguments give the same list."""
    rng = random.Random(seed)
    span = minutes * 60.0
    faults, blocked = [], []  # blocked: (start, end) around supervisor kills
    taken = collections.defaultdict(list)  # process -> (start, end) of faults on it
    exclusive = [kind for kind, every in EXCLUSIVE_FAULTS.items()
                 for _ in range(max(1, round(minutes / every)))]
    rng.shuffle(exclusive)
    slot = (span - QUIET_END) / len(exclusive)
    for i, kind in enumerate(exclusive):
        duration = _exclusive_duration(kind, rng, minutes)
        room = max(0.0, slot - duration - RECOVERY[kind])
        at = i * slot + rng.uniform(0.0, room)
        target = rng.choice(names) if kind == "reload" else ""
        faults.append(Fault(round(at, 2), kind, target, round(duration, 2)))
        if kind == "kill_supervisor":
            blocked.append((at - 12.0, at + RECOVERY[kind]))
        if kind == "reload":  # its collector and tor are gone for a while: leave them be
            for process in (f"collector-{target}", f"tor-{target}"):
                taken[process].append((at - 3.0, at + duration + RECOVERY[kind]))
    for kind, per_minute in LIGHT_FAULTS.items():
        if kind in TOR_FAULTS and not tor:
            continue
        count = max(1, round(per_minute * minutes * rng.uniform(0.7, 1.3)))
        for _ in range(count):
            for _attempt in range(50):
                duration = _light_duration(kind, rng)
                at = rng.uniform(3.0, span - QUIET_END - duration)
                target = rng.choice(names) if kind not in ("kill_exporter", "stop_exporter",
                                                           "disconnect", "stall") else ""
                if any(a <= at + duration and at <= b for a, b in blocked):
                    continue
                process = _process(kind, target)
                if process is not None:
                    # one fault at a time per process, and a kill (or a stop the supervisor
                    # will take for a hang) keeps the process to itself for KILL_SPACING
                    drastic = kind.startswith("kill_") or (kind == "stop_collector" and
                                                           duration > HEARTBEAT_TIMEOUT)
                    span_ = (at, at + duration + (KILL_SPACING if drastic else 3.0))
                    if any(a <= span_[1] and span_[0] <= b for a, b in taken[process]):
                        continue
                    taken[process].append(span_)
                faults.append(Fault(round(at, 2), kind, target, round(duration, 2)))
                break
    return sorted(faults)


# --- what happened -------------------------------------------------------------------------------

@dataclass
class Event:
    """A fault as injected (wall time)."""
    wall: float
    kind: str
    target: str
    duration: float
    note: str = ""


@dataclass
class Window:
    """A span of wall time during which a symbol's collector was not connected."""
    symbol: str  # short name
    start: float
    end: Optional[float] = None
    detected: float = 0.0
    restarted: bool = False  # a new collector pid afterwards
    last_exit: Optional[str] = None
    causes: List[str] = field(default_factory=list)


@dataclass
class Link:
    """One symbol's collector connection as the status sampler sees it."""
    epoch: Optional[Tuple[int, int]] = None  # (pid, reconnects) while connected
    last_up: float = 0.0
    window: Optional[Window] = None


@dataclass
class SymbolReport:
    name: str
    sent: int = 0  # data rows the simulator sent
    stored: int = 0  # distinct data rows stored (files + tables)
    duplicates: int = 0
    corrupt: int = 0
    unrecorded_in_windows: int = 0
    unrecorded_outside: int = 0
    lost_in_windows: int = 0
    lost_outside: int = 0
    gap_seconds: float = 0.0
    windows: int = 0
    window_seconds: float = 0.0
    max_extension_s: float = 0.0
    longest_window: str = ""  # its length, start and causes
    long_windows: int = 0  # windows over LONG_WINDOW s: a recovery this slow is worth a look
    dead_letters_injected: int = 0
    dead_letters_stored: int = 0
    examples: List[str] = field(default_factory=list)  # first runs lost outside windows
    outages: List[str] = field(default_factory=list)  # the windows that cost rows


@dataclass
class Report:
    seed: int
    minutes: float
    rate: float
    hour_seconds: float
    tor: bool
    clickhouse: str
    disk_full_method: str = ""
    runtime_s: float = 0.0
    faults: Dict[str, int] = field(default_factory=dict)
    faults_skipped: List[str] = field(default_factory=list)
    symbols: List[SymbolReport] = field(default_factory=list)
    dead_letters_sent: int = 0
    dead_letters_stored: int = 0
    dead_letters_missing: int = 0
    dead_letters_missing_allowed: int = 0
    dead_letters_extra: int = 0
    files: int = 0
    file_rows: int = 0
    bad_files: List[str] = field(default_factory=list)
    temp_files_left: int = 0
    temp_file_names: List[str] = field(default_factory=list)
    fresh_rows: int = 0
    export_once_exit: Optional[int] = None
    export_once_attempts: int = 0
    verify_exit: Optional[int] = None
    # verify failed only by "hour ... missing" for hours of which no row of that symbol was
    # stored (outages of 10 s are whole event hours here): a true gap, not a bad export
    verify_excused: List[str] = field(default_factory=list)
    verify_attempts: int = 0
    verify_output: str = ""
    rotations: int = 0
    restarts: Dict[str, int] = field(default_factory=dict)
    peak_rss_mb: Dict[str, float] = field(default_factory=dict)
    unplanned: List[str] = field(default_factory=list)
    crashes: List[str] = field(default_factory=list)
    supervisor_restart_refusals: int = 0
    healthy: bool = False
    health_notes: List[str] = field(default_factory=list)
    flapping_lines: int = 0
    tracebacks: int = 0
    stop_exit: Optional[int] = None
    stop_seconds: Optional[float] = None
    loopback_only: Optional[bool] = None
    failures: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def long_windows(self) -> int:
        return sum(s.long_windows for s in self.symbols)

    def judge(self) -> None:
        """Fill `failures` from the figures."""
        f = self.failures
        for s in self.symbols:
            if s.duplicates:
                f.append(f"{s.name}: {s.duplicates} duplicate rows")
            if s.corrupt:
                f.append(f"{s.name}: {s.corrupt} stored rows differ from what was sent")
            if s.lost_outside:
                f.append(f"{s.name}: {s.lost_outside} rows lost outside outage windows")
            if s.unrecorded_outside:
                f.append(f"{s.name}: {s.unrecorded_outside} rows stored that were never sent")
        if self.dead_letters_extra:
            f.append(f"{self.dead_letters_extra} dead letters stored twice or never sent")
        if self.dead_letters_missing > self.dead_letters_missing_allowed:
            f.append(f"{self.dead_letters_missing} dead letters lost "
                     f"({self.dead_letters_missing_allowed} sent inside outage windows)")
        if self.bad_files:
            f.append(f"{len(self.bad_files)} corrupt or mis-houred files")
        if self.temp_files_left:
            f.append(f"{self.temp_files_left} temporary files left in the export dir")
        if self.supervisor_restart_refusals:
            f.append(f"mexc run refused to start {self.supervisor_restart_refusals} times "
                     "after a supervisor kill")
        if self.export_once_exit != 0:
            f.append(f"mexc export --once exit {self.export_once_exit}")
        if self.verify_exit != 0 and not self.verify_excused:
            f.append(f"mexc verify exit {self.verify_exit}")
        if self.crashes:
            f.append(f"{len(self.crashes)} unplanned collector crashes")
        if not self.healthy:
            f.append("daemon unhealthy at the end: " + "; ".join(self.health_notes))
        if self.stop_exit != 0:
            f.append(f"SIGTERM stop: exit {self.stop_exit}")
        elif self.stop_seconds is not None and self.stop_seconds > 15.0:
            f.append(f"SIGTERM stop took {self.stop_seconds:.1f}s (the promise is 15 s)")
        if self.loopback_only is False:
            f.append("a tor socket outside 127.0.0.0/8")

    def text(self) -> str:
        lines = [f"mexc soak: seed {self.seed}, {self.minutes:g} min of faults, {self.rate:g} "
                 f"frames/s per stream, an event hour every {self.hour_seconds:g} s, tor "
                 f"{'on' if self.tor else 'off'}, clickhouse {self.clickhouse}, full disk by "
                 f"{self.disk_full_method}; ran {self.runtime_s:.0f} s",
                 "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
                 + (f" ({len(self.faults_skipped)} skipped: "
                    f"{', '.join(self.faults_skipped[:6])})" if self.faults_skipped else "")]
        header = ("symbol", "sent", "stored", "dup", "corrupt", "lost", "in windows", "gap s",
                  "windows", "window s", "ext s", "outside", "dl inj", "dl stored")
        rows = [header] + [(s.name, f"{s.sent:,}", f"{s.stored:,}", s.duplicates, s.corrupt,
                            s.lost_in_windows + s.lost_outside, s.lost_in_windows,
                            f"{s.gap_seconds:.1f}", s.windows, f"{s.window_seconds:.1f}",
                            f"{s.max_extension_s:.1f}", s.lost_outside,
                            s.dead_letters_injected, s.dead_letters_stored)
                           for s in self.symbols]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  " + "  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                                          for i, (v, w) in enumerate(zip(r, widths))))
        for s in self.symbols:
            for outage in s.outages[:8]:
                lines.append(f"  {s.name} outage {outage}")
            if len(s.outages) > 8:
                lines.append(f"  {s.name}: {len(s.outages) - 8} more outages with loss")
        lines.append("longest outage window: " + "; ".join(
            f"{s.name} {s.longest_window or '-'}" for s in self.symbols)
            + (f" ({self.long_windows} over {LONG_WINDOW:.0f}s: work dir kept)"
               if self.long_windows else ""))
        for s in self.symbols:
            for example in s.examples:
                lines.append(f"  {s.name} LOST OUTSIDE WINDOWS: {example}")
        total = lambda attr: sum(getattr(s, attr) for s in self.symbols)  # noqa: E731
        lines += [
            f"duplicates: {total('duplicates')}",
            f"lost outside outage windows: {total('lost_outside')}",
            f"lost inside outage windows: {total('lost_in_windows')} rows, "
            f"{sum(s.gap_seconds for s in self.symbols):.1f} gap seconds",
            f"stored rows that differ or were never sent: "
            f"{total('corrupt') + total('unrecorded_outside')} "
            f"(+{total('unrecorded_in_windows')} delivered by half-sent frames inside windows)",
            f"dead letters: {self.dead_letters_sent} sent, {self.dead_letters_stored} stored, "
            f"{self.dead_letters_missing} missing ({self.dead_letters_missing_allowed} allowed), "
            f"{self.dead_letters_extra} extra",
            f"files: {self.files} Parquet files, {self.file_rows:,} rows; "
            f"corrupt or mis-houred files: {len(self.bad_files)}"
            + (f" ({'; '.join(self.bad_files[:3])})" if self.bad_files else "")
            + f"; temporary files left: {self.temp_files_left}"
            + (f" ({', '.join(self.temp_file_names[:3])})" if self.temp_file_names else "")
            + (f"; rows in *_fresh tables: {self.fresh_rows}" if self.fresh_rows else ""),
            f"mexc export --once: exit {self.export_once_exit} after "
            f"{self.export_once_attempts} attempt(s); mexc verify: exit {self.verify_exit} "
            f"after {self.verify_attempts} attempt(s)"
            + (f" (only for {len(self.verify_excused)} hours in which no row of the symbol was "
               f"stored: {', '.join(self.verify_excused[:4])})" if self.verify_excused else "")
            + f"; rotations: {self.rotations}",
            "restarts: " + (", ".join(f"{k} {v}" for k, v in sorted(self.restarts.items()))
                            or "none"),
            "peak RSS: " + ", ".join(f"{k} {v:.0f} MiB"
                                     for k, v in sorted(self.peak_rss_mb.items())),
            f"unplanned reconnects and daemon-initiated restarts: {len(self.unplanned)}"
            + (f" ({'; '.join(self.unplanned[:5])})" if self.unplanned else ""),
            f"unplanned collector crashes: {len(self.crashes)}"
            + (f" ({'; '.join(self.crashes[:5])})" if self.crashes else ""),
            f"supervisor restarts refused: {self.supervisor_restart_refusals}; "
            f"flapping log lines: {self.flapping_lines}; tracebacks in logs: {self.tracebacks}",
        ]
        if self.loopback_only is not None:
            lines.append(f"tor sockets loopback only: {'yes' if self.loopback_only else 'NO'}")
        lines.append(f"daemon healthy at end: {'yes' if self.healthy else 'NO'}"
                     + (f" ({'; '.join(self.health_notes)})" if self.health_notes else "")
                     + f"; SIGTERM stop: exit {self.stop_exit}"
                     + (f" in {self.stop_seconds:.1f}s" if self.stop_seconds is not None else ""))
        if self.verify_exit not in (0, None) and not self.verify_excused:
            said = self.verify_output.strip().replace("\n", " | ")
            lines.append("mexc verify said: " + said[-600:])
        lines += [f"FAIL: {f}" for f in self.failures]
        lines.append(f"RESULT: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


# --- the world -----------------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.args = args
        self.names = list(SYMBOLS)
        self.rng = random.Random(args.seed * 7919 + 1)  # choices made while injecting
        self.dir = tempfile.mkdtemp(prefix="mexc-soak-")
        self.state_dir = os.path.join(self.dir, "state")
        self.runtime_dir = os.path.join(self.dir, "run")
        self.config_path = os.path.join(self.dir, "mexc.toml")
        self.speed = 3600.0 / args.hour_seconds
        self.anchor = int(time.time() * 1000)
        self.clock = EventClock(self.speed, self.anchor)
        self.report = Report(args.seed, args.minutes, args.rate, args.hour_seconds, args.tor,
                             "managed" if args.managed else "external")
        self.sim: Optional[MexcSimulator] = None
        self.ch: Optional[ManagedClickHouse] = None
        self.ch_port = free_port()
        self.network = None
        self.daemon: Optional[Proc] = None
        self.daemons: List[Proc] = []
        self.tmpfs: Optional[str] = None
        self.export_dir = ""
        self.lock = threading.Lock()
        self.events: List[Event] = []
        self.injections: List[Tuple[float, str, str]] = []  # (wall, symbol name, kind)
        self.injectors: List[threading.Thread] = []
        self.stopped_pids = set()  # SIGSTOPped by us and not yet continued
        self.filler: Optional[str] = None
        self.removed: Optional[str] = None  # symbol taken out of the config by a reload
        self.links: Dict[str, Link] = {}  # see start()
        self.windows: List[Window] = []
        self.child_pids: Dict[int, float] = {}  # every child pid seen -> create time
        self.tor_pids = set()
        self.restarts: Dict[Tuple[int, str], int] = {}  # (supervisor pid, child) -> restarts
        self.peak_rss: Dict[str, int] = collections.defaultdict(int)
        self.sampler_stop = threading.Event()
        self.sampler: Optional[threading.Thread] = None

    # --- setting up ------------------------------------------------------------------------

    def ch_section(self) -> dict:
        return {"host": "127.0.0.1", "port": self.ch_port, "database": "soak", "user": "default",
                "password": "", "managed": self.args.managed}

    def write_config(self, names=None, invalid: bool = False) -> None:
        """Atomically, so the supervisor never reads half a file on SIGHUP."""
        names = self.names if names is None else names
        data = {
            "symbols": [SYMBOLS[n] for n in names],
            "exchange": {"url": self.sim.url, "ping_interval": PING_INTERVAL,
                         "dead_after": DEAD_AFTER, "silent_alarm": 10.0, "reconnect_min": 0.2,
                         "reconnect_max": 2.0, "connect_timeout": 5.0},
            "clickhouse": self.ch_section(),
            "collector": {"max_buffered_rows": MAX_BUFFERED_ROWS, "stats_interval": 10.0},
            "supervisor": {"heartbeat_timeout": HEARTBEAT_TIMEOUT, "restart_min": 0.5,
                           "restart_max": 10.0, "rotation_ack_timeout": 3.0},
            "tor": {"enabled": self.args.tor},
            "export": {"dir": self.export_dir, "delay": EXPORT_DELAY,
                       "clock_speed": self.speed, "clock_anchor_ms": self.anchor},
            "paths": {"state_dir": self.state_dir, "runtime_dir": self.runtime_dir},
            "log": {"level": "info"},
        }
        if self.args.tor:
            data["tor"].update(exit_check_interval=1.0, bootstrap_timeout=60.0,
                               torrc_extra=self.network.torrc_extra())
        if invalid:
            data["collector"]["batch_rows"] = "many"  # a value of the wrong type
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(toml_dump(data))
        os.replace(tmp, self.config_path)

    def mount_export_dir(self) -> None:
        """export.dir on a small tmpfs of its own, so the disk can really be full."""
        mountpoint = os.path.join(self.dir, "exportfs")
        os.makedirs(mountpoint)
        size_mb = 64 + int(8 * self.args.minutes * max(1.0, self.args.rate / 100.0))
        if self.args.no_tmpfs:
            result = subprocess.CompletedProcess([], 1, "", "--no-tmpfs")
        else:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755",
                                     "soak-export", mountpoint], capture_output=True, text=True)
        if result.returncode == 0:
            self.tmpfs = mountpoint
            self.report.disk_full_method = f"filling a {size_mb} MiB tmpfs"
        else:
            self.report.disk_full_method = "replacing export.dir with a file (no tmpfs: " \
                                           f"{(result.stderr.strip() or 'mount failed')[:60]})"
        self.export_dir = os.path.join(mountpoint, "export")
        os.makedirs(self.export_dir)

    def start(self) -> None:
        self.mount_export_dir()
        if not self.args.managed:
            self.ch = ManagedClickHouse(os.path.join(self.dir, "clickhouse"), port=self.ch_port)
            self.ch.start()
            say(f"clickhouse {self.ch.port} ready")
        if self.args.tor:
            from tests.tor_network import TorNetwork
            self.network = TorNetwork(os.path.join(self.dir, "tornet"), n_authorities=3,
                                      n_exits=3, key_cache_dir=os.path.join(
                                          ROOT, ".pytest_cache", "tor-keys"))
            self.network.start(timeout=90)
            say("private tor network up")
        self.sim = MexcSimulator(rate=self.args.rate, event_clock=self.clock.now_ms,
                                 seed=self.args.seed).start()
        self.write_config()
        # Until a collector is first seen connected its symbol is in a "startup" window: the
        # daemon may restart it before that (with Tor, to separate exits), losing what was in
        # flight, before the sampler ever saw it.
        self.links = {name: Link(window=Window(name, start=time.time(), causes=["startup"]))
                      for name in self.names}
        self.start_daemon()
        self.sampler = threading.Thread(target=self._sample_loop, name="status-sampler",
                                        daemon=True)
        self.sampler.start()
        wait_for(self.all_connected, 180, "every collector connected")
        say(f"daemon up: {', '.join(self.names)} connected; work dir {self.dir}")

    def start_daemon(self) -> Proc:
        proc = Proc([MEXC, "run", "--config", self.config_path],
                    os.path.join(self.dir, f"daemon-{len(self.daemons)}.log"),
                    {"PYTHONPATH": ROOT})
        self.daemons.append(proc)
        self.daemon = proc
        return proc

    # --- the daemon's status ---------------------------------------------------------------

    def status(self, timeout: float = 3.0) -> Optional[dict]:
        try:
            return sockets.request(self.runtime_dir, "status", timeout=timeout)["result"]
        except Exception:  # not running, restarting, a reply we cannot read
            return None

    def child(self, name: str) -> Optional[dict]:
        status = self.status()
        for c in (status or {}).get("children", []):
            if c["name"] == name and c["state"] == "running" and c["pid"]:
                return c
        return None

    def all_connected(self) -> bool:
        with self.lock:
            return all(self.links[n].epoch is not None and self.links[n].window is None
                       for n in self.names)

    def _sample_loop(self) -> None:
        while not self.sampler_stop.wait(STATUS_EVERY):
            status = self.status(timeout=2.0)
            if status is not None:
                self._sample(status, time.time())

    def _sample(self, status: dict, now: float) -> None:
        sup = status["supervisor"]
        with self.lock:
            self.peak_rss["supervisor"] = max(self.peak_rss["supervisor"], sup["rss_bytes"] or 0)
            for c in status["children"]:
                if c["rss_bytes"]:
                    self.peak_rss[c["kind"]] = max(self.peak_rss[c["kind"]], c["rss_bytes"])
                self.restarts[(sup["pid"], c["name"])] = c["restarts"]
                if c["pid"] and c["pid"] not in self.child_pids:
                    try:
                        self.child_pids[c["pid"]] = psutil.Process(c["pid"]).create_time()
                    except psutil.Error:
                        pass
                if c["kind"] == "tor" and c["pid"] and c["pid"] not in self.tor_pids:
                    self.tor_pids.add(c["pid"])
                    if self.network is not None:
                        self.network.watch(c["pid"])
            if self.ch is not None and self.ch.process and self.ch.process.poll() is None:
                try:
                    rss = psutil.Process(self.ch.process.pid).memory_info().rss
                    self.peak_rss["clickhouse"] = max(self.peak_rss["clickhouse"], rss)
                except psutil.Error:
                    pass
            collectors = {c["symbol"]: c for c in status["children"] if c["kind"] == "collector"}
            for name in self.names:
                self._track(name, collectors.get(SYMBOLS[name]), now)

    def _track(self, name: str, c: Optional[dict], now: float) -> None:
        """Open a window when the symbol's connection epoch ends, close it when one is up."""
        link = self.links[name]
        up = bool(c and c["state"] == "running" and c["pid"] and c.get("connected"))
        epoch = (c["pid"], c.get("reconnects") or 0) if up else None
        if link.window is None:
            if epoch == link.epoch:  # still up
                link.last_up = now
                return
            link.window = Window(name, start=link.last_up - STALE, detected=now)
        if up:
            window = link.window
            window.end = now + END_SLACK
            window.restarted = link.epoch is not None and epoch[0] != link.epoch[0]
            window.last_exit = c.get("last_exit")
            self._explain(window)
            self.windows.append(window)
            link.window, link.epoch, link.last_up = None, epoch, now

    def _explain(self, window: Window) -> None:
        """Name the planned faults behind a window; pull its start back to the first of them."""
        if window.causes:  # startup
            return
        for e in self.events:
            if e.kind not in CONNECTION_FAULTS:
                continue
            if not CONNECTION_FAULTS[e.kind] and e.target != window.symbol:
                continue
            # the process a planned fault signalled, by pid: also when it came after the
            # window opened (a collector killed while it was reconnecting)
            victim = e.note.startswith("pid ") and (window.last_exit or "").startswith(
                e.note.split(",")[0] + " ")
            if victim or e.wall - 2.0 <= window.detected and window.start <= e.wall \
                    + e.duration + 2.0 + (HEARTBEAT_TIMEOUT if e.kind == "stop_collector" else 0.0):
                window.causes.append(e.kind)
                window.start = min(window.start, e.wall - 0.5)
        if not window.causes:
            what = (f"{window.symbol}: collector restarted by the daemon ({window.last_exit})"
                    if window.restarted else f"{window.symbol}: reconnected")
            say(f"unplanned: {what} at {time.strftime('%H:%M:%S', time.localtime(window.start))}")
            if window.restarted and "exit code 0" not in (window.last_exit or ""):
                self.report.crashes.append(what)
            else:
                self.report.unplanned.append(what)

    # --- recording -------------------------------------------------------------------------

    def note(self, fault: Fault, note: str = "") -> None:
        with self.lock:
            self.events.append(Event(time.time(), fault.kind, fault.target, fault.duration, note))
        say(f"{fault}{': ' + note if note else ''}")

    def streaming(self, symbol: str) -> bool:
        """The simulator has a live connection subscribed to symbol (so a send_* for it goes
        to its own collector, not to another symbol's connection)."""
        name = next(n for n, s in SYMBOLS.items() if s == symbol)
        with self.lock:
            link = self.links[name]
            if link.window is not None or link.epoch is None:
                return False
        return any(c.open and not c.closed.is_set() and c.subscribed_to(symbol)
                   for c in self.sim._open_connections())

    def inject(self, fault: Fault, what: str, send: Callable[[str], object]) -> bool:
        """A simulator-side send for fault.target, in a thread of its own: a send to a
        SIGSTOPped collector blocks until it runs again."""
        symbol = SYMBOLS[fault.target]
        if not self.streaming(symbol):
            return False
        wall = time.time()

        def run():
            if send(symbol) and what:
                with self.lock:
                    self.injections.append((wall, fault.target, what))
        thread = threading.Thread(target=run, name=f"inject-{fault.kind}", daemon=True)
        thread.start()
        self.injectors.append(thread)
        return True

    def signal_pid(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        if signum == signal.SIGSTOP:
            self.stopped_pids.add(pid)
        elif signum == signal.SIGCONT:
            self.stopped_pids.discard(pid)

    # --- running the schedule --------------------------------------------------------------

    def run_schedule(self, schedule: List[Fault], span: float) -> None:
        """Inject each fault at its time; a fault returns its undo, run `duration` later.
        Returns when every fault is undone and `span` seconds have passed."""
        t0 = time.monotonic()
        queue = [(f.at, n, f, FAULTS[f.kind]) for n, f in enumerate(schedule)]
        heapq.heapify(queue)
        counter = len(queue)
        while queue:
            at, _n, fault, action = heapq.heappop(queue)
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            try:
                undo = action(self, fault)
            except Exception as e:  # a fault that could not be injected is reported, not fatal
                undo = None
                self.report.faults_skipped.append(f"{fault} ({type(e).__name__}: {e})")
                say(f"{fault}: skipped: {type(e).__name__}: {e}")
            if undo is not None:  # `duration` counts from when the fault is in force
                counter += 1
                heapq.heappush(queue, (time.monotonic() - t0 + fault.duration, counter,
                                       Fault(at, "undo " + fault.kind, fault.target),
                                       lambda soak, _f, undo=undo: undo()))
        time.sleep(max(0.0, t0 + span - time.monotonic()))
        for thread in self.injectors:
            thread.join(30)

    # --- the end ---------------------------------------------------------------------------

    def restore(self) -> None:
        """Undo anything still in force (the schedule undoes everything; this is the net)."""
        for pid in list(self.stopped_pids):
            self.signal_pid(pid, signal.SIGCONT)
        if self.filler:
            free_disk(self)
        if self.tmpfs is None and not os.path.isdir(self.export_dir):
            free_disk(self)
        if self.ch is not None and (self.ch.process is None or self.ch.process.poll() is not None):
            self.ch.start()
        if self.removed:
            self.write_config()
            self.daemon.signal(signal.SIGHUP)
            self.removed = None

    def drained(self) -> bool:
        status = self.status()
        if status is None:
            return False
        collectors = [c for c in status["children"] if c["kind"] == "collector"]
        return len(collectors) == len(self.names) and all(
            c["state"] == "running" and c.get("buffered_rows") == 0 and c.get("spooled_rows") == 0
            and not c.get("held") for c in collectors)

    def export_once(self) -> None:
        for attempt in range(1, 6):
            result = subprocess.run([MEXC, "export", "--once", "--config", self.config_path],
                                    capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "PYTHONPATH": ROOT})
            self.report.export_once_exit = result.returncode
            self.report.export_once_attempts = attempt
            say(f"mexc export --once: exit {result.returncode}: "
                f"{(result.stderr.strip().splitlines() or [''])[-1][:200]}")
            if result.returncode == 0:
                return
            time.sleep(3)

    def stored_total(self) -> int:
        total = 0
        for name in sorted(os.listdir(self.export_dir)):
            if FILE_RE.match(name):
                try:
                    total += pq.read_metadata(os.path.join(self.export_dir, name)).num_rows
                except Exception:
                    pass
        store = Store(self.ch_section())
        try:
            for n in self.names:
                for table in (f"{n}_current", f"{n}_previous", f"{n}_fresh"):
                    if store.exists(table):
                        total += store.count(table)
        finally:
            store.close()
        return total

    def settle(self, timeout: float = 60.0) -> None:
        """Until the stored row count stops changing."""
        deadline, previous = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                total = self.stored_total()
            except Exception:
                total = None
            if total is not None and total == previous:
                return
            previous = total
            time.sleep(2.0)

    def check_health(self) -> None:
        r = self.report
        first = self.status()
        time.sleep(5.0)
        second = self.status()
        if first is None or second is None:
            r.health_notes.append("status does not answer")
            return
        before = {c["name"]: (c["pid"], c["restarts"]) for c in first["children"]}
        for c in second["children"]:
            if c["state"] != "running":
                r.health_notes.append(f"{c['name']} {c['state']} ({c['last_exit']})")
            elif c["kind"] == "collector" and not c.get("connected"):
                r.health_notes.append(f"{c['name']} not connected")
            elif before.get(c["name"]) != (c["pid"], c["restarts"]):
                r.health_notes.append(f"{c['name']} restarted during the final 5 s (flapping)")
        names = {c["name"] for c in second["children"]}
        expected = {f"collector-{n}" for n in self.names} | {"exporter"}
        expected |= {f"tor-{n}" for n in self.names} if self.args.tor else set()
        expected |= {"clickhouse"} if self.args.managed else set()
        for missing in sorted(expected - names):
            r.health_notes.append(f"{missing} missing")
        if not second["supervisor"]["clickhouse"]["reachable"]:
            r.health_notes.append("clickhouse not reachable")
        r.healthy = not r.health_notes

    def current_counts(self) -> Dict[str, int]:
        store = Store(self.ch_section())
        try:
            return {n: store.count(f"{n}_current") for n in self.names}
        except Exception:
            return {}
        finally:
            store.close()

    def verify(self) -> None:
        """`mexc verify`, right after fresh frames reached every {name}_current.  Two of its
        failures can be passing states here and are tried again: "no data in the last 5
        minutes" (it reads current, which the rotations every few seconds keep emptying) and,
        with Tor, exits not yet read or not yet separated after the last restarts."""
        transient = ("no data in the last", "IP Separation Failure")
        for attempt in range(1, 6):
            for name in self.names:
                self.sim.send_frames(SYMBOLS[name], 20)
            wait_for(lambda: (lambda c: c and all(c.values()))(self.current_counts()), 60,
                     "fresh rows in every current table")
            result = subprocess.run([MEXC, "verify", "--config", self.config_path],
                                    capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "PYTHONPATH": ROOT})
            self.report.verify_exit, self.report.verify_attempts = result.returncode, attempt
            self.report.verify_output = result.stdout + result.stderr
            say(f"mexc verify: exit {result.returncode}")
            problems = [line for line in result.stdout.splitlines() if line.startswith("❌")
                        and "some checks failed" not in line]
            if result.returncode == 0 or not all(any(t in p for t in transient)
                                                 for p in problems):
                return
            time.sleep(3.0)

    def stop_daemon(self) -> None:
        started = time.monotonic()
        self.daemon.signal(signal.SIGTERM)
        try:
            self.report.stop_exit = self.daemon.popen.wait(30)
            self.report.stop_seconds = time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.report.stop_exit = None
            self.daemon.kill()

    def read_logs(self) -> None:
        text = ""
        for proc in self.daemons:
            with open(proc.log_path, errors="replace") as f:
                text += f.read()
        self.report.rotations = len(re.findall(r"exporter rotated ", text))
        self.report.flapping_lines = text.count("(flapping:")
        self.report.tracebacks = text.count("Traceback")

    def finish(self) -> None:
        """Everything back, data stopped and drained, exported, counted, checked, stopped."""
        r = self.report
        self.restore()
        wait_for(self.all_connected, 120, "every collector connected again")
        time.sleep(2.0)
        self.sim.stop_data()
        say("data stopped; draining")
        wait_for(self.drained, 180, "collectors drained (nothing buffered, spooled or held)", 1.0)
        self.export_once()
        self.verify()
        wait_for(self.drained, 60, "the last frames stored", 1.0)
        self.settle()
        with self.lock:
            for name, link in self.links.items():
                if link.window is not None:  # never connected again
                    link.window.end = time.time()
                    self.windows.append(link.window)
                    r.health_notes.append(f"collector-{name} never reconnected")
                    link.window = None
        self.check_health()
        if self.network is not None:
            try:
                self.network.assert_loopback_only(extra_pids=[
                    p for p in self.tor_pids if psutil.pid_exists(p)])
                r.loopback_only = True
            except Exception as e:
                r.loopback_only = False
                say(f"loopback check: {e}")
        # Stopped before counting: its exporter would rotate (every few seconds of event time)
        # while the files and then the tables are read, moving rows from one to the other.
        self.sampler_stop.set()
        self.stop_daemon()
        if self.args.managed:  # its ClickHouse went with it: start one on the same data
            self.ch = ManagedClickHouse(os.path.join(self.state_dir, "clickhouse"),
                                        port=self.ch_port).start()
        account(self)
        self.read_logs()
        per_child = collections.Counter()
        for (_sup, name), restarts in self.restarts.items():
            per_child[name] += restarts
        r.restarts = dict(per_child)
        r.peak_rss_mb = {k: v / 2**20 for k, v in self.peak_rss.items() if v}
        for e in self.events:
            r.faults[e.kind] = r.faults.get(e.kind, 0) + 1

    def cleanup(self) -> None:
        self.sampler_stop.set()
        for pid in list(self.stopped_pids):
            self.signal_pid(pid, signal.SIGCONT)
        for proc in self.daemons:
            if proc.popen.poll() is None:
                proc.signal(signal.SIGTERM)
                try:
                    proc.popen.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
        for pid, created in self.child_pids.items():  # only children we saw, by pid and age
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            except psutil.Error:
                pass
        if self.sim is not None:
            self.sim.stop()
        if self.ch is not None:
            self.ch.stop()
        if self.network is not None:
            try:
                self.network.stop()
            except Exception as e:
                say(f"tor network: {e}")
        keep = self.args.keep or not self.report.passed or self.report.long_windows
        if self.tmpfs:
            if keep and os.path.isdir(self.export_dir):  # the tmpfs goes: keep its files
                shutil.copytree(self.export_dir, os.path.join(self.dir, "export-kept"))
            subprocess.run(["umount", "-l", self.tmpfs], capture_output=True)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            say(f"work dir kept: {self.dir} (daemon logs daemon-*.log, ClickHouse data "
                f"clickhouse/, files export-kept/ or exportfs/export/)")

    def run(self) -> Report:
        started = time.monotonic()
        self.start()
        schedule = build_schedule(self.args.seed, self.args.minutes, self.names, self.args.tor)
        say(f"{len(schedule)} faults over {self.args.minutes:g} min: "
            + ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(
                f.kind for f in schedule).items())))
        self.run_schedule(schedule, self.args.minutes * 60.0)
        say("fault phase over")
        self.finish()
        self.report.runtime_s = time.monotonic() - started
        self.report.judge()
        return self.report


# --- the faults: each takes (soak, fault) and may return its undo ---------------------------------

def _signal_child(soak: Soak, fault: Fault, name: str, signum: int):
    child = soak.child(name)
    if child is None:
        raise SoakError(f"{name} is not running")
    soak.note(fault, f"pid {child['pid']}")
    soak.signal_pid(child["pid"], signum)
    if signum == signal.SIGSTOP:
        return lambda: soak.signal_pid(child["pid"], signal.SIGCONT)
    return None


def kill_collector(soak, fault):
    return _signal_child(soak, fault, f"collector-{fault.target}", signal.SIGKILL)


def stop_collector(soak, fault):
    return _signal_child(soak, fault, f"collector-{fault.target}", signal.SIGSTOP)


def kill_exporter(soak, fault):
    return _signal_child(soak, fault, "exporter", signal.SIGKILL)


def stop_exporter(soak, fault):
    return _signal_child(soak, fault, "exporter", signal.SIGSTOP)


def kill_tor(soak, fault):
    return _signal_child(soak, fault, f"tor-{fault.target}", signal.SIGKILL)


def stop_tor(soak, fault):
    return _signal_child(soak, fault, f"tor-{fault.target}", signal.SIGSTOP)


def clickhouse_outage(soak, fault):
    if soak.args.managed:  # the daemon's own server crashes; its supervisor restarts it
        return _signal_child(soak, fault, "clickhouse", signal.SIGKILL)
    soak.note(fault, "stopping our clickhouse")
    soak.ch.stop()

    def back():
        soak.ch.start()
        say("clickhouse started again")
    return back


def fill_disk(soak, fault):
    if soak.tmpfs:
        soak.filler = os.path.join(soak.tmpfs, "filler")
        with open(soak.filler, "wb") as f:
            block = b"\0" * (1 << 20)
            try:
                while True:
                    f.write(block)
                    f.flush()
            except OSError:
                pass
        soak.note(fault, f"{os.path.getsize(soak.filler) >> 20} MiB filler, tmpfs full")
    else:
        os.rename(soak.export_dir, soak.export_dir + ".away")
        with open(soak.export_dir, "w") as f:
            f.write("a file where the export directory should be\n")
        soak.note(fault, "export.dir replaced by a file")
    # The exporter may be waiting out a retry (a minute, whatever the clock speed): ask for a
    # cycle now, so the full disk is met at once.
    try:
        sockets.request(soak.runtime_dir, "export", timeout=3.0)
    except Exception as e:
        say(f"export request: {type(e).__name__}: {e}")
    return lambda: free_disk(soak)


def free_disk(soak) -> None:
    if soak.filler:
        os.unlink(soak.filler)
        soak.filler = None
    elif not os.path.isdir(soak.export_dir):
        os.unlink(soak.export_dir)
        os.rename(soak.export_dir + ".away", soak.export_dir)
    say("export disk usable again")


def reload(soak, fault):
    """SIGHUP without fault.target (maybe after an invalid file first), later with it again."""
    if soak.rng.random() < 0.3:
        soak.write_config(invalid=True)
        soak.daemon.signal(signal.SIGHUP)
        time.sleep(1.0)
    soak.removed = fault.target
    soak.write_config([n for n in soak.names if n != fault.target])
    soak.note(fault, f"SIGHUP without {SYMBOLS[fault.target]}")
    soak.daemon.signal(signal.SIGHUP)

    def add_back():
        soak.write_config()
        soak.daemon.signal(signal.SIGHUP)
        soak.removed = None
        say(f"SIGHUP with {SYMBOLS[fault.target]} again")
    return add_back


def kill_supervisor(soak, fault):
    """SIGKILL `mexc run` and start it again at once, as systemd would: the new run must wait
    for the old children (they die with it, storing or spooling their rows) by itself."""
    soak.note(fault, f"pid {soak.daemon.pid}")
    soak.daemon.signal(signal.SIGKILL)
    soak.daemon.popen.wait(10)
    for _attempt in range(5):
        proc = soak.start_daemon()
        try:
            wait_for(lambda: proc.popen.poll() is not None or soak.status(timeout=1.0), 60,
                     "the new mexc run to answer status", 0.2)
        except SoakError as e:
            say(str(e))
        if proc.popen.poll() is None:
            return None
        soak.report.supervisor_restart_refusals += 1
        say(f"mexc run exited {proc.popen.returncode}: {proc.log().strip()[-300:]}")
        time.sleep(1.0)
    raise SoakError("mexc run would not start again")


def disconnect(soak, fault):
    soak.note(fault)
    soak.sim.force_disconnect()


def stall(soak, fault):
    soak.note(fault)
    soak.sim.stall(fault.duration)


def burst(soak, fault):
    frames = int(BURST_FACTOR * soak.args.rate * 3)
    if soak.inject(fault, "", lambda symbol: soak.sim.send_frames(symbol, frames)):
        soak.note(fault, f"{frames} frames at once")
    else:
        soak.report.faults_skipped.append(f"{fault} (not connected)")


def junk(soak, fault):
    sim = soak.sim
    kinds = {
        "junk": lambda s: sim.send_junk(s),
        "unknown_channel": lambda s: sim.send_unknown_channel(s),
        "wrong_types": lambda s: sim.send_wrong_types(s),
        "bad_binary": lambda s: sim.send_bad_binary(s),
        "gzip_deal": lambda s: sim.send_gzip_deal(s),
    }
    what = soak.rng.choice(sorted(kinds))
    dead_letter = what != "gzip_deal"  # a gzip deal is ordinary data
    if soak.inject(fault, what if dead_letter else "", kinds[what]):
        soak.note(fault, what)
    else:
        soak.report.faults_skipped.append(f"{fault} (not connected)")


def huge(soak, fault):
    nbytes = soak.rng.randint(2, 6) << 20
    if soak.inject(fault, "huge", lambda s: soak.sim.send_huge(s, nbytes)):
        soak.note(fault, f"{nbytes >> 20} MiB frame")
    else:
        soak.report.faults_skipped.append(f"{fault} (not connected)")


FAULTS = {
    "kill_collector": kill_collector, "stop_collector": stop_collector,
    "kill_exporter": kill_exporter, "stop_exporter": stop_exporter,
    "kill_tor": kill_tor, "stop_tor": stop_tor,
    "clickhouse_outage": clickhouse_outage, "disk_full": fill_disk, "reload": reload,
    "kill_supervisor": kill_supervisor, "disconnect": disconnect, "stall": stall,
    "burst": burst, "junk": junk, "huge": huge,
}


# --- counting ------------------------------------------------------------------------------------

class Stored:
    """One symbol's stored rows: data rows by ts (count, content hash), dead letters by text."""

    def __init__(self):
        self.count = collections.Counter()  # ts -> times stored
        self.content: Dict[int, int] = {}  # ts -> hash((mt, m)) of the first copy
        self.dead = collections.Counter()  # m -> times stored

    def add(self, ts: int, mt: str, m: str) -> None:
        if mt == "dl":
            self.dead[m] += 1
            return
        self.count[ts] += 1
        self.content.setdefault(ts, hash((mt, m)))


def read_files(soak: Soak, stored: Dict[str, Stored]) -> None:
    """Every Parquet file: readable, mt never null, every ts inside the file's hour."""
    r = soak.report
    for filename in sorted(os.listdir(soak.export_dir)):
        match = FILE_RE.match(filename)
        if match is None:
            if filename.endswith(".tmp"):
                r.temp_files_left += 1
                r.temp_file_names.append(filename)
            continue
        name, day, hour = match.groups()
        hour_ms = calendar.timegm(time.strptime(day + hour, "%Y%m%d%H")) * 1000
        try:
            table = pq.read_table(os.path.join(soak.export_dir, filename),
                                  columns=["ts", "mt", "m"])
            if table.column("mt").null_count:
                raise ValueError(f"{table.column('mt').null_count} null mt")
            ts = table.column("ts").cast(pa.int64()).to_pylist()
            mts, ms = table.column("mt").to_pylist(), table.column("m").to_pylist()
        except Exception as e:
            r.bad_files.append(f"{filename}: {type(e).__name__}: {str(e)[:120]}")
            continue
        outside = sum(1 for t in ts if not hour_ms <= t < hour_ms + HOUR_MS)
        if outside:
            r.bad_files.append(f"{filename}: {outside} rows outside its hour")
        if name not in stored:
            r.bad_files.append(f"{filename}: unknown symbol")
            continue
        r.files += 1
        r.file_rows += len(ts)
        add = stored[name].add
        for t, mt, m in zip(ts, mts, ms):
            add(t, mt, m)


def read_tables(soak: Soak, stored: Dict[str, Stored]) -> None:
    store = Store(soak.ch_section(), timeout=60.0)
    try:
        for name in soak.names:
            for table in (f"{name}_current", f"{name}_previous", f"{name}_fresh"):
                if not store.exists(table):
                    continue
                add, n = stored[name].add, 0
                for ts, mt, m, _rts in store.rows(table):
                    add(ts, mt, m)
                    n += 1
                if table.endswith("_fresh"):
                    soak.report.fresh_rows += n
    finally:
        store.close()


def event_ms(soak: Soak, wall_s: float) -> int:
    return int(soak.anchor + (wall_s * 1000 - soak.anchor) * soak.speed)


def merged_windows(soak: Soak, name: str) -> List[Tuple[int, int, List[Window]]]:
    """The symbol's outage windows in event ms, with slack, overlapping ones merged:
    (start, end, the windows merged)."""
    windows = sorted((w for w in soak.windows if w.symbol == name), key=lambda w: w.start)
    merged: List[list] = []
    for w in windows:
        a, b = event_ms(soak, w.start - EVENT_SLACK), event_ms(soak, w.end + EVENT_SLACK)
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
            merged[-1][2].append(w)
        else:
            merged.append([a, b, [w]])
    return [(a, b, ws) for a, b, ws in merged]


def gap_seconds(ts: List[int], indices: List[int], speed: float) -> float:
    """Wall seconds spanned by lost rows: per run of consecutive lost rows (send order), from
    its first row's time to its last's, summed."""
    total, run_start = 0.0, 0
    for j in range(1, len(indices) + 1):
        if j == len(indices) or indices[j] != indices[j - 1] + 1:
            run = ts[run_start:j]
            total += (max(run) - min(run)) / speed / 1000
            run_start = j
    return total


def describe_outage(windows: List[Window], lost: int, gap: float, extension_s: float) -> str:
    start, end = windows[0].start, max(w.end for w in windows)
    causes = sorted({c for w in windows for c in w.causes}) or ["unplanned"]
    return (f"{time.strftime('%H:%M:%S', time.localtime(start))} for {end - start:.1f}s "
            f"({', '.join(causes)}): {lost:,} rows lost, {gap:.1f} gap seconds"
            + (f", reaching {extension_s:.1f}s before the window" if extension_s else ""))


def account_symbol(soak: Soak, name: str, stored: Stored) -> SymbolReport:
    report = SymbolReport(name)
    rows = [row for row in soak.sim.expected_rows(SYMBOLS[name]) if row[0] is not None]
    spans = merged_windows(soak, name)
    starts = [a for a, _b, _ws in spans]

    def window_of(ts: int) -> Optional[int]:
        i = bisect.bisect_right(starts, ts) - 1
        return i if i >= 0 and ts <= spans[i][1] else None

    report.sent = len(rows)
    report.windows = sum(1 for w in soak.windows if w.symbol == name)
    windows = [w for w in soak.windows if w.symbol == name]
    report.window_seconds = sum(w.end - w.start for w in windows)
    report.long_windows = sum(1 for w in windows if w.end - w.start > LONG_WINDOW)
    if windows:
        w = max(windows, key=lambda w: w.end - w.start)
        report.longest_window = (f"{w.end - w.start:.1f}s from "
                                 f"{time.strftime('%H:%M:%S', time.localtime(w.start))} "
                                 f"({', '.join(w.causes) or 'unplanned'})")
    sent_content = {}
    missing = []
    for ts, mt, m in rows:
        sent_content[ts] = hash((mt, m))
        missing.append(stored.count[ts] == 0)
    for ts, times in stored.count.items():
        report.stored += 1
        report.duplicates += times - 1
        expected = sent_content.get(ts)
        if expected is None:
            if window_of(ts) is None:
                report.unrecorded_outside += 1
            else:
                report.unrecorded_in_windows += 1
        elif expected != stored.content[ts]:
            report.corrupt += 1
    # lost rows: in a window, or in the contiguous run of lost rows just before one
    explained = [False] * len(rows)
    lost_by_window = collections.defaultdict(list)  # window index -> its lost rows' indices
    extension = collections.defaultdict(float)  # window index -> s its run reached back
    first_index = {}  # window index -> first send index inside it
    for i, (ts, _mt, _m) in enumerate(rows):
        w = window_of(ts)
        if w is None:
            continue
        first_index.setdefault(w, i)
        if missing[i]:
            explained[i] = True
            lost_by_window[w].append(i)
    for w, i in first_index.items():
        k = i - 1
        while k >= 0 and missing[k] and not explained[k]:
            explained[k] = True
            lost_by_window[w].append(k)
            extension[w] = max(extension[w], (spans[w][0] - rows[k][0]) / soak.speed / 1000)
            k -= 1
    for w, lost in sorted(lost_by_window.items()):
        gap = gap_seconds([rows[i][0] for i in sorted(lost)], sorted(lost), soak.speed)
        report.lost_in_windows += len(lost)
        report.gap_seconds += gap
        report.max_extension_s = max(report.max_extension_s, extension[w])
        report.outages.append(describe_outage(spans[w][2], len(lost), gap, extension[w]))
    outside = [i for i in range(len(rows)) if missing[i] and not explained[i]]
    report.lost_outside = len(outside)
    run_start = 0  # describe the first runs of consecutive rows lost outside windows
    for j in range(1, len(outside) + 1):
        if j < len(outside) and outside[j] == outside[j - 1] + 1:
            continue
        if len(report.examples) < 5:
            first, last = outside[run_start], outside[j - 1]
            wall = (soak.anchor + (rows[first][0] - soak.anchor) / soak.speed) / 1000
            report.examples.append(
                f"{last - first + 1:,} rows from #{first} of {len(rows):,} (ts={rows[first][0]}, "
                f"sent about {time.strftime('%H:%M:%S', time.localtime(wall))}"
                f".{int(wall * 1000) % 1000:03d})")
        run_start = j
    report.dead_letters_injected = sum(1 for _w, n, _k in soak.injections if n == name)
    report.dead_letters_stored = sum(stored.dead.values())
    return report


def account_dead_letters(soak: Soak, stored: Dict[str, Stored]) -> None:
    """Dead letters have no event time: compare the multisets of texts over all symbols."""
    r = soak.report
    expected = collections.Counter(m for ts, mt, m in soak.sim.expected_rows() if mt == "dl")
    got = collections.Counter()
    for s in stored.values():
        got.update(s.dead)
    binary_expected = expected.pop(None, 0)
    binary_got = sum(n for m, n in got.items() if m.startswith("binary:"))
    got = collections.Counter({m: n for m, n in got.items() if not m.startswith("binary:")})
    r.dead_letters_sent = sum(expected.values()) + binary_expected
    r.dead_letters_stored = sum(got.values()) + binary_got
    r.dead_letters_missing = (sum((expected - got).values())
                              + max(0, binary_expected - binary_got))
    r.dead_letters_extra = sum((got - expected).values()) + max(0, binary_got - binary_expected)
    windows = collections.defaultdict(list)
    for w in soak.windows:
        windows[w.symbol].append((w.start - 1.0, w.end + 1.0))
    r.dead_letters_missing_allowed = sum(
        1 for wall, name, _kind in soak.injections
        if any(a <= wall <= b for a, b in windows[name]))


def account(soak: Soak) -> None:
    say("reading every file and table back")
    stored = {name: Stored() for name in soak.names}
    read_files(soak, stored)
    read_tables(soak, stored)
    soak.report.symbols = [account_symbol(soak, name, stored[name]) for name in soak.names]
    account_dead_letters(soak, stored)
    excuse_missing_hours(soak, stored)


MISSING_HOUR = re.compile(r"^❌ ([a-z0-9_]+): hour ([a-z0-9_]+_\d{8}_\d{2}00\.parquet) missing$")


def excuse_missing_hours(soak: Soak, stored: Dict[str, Stored]) -> None:
    """`mexc verify` calls an hour missing between a symbol's first and last file.  With an event
    hour every few seconds an outage can span a whole hour; the failure is excused when every
    problem it names is such an hour, with no row of that symbol stored."""
    r = soak.report
    if not r.verify_exit:
        return
    problems = [line for line in r.verify_output.splitlines()
                if line.startswith("❌") and "some checks failed" not in line]
    excused = []
    for line in problems:
        match = MISSING_HOUR.match(line)
        if match is None or match.group(1) not in stored:
            return
        name, filename = match.groups()
        day, hour = FILE_RE.match(filename).group(2, 3)
        start = calendar.timegm(time.strptime(day + hour, "%Y%m%d%H")) * 1000
        if any(start <= ts < start + HOUR_MS for ts in stored[name].count):
            return
        excused.append(filename)
    r.verify_excused = excused


# --- command line --------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="length of the fault phase (default 3; the long run is 60)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--tor", action="store_true",
                        help="collectors through their tors on a private Tor network")
    parser.add_argument("--managed", action="store_true",
                        help="the daemon runs ClickHouse itself (clickhouse.managed = true)")
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
        data = dataclasses.asdict(report)
        data["passed"] = report.passed
        print(json.dumps(data, sort_keys=True), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

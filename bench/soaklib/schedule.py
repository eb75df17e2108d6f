"""The schedule of faults: which fault, when, on what and for how long, drawn from the seed
(see "Faults" in bench/soak.py).  The same seed and arguments always give the same list."""
from __future__ import annotations

import collections
import heapq
import random
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from .common import DEAD_AFTER, HEARTBEAT_TIMEOUT, say

KILL_SPACING = 20.0  # s between two kills/long stops of one collector
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


def light_duration(kind: str, rng: random.Random) -> float:
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
                duration = light_duration(kind, rng)
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


def run(schedule: List[Fault], span: float, inject: Callable[[Fault], Optional[Callable]],
        skipped: List[str]) -> None:
    """Inject each fault at its time; inject(fault) returns its undo (or None), run
    fault.duration after it is in force.  A fault that cannot be injected is listed in
    `skipped`, not fatal.  Returns when every fault is undone and `span` seconds have passed."""
    t0 = time.monotonic()
    queue = [(f.at, n, f, inject) for n, f in enumerate(schedule)]
    heapq.heapify(queue)
    counter = len(queue)
    while queue:
        at, _n, fault, action = heapq.heappop(queue)
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        try:
            undo = action(fault)
        except Exception as e:
            undo = None
            skipped.append(f"{fault} ({type(e).__name__}: {e})")
            say(f"{fault}: skipped: {type(e).__name__}: {e}")
        if undo is not None:  # `duration` counts from when the fault is in force
            counter += 1
            heapq.heappush(queue, (time.monotonic() - t0 + fault.duration, counter,
                                   Fault(at, "undo " + fault.kind, fault.target),
                                   lambda _f, undo=undo: undo()))
    time.sleep(max(0.0, t0 + span - time.monotonic()))

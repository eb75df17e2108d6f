"""What the soak saw happen: faults as injected, and the outage windows of each symbol's
collector connection as the status sampler found them (the accounting reads them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


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
    last_exit_code: Optional[int] = None  # 0: a restart asked for (e.g. the exit guard's)
    causes: List[str] = field(default_factory=list)


@dataclass
class Link:
    """One symbol's collector connection as the status sampler sees it."""
    epoch: Optional[Tuple[int, int]] = None  # (pid, reconnects) while connected
    last_up: float = 0.0
    window: Optional[Window] = None

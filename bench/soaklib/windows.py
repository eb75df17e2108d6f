"""What the soak saw happen: faults as injected, and the outage windows of each symbol's
collector connection as the status sampler found them (the accounting reads them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple


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


STALE = 1.5  # s a heartbeat (every 1 s) can be older than the status that shows it
END_SLACK = 0.5  # s added to the end of a window


def track(link: Link, name: str, c: Optional[dict], now: float) -> Optional[Window]:
    """One status sample of a symbol's collector (c: its entry in the status, None when it
    is not running): opens a window when the connection epoch ends, and returns the window
    when a connection is up again (closed, not yet explained)."""
    up = bool(c and c["state"] == "running" and c["pid"] and c.get("connected"))
    epoch = (c["pid"], c.get("reconnects") or 0) if up else None
    if link.window is None:
        if epoch == link.epoch:  # still up
            link.last_up = now
            return None
        link.window = Window(name, start=link.last_up - STALE, detected=now)
    if not up:
        return None
    window = link.window
    window.end = now + END_SLACK
    window.restarted = link.epoch is not None and epoch[0] != link.epoch[0]
    window.last_exit = c.get("last_exit")
    window.last_exit_code = c.get("last_exit_code")
    link.window, link.epoch, link.last_up = None, epoch, now
    return window


def name_causes(window: Window, events: Iterable[Event], spread: Dict[str, bool],
                hang_after: float) -> None:
    """The planned faults behind a window, added to its causes; its start pulled back to the
    first of them.  spread: kind -> does it take every symbol down (else only its target's);
    hang_after: how long a stopped collector runs on before it is taken for hung."""
    events = [e for e in events
              if e.kind in spread and (spread[e.kind] or e.target == window.symbol)]
    killer = _killer(window, events)
    for e in events:
        if e is killer or e.wall - 2.0 <= window.detected and window.start <= e.wall \
                + e.duration + 2.0 + (hang_after if e.kind == "stop_collector" else 0.0):
            window.causes.append(e.kind)
            window.start = min(window.start, e.wall - 0.5)


def _killer(window: Window, events: List[Event]) -> Optional[Event]:
    """The fault that signalled the process this window's restart replaced, by pid: also
    one that came after the window opened (a collector killed while it was reconnecting).
    Only a window that ended with a new process has one: last_exit names the collector's
    last exit for as long as its successor runs, and a later reconnect's window is no victim
    of that fault (its start pulled back to it stretched one window over 14 minutes of
    data).  And only the last fault aimed at that pid: it outlived the earlier ones (a
    SIGSTOP of 3 s two minutes before the one it was killed for as hung stretched a window
    over those two minutes of data: cluster soak seed 11)."""
    if not window.restarted or not window.last_exit:
        return None
    aimed = [e for e in events if e.note.startswith("pid ")
             and (window.end is None or e.wall <= window.end)
             and window.last_exit.startswith(e.note.split(",")[0] + " ")]
    return max(aimed, key=lambda e: e.wall, default=None)

"""Event time: the hour every table rotation and every Parquet file is cut at.

Times are integer milliseconds since the epoch, UTC, as the exchange sends them.
"""
import calendar
import datetime
import re
import time
from typing import Optional

HOUR_MS = 3_600_000
UNIT_MS = {"s": 1000, "m": 60_000, "h": HOUR_MS, "d": 24 * HOUR_MS}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def hour_start(ms: int) -> int:
    """The start of the UTC hour holding `ms`."""
    return ms // HOUR_MS * HOUR_MS


def iso(ms: int) -> str:
    """`2026-11-26T13:00:00Z` (whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def from_iso(text: str) -> int:
    """iso()'s text back to ms since the epoch."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) * 1000


def duration_ms(text: str) -> int:
    """`90s`, `30m`, `2h`, `1.5d` -> ms; ValueError for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (like 90s, 30m, 2h, 1.5d)")
    return int(float(match.group(1)) * UNIT_MS[match.group(2)])


def parse_time(text: str, now_ms: Optional[int] = None) -> int:
    """A moment a user typed -> ms since the epoch: `now`; a time ago, `2h` or `-2h` (s, m, h,
    d; `-1.5d`); epoch ms (digits only); or ISO-8601 (`2026-11-24`, `2026-11-24T14:00`,
    `2026-11-24T14:00:00.5+01:00`; no zone = UTC).  ValueError for anything else."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    text = text.strip()
    if text == "now":
        return now_ms
    if text.isdigit():
        return int(text)
    if _DURATION.fullmatch(text.removeprefix("-")):
        return now_ms - duration_ms(text.removeprefix("-"))
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (ISO-8601 like 2026-11-24T14:00, epoch ms, "
                         f"or a time ago like 2h, -30m, 1d)") from None
    return datetime_ms(moment)


def datetime_ms(moment: datetime.datetime) -> int:
    """ms since the epoch; a naive datetime is UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


class EventClock:
    """Event time in ms.  Runs `speed` times faster than the wall clock from `anchor_ms`, so
    tests and `mexc demo` can pass hours in seconds; speed 1 is the wall clock."""

    def __init__(self, speed: float = 1.0, anchor_ms: int = 0):
        self.speed, self.anchor_ms = speed, anchor_ms

    def now_ms(self) -> int:
        wall = time.time() * 1000
        return int(self.anchor_ms + (wall - self.anchor_ms) * self.speed)

    def wall_seconds_until(self, event_ms: int) -> float:
        return max(0.0, (event_ms - self.now_ms()) / self.speed / 1000)

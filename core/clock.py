"""Event time: the hour every table rotation and every Parquet file is cut at.

Times are integer milliseconds since the epoch, UTC, as the exchange sends them.
"""
import calendar
import time

HOUR_MS = 3_600_000


def hour_start(ms: int) -> int:
    """The start of the UTC hour holding `ms`."""
    return ms // HOUR_MS * HOUR_MS


def iso(ms: int) -> str:
    """`2026-11-26T13:00:00Z` (whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def from_iso(text: str) -> int:
    """iso()'s text back to ms since the epoch."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) * 1000


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

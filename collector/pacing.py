"""What the receive loop needs to judge a socket fairly and to dial politely on a crowded host.

Starvation: a collector on a loaded machine may not run for seconds.  Meanwhile it sends no
ping, so no pong comes back, and the socket looks silent for a time its own process caused.
The receive loop tells Starvation when it went to wait and when it woke; a wait that ended
later than asked, and work between two waits that took long, are time the loop could not
read, and the socket's silence is judged without it (Collector._silence).

DialPacer: every dial of every collector on the host (first connects, reconnects,
replacements) takes the next free slot of one clock, `supervisor.start_rate` a second, kept in
a small file under an exclusive lock.  So a storm of replacements (a loaded host, an exchange
that drops every socket at once) reaches the exchange at the configured rate, as starts do,
instead of as a burst that adds the load that feeds the storm.
"""
import collections
import fcntl
import os
import struct
import time

SLACK = 0.05  # s; lateness or work below this is the ordinary cost of a wake-up, not counted
MARKS = 64  # starvation episodes remembered (a silence is judged within seconds)
# A slot more than this far ahead was written before a reboot (time.monotonic restarts at 0):
# ignored.  300 symbols at 10 a second queue for 30 s.
MAX_LEAD = 600.0
_SLOT = struct.Struct("d")


class Starvation:
    """Seconds the receive loop was kept from running, cumulative, with when each episode
    began, so that since(t) says how much of the time after t was the loop's own doing."""

    def __init__(self):
        self.total = 0.0
        self.woke_at = None  # monotonic time the loop last came back from a wait
        self.marks = collections.deque(maxlen=MARKS)  # (episode start, total before it)

    def begin(self) -> None:
        """A new connection's loop: the time before it is no one's silence."""
        self.woke_at = None

    def before_wait(self, now: float) -> None:
        """The loop is about to wait: the work since it last woke counts if it took long
        (a dial of the replacement, a slow flush)."""
        if self.woke_at is not None:
            self._add(self.woke_at, now)

    def after_wait(self, planned_end: float, now: float) -> None:
        """Back from a wait (and what it read) that was to end at planned_end at the latest."""
        self._add(planned_end, now)
        self.woke_at = now

    def since(self, t: float) -> float:
        """Seconds of starvation in episodes that began at or after t.  One that began
        before a frame read (the loop woke late, and found the frame) is not counted for
        the silence after that frame."""
        for start, before in self.marks:
            if start >= t:
                return self.total - before
        return 0.0

    def _add(self, start: float, end: float) -> None:
        if end - start > SLACK:
            self.marks.append((start, self.total))
            self.total += end - start


class DialPacer:
    """At most `rate` dials a second across the collectors that share `path`: reserve()
    takes the next free slot (now, or 1/rate after the last one taken) and returns it; the
    caller dials then.  A pacer without a path (a collector run alone) never waits."""

    def __init__(self, path, rate: float):
        self.path, self.interval = path, 1.0 / rate

    def reserve(self, now: float = None) -> float:
        now = time.monotonic() if now is None else now
        if self.path is None:
            return now
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # no runtime_dir (a collector run alone): pacing is no reason to wait
            return now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = os.pread(fd, _SLOT.size, 0)
            last = _SLOT.unpack(data)[0] if len(data) == _SLOT.size else None
            slot = now
            if last is not None and last - now < MAX_LEAD:
                slot = max(now, last + self.interval)
            os.pwrite(fd, _SLOT.pack(slot), 0)
            return slot
        finally:
            os.close(fd)  # releases the lock

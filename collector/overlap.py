"""Make before break: while an old and a new connection to one symbol both deliver, every
event is stored once, and the old one is dropped once the new one covers every channel.

Both connections carry the same streams in the same order: the old one up to when it is
dropped, the new one from its subscription on.  An event is known by its row's
core.vocabulary.event_key.  Each connection counts the keys it brought; a row is stored when
its connection has now brought that key more often than it was stored (the stored count is
the larger of the two connections' counts), so two equal trades of one millisecond, brought
twice by each connection, are stored twice, not four times, and not once.

A channel is joined once either connection brings a row the other one brought first: from
then on the new connection alone delivers everything the old one would (it subscribed before
that row was made, and the old one has delivered everything before it).  Once every channel
the new connection has seen data on is joined, and the new one has data on every channel the
old one had, the old connection can go without a hole.

The old one may have been ahead then: the new one brings again what the old one brought
last.  So after the old one is closed (close(OLD)) the new one's rows still pass through here,
until on every channel the old one brought data on it brings one the old one did not
(finished): past that, it brings nothing the old one did.  The same holds the other way round
when the new one is lost during the handover and the old one, stalled behind it, reads on.
"""
from typing import Dict, List, Set

from core.vocabulary import event_key

OLD, NEW = 0, 1


class Overlap:
    """The rows of two connections during a handover, deduplicated."""

    def __init__(self):
        self.old_channels: Set[str] = set()  # channels that brought data on the old one
        self.brought = ({}, {})  # per connection: event key -> times brought
        self.stored: Dict[tuple, int] = {}  # event key -> times stored
        self.new_channels: Set[str] = set()  # channels that brought data on the new one
        self.joined: Set[str] = set()
        self.duplicates = 0  # rows dropped because the other connection brought them first
        self.gone = None  # OLD or NEW, once that connection is closed
        self.past: Set[str] = set()  # channels on which, one connection gone, the other
        # brought a row the gone one had not

    def admit(self, side: int, channel: str, rows: list) -> List[tuple]:
        """The rows of one data frame from connection `side` (OLD, NEW) that are to be
        stored."""
        brought, stored, keep = self.brought[side], self.stored, []
        for row in rows:
            key = event_key(row)
            n = brought.get(key, 0) + 1
            brought[key] = n
            if n > stored.get(key, 0):
                stored[key] = n
                keep.append(row)
            else:
                self.duplicates += 1
                self.joined.add(channel)
        (self.new_channels if side == NEW else self.old_channels).add(channel)
        if self.gone is not None and side != self.gone and keep:
            self.past.add(channel)
        return keep

    def close(self, side: int) -> None:
        """Connection `side` is gone; the other one's rows still pass through admit()."""
        self.gone = side

    @property
    def survivor(self) -> int:
        """The connection that stayed, once one is closed."""
        return OLD if self.gone == NEW else NEW

    def finished(self) -> bool:
        """One connection is gone and the other is past everything the gone one brought."""
        if self.gone is None:
            return False
        return (self.old_channels if self.gone == OLD else self.new_channels) <= self.past

    def covered(self) -> bool:
        """The new connection delivers everything the old one would: the old can go."""
        return bool(self.new_channels) and self.old_channels <= self.new_channels \
            and self.new_channels <= self.joined

"""The whole order book replayed from the archive's `bs` snapshots and `bu` increments
(layouts: core/channels.py BOOK_SNAPSHOT_LAYOUT, BOOK_UPDATE_LAYOUT).

The book at an instant T is the newest snapshot with ts <= T, then every increment with
ts <= T whose versions go past the snapshot's, in version order: each must begin at most one
past the version reached (an increment the snapshot already holds is skipped; a merged one
reaching across the snapshot's version sets each of its levels to their size at its end,
which is right either way).  A hole in the versions before T means the book at T is unknown
(the collector was resyncing: the ledger has a book_resync record there): BookUnknown.

`check_hour` is what `mexc verify` asks of each hour: replayed from its first snapshot, does
the book equal every later snapshot of the hour, where no hole intervenes?
"""
import bisect
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from core.channels import FIELD_SEPARATOR, LEVEL_CLOSE, LEVEL_FIELDS, LEVEL_OPEN, LEVEL_SEPARATOR

CLOCK_SLACK_MS = 60_000  # increments read from this long before a snapshot's ts (two clocks)
_BETWEEN = LEVEL_CLOSE + LEVEL_SEPARATOR + LEVEL_OPEN


class BookUnknown(Exception):
    """No book at this instant: no snapshot before it, or a hole in the versions."""


class Snapshot(NamedTuple):
    ts: int
    version: int
    bids: str  # level texts, as in m
    asks: str


class Update(NamedTuple):
    ts: int
    begin: int
    end: int
    bids: str
    asks: str


def snapshots(ts: Iterable[int], m: Iterable[str]) -> List[Snapshot]:
    """`bs` rows (ts ms, m) -> Snapshots in ts order."""
    found = []
    for t, text in zip(ts, m):
        version, bids, asks = text.split(FIELD_SEPARATOR)
        found.append(Snapshot(t, int(version), bids, asks))
    return sorted(found, key=lambda s: (s.ts, s.version))


def updates(ts: Iterable[int], m: Iterable[str]) -> List[Update]:
    """`bu` rows (ts ms, m) -> Updates in (ts, version) order."""
    found = []
    for t, text in zip(ts, m):
        begin, end, bids, asks = text.split(FIELD_SEPARATOR)
        found.append(Update(t, int(begin), int(end), bids, asks))
    return sorted(found, key=lambda u: (u.ts, u.begin))


def levels(side: str) -> List[Tuple[str, str]]:
    """`[p,s],[p,s]` -> [(p, s)] as texts."""
    if not side:
        return []
    inner = side[len(LEVEL_OPEN):-len(LEVEL_CLOSE)]
    return [tuple(pair.split(LEVEL_FIELDS, 1)) for pair in inner.split(_BETWEEN)]


class Book:
    """Both sides as {price: size} (floats: each the double nearest the exchange's text) and
    the version reached."""

    def __init__(self, snapshot: Snapshot):
        self.version = snapshot.version
        self.ts = snapshot.ts
        self.sides = ({float(p): float(s) for p, s in levels(snapshot.bids)},
                      {float(p): float(s) for p, s in levels(snapshot.asks)})

    def apply(self, update: Update) -> None:
        """BookUnknown for an update that does not follow on; skipped when already held."""
        if update.end <= self.version:
            return
        if update.begin > self.version + 1:
            raise BookUnknown(f"versions {self.version + 1}..{update.begin - 1} missing "
                              f"(a book_resync in the gap ledger)")
        for side, text in zip(self.sides, (update.bids, update.asks)):
            for price, size in levels(text):
                size = float(size)
                if size:
                    side[float(price)] = size
                else:
                    side.pop(float(price), None)
        self.version, self.ts = update.end, update.ts

    def top(self, n: Optional[int] = None) -> Tuple[list, list]:
        """(bids best first, asks best first) as [(price, size)], at most n each."""
        return (sorted(self.sides[0].items(), reverse=True)[:n],
                sorted(self.sides[1].items())[:n])

    def same_as(self, snapshot: Snapshot) -> bool:
        other = Book(snapshot)
        return self.sides == other.sides


class BookAt(NamedTuple):
    """The whole book at one instant: bids and asks best first as [(price, size)], the
    version reached and the exchange ms of the last snapshot or increment applied."""
    version: int
    ts: int
    bids: list
    asks: list


def books_at(instants: List[int], snaps: List[Snapshot], ups: List[Update]) -> List:
    """The BookAt each instant, or the BookUnknown saying why there is none; one forward
    pass over the increments from each snapshot used."""
    snap_ts = [s.ts for s in snaps]
    up_ts = [u.ts for u in ups]
    answers: Dict[int, object] = {}
    book, base, cursor = None, None, 0
    for instant in sorted(set(instants)):
        i = bisect.bisect_right(snap_ts, instant) - 1
        if i < 0:
            answers[instant] = BookUnknown("no book snapshot before this instant")
            continue
        if base != i:
            base, book = i, Book(snaps[i])
            cursor = bisect.bisect_left(up_ts, snaps[i].ts - CLOCK_SLACK_MS)
        if not isinstance(book, BookUnknown):  # unknown until the next snapshot
            try:
                while cursor < len(ups) and ups[cursor].ts <= instant:
                    book.apply(ups[cursor])
                    cursor += 1
            except BookUnknown as e:
                book = e
        answers[instant] = book if isinstance(book, BookUnknown) else \
            BookAt(book.version, book.ts, *book.top())
    return [answers[instant] for instant in instants]


class HourCheck(NamedTuple):
    snapshots: int  # snapshots in the hour
    checked: int  # later snapshots compared with the replayed book
    differ: int  # of those, not equal
    unchecked: int  # later snapshots after a hole (a resync) or not at an update's end


def check_hour(snaps: List[Snapshot], ups: List[Update]) -> HourCheck:
    """Replay from the hour's first snapshot; compare the book with each later snapshot when
    the replay reaches its version exactly, with no hole since the last re-base."""
    if not snaps:
        return HourCheck(0, 0, 0, 0)
    by_version = sorted(ups, key=lambda u: (u.begin, u.end))
    book, cursor, checked, differ, unchecked = Book(snaps[0]), 0, 0, 0, 0
    for snap in sorted(snaps[1:], key=lambda s: s.version):
        try:
            while cursor < len(by_version) and by_version[cursor].end <= snap.version:
                book.apply(by_version[cursor])
                cursor += 1
            if book.version != snap.version:
                raise BookUnknown("the replay does not stop at the snapshot's version")
            checked += 1
            differ += not book.same_as(snap)
        except BookUnknown:
            unchecked += 1
            book = Book(snap)  # re-base: a resync starts from this snapshot
            while cursor < len(by_version) and by_version[cursor].end <= snap.version:
                cursor += 1
    return HourCheck(len(snaps), checked, differ, unchecked)

"""One symbol's whole order book, as MEXC's `sub.depth` and REST depth snapshot show it: every
level, absolute sizes, a version that rises by one per change set, and every change kept (the
truth a rebuilt book is compared with).

An event of the book happens at one exchange ms and makes 1-3 change sets, versions v+1..v+k.
Unmerged subscribers (`"compress": false`) get one push.depth frame per version, all stamped
with the event's ms; merged ones get one frame with `begin`/`end` and each level's last size.
So the book at an instant T is the book after every event with ts <= T, whichever way it was
sent.  Faults for the tests: drop an event's frames, jump the version, send two events' frames
in swapped order, delay the REST snapshot (see MexcSimulator.book_fault).  Once a symbol's
whole book is open, its push.depth.full top-N snapshots are rendered from it too (market.py),
so a collector of both sees one book."""
import random
import time
from typing import List, NamedTuple, Optional, Tuple

from mexc.simulator.wire import decimal_text, style_cycle, text_frame

LEVELS = 100  # levels per side at the start; changes reach LEVELS + SPREAD_OUT ticks away
SPREAD_OUT = 20
FIRST_VERSION = 5_000_000
BOOK_FAULTS = ("drop", "jump", "reorder", "delay_snapshot")
BID, ASK = 0, 1

# push.depth data in MEXC's key orders; {0} asks, {1} bids, {2} version, {3} begin, {4} end
_UNMERGED = ('{{"asks":[{0}],"bids":[{1}],"version":{2}}}',
             '{{"bids":[{1}],"version":{2},"asks":[{0}]}}')
_MERGED = ('{{"asks":[{0}],"bids":[{1}],"end":{4},"begin":{3},"version":{2}}}',
           '{{"begin":{3},"end":{4},"version":{2},"bids":[{1}],"asks":[{0}]}}')
_PUSH = '{{"symbol":{0},"data":{1},"channel":"push.depth","ts":{2}}}'


class Change(NamedTuple):
    side: int  # BID or ASK
    units: int  # price in units of 10**-scale
    size: int  # 0 deletes the level


class BookEvent(NamedTuple):
    """Change sets made at one exchange ms: versions first..first+len(sets)-1."""
    ts: int
    first: int
    sets: Tuple[Tuple[Change, ...], ...]

    @property
    def last(self) -> int:
        return self.first + len(self.sets) - 1


class FullBook:
    """The book of one symbol.  Used under the market's lock."""

    def __init__(self, symbol: str, symbol_json: str, seed: int, mid: int, scale: int,
                 keep: bool = True):
        """keep: keep every event (the truth); a benchmark's rows need none."""
        self.symbol_json = symbol_json
        self.rng = random.Random(f"{seed}:{symbol}:book")
        self.styles = style_cycle(self.rng)
        self.mid, self.scale = mid, scale
        self.sides = ({}, {})  # units -> size, bids and asks
        for i in range(1, LEVELS + 1):
            self.sides[BID][mid - i] = self._size()
            self.sides[ASK][mid + i] = self._size()
        self.version = FIRST_VERSION
        self.initial = (dict(self.sides[BID]), dict(self.sides[ASK]), self.version)
        self.keep = keep
        self.top_version = None  # of the last push.depth.full rendered from this book
        self.events: List[BookEvent] = []  # the truth, oldest first
        self.drops = self.jump = 0  # pending faults
        self.reorder = False
        self.held: Optional[BookEvent] = None  # the event whose frames go after the next one's

    def _size(self) -> int:
        return 1 + int(self.rng.random() ** 2 * 50_000)

    # --- the market ---------------------------------------------------------------------

    def step(self, ts: int) -> BookEvent:
        """1-3 change sets at ts, applied to the book and kept."""
        rng, sets = self.rng, []
        first = self.version + 1 + self.jump
        self.jump = 0
        for _ in range(1 + int(rng.random() * 3)):
            changes = {}
            for _ in range(1 + int(rng.random() * 3)):
                side = BID if rng.random() < 0.5 else ASK
                offset = 1 + int(rng.random() * (LEVELS + SPREAD_OUT))
                units = self.mid - offset if side == BID else self.mid + offset
                levels = self.sides[side]
                size = 0 if units in levels and rng.random() < 0.25 else self._size()
                if size:
                    levels[units] = size
                else:
                    levels.pop(units, None)
                changes[(side, units)] = Change(side, units, size)
            sets.append(tuple(changes.values()))
        event = BookEvent(ts, first, tuple(sets))
        self.version = event.last
        if self.keep:
            self.events.append(event)
        return event

    def outgoing(self, event: BookEvent) -> List[BookEvent]:
        """The events whose frames go out now, after the faults asked for."""
        if self.drops:
            self.drops -= 1
            return []
        if self.reorder:
            self.reorder, self.held = False, event
            return []
        if self.held is not None:
            held, self.held = self.held, None
            return [event, held]
        return [event]

    # --- rendering ------------------------------------------------------------------------

    def _level(self, change: Change) -> Tuple[str, str]:
        """('[price,size,orders]' for the frame, '[price,size]' for the row)."""
        price = decimal_text(change.units, self.scale, next(self.styles))
        if change.size == 0:
            return f"[{price},0,0]", f"[{price},0]"
        size = decimal_text(change.size, 0, next(self.styles))
        return f"[{price},{size},{1 + change.size % 17}]", f"[{price},{size}]"

    def _frame(self, ts: int, changes, begin: int, end: int, merged: bool) -> tuple:
        levels = ([], []), ([], [])  # per side: frame texts, row texts
        for change in changes:
            frame_text, row_text = self._level(change)
            levels[change.side][0].append(frame_text)
            levels[change.side][1].append(row_text)
        (bid_frame, bid_row), (ask_frame, ask_row) = levels
        templates = _MERGED if merged else _UNMERGED
        data = templates[int(self.rng.random() * len(templates))].format(
            ",".join(ask_frame), ",".join(bid_frame), end, begin, end)
        row = (ts, "bu", f"{begin}|{end}|{','.join(bid_row)}|{','.join(ask_row)}")
        return text_frame(_PUSH.format(self.symbol_json, data, ts)), row

    def render(self, events: List[BookEvent], merged: bool) -> tuple:
        """(frame bytes, rows) of events for an unmerged or a merged subscriber."""
        frames, rows = [], []
        for event in events:
            if merged:
                net = {}
                for changes in event.sets:
                    net.update(((c.side, c.units), c) for c in changes)
                parts = [self._frame(event.ts, net.values(), event.first, event.last, True)]
            else:
                parts = [self._frame(event.ts, changes, event.first + i, event.first + i, False)
                         for i, changes in enumerate(event.sets)]
            for frame, row in parts:
                frames.append(frame)
                rows.append(row)
        return b"".join(frames), rows

    def render_top(self, ts: int, limit: int) -> tuple:
        """push.depth.full of this book's top `limit` levels now (once a symbol's whole book
        is open, its top-N snapshots come from it, so both channels show one book)."""
        self.top_version = self.version
        sides = []
        for levels, reverse in ((self.sides[BID], True), (self.sides[ASK], False)):
            units = sorted(levels, reverse=reverse)[:limit]
            sides.append([self._level(Change(0, u, levels[u])) for u in units])
        (bid_frame, bid_row), (ask_frame, ask_row) = (
            ([f for f, _ in side], [r for _, r in side]) for side in sides)
        data = (f'{{"asks":[{",".join(ask_frame)}],"bids":[{",".join(bid_frame)}],'
                f'"version":{self.version}}}')
        row = (ts, "dp", ",".join(bid_row) + "|" + ",".join(ask_row))
        return (f'{{"symbol":{self.symbol_json},"data":{data},"channel":"push.depth.full",'
                f'"ts":{ts}}}'), [row]

    def snapshot_json(self, timestamp: int, limit: Optional[int]) -> str:
        """The REST depth answer: every level (or `limit` per side), best first."""
        def side(levels, reverse):
            units = sorted(levels, reverse=reverse)[:limit]
            return ",".join(self._level(Change(0, u, levels[u]))[0] for u in units)
        return (f'{{"success":true,"code":0,"data":{{"asks":[{side(self.sides[ASK], False)}],'
                f'"bids":[{side(self.sides[BID], True)}],"version":{self.version},'
                f'"timestamp":{timestamp}}}}}')

    # --- the truth --------------------------------------------------------------------------

    def true_books(self, instants: List[int]) -> List[tuple]:
        """The book after every event with ts <= each instant (sorted or not), as
        (version, bids [(units, size)] best first, asks [(units, size)] best first)."""
        bids, asks, version = dict(self.initial[0]), dict(self.initial[1]), self.initial[2]
        books, events, i = {}, self.events, 0
        for instant in sorted(set(instants)):
            while i < len(events) and events[i].ts <= instant:
                for changes in events[i].sets:
                    for c in changes:
                        levels = bids if c.side == BID else asks
                        if c.size:
                            levels[c.units] = c.size
                        else:
                            levels.pop(c.units, None)
                version = events[i].last
                i += 1
            books[instant] = (version, sorted(bids.items(), reverse=True), sorted(asks.items()))
        return [books[instant] for instant in instants]

    def price(self, units: int) -> float:
        return units / 10 ** self.scale


def delayed(seconds: float) -> None:
    """A REST snapshot answer held back (the 'delay_snapshot' fault)."""
    if seconds > 0:
        time.sleep(seconds)

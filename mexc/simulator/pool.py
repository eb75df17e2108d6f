"""Frames in bulk: the live channel mix generated once and re-issued with fresh times and
versions (send_frames, burst), or pre-encoded and counted for benchmarks, which must not pay
for generating while timed."""
import itertools
import random
import re

from mexc.simulator.book import FullBook
from mexc.simulator.feed import Feed, Sequences
from mexc.simulator.wire import text_frame, wall_ms


def live_mix_frames(n: int, symbol: str = "BTC_USDT", seed: int = 1) -> tuple:
    """n encoded WebSocket frames of the live mix, ready for send_prepared(), and the number
    of rows they must become: for benchmarks, which must not pay for encoding while timed."""
    feed = Feed(symbol, seed, random.Random(seed), Sequences(wall_ms))
    frames, rows = [], 0
    for _ in range(n):
        text, frame_rows = feed.frame(feed.random_channel())
        frames.append(text_frame(text))
        rows += len(frame_rows)
    return b"".join(frames), rows


def live_mix_rows(n: int, symbol: str = "BTC_USDT", seed: int = 1):
    """Yields n (mt, m) rows of the live mix, one per frame (a deal frame's first trade): ~70%
    deals 'd', 25% depth 'dp' (20+20 levels), 5% ticker 't' (CHANNEL_WEIGHTS), the texts a
    collector stores; for benchmarks that fill tables without sending frames."""
    feed = Feed(symbol, seed, random.Random(seed), Sequences(wall_ms))
    for _ in range(n):
        _text, rows = feed.frame(feed.random_channel())
        _ts, mt, m = rows[0]
        yield mt, m


def book_update_rows(n: int, symbol: str = "BTC_USDT", seed: int = 1):
    """Yields n (mt, m) rows of a whole book's unmerged increments ('bu', one per version),
    the texts a collector stores; for benchmarks that fill tables without sending frames."""
    feed = Feed(symbol, seed, random.Random(seed), Sequences(wall_ms))
    book = FullBook(symbol, feed.symbol_json, seed, feed.price, feed.scale, keep=False)
    made = 0
    while made < n:
        _frames, rows = book.render([book.step(0)], merged=False)
        for _ts, mt, m in rows[:n - made]:
            yield mt, m
        made += len(rows)


# Stand-ins for times and versions while a pooled frame is generated. Real numbers in frames
# never have 16 digits, so every 16-digit number in the text is one of these (plus a delta).
_TS_MARKER = 2 * 10**15
_VERSION_MARKER = 9 * 10**15
_MARKER_NUMBER = re.compile(r"\b(\d{16})\b")


class _MarkerSequences:
    def timestamps(self, symbol: str, n: int = 1) -> int:
        return _TS_MARKER

    def version(self, symbol: str, gap: int) -> int:
        return _VERSION_MARKER


class _PooledFrame:
    """A generated frame as a %-template whose slots are times (marker delta) or the version."""

    def __init__(self, text: str, rows: list):
        parts = _MARKER_NUMBER.split(text)
        self.template = "%d".join(part.replace("%", "%%") for part in parts[0::2])
        self.deltas = tuple(None if int(n) >= _VERSION_MARKER else int(n) - _TS_MARKER
                            for n in parts[1::2])
        self.has_version = None in self.deltas
        # a deal row's m holds the trade id, a time marker plus an offset: a slot like the text's
        self.rows = tuple((ts - _TS_MARKER, mt, *_slots(m)) for ts, mt, m in rows)


def _slots(m: str) -> tuple:
    """m -> (m, ()) when it holds no marker, else (%-template, deltas from _TS_MARKER)."""
    parts = _MARKER_NUMBER.split(m)
    if len(parts) == 1:
        return m, ()
    return ("%d".join(part.replace("%", "%%") for part in parts[0::2]),
            tuple(int(n) - _TS_MARKER for n in parts[1::2]))


class FramePool:
    """Frames of the live channel mix, generated once and then re-issued with fresh unique times
    and versions: several times cheaper than generating, for send_frames and burst."""

    SIZE = 509  # prime, so the mix does not line up with round frame counts

    def __init__(self, symbol: str, seed: int, rng: random.Random, depth_limit: int,
                 sequences: Sequences):
        feed = Feed(symbol, seed, rng, _MarkerSequences())
        self.frames = [_PooledFrame(*feed.frame(feed.random_channel(), depth_limit))
                       for _ in range(self.SIZE)]
        self.symbol = symbol
        self.sequences = sequences
        self.cycle = itertools.cycle(self.frames)

    def encode(self, n: int) -> tuple:
        """(n frames as one bytes buffer, their rows)."""
        timestamps, version, symbol = self.sequences.timestamps, self.sequences.version, self.symbol
        parts, rows = [], []
        for frame in itertools.islice(self.cycle, n):
            base = timestamps(symbol, len(frame.rows))
            number = version(symbol, 1) if frame.has_version else 0
            values = tuple(number if d is None else base + d for d in frame.deltas)
            parts.append(text_frame(frame.template % values))
            rows += [(base + d, mt, m % tuple(base + x for x in slots) if slots else m)
                     for d, mt, m, slots in frame.rows]
        return b"".join(parts), rows



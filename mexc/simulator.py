"""A MEXC futures exchange on loopback (WebSocket and REST), for the tests, benchmarks, `mexc demo`.

Hand-rolled RFC 6455 on plain sockets and threads (stdlib only), speaking the protocol described
in README "Row format" and collector/wire.py. A market per symbol trades on the simulator's
clock whether or not anyone listens, and keeps every trade (`trades()`, the truth); the REST
API lists the latest ones. Every frame whose sendall completed is turned into the rows a
correct collector must store, so tests can compare the database with `expected_rows()`.

Run standalone: python -m mexc.simulator --port 0 --rate 1000 [--tls-cert C --tls-key K]
(prints "LISTENING ws://HOST:PORT/edge REST http://HOST:PORT"; SIGTERM prints the rows sent)
"""
from __future__ import annotations

import argparse
import base64
import bisect
import collections
import decimal
import gzip
import functools
import hashlib
import heapq
import itertools
import json
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from typing import NamedTuple, Optional

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Relative frame rates of one symbol's streams, as seen live: deals most, depth.full, ticker least.
CHANNEL_WEIGHTS = {"deal": 14, "depth.full": 5, "ticker": 1}
DEPTH_LIMITS = (5, 10, 20)
DEFAULT_DEPTH_LIMIT = 20
DEFAULT_SYMBOL = re.compile(r"[A-Z0-9]+_USDT")
IDLE_MESSAGE = "more than 60 seconds no response, close the channel"
DEAD_LETTER_CHARS = 500

ACCEPT_POLL = 0.1  # s; how quickly the acceptor notices stop()
SENDER_POLL = 0.05  # s; longest a sender sleeps (idle checks, stall ends, new subscriptions)
HANDSHAKE_TIMEOUT = 5.0
BATCH_WINDOW = 0.002  # s; frames due this close together share one sendall
BATCH_BYTES = 256 * 1024
MAX_BACKLOG = 1.0  # s; a stream that fell behind (stall, overload) catches up at most this much
SEND_CHUNK = 512  # frames per sendall in send_frames
MAX_CLIENT_FRAME = 1 << 20
OUTBOX_FRAMES = 50_000  # market pushes queued for one connection at most
JOIN_TIMEOUT = 2.0

_SHORT_HEADER = struct.Struct("!BB")
_MEDIUM_HEADER = struct.Struct("!BBH")
_LONG_HEADER = struct.Struct("!BBQ")


def wall_ms() -> int:
    return int(time.time() * 1000)


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One unmasked, unfragmented server frame."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADER.pack(0x80 | opcode, n) + payload
    if n < 65536:
        return _MEDIUM_HEADER.pack(0x80 | opcode, 126, n) + payload
    return _LONG_HEADER.pack(0x80 | opcode, 127, n) + payload


def text_frame(text: str) -> bytes:
    return encode_frame(text.encode())


def unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def control_message(channel: str, data: str) -> str:
    """An ack, pong or rs.error in MEXC's envelope; data is already JSON text."""
    return f'{{"channel":"{channel}","data":{data},"ts":{wall_ms()}}}'


def rs_error(text: str) -> str:
    return control_message("rs.error", json.dumps(text))


def merges_deals(param: dict) -> bool:
    """Whether MEXC merges this sub.deal's prints: unless its param says "compress": false."""
    return param.get("compress") is not False


def dead_letter(text: str | None) -> tuple:
    # The simulator cannot know the receive time a collector stamps on a dead letter.
    return (None, "dl", None if text is None else text[:DEAD_LETTER_CHARS])


# --- exact decimal text -------------------------------------------------------------------------

PLAIN, PADDED, EXPONENT = range(3)


def decimal_text(units: int, scale: int, style: int = PLAIN) -> str:
    """JSON number text for units * 10**-scale, spelled as MEXC does: plain (ints when whole),
    padded with trailing zeros (0.080100) or in exponent form (7.548E+4)."""
    sign = "-" if units < 0 else ""
    digits = str(abs(units))
    if style == EXPONENT and units:
        mantissa = digits.rstrip("0")
        fraction = "." + mantissa[1:] if len(mantissa) > 1 else ""
        return f"{sign}{mantissa[0]}{fraction}E{len(digits) - 1 - scale:+d}"
    digits = digits.rjust(scale + 1, "0")
    whole, fraction = digits[: len(digits) - scale], digits[len(digits) - scale:]
    fraction = fraction + "00" if style == PADDED else fraction.rstrip("0")
    return f"{sign}{whole}.{fraction}" if fraction else sign + whole


def style_cycle(rng: random.Random):
    """An endless seeded mix of spellings: mostly plain, some padded, a few exponents.
    Cycling a precomputed list is far cheaper than a random draw per number."""
    return itertools.cycle([PLAIN if r < 0.85 else PADDED if r < 0.95 else EXPONENT
                            for r in (rng.random() for _ in range(1009))])


# --- per-symbol sequences shared by every connection -------------------------------------------

class _Sequences:
    """Event timestamps, unique per symbol, and depth versions, rising per symbol across
    connections and reconnects, so a collector never has reason to drop a frame as stale."""

    def __init__(self, clock):
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ts = {}
        self._version = collections.defaultdict(lambda: 1_000_000)

    def timestamps(self, symbol: str, n: int = 1) -> int:
        """First of n consecutive ms never handed out for symbol, at or after the event clock."""
        now = int(self._clock())
        with self._lock:
            first = max(now, self._last_ts.get(symbol, now - 1) + 1)
            self._last_ts[symbol] = first + n - 1
        return first

    def latest(self, symbol: str):
        """The last ms handed out for symbol (None before the first)."""
        with self._lock:
            return self._last_ts.get(symbol)

    def version(self, symbol: str, gap: int) -> int:
        with self._lock:
            self._version[symbol] += gap
            return self._version[symbol]


# --- frame generation ---------------------------------------------------------------------------

# Key orders vary between live frames; collectors must not depend on them. Positional fields:
# push {0} symbol JSON, {1} data, {2} channel, {3} ts, {4} cts;
# trade {0} p, {1} v, {2} T, {3} O, {4} M, {5} t, {6} i; depth {0} asks, {1} bids, {2} version.
_PUSH_FORMATS = (
    '{{"symbol":{0},"data":{1},"channel":"{2}","ts":{3}}}',
    '{{"channel":"{2}","data":{1},"symbol":{0},"ts":{3}}}',
    '{{"channel":"{2}","symbol":{0},"ts":{3},"data":{1}}}',
    '{{"symbol":{0},"channel":"{2}","ts":{3},"cts":{4},"data":{1}}}',
)
_TRADE_FORMATS = (
    '{{"p":{0},"v":{1},"T":{2},"O":{3},"M":{4},"t":{5},"i":{6}}}',
    '{{"t":{5},"i":{6},"p":{0},"v":{1},"T":{2},"O":{3},"M":{4}}}',
    '{{"M":{4},"O":{3},"T":{2},"i":{6},"p":{0},"t":{5},"v":{1}}}',
)
_DEPTH_FORMATS = (
    '{{"asks":[{0}],"bids":[{1}],"version":{2}}}',
    '{{"bids":[{1}],"asks":[{0}],"version":{2}}}',
    '{{"version":{2},"asks":[{0}],"bids":[{1}]}}',
)
# Ticker data fields, by position; the last one is an extra that comes and goes.
_TICKER_KEYS = ("lastPrice", "fairPrice", "indexPrice", "holdVol", "fundingRate", "symbol",
                "bid1", "ask1", "volume24", "amount24", "riseFallRate", "maxBidPrice",
                "minAskPrice", "timestamp", "riseFallValue")


def _ticker_formats(count: int = 6) -> tuple:
    """Ticker data templates in shuffled key orders (a shuffle per frame is too slow)."""
    rng = random.Random(0)
    formats = []
    for k in range(count):
        positions = list(range(len(_TICKER_KEYS) - k % 2))
        rng.shuffle(positions)
        formats.append("{{" + ",".join(f'"{_TICKER_KEYS[j]}":{{{j}}}' for j in positions) + "}}")
    return tuple(formats)


_TICKER_FORMATS = _ticker_formats()
_TRADE_ID_OFFSET = 11_300_000_000_000  # trade ids derive from the unique trade ms: unique too
MIN_PRICE_UNITS = 1000  # keeps 20 book levels below the price positive


def _instrument(symbol: str, seed: int) -> tuple:
    """A stable (price units, scale) per symbol: BTC-like 115309.8 down to 0.00012345."""
    rng = random.Random(f"{seed}:{symbol}")
    magnitude = rng.randint(-3, 5)
    scale = min(8, max(1, 5 - magnitude))
    return int(10 ** (magnitude + scale) * (1 + 9 * rng.random())), scale


class Trade(NamedTuple):
    """One trade the simulated market made, in MEXC's words: p and v are the exact number texts
    sent, T the side (1 buy, 2 sell), O the open/close effect, M the self-trade flag, t the
    trade time (ms, unique per symbol), id MEXC's "i" (unique per symbol)."""
    symbol: str
    id: int
    p: str
    v: str
    T: int
    O: int  # noqa: E741 (MEXC's name)
    M: int
    t: int

    @property
    def row(self) -> tuple:
        """The (ts, mt, m) row a collector stores for this trade."""
        return (self.t, "d", f"{self.p}|{self.v}|{self.T}")

    def rest_json(self) -> str:
        """The trade as GET /api/v1/contract/deals lists it (no id: MEXC documents none)."""
        return (f'{{"p":{self.p},"v":{self.v},"T":{self.T},"O":{self.O},"M":{self.M},'
                f'"t":{self.t}}}')


def merged_prints(trades: list) -> list:
    """MEXC's deal merging (compress on, its default since 2025-08): consecutive prints of one
    side at one price in a push go out as one print, volumes summed, with the first one's t."""
    prints = []
    for trade in trades:
        last = prints[-1] if prints else None
        if last and last.T == trade.T and decimal.Decimal(last.p) == decimal.Decimal(trade.p):
            volume = int(decimal.Decimal(last.v) + decimal.Decimal(trade.v))
            prints[-1] = last._replace(v=decimal_text(volume, 0))
        else:
            prints.append(trade)
    return prints


class _BookSide:
    """One side of a top-20 book as the texts frames and rows are made of."""

    def __init__(self, prices: list, sizes: list, feed: "_Feed"):
        self.prices, self.sizes = prices, sizes
        self.levels = [""] * len(prices)  # "[price,size,orderCount]"
        self.pairs = [""] * len(prices)  # "[price,size]", the row's form
        for i, size in enumerate(sizes):
            self.set_size(i, size, feed)

    def set_size(self, i: int, size: int, feed: "_Feed") -> None:
        price, text = self.prices[i], decimal_text(size, 0, next(feed.styles))
        self.sizes[i] = size
        self.levels[i] = f"[{price},{text},{1 + int(feed.random() * 40)}]"
        self.pairs[i] = f"[{price},{text}]"


class _Feed:
    """Market state of one symbol on one connection, turned into push frames plus the rows a
    collector must store for them. Only used under that connection's send lock.
    Frame makers return (frame text, rows), rows being (ts, mt, m) in frame order."""

    def __init__(self, symbol: str, seed: int, rng: random.Random, sequences: _Sequences):
        self.symbol = symbol
        self.symbol_json = json.dumps(symbol)
        self.random = rng.random
        self.styles = style_cycle(rng)
        self.sequences = sequences
        self.price, self.scale = _instrument(symbol, seed)
        self.book_mid = None
        self.bids = self.asks = None

    def frame(self, channel: str, depth_limit: int = DEFAULT_DEPTH_LIMIT) -> tuple:
        if channel == "deal":
            return self.deal_frame()
        if channel == "depth.full":
            return self.depth_frame(depth_limit)
        return self.ticker_frame()

    def random_channel(self) -> str:
        r = self.random() * sum(CHANNEL_WEIGHTS.values())
        for channel, weight in CHANNEL_WEIGHTS.items():
            if r < weight:
                return channel
            r -= weight
        return "ticker"

    def _push(self, channel: str, data: str, ts: int, cts: str) -> str:
        template = _PUSH_FORMATS[int(self.random() * len(_PUSH_FORMATS))]
        return template.format(self.symbol_json, data, channel, ts, cts)

    def _walk(self) -> None:
        if self.random() < 0.3:
            self.price = max(MIN_PRICE_UNITS, self.price + int(self.random() * 7) - 3)

    def _price_text(self, units: int) -> str:
        return decimal_text(units, self.scale, next(self.styles))

    def new_trades(self, n: int = 0) -> list:
        """n trades (1-3 when 0) at consecutive unique ms, the price walking between them."""
        random = self.random
        n = n or 1 + int(random() * 3)
        first_t = self.sequences.timestamps(self.symbol, n)
        trades = []
        for t in range(first_t, first_t + n):
            self._walk()
            price = self._price_text(self.price)
            volume = decimal_text(1 + int(random() ** 3 * 5000), 0, next(self.styles))
            trades.append(Trade(self.symbol, t + _TRADE_ID_OFFSET, price, volume,
                                1 + int(random() * 2), 1 + int(random() * 4),
                                1 + int(random() * 2), t))
        return trades

    def deal_frame(self, trades=None, merge: bool = False) -> tuple:
        """A push.deal of trades (new ones when None), merged as MEXC's compress does if asked."""
        random = self.random
        prints = self.new_trades() if trades is None else trades
        if merge:
            prints = merged_prints(prints)
        single = len(prints) == 1 and random() < 0.3  # the pre-2025-08 format: an object
        template = _TRADE_FORMATS[int(random() * len(_TRADE_FORMATS))]
        quote_ids = random() < 0.5  # ids are ints in the docs, strings live
        texts = [template.format(trade.p, trade.v, trade.T, trade.O, trade.M, trade.t,
                                 f'"{trade.id}"' if quote_ids else trade.id)
                 for trade in prints]
        rows = [trade.row for trade in prints]
        if random() < 0.3:  # batches are not chronological; rows follow frame order
            texts.reverse()
            rows.reverse()
        data = texts[0] if single else "[" + ",".join(texts) + "]"
        last_t = max(trade.t for trade in prints)
        return self._push("push.deal", data, last_t, f'"{last_t}"'), rows

    def ticker_frame(self) -> tuple:
        random = self.random
        ts = self.sequences.timestamps(self.symbol)
        self._walk()
        price, spread = self.price, 1 + int(random() * 3)
        fields = (
            self._price_text(price),
            self._price_text(price + int(random() * 5) - 2),
            self._price_text(price + int(random() * 9) - 4),
            decimal_text(int(random() * 200_000_000), 0, next(self.styles)),
            decimal_text(int(random() * 200) - 50, 6, PADDED if random() < 0.6 else PLAIN),
            self.symbol_json,
            self._price_text(price - spread),
            self._price_text(price + spread),
            decimal_text(int(random() * 10**9), 0),
            decimal_text(int(random() * 10**12), 4, next(self.styles)),
            decimal_text(int(random() * 2000) - 1000, 4),
            self._price_text(price * 11 // 10),
            self._price_text(price * 9 // 10),
            ts,
            decimal_text(int(random() * 999) - 500, self.scale),
        )
        template = _TICKER_FORMATS[int(random() * len(_TICKER_FORMATS))]
        row = (ts, "t", "|".join(fields[:5]))
        # The envelope ts differs from data.timestamp, which is the row's time.
        frame_ts = ts + 1 + int(random() * 5)
        return self._push("push.ticker", template.format(*fields), frame_ts, frame_ts), [row]

    def depth_frame(self, limit: int) -> tuple:
        return self.render_depth(self.next_depth(), limit)

    def next_depth(self) -> tuple:
        """The book changes; its (ts, version, cts), for render_depth at any limit."""
        if self.book_mid is None or (self.price != self.book_mid and self.random() < 0.2):
            self._rebuild_book()
        else:
            self._touch_book()
        ts = self.sequences.timestamps(self.symbol)
        version = self.sequences.version(self.symbol, 1 + int(self.random() * 3))
        return ts, version, ts - int(self.random() * 5)

    def render_depth(self, state: tuple, limit: int) -> tuple:
        """The push.depth.full of the book as it is now, stamped with next_depth's state."""
        ts, version, cts = state
        template = _DEPTH_FORMATS[int(self.random() * len(_DEPTH_FORMATS))]
        data = template.format(",".join(self.asks.levels[:limit]),
                               ",".join(self.bids.levels[:limit]), version)
        # limit <= 20, so the frame's levels are exactly the row's top 20
        row = (ts, "dp", ",".join(self.bids.pairs[:limit]) + "|"
               + ",".join(self.asks.pairs[:limit]))
        return self._push("push.depth.full", data, ts, cts), [row]

    def _random_size(self) -> int:
        return 1 + int(self.random() ** 2 * 200_000)

    def _rebuild_book(self) -> None:
        self.book_mid = self.price
        depth = range(1, DEFAULT_DEPTH_LIMIT + 1)
        sizes = [self._random_size() for _ in depth]
        self.bids = _BookSide([self._price_text(self.price - i) for i in depth], sizes, self)
        sizes = [self._random_size() for _ in depth]
        self.asks = _BookSide([self._price_text(self.price + i) for i in depth], sizes, self)

    def _touch_book(self) -> None:
        """Change 1-3 levels' sizes, so no two frames carry the same book."""
        for _ in range(1 + int(self.random() * 3)):
            side = self.bids if self.random() < 0.5 else self.asks
            i = int(self.random() * len(side.sizes))
            size, delta = side.sizes[i], 1 + int(self.random() * 1000)
            side.set_size(i, size - delta if size > delta else size + delta, self)


# --- pre-rendered frames for benchmarks -------------------------------------------------------

# Stand-ins for times and versions while a pooled frame is generated. Real numbers in frames
# never have 16 digits, so every 16-digit number in the text is one of these (plus a delta).
def live_mix_frames(n: int, symbol: str = "BTC_USDT", seed: int = 1) -> tuple:
    """n encoded WebSocket frames of the live mix, ready for send_prepared(), and the number
    of rows they must become: for benchmarks, which must not pay for encoding while timed."""
    feed = _Feed(symbol, seed, random.Random(seed), _Sequences(wall_ms))
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
    feed = _Feed(symbol, seed, random.Random(seed), _Sequences(wall_ms))
    for _ in range(n):
        _text, rows = feed.frame(feed.random_channel())
        _ts, mt, m = rows[0]
        yield mt, m


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
        self.rows = tuple((ts - _TS_MARKER, mt, m) for ts, mt, m in rows)


class _FramePool:
    """Frames of the live channel mix, generated once and then re-issued with fresh unique times
    and versions: several times cheaper than generating, for send_frames and burst."""

    SIZE = 509  # prime, so the mix does not line up with round frame counts

    def __init__(self, symbol: str, seed: int, rng: random.Random, depth_limit: int,
                 sequences: _Sequences):
        feed = _Feed(symbol, seed, rng, _MarkerSequences())
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
            rows += [(base + d, mt, m) for d, mt, m in frame.rows]
        return b"".join(parts), rows


# --- the market ---------------------------------------------------------------------------------

class _Market:
    """The exchange's side of every symbol: once a symbol's market is open (its first
    subscription, or open()), its trades, book and ticker change on the simulator's clock whether
    or not anyone is connected; subscribed connections get each change as a push. Every trade
    is kept (the truth), so tests can ask which trades happened between two times.
    One thread makes the events; everything here is guarded by `lock`."""

    def __init__(self, sim: "MexcSimulator"):
        self.sim = sim
        self.lock = threading.Lock()
        self.rng = random.Random(f"{sim.seed}:market")
        self.feeds = {}  # symbol -> _Feed
        self.truth = {}  # symbol -> [Trade], in the order made (t rising)
        self.times = {}  # symbol -> [t of each Trade in truth], for bisect
        self.schedule = []  # heap of (due, order, symbol, channel)
        self.order = itertools.count()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mexc-sim-market", daemon=True)

    def open(self, symbol: str) -> _Feed:
        """The symbol's market, trading from now on (at the simulator's rate)."""
        with self.lock:
            feed = self.feeds.get(symbol)
            if feed is None:
                feed = self.feeds[symbol] = _Feed(symbol, self.sim.seed, self.rng,
                                                  self.sim._sequences)
                self.truth[symbol], self.times[symbol] = [], []
                now = time.monotonic()
                for channel in self.sim._intervals:
                    heapq.heappush(self.schedule, (now, next(self.order), symbol, channel))
        self.wake.set()
        return feed

    def trade(self, symbol: str, count: int) -> list:
        """count trades now, in one push to the deal subscribers."""
        feed = self.open(symbol)
        with self.lock:
            return self._happen(feed, "deal", count)

    def trades(self, symbol: str, since_ms=None, until_ms=None) -> list:
        with self.lock:
            times = self.times.get(symbol, [])
            first = 0 if since_ms is None else bisect.bisect_left(times, since_ms)
            end = len(times) if until_ms is None else bisect.bisect_right(times, until_ms)
            return self.truth.get(symbol, [])[first:end]

    def _run(self) -> None:
        while not self.sim._stopping.is_set():
            self.wake.clear()
            with self.lock:
                delay = self._make_due_events()
            self.wake.wait(min(max(delay, 0.0), SENDER_POLL))

    def _make_due_events(self) -> float:
        """Make every event due within BATCH_WINDOW; seconds until the next one."""
        now = time.monotonic()
        schedule, intervals = self.schedule, self.sim._intervals
        while schedule and schedule[0][0] <= now + BATCH_WINDOW:
            if self.sim._data_stopped:
                schedule.clear()
                break
            due, order, symbol, channel = heapq.heappop(schedule)
            self._happen(self.feeds[symbol], channel)
            next_due = max(due + intervals[channel] * (0.5 + self.rng.random()), now - MAX_BACKLOG)
            heapq.heappush(schedule, (next_due, order, symbol, channel))
        return schedule[0][0] - time.monotonic() if schedule else SENDER_POLL

    def _happen(self, feed: _Feed, channel: str, count: int = 0) -> list:
        """One event of the channel; pushed to its subscribers; the trades made, if any."""
        trades = []
        if channel == "deal":
            trades = feed.new_trades(count)
            self.truth[feed.symbol] += trades
            self.times[feed.symbol] += [trade.t for trade in trades]
            render = functools.partial(feed.deal_frame, trades)  # variant: merge
        elif channel == "depth.full":
            render = functools.partial(feed.render_depth, feed.next_depth())  # variant: limit
        else:
            frame = feed.ticker_frame()
            render = lambda _variant: frame  # noqa: E731
        self._push(feed.symbol, channel, render)
        return trades

    def _push(self, symbol: str, channel: str, render) -> None:
        """To every connection subscribed, each variant rendered once.  While the simulator is
        stalled they wait in the outboxes, as data does in a frozen network path."""
        subscribers = self.sim._subscribers(symbol, channel)
        variants = collections.Counter(subscription.variant for _, subscription in subscribers)
        frames = {}
        for variant, count in variants.items():
            text, rows = render(variant)
            frames[variant] = (text_frame(text), _SharedRows(rows) if count > 1 else rows)
        for connection, subscription in subscribers:
            connection.push(symbol, channel, subscription.token, *frames[subscription.variant])


class _SharedRows(tuple):
    """The rows of one push sent to several connections: the simulator records them once."""


# --- REST: recent trades ---------------------------------------------------------------------

DEALS_PATH = re.compile(r"/api/v1/contract/deals/([^/?#]+)")
REST_LIMIT = 100  # trades per answer at most, and by default
REST_RATE = (20, 2.0)  # requests per seconds per IP, as MEXC allows
REST_FAULTS = ("error", "drop")
_HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
                 500: "Internal Server Error"}


class RestAnswer(NamedTuple):
    """A deals request the REST API answered with trades: how far back the answer reached, so a
    test can tell whether a gap was within reach of a backfill."""
    ip: str
    symbol: str
    limit: int
    count: int  # trades listed (fewer than limit: every trade the market made)
    oldest_t: Optional[int]  # None when count is 0
    newest_t: Optional[int]
    latest_ms: Optional[int]  # the symbol's latest event ms (any frame) when it was answered


def _rest_error(code: int, message: str) -> str:
    return json.dumps({"success": False, "code": code, "message": message})


class _RestApi:
    """GET /api/v1/contract/deals/{symbol}?limit=N as MEXC answers it: the latest trades, newest
    first, at most 100; 20 requests per 2 s per client IP, then code 510 (MEXC's "too frequent"),
    with HTTP 429. Served on the WebSocket's port: a GET without Upgrade is a REST request."""

    def __init__(self, sim: "MexcSimulator"):
        self.sim = sim
        self.lock = threading.Lock()
        self.served = collections.defaultdict(collections.deque)  # ip -> monotonic times
        self.requests = collections.Counter()  # ip -> requests received
        self.answers = []  # RestAnswer of every deals request answered with trades
        self.fault, self.fault_until = None, 0.0

    def fail(self, seconds: float, mode: str = "error") -> None:
        if mode not in REST_FAULTS:
            raise ValueError(f"mode must be one of {REST_FAULTS}")
        with self.lock:
            self.fault, self.fault_until = mode, time.monotonic() + seconds

    def answer(self, request_line: str, ip: str):
        """The HTTP response bytes, or None to drop the connection without one."""
        with self.lock:
            self.requests[ip] += 1
            if time.monotonic() < self.fault_until:
                if self.fault == "drop":
                    return None
                return _http(500, _rest_error(500, "Internal Server Error"))
            method, _, target = request_line.partition(" ")
            target = target.rpartition(" ")[0] or target
            match = DEALS_PATH.fullmatch(target.partition("?")[0])
            if method != "GET" or match is None:
                return _http(404, _rest_error(404, "Not Found"))
            if not self._admit(ip):
                return _http(429, _rest_error(510, "Requests are too frequent!"))
        return _http(200, self._deals(match.group(1), _query_limit(target), ip))

    def _admit(self, ip: str) -> bool:
        """Within the rate limit: counts served requests in a sliding window."""
        allowed, window = REST_RATE
        now, served = time.monotonic(), self.served[ip]
        while served and served[0] <= now - window:
            served.popleft()
        if len(served) >= allowed:
            return False
        served.append(now)
        return True

    def _deals(self, symbol: str, limit: int, ip: str) -> str:
        if not self.sim._contract_exists(symbol):
            return _rest_error(1001, "Contract does not exist!")
        stamped = self.sim._sequences.latest(symbol)  # before the trades: nothing missed
        latest = self.sim._market.trades(symbol)[-limit:]
        times = [trade.t for trade in latest] or [None]
        with self.lock:
            self.answers.append(RestAnswer(ip, symbol, limit, len(latest), times[0], times[-1],
                                           stamped))
        data = ",".join(trade.rest_json() for trade in reversed(latest))
        return f'{{"success":true,"code":0,"data":[{data}]}}'


def _query_limit(target: str) -> int:
    """limit from the query string, clamped to 1..100; 100 when absent or not a number."""
    query = urllib.parse.parse_qs(target.partition("?")[2])
    try:
        return min(REST_LIMIT, max(1, int(query["limit"][0])))
    except (KeyError, ValueError):
        return REST_LIMIT


def _http(status: int, body: str) -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 {status} {_HTTP_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


# --- one client connection ----------------------------------------------------------------------

class _ConnectionEnded(Exception):
    pass


# variant: what tells this subscriber's frames apart from another's of the same event: the
# depth limit for depth.full, whether deals are merged for deal, nothing for ticker.
_Subscription = collections.namedtuple("_Subscription", "limit token variant")


class _Connection:
    """A reader thread (handshake, client requests; or one REST request) and a sender thread
    (the market's pushes, idle timeout, replies held back by a stall). Every write goes through
    send_lock."""

    def __init__(self, sim: "MexcSimulator", sock: socket.socket, index: int, peer: tuple):
        self.sim = sim
        self.sock = sock
        self.peer = peer  # (host, port) of the client
        self.index = index
        self.rng = random.Random(f"{sim.seed}:{index}")
        self.send_lock = threading.Lock()
        self.reply_lock = threading.Lock()
        self.pending = []  # (frame bytes, records) held back while stalled
        self.wake = threading.Event()
        self.closed = threading.Event()
        self.open = False  # WebSocket handshake done
        # Where symbol-less dead letters (rs.error) are filed: a collector keeps one symbol per
        # connection, so it stores them with that symbol.
        self.first_symbol = None
        self.feeds = {}  # symbol -> _Feed
        self.pools = {}  # (symbol, depth limit) -> _FramePool
        self.active = {}  # (symbol, channel) -> _Subscription
        # Pushes from the market not sent yet: (frame, symbol, rows, (symbol, channel), token).
        # A client that reads nothing loses the oldest beyond OUTBOX_FRAMES, never recorded.
        self.outbox = collections.deque(maxlen=OUTBOX_FRAMES)
        self.last_ping = time.monotonic()
        self.buffer = bytearray()
        self.reader = threading.Thread(target=self._run, name=f"mexc-sim-read-{index}", daemon=True)
        self.sender = None
        # Symbols a newer connection has subscribed to since (under sim._lock): the client
        # that read them here has moved on (see MexcSimulator.orphaned_rows).
        self.superseded = set()

    def start(self) -> None:
        self.reader.start()

    def abort(self) -> None:
        """Drop the connection without a close frame; the reader thread cleans up."""
        self.closed.set()
        self.wake.set()
        try:  # on the raw socket: TLS state may be in use by the other thread
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    # sending

    def send(self, data: bytes, records=()) -> bool:
        with self.send_lock:
            return self._send_locked(data, records)

    def _send_locked(self, data: bytes, records) -> bool:
        """records: (symbol, rows) pairs, stored only once sendall returned, and before the lock
        is released, so anything the client reads after a later reply is already recorded."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.abort()
            return False
        self.sim._record(records, self)
        return True

    def send_generated(self, symbol: str, make) -> bool:
        """make(feed) -> (bytes, rows), this connection's own frames (not the market's), sent
        after the pushes queued before them: made under the market's lock, so depth versions
        reach the client in the order they were allocated, and sent outside it, so a client
        that reads slowly holds up only its own connection."""
        with self.send_lock:
            with self.sim._market.lock:
                parts, records = self._take_outbox(None)
                data, rows = make(self._feed(symbol))
            return self._send_locked(b"".join(parts) + data, records + [(symbol, rows)])

    def send_pooled(self, symbol: str, n: int) -> bool:
        def make(_feed):
            limit = self.depth_limit(symbol)
            pool = self.pools.get((symbol, limit))
            if pool is None:
                pool = self.pools[(symbol, limit)] = _FramePool(
                    symbol, self.sim.seed, self.rng, limit, self.sim._sequences)
            return pool.encode(n)
        return self.send_generated(symbol, make)

    def push(self, symbol: str, channel: str, token: int, frame: bytes, rows: list) -> None:
        """Queue a market push for the sender thread (the market never waits on a client)."""
        self.outbox.append((frame, symbol, rows, (symbol, channel), token))
        self.wake.set()

    def _send_outbox_locked(self, max_bytes=BATCH_BYTES) -> None:
        """Queued pushes in one sendall (up to max_bytes; None: all)."""
        parts, records = self._take_outbox(max_bytes)
        if parts:
            self._send_locked(b"".join(parts), records)

    def _take_outbox(self, max_bytes) -> tuple:
        """(frames, records) of queued pushes up to max_bytes (None: all), skipping those of a
        subscription ended since: no data after an unsub ack."""
        parts, records, size = [], [], 0
        while self.outbox and (max_bytes is None or size < max_bytes):
            frame, symbol, rows, key, token = self.outbox.popleft()
            subscription = self.active.get(key)
            if subscription is None or subscription.token != token:
                continue
            parts.append(frame)
            records.append((symbol, rows))
            size += len(frame)
        return parts, records

    def reply(self, text: str, records=(), start=None) -> None:
        self.reply_frame(text_frame(text), records, start)

    def reply_frame(self, frame: bytes, records=(), start=None) -> None:
        """Send a reply now, or hold it (in order) while the simulator is stalled.
        start: (key, _Subscription) the reply acks, started as the reply goes."""
        with self.reply_lock:
            if self.pending or self.sim._stall_remaining() > 0:
                self.pending.append((frame, records, start))
                self.wake.set()
                return
            self._send_replies([(frame, records, start)])

    def _flush_pending(self) -> None:
        with self.reply_lock:
            if self.pending:
                self._send_replies(self.pending)
                self.pending = []

    def _send_replies(self, replies: list) -> None:
        """Replies go after every push queued before them (a pong follows the trades made
        before its ping).  A subscription a reply acks starts under the same lock: it exists
        before the client can read the ack (a trade made once the client has the ack reaches
        it), and its pushes can only follow the ack."""
        with self.send_lock:
            self._send_outbox_locked(max_bytes=None)
            for _frame, _records, start in replies:
                if start is not None:
                    key, subscription = start
                    self.active[key] = subscription
            self._send_locked(b"".join(frame for frame, _, _ in replies),
                              [record for _, records, _ in replies for record in records])

    def _feed(self, symbol: str) -> _Feed:
        feed = self.feeds.get(symbol)
        if feed is None:
            feed = self.feeds[symbol] = _Feed(symbol, self.sim.seed, self.rng, self.sim._sequences)
        return feed

    def depth_limit(self, symbol: str) -> int:
        subscription = self.active.get((symbol, "depth.full"))
        return subscription.limit if subscription else DEFAULT_DEPTH_LIMIT

    def subscribed_to(self, symbol: str) -> bool:
        return any(s == symbol for s, _ in self.active.copy())

    # reader thread

    def _run(self) -> None:
        try:
            self._handshake()
            self.sender = threading.Thread(target=self._send_loop, daemon=True,
                                           name=f"mexc-sim-send-{self.index}")
            self.sender.start()
            self._read_loop()
        except (OSError, ValueError, _ConnectionEnded):
            pass
        finally:
            self.abort()
            if self.sender:
                self.sender.join()
            self.sock.close()
            self.sim._forget(self)

    def _handshake(self) -> None:
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        if self.sim.ssl_context:
            self.sock = self.sim.ssl_context.wrap_socket(self.sock, server_side=True)
            if self.closed.is_set():  # aborted while the TLS handshake ran
                raise _ConnectionEnded
        request = self._recv_until(b"\r\n\r\n")
        key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", request)
        if not key:
            self._answer_rest(request.partition(b"\r\n")[0].decode("latin-1"))
            raise _ConnectionEnded
        accept = base64.b64encode(hashlib.sha1(key.group(1) + WS_GUID).digest())
        response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.last_ping = time.monotonic()
        self.sim._count_websocket(self.peer)
        # Open before the client can see the 101, so a send_* right after connecting finds this
        # connection; the lock makes that send wait until the 101 is out.
        with self.send_lock:
            self.open = True
            self.sock.sendall(response)
            self.sock.settimeout(None)

    def _answer_rest(self, request_line: str) -> None:
        """One HTTP request that is not a WebSocket upgrade: REST, answered, then closed."""
        response = self.sim._rest.answer(request_line, self.peer[0])
        if response is not None:
            self.sock.sendall(response)

    def _recv_more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _ConnectionEnded
        self.buffer += chunk

    def _recv_until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            if len(self.buffer) > 16384:
                raise _ConnectionEnded
            self._recv_more()
        data = bytes(self.buffer[:end])
        del self.buffer[: end + len(marker)]
        return data

    def _recv_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._recv_more()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = self._recv_exact(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._recv_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._recv_exact(8))
        if length > MAX_CLIENT_FRAME:
            raise _ConnectionEnded
        mask = self._recv_exact(4) if second & 0x80 else None
        payload = self._recv_exact(length)
        return bool(first & 0x80), first & 0x0F, unmask(payload, mask) if mask else payload

    def _read_loop(self) -> None:
        message, message_opcode = b"", None
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == OP_CLOSE:
                self.send(encode_frame(payload[:2], OP_CLOSE))
                return
            if opcode == OP_PING:
                self.reply_frame(encode_frame(payload, OP_PONG))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CONTINUATION:
                message += payload
            else:
                message, message_opcode = payload, opcode
            if fin:
                if message_opcode == OP_TEXT:
                    self._on_request(message)
                message, message_opcode = b"", None

    def _on_request(self, raw: bytes) -> None:
        try:
            request = json.loads(raw)
        except ValueError:
            return
        method = request.get("method") if isinstance(request, dict) else None
        if method == "ping":
            self.last_ping = time.monotonic()
            self.sim._count_ping()
            self.reply(control_message("pong", str(wall_ms())))
        elif isinstance(method, str):
            action, _, channel = method.partition(".")
            if action in ("sub", "unsub") and channel in CHANNEL_WEIGHTS:
                param = request.get("param")
                self._on_subscription(action, channel, param if isinstance(param, dict) else {})
        # Anything else gets no reply at all, as on MEXC.

    def _on_subscription(self, action: str, channel: str, param: dict) -> None:
        symbol = param.get("symbol")
        if not isinstance(symbol, str):
            return
        limit = param.get("limit")
        if type(limit) is not int or limit not in DEPTH_LIMITS:
            limit = DEFAULT_DEPTH_LIMIT
        if action == "sub":
            self.sim._log_subscription(symbol, channel, limit, param)
        if not self.sim._contract_exists(symbol):
            error = rs_error(f"Contract [{symbol}] not exists")
            self.reply(error, [(symbol, [dead_letter(error)])])
            return
        ack = control_message(f"rs.{action}.{channel}", '"success"')
        if action == "unsub":  # no data after the unsub ack
            self.active.pop((symbol, channel), None)
            self.reply(ack)
            return
        if self.first_symbol is None:
            self.first_symbol = symbol
        if not self.subscribed_to(symbol):
            self.sim._supersede(self, symbol)
        variant = limit if channel == "depth.full" else merges_deals(param) if channel == "deal" \
            else None
        subscription = _Subscription(limit, next(self.sim._tokens), variant)
        self.reply(ack, start=((symbol, channel), subscription))
        self.sim._market.open(symbol)

    # sender thread

    def _send_loop(self) -> None:
        while not self.closed.is_set():
            self.wake.clear()
            stalled = self.sim._stall_remaining()
            if stalled > 0:
                self.closed.wait(min(stalled, SENDER_POLL))
                continue
            self._flush_pending()
            if time.monotonic() - self.last_ping > self.sim.idle_timeout:
                self._close_idle()
                return
            with self.send_lock:
                self._send_outbox_locked()
            self.wake.wait(0 if self.outbox else SENDER_POLL)

    def _close_idle(self) -> None:
        error = rs_error(IDLE_MESSAGE)
        # An empty close frame, as MEXC's 1005, then the socket goes.
        self.send(text_frame(error) + encode_frame(b"", OP_CLOSE),
                  [(self.first_symbol, [dead_letter(error)])])
        self.abort()


# --- the server ---------------------------------------------------------------------------------

class MexcSimulator:
    """A MEXC futures exchange on loopback (WebSocket and REST on one port) that records what
    it sent and every trade its market made.

    rate: events per second per (symbol, channel) stream of an open market on average, split
    as the live mix (CHANNEL_WEIGHTS), whether anyone is subscribed or not; 0 trades only when
    told (trade(); send_frames, burst, ... send per connection, outside the market).
    A symbol's market opens at its first subscription (or open_market()).
    Rows of a symbol get unique event ms; at high rates they run ahead of the event clock.
    """

    def __init__(self, host="127.0.0.1", port=0, ssl_context=None, rate=50.0,
                 event_clock=None, idle_timeout=60.0, known_symbols=None, seed=1):
        self.host = host
        self.ssl_context = ssl_context
        self.rate = rate
        self.idle_timeout = idle_timeout
        self.known_symbols = None if known_symbols is None else set(known_symbols)
        self.seed = seed
        self._port = port
        self._sequences = _Sequences(event_clock or wall_ms)
        total_weight = sum(CHANNEL_WEIGHTS.values())
        self._intervals = {} if rate <= 0 else {
            channel: total_weight / (rate * len(CHANNEL_WEIGHTS) * weight)
            for channel, weight in CHANNEL_WEIGHTS.items()}
        self._tokens = itertools.count()
        self._connection_ids = itertools.count()
        self._wrong_type_variants = itertools.count()
        self._stall_until = 0.0
        self._data_stopped = False
        self._stopping = threading.Event()
        self._listener = None
        self._acceptor = None
        self._market = _Market(self)
        self._rest = _RestApi(self)
        self._lock = threading.Lock()  # guards everything below
        self._rows = {}  # symbol (None: dead letters without one) -> rows in send order
        self._connections = set()
        self._total_connections = 0
        self._pings = 0
        self._subscriptions = []
        self._depth_limits = {}
        self._peers = []
        self._orphaned = {}  # symbol -> data rows sent on superseded connections
        self._shared_sent = set()  # rows of _SharedRows recorded already

    # lifecycle

    def start(self) -> "MexcSimulator":
        self._listener = socket.create_server((self.host, self._port), backlog=128)
        self._port = self._listener.getsockname()[1]
        self._listener.settimeout(ACCEPT_POLL)
        self._acceptor = threading.Thread(target=self._accept_loop, name="mexc-sim-accept",
                                          daemon=True)
        self._acceptor.start()
        self._market.thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._acceptor:
            self._acceptor.join(JOIN_TIMEOUT)
        self._market.wake.set()
        if self._market.thread.is_alive():
            self._market.thread.join(JOIN_TIMEOUT)
        if self._listener:
            self._listener.close()
        connections = self._open_connections()
        for connection in connections:
            connection.abort()
        for connection in connections:
            connection.reader.join(JOIN_TIMEOUT)

    def __enter__(self) -> "MexcSimulator":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        return f"{scheme}://{self.host}:{self.port}/edge"

    @property
    def rest_url(self) -> str:
        """Base URL of the REST API (exchange.rest_url): same host and port as url."""
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # the market

    def open_market(self, symbol: str) -> None:
        """Start the symbol's market now, before anyone subscribes."""
        self._market.open(symbol)

    def trade(self, symbol: str, count: int = 1) -> list:
        """count trades now, pushed (as one push.deal) to the symbol's deal subscribers; the
        Trades made.  The reply to any later request (a pong) follows that push."""
        return self._market.trade(symbol, count)

    def trades(self, symbol: str, since_ms=None, until_ms=None) -> list:
        """The truth: every Trade the market made for symbol with since_ms <= t <= until_ms
        (bounds optional), oldest first, whether or not anyone received it. Frames made by
        send_frames, burst, send_gzip_deal, ... are outside the market and not in it."""
        return self._market.trades(symbol, since_ms, until_ms)

    # observation

    def expected_rows(self, symbol=None) -> list:
        """(ts, mt, m) rows a correct collector stores for everything sent so far, in send order;
        ts is None for dead letters, and m too for a bad binary frame. symbol=None: all rows."""
        with self._lock:
            if symbol is None:
                return [row for rows in self._rows.values() for row in rows]
            return list(self._rows.get(symbol, ()))

    def sent_counts(self, symbol=None) -> dict:
        """Expected rows per mt ('t', 'd', 'dp', 'dl'): one 'd' per trade, not per frame."""
        return dict(collections.Counter(mt for _, mt, _ in self.expected_rows(symbol)))

    def sent_counts_by_symbol(self) -> dict:
        """symbol -> sent_counts(symbol), for every symbol with rows."""
        with self._lock:
            symbols = list(self._rows)
        return {symbol: self.sent_counts(symbol) for symbol in symbols}

    def streaming_to(self, symbol: str) -> bool:
        """An open connection is subscribed to symbol: a send_* for it goes to that symbol's
        own subscriber, not to another connection."""
        return any(c.open and not c.closed.is_set() and c.subscribed_to(symbol)
                   for c in self._open_connections())

    def orphaned_rows(self, symbol) -> set:
        """The symbol's data rows (ts, mt, m) whose sendall completed on a connection
        after a newer connection had subscribed to the same symbol.  A client reads one
        connection per symbol and opens the next only after leaving the previous one, so nobody
        reads these: the old connection is an orphan the network has not torn down yet (e.g.
        the exit stream of a SIGKILLed tor, which the exit relay closes only later, while the
        kernel buffers keep accepting sendall()).  They are in expected_rows() all the same."""
        with self._lock:
            return set(self._orphaned.get(symbol, ()))

    @property
    def connections(self) -> int:
        """Open WebSocket connections (REST requests are not counted)."""
        with self._lock:
            return sum(1 for connection in self._connections if connection.open)

    @property
    def total_connections(self) -> int:
        with self._lock:
            return self._total_connections

    @property
    def pings_received(self) -> int:
        with self._lock:
            return self._pings

    @property
    def subscriptions(self) -> list:
        """Every sub.* request received, accepted or not, as (symbol, channel)."""
        with self._lock:
            return [(symbol, channel) for symbol, channel, _param in self._subscriptions]

    @property
    def subscription_params(self) -> list:
        """Every sub.* request received, as (symbol, channel, its param object)."""
        with self._lock:
            return list(self._subscriptions)

    @property
    def depth_limits(self) -> dict:
        """symbol -> limit of its latest sub.depth.full (5, 10 or 20; anything else means 20)."""
        with self._lock:
            return dict(self._depth_limits)

    @property
    def peer_addresses(self) -> list:
        """(host, port) of every WebSocket client so far."""
        with self._lock:
            return list(self._peers)

    @property
    def rest_requests(self) -> dict:
        """Client IP -> REST requests received (answered, refused or failed)."""
        with self._rest.lock:
            return dict(self._rest.requests)

    def rest_answers(self, symbol=None) -> list:
        """RestAnswer of every deals request answered with trades (of symbol, when given), in
        the order served."""
        with self._rest.lock:
            return [a for a in self._rest.answers if symbol is None or a.symbol == symbol]

    # fault injection

    def force_disconnect(self) -> None:
        for connection in self._open_connections():
            connection.abort()

    def stop_data(self) -> None:
        """The market stops (send_* still work), and pushes not sent yet are dropped.  When
        this returns, nothing more is being sent, so expected_rows() is final until the next
        send_*."""
        with self._market.lock:  # the market makes no event after this one
            self._data_stopped = True
        for connection in self._open_connections():
            with connection.send_lock:
                connection.outbox.clear()

    def fail_rest(self, seconds: float, mode: str = "error") -> None:
        """For a while every REST request fails: "error" answers HTTP 500, "drop" closes the
        connection without an answer."""
        self._rest.fail(seconds, mode)

    def stall(self, seconds: float) -> None:
        """Send nothing (data, acks, pongs) for a while; replies and the market's pushes go out
        afterwards (those of a connection closed meanwhile never do).  The send_* methods below
        still send."""
        with self._lock:
            self._stall_until = max(self._stall_until, time.monotonic() + seconds)

    def send_junk(self, symbol: str) -> bool:
        return self._send_dead_letter(symbol, f"not json {{ {symbol}")

    def send_unknown_channel(self, symbol: str) -> bool:
        text = (f'{{"channel":"push.mystery","symbol":{json.dumps(symbol)},"data":{{"x":1}},'
                f'"ts":{wall_ms()}}}')
        return self._send_dead_letter(symbol, text)

    def send_wrong_types(self, symbol: str) -> bool:
        """Alternately a deal whose data is a number and a single-object deal without "p"."""
        data = ('{"v":5,"T":1,"O":1,"M":2,"t":%d,"i":1}' % wall_ms()
                if next(self._wrong_type_variants) % 2 else "42")
        text = (f'{{"symbol":{json.dumps(symbol)},"data":{data},"channel":"push.deal",'
                f'"ts":{wall_ms()}}}')
        return self._send_dead_letter(symbol, text)

    def send_huge(self, symbol: str, nbytes: int) -> bool:
        """A valid push of about nbytes on an unknown channel."""
        head = f'{{"channel":"push.mystery","symbol":{json.dumps(symbol)},"ts":{wall_ms()},"data":"'
        tail = '"}'
        filler = "x" * max(0, nbytes - len(head) - len(tail))
        return self._send_dead_letter(symbol, head + filler + tail)

    def send_rs_error(self, text: str) -> bool:
        """To the newest connection; its row is filed under that connection's first symbol."""
        connection = self._target(None)
        if connection is None:
            return False
        error = rs_error(text)
        records = [(connection.first_symbol, [dead_letter(error)])]
        return connection.send(text_frame(error), records)

    def send_bad_binary(self, symbol: str) -> bool:
        payload = b"\x00\xffneither gzip nor zlib " + symbol.encode()
        records = [(symbol, [dead_letter(None)])]  # the collector's text for it is its own
        return self._send(symbol, encode_frame(payload, OP_BINARY), records)

    def send_gzip_deal(self, symbol: str) -> bool:
        def make(feed):
            text, rows = feed.deal_frame()
            return encode_frame(gzip.compress(text.encode()), OP_BINARY), rows
        return self._send_generated(symbol, make)

    def send_frames(self, symbol: str, n: int) -> int:
        """n data frames of the live channel mix, as fast as possible, in sendalls of SEND_CHUNK
        frames; returns how many went. Content comes from a pool of pre-rendered frames (see
        _FramePool): prices repeat, times and versions stay unique and rising."""
        connection = self._target(symbol)
        sent = 0
        while connection is not None and sent < n:
            chunk = min(SEND_CHUNK, n - sent)
            if not connection.send_pooled(symbol, chunk):
                break
            sent += chunk
        return sent

    def send_prepared(self, symbol: str, data: bytes) -> bool:
        """Send frames from live_mix_frames() in one sendall, NOT recorded in expected_rows()
        (a benchmark's hundreds of thousands of rows would cost more than the sending)."""
        return self._send(symbol, data, ())

    def burst(self, n_frames: int, symbol: str) -> int:
        """n frames pre-encoded into one buffer and sent with one sendall; returns n or 0."""
        connection = self._target(symbol)
        if connection is None:
            return 0
        return n_frames if connection.send_pooled(symbol, n_frames) else 0

    # internals

    def _target(self, symbol):
        """The newest open connection subscribed to symbol, else the newest open one."""
        candidates = [c for c in self._open_connections() if c.open and not c.closed.is_set()]
        subscribed = [c for c in candidates if symbol is not None and c.subscribed_to(symbol)]
        return max(subscribed or candidates, key=lambda c: c.index, default=None)

    def _send(self, symbol, frame: bytes, records) -> bool:
        connection = self._target(symbol)
        return connection is not None and connection.send(frame, records)

    def _send_dead_letter(self, symbol: str, text: str) -> bool:
        return self._send(symbol, text_frame(text), [(symbol, [dead_letter(text)])])

    def _send_generated(self, symbol: str, make) -> bool:
        connection = self._target(symbol)
        return connection is not None and connection.send_generated(symbol, make)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, sock, next(self._connection_ids), tuple(peer[:2]))
            with self._lock:
                self._connections.add(connection)
            connection.start()

    def _open_connections(self) -> list:
        with self._lock:
            return list(self._connections)

    def _count_websocket(self, peer: tuple) -> None:
        with self._lock:
            self._total_connections += 1
            self._peers.append(peer)

    def _subscribers(self, symbol: str, channel: str) -> list:
        """(connection, subscription) of every open connection subscribed to the stream."""
        found = []
        for connection in self._open_connections():
            subscription = connection.active.get((symbol, channel))
            if subscription is not None and connection.open and not connection.closed.is_set():
                found.append((connection, subscription))
        return found

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _record(self, records, connection=None) -> None:
        """Rows whose sendall completed; a push sent to several connections counts once (a
        collector stores it once), and is orphaned only if no live connection sent it."""
        with self._lock:
            for symbol, rows in records:
                orphaned = self._orphaned.setdefault(symbol, set())
                if isinstance(rows, _SharedRows):
                    if not (connection and symbol in connection.superseded):
                        orphaned.difference_update(rows)
                    if rows[0] in self._shared_sent:
                        continue
                    self._shared_sent.update(rows)
                self._rows.setdefault(symbol, []).extend(rows)
                if connection is not None and symbol in connection.superseded:
                    orphaned.update(row for row in rows if row[0] is not None)

    def _supersede(self, newer, symbol: str) -> None:
        """newer is subscribing to symbol: what older connections still send of it is read by
        no one."""
        with self._lock:
            for connection in self._connections:
                if connection.index < newer.index and connection.subscribed_to(symbol):
                    connection.superseded.add(symbol)

    def _count_ping(self) -> None:
        with self._lock:
            self._pings += 1

    def _log_subscription(self, symbol: str, channel: str, limit: int, param: dict) -> None:
        with self._lock:
            self._subscriptions.append((symbol, channel, dict(param)))
            if channel == "depth.full":
                self._depth_limits[symbol] = limit

    def _contract_exists(self, symbol: str) -> bool:
        if self.known_symbols is not None:
            return symbol in self.known_symbols
        return DEFAULT_SYMBOL.fullmatch(symbol) is not None

    def _stall_remaining(self) -> float:
        return self._stall_until - time.monotonic()


# --- command line -------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args(argv)
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    simulator = MexcSimulator(args.host, args.port, context, args.rate,
                              idle_timeout=args.idle_timeout)
    with simulator:
        print(f"LISTENING {simulator.url} REST {simulator.rest_url}", flush=True)
        while not stop.wait(0.2):
            pass
    # rs.error dead letters sent before any subscription have no symbol: listed under "".
    counts = {symbol or "": c for symbol, c in simulator.sent_counts_by_symbol().items()}
    print(json.dumps(counts, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A MEXC futures WebSocket server on loopback, for the tests, the benchmarks and `mexc demo`.

Hand-rolled RFC 6455 on plain sockets and threads (stdlib only), speaking the protocol described
in README "Row format" and collector/wire.py. Every frame whose sendall completed is turned into the rows a
correct collector must store, so tests can compare the database with `expected_rows()`.

Run standalone: python -m mexc.simulator --port 0 --rate 1000 [--tls-cert C --tls-key K]
"""
from __future__ import annotations

import argparse
import base64
import collections
import gzip
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

    def deal_frame(self) -> tuple:
        random = self.random
        n = 1 + int(random() * 3)
        single = n == 1 and random() < 0.3  # the pre-2025-08 format: one object, not a list
        first_t = self.sequences.timestamps(self.symbol, n)
        template = _TRADE_FORMATS[int(random() * len(_TRADE_FORMATS))]
        quote_ids = random() < 0.5  # ids are ints in the docs, strings live
        trades, rows = [], []
        for t in range(first_t, first_t + n):
            self._walk()
            price = self._price_text(self.price)
            volume = decimal_text(1 + int(random() ** 3 * 5000), 0, next(self.styles))
            side = 1 + int(random() * 2)
            trade_id = f'"{t + _TRADE_ID_OFFSET}"' if quote_ids else t + _TRADE_ID_OFFSET
            trades.append(template.format(price, volume, side, 1 + int(random() * 4),
                                          1 + int(random() * 2), t, trade_id))
            rows.append((t, "d", f"{price}|{volume}|{side}"))
        if random() < 0.3:  # batches are not chronological; rows follow frame order
            trades.reverse()
            rows.reverse()
        data = trades[0] if single else "[" + ",".join(trades) + "]"
        last_t = first_t + n - 1
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
        if self.book_mid is None or (self.price != self.book_mid and self.random() < 0.2):
            self._rebuild_book()
        else:
            self._touch_book()
        ts = self.sequences.timestamps(self.symbol)
        version = self.sequences.version(self.symbol, 1 + int(self.random() * 3))
        template = _DEPTH_FORMATS[int(self.random() * len(_DEPTH_FORMATS))]
        data = template.format(",".join(self.asks.levels[:limit]),
                               ",".join(self.bids.levels[:limit]), version)
        # limit <= 20, so the frame's levels are exactly the row's top 20
        row = (ts, "dp", ",".join(self.bids.pairs[:limit]) + "|"
               + ",".join(self.asks.pairs[:limit]))
        cts = ts - int(self.random() * 5)
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


# --- one client connection ----------------------------------------------------------------------

class _ConnectionEnded(Exception):
    pass


_Subscription = collections.namedtuple("_Subscription", "limit token")


class _Connection:
    """A reader thread (handshake, client requests) and a sender thread (paced data, idle
    timeout, replies held back by a stall). Every write goes through send_lock."""

    def __init__(self, sim: "MexcSimulator", sock: socket.socket, index: int):
        self.sim = sim
        self.sock = sock
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
        self.new_streams = collections.deque()  # (symbol, channel, token) for the sender
        self.schedule = []  # heap of (due, token, symbol, channel); sender thread only
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
        """make(feed) -> (bytes, rows). Generated under the send lock, so depth versions reach
        the client in the order they were allocated."""
        with self.send_lock:
            data, rows = make(self._feed(symbol))
            return self._send_locked(data, [(symbol, rows)])

    def send_pooled(self, symbol: str, n: int) -> bool:
        with self.send_lock:
            limit = self.depth_limit(symbol)
            pool = self.pools.get((symbol, limit))
            if pool is None:
                pool = self.pools[(symbol, limit)] = _FramePool(
                    symbol, self.sim.seed, self.rng, limit, self.sim._sequences)
            data, rows = pool.encode(n)
            return self._send_locked(data, [(symbol, rows)])

    def reply(self, text: str, records=()) -> None:
        self.reply_frame(text_frame(text), records)

    def reply_frame(self, frame: bytes, records=()) -> None:
        """Send a reply now, or hold it (in order) while the simulator is stalled."""
        with self.reply_lock:
            if self.pending or self.sim._stall_remaining() > 0:
                self.pending.append((frame, records))
                self.wake.set()
                return
            self.send(frame, records)

    def _flush_pending(self) -> None:
        with self.reply_lock:
            if self.pending:
                self.send(b"".join(frame for frame, _ in self.pending),
                          [record for _, records in self.pending for record in records])
                self.pending = []

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
            self.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            raise _ConnectionEnded
        accept = base64.b64encode(hashlib.sha1(key.group(1) + WS_GUID).digest())
        response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.last_ping = time.monotonic()
        # Open before the client can see the 101, so a send_* right after connecting finds this
        # connection; the lock makes that send wait until the 101 is out.
        with self.send_lock:
            self.open = True
            self.sock.sendall(response)
            self.sock.settimeout(None)

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
        self.reply(ack)  # ack first: a stream starts only once its ack is sent (or queued)
        if self.first_symbol is None:
            self.first_symbol = symbol
        if not self.subscribed_to(symbol):
            self.sim._supersede(self, symbol)
        token = next(self.sim._tokens)
        self.active[(symbol, channel)] = _Subscription(limit, token)
        self.new_streams.append((symbol, channel, token))
        self.wake.set()

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
            self._schedule_new_streams()
            delay = self._send_due_frames()
            self.wake.wait(min(delay, SENDER_POLL))

    def _close_idle(self) -> None:
        error = rs_error(IDLE_MESSAGE)
        # An empty close frame, as MEXC's 1005, then the socket goes.
        self.send(text_frame(error) + encode_frame(b"", OP_CLOSE),
                  [(self.first_symbol, [dead_letter(error)])])
        self.abort()

    def _schedule_new_streams(self) -> None:
        now = time.monotonic()
        while self.new_streams:
            symbol, channel, token = self.new_streams.popleft()
            if self.sim._intervals:
                heapq.heappush(self.schedule, (now, token, symbol, channel))

    def _send_due_frames(self) -> float:
        """Send every frame due within BATCH_WINDOW in one sendall; seconds until the next one."""
        now = time.monotonic()
        horizon = now + BATCH_WINDOW
        schedule = self.schedule
        with self.send_lock:
            if self.sim._data_stopped:
                schedule.clear()
                return SENDER_POLL
            parts, records, size = [], [], 0
            while schedule and schedule[0][0] <= horizon and size < BATCH_BYTES:
                due, token, symbol, channel = heapq.heappop(schedule)
                subscription = self.active.get((symbol, channel))
                if subscription is None or subscription.token != token:
                    continue  # unsubscribed, or replaced by a newer subscription
                text, rows = self._feed(symbol).frame(channel, subscription.limit)
                frame = text_frame(text)
                parts.append(frame)
                records.append((symbol, rows))
                size += len(frame)
                jitter = 0.5 + self.rng.random()
                next_due = max(due + self.sim._intervals[channel] * jitter, now - MAX_BACKLOG)
                heapq.heappush(schedule, (next_due, token, symbol, channel))
            if parts:
                self._send_locked(b"".join(parts), records)
        return schedule[0][0] - time.monotonic() if schedule else SENDER_POLL


# --- the server ---------------------------------------------------------------------------------

class MexcSimulator:
    """A MEXC futures WebSocket server on loopback that records what it sent.

    rate: data frames per second per subscribed (symbol, channel) stream on average, split as
    the live mix (CHANNEL_WEIGHTS); 0 sends data only when told (send_frames, burst, ...).
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
        self._lock = threading.Lock()  # guards everything below
        self._rows = {}  # symbol (None: dead letters without one) -> rows in send order
        self._connections = set()
        self._total_connections = 0
        self._pings = 0
        self._subscriptions = []
        self._depth_limits = {}
        self._peers = []
        self._orphaned = {}  # symbol -> data rows sent on superseded connections

    # lifecycle

    def start(self) -> "MexcSimulator":
        self._listener = socket.create_server((self.host, self._port), backlog=128)
        self._port = self._listener.getsockname()[1]
        self._listener.settimeout(ACCEPT_POLL)
        self._acceptor = threading.Thread(target=self._accept_loop, name="mexc-sim-accept",
                                          daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._acceptor:
            self._acceptor.join(JOIN_TIMEOUT)
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
        with self._lock:
            return len(self._connections)

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
        with self._lock:
            return list(self._peers)

    # fault injection

    def force_disconnect(self) -> None:
        for connection in self._open_connections():
            connection.abort()

    def stop_data(self) -> None:
        """Send no more rate-driven data frames (send_* still work).  When this returns,
        nothing more is being sent, so expected_rows() is final until the next send_*."""
        self._data_stopped = True
        for connection in self._open_connections():
            with connection.send_lock:
                pass

    def stall(self, seconds: float) -> None:
        """Send nothing (data, acks, pongs) for a while; replies go out, in order, afterwards.
        The send_* methods below still send."""
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
            connection = _Connection(self, sock, next(self._connection_ids))
            with self._lock:
                self._connections.add(connection)
                self._total_connections += 1
                self._peers.append(tuple(peer[:2]))
            connection.start()

    def _open_connections(self) -> list:
        with self._lock:
            return list(self._connections)

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _record(self, records, connection=None) -> None:
        with self._lock:
            for symbol, rows in records:
                self._rows.setdefault(symbol, []).extend(rows)
                if connection is not None and symbol in connection.superseded:
                    self._orphaned.setdefault(symbol, set()).update(
                        row for row in rows if row[0] is not None)

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
        print(f"LISTENING {simulator.url}", flush=True)
        while not stop.wait(0.2):
            pass
    # rs.error dead letters sent before any subscription have no symbol: listed under "".
    counts = {symbol or "": c for symbol, c in simulator.sent_counts_by_symbol().items()}
    print(json.dumps(counts, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

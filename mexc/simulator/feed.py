"""One symbol's market data as MEXC pushes it: trades, a top-20 book and a ticker that walk on
a seeded random path, rendered as push frames in varying key orders and number spellings,
each with the rows a correct collector stores for it (the oracle: generated here, independently
of collector/wire.py)."""
import collections
import decimal
import json
import random
import threading
from typing import NamedTuple

from mexc.simulator.wire import PADDED, PLAIN, decimal_text, style_cycle

# Relative frame rates of one symbol's streams, as seen live: deals most, depth.full, ticker least.
CHANNEL_WEIGHTS = {"deal": 14, "depth.full": 5, "ticker": 1}
DEPTH_LIMITS = (5, 10, 20)
DEFAULT_DEPTH_LIMIT = 20

class Sequences:
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
        """The (ts, mt, m) row a collector stores for this trade from the WebSocket (the id
        last)."""
        return (self.t, "d", f"{self.p}|{self.v}|{self.T}|{self.id}")

    @property
    def rest_row(self) -> tuple:
        """The row a backfill stores for it from the REST answer, which lists no id."""
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

    def __init__(self, prices: list, sizes: list, feed: "Feed"):
        self.prices, self.sizes = prices, sizes
        self.levels = [""] * len(prices)  # "[price,size,orderCount]"
        self.pairs = [""] * len(prices)  # "[price,size]", the row's form
        for i, size in enumerate(sizes):
            self.set_size(i, size, feed)

    def set_size(self, i: int, size: int, feed: "Feed") -> None:
        price, text = self.prices[i], decimal_text(size, 0, next(feed.styles))
        self.sizes[i] = size
        self.levels[i] = f"[{price},{text},{1 + int(feed.random() * 40)}]"
        self.pairs[i] = f"[{price},{text}]"


class Feed:
    """Market state of one symbol on one connection, turned into push frames plus the rows a
    collector must store for them. Only used under that connection's send lock.
    Frame makers return (frame text, rows), rows being (ts, mt, m) in frame order."""

    def __init__(self, symbol: str, seed: int, rng: random.Random, sequences: Sequences):
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



"""The exchange's side of every symbol: trades, book and ticker changing on the simulator's
clock whether or not anyone is connected, every trade kept (the truth)."""
import bisect
import collections
import functools
import heapq
import itertools
import random
import threading
import time

from mexc.simulator.book import FullBook
from mexc.simulator.feed import CHANNEL_WEIGHTS, Feed, Sequences
from mexc.simulator.traffic import SharedRows
from mexc.simulator.wire import text_frame

POLL = 0.05  # s; longest the market thread sleeps (new symbols, stop)
BATCH_WINDOW = 0.002  # s; events due this close together are made together
MAX_BACKLOG = 1.0  # s; a stream that fell behind (stall, overload) catches up at most this much
JOIN_TIMEOUT = 2.0


def intervals(rate: float) -> dict:
    """channel -> mean seconds between its events for `rate` events/s per stream on average,
    split as the live mix (CHANNEL_WEIGHTS); {} for rate 0 (no events of its own)."""
    if rate <= 0:
        return {}
    total_weight = sum(CHANNEL_WEIGHTS.values())
    return {channel: total_weight / (rate * len(CHANNEL_WEIGHTS) * weight)
            for channel, weight in CHANNEL_WEIGHTS.items()}


class Market:
    """Once a symbol's market is open (its first subscription, or open()), its trades, book and
    ticker change on the simulator's clock; each change goes as a push to the connections that
    `subscribers(symbol, channel)` names ((connection, subscription) pairs; a connection's
    `push()` queues it).  Every trade is kept, so tests can ask which trades happened between
    two times.  One thread makes the events; everything here is guarded by `lock`."""

    def __init__(self, seed: int, sequences: Sequences, rate: float, subscribers):
        self.seed = seed
        self.sequences = sequences
        self.intervals = intervals(rate)
        self.book_interval = 1.0 / rate if rate > 0 else None  # s between full-book events
        self.subscribers = subscribers
        self.lock = threading.Lock()
        self.rng = random.Random(f"{seed}:market")
        self.feeds = {}  # symbol -> Feed
        self.truth = {}  # symbol -> [Trade], in the order made (t rising)
        self.times = {}  # symbol -> [t of each Trade in truth], for bisect
        self.books = {}  # symbol -> FullBook, from its first sub.depth or REST depth request
        self.schedule = []  # heap of (due, order, symbol, channel)
        self.order = itertools.count()
        self.data_stopped = False
        self.halted = set()  # symbols delisted: no events until resumed
        self.closing = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mexc-sim-market", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(JOIN_TIMEOUT)

    def stop_data(self) -> None:
        """No event after this one (trade() still trades)."""
        with self.lock:
            self.data_stopped = True

    def halt(self, symbol: str) -> None:
        """The symbol makes no more events (delisted, paused); trade() still trades."""
        with self.lock:
            self.halted.add(symbol)

    def resume(self, symbol: str) -> None:
        """A halted symbol makes events again (listed again)."""
        with self.lock:
            if symbol not in self.halted:
                return
            self.halted.discard(symbol)
            if symbol in self.feeds:
                now = time.monotonic()
                for channel in self.intervals:
                    heapq.heappush(self.schedule, (now, next(self.order), symbol, channel))
        self.wake.set()

    def open(self, symbol: str) -> Feed:
        """The symbol's market, trading from now on (at the simulator's rate)."""
        with self.lock:
            feed = self.feeds.get(symbol)
            if feed is None:
                feed = self.feeds[symbol] = Feed(symbol, self.seed, self.rng, self.sequences)
                self.truth[symbol], self.times[symbol] = [], []
                now = time.monotonic()
                for channel in self.intervals if symbol not in self.halted else ():
                    heapq.heappush(self.schedule, (now, next(self.order), symbol, channel))
        self.wake.set()
        return feed

    def open_book(self, symbol: str) -> FullBook:
        """The symbol's whole book, changing from now on (at the simulator's rate)."""
        feed = self.open(symbol)
        with self.lock:
            book = self.books.get(symbol)
            if book is None:
                book = self.books[symbol] = FullBook(symbol, feed.symbol_json, self.seed,
                                                     feed.price, feed.scale)
                if self.book_interval:
                    heapq.heappush(self.schedule,
                                   (time.monotonic(), next(self.order), symbol, "depth"))
        self.wake.set()
        return book

    def book_events(self, symbol: str, count: int) -> None:
        """count events of the symbol's whole book now, each pushed to its subscribers."""
        self.open_book(symbol)
        with self.lock:
            for _ in range(count):
                self._happen(self.feeds[symbol], "depth")

    def book_fault(self, symbol: str, fault: str, n: int) -> None:
        """drop: the next n events' frames are not sent; jump: the next version is n more
        than the next; reorder: the next event's frames go after the one after it."""
        book = self.open_book(symbol)
        with self.lock:
            if fault == "drop":
                book.drops += n
            elif fault == "jump":
                book.jump += n
            elif fault == "reorder":
                book.reorder = True
            else:
                raise ValueError(f"no such book fault: {fault!r}")

    def book_snapshot(self, symbol: str, limit) -> str:
        """The REST depth answer of the book as it is now, stamped with an ms of its own
        (after every change it holds, before every later one)."""
        book = self.open_book(symbol)
        with self.lock:
            return book.snapshot_json(self.sequences.timestamps(symbol), limit)

    def true_books(self, symbol: str, instants: list) -> list:
        book = self.open_book(symbol)
        with self.lock:
            return book.true_books(instants)

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
        while not self.closing.is_set():
            self.wake.clear()
            with self.lock:
                delay = self._make_due_events()
            self.wake.wait(min(max(delay, 0.0), POLL))

    def _make_due_events(self) -> float:
        """Make every event due within BATCH_WINDOW; seconds until the next one."""
        now = time.monotonic()
        schedule, intervals = self.schedule, self.intervals
        while schedule and schedule[0][0] <= now + BATCH_WINDOW:
            if self.data_stopped:
                schedule.clear()
                break
            due, order, symbol, channel = heapq.heappop(schedule)
            if symbol in self.halted:  # resume() schedules it anew
                continue
            self._happen(self.feeds[symbol], channel)
            interval = self.book_interval if channel == "depth" else intervals[channel]
            next_due = max(due + interval * (0.5 + self.rng.random()), now - MAX_BACKLOG)
            heapq.heappush(schedule, (next_due, order, symbol, channel))
        return schedule[0][0] - time.monotonic() if schedule else POLL

    def _happen(self, feed: Feed, channel: str, count: int = 0) -> list:
        """One event of the channel; pushed to its subscribers; the trades made, if any."""
        trades = []
        if channel == "deal":
            trades = feed.new_trades(count)
            self.truth[feed.symbol] += trades
            self.times[feed.symbol] += [trade.t for trade in trades]
            render = functools.partial(feed.deal_frame, trades)  # variant: merge
        elif channel == "depth":
            book = self.books[feed.symbol]
            events = book.outgoing(book.step(self.sequences.timestamps(feed.symbol)))
            if not events:
                return trades
            render = functools.partial(book.render, events)  # variant: merged
        elif channel == "depth.full" and feed.symbol in self.books:
            book = self.books[feed.symbol]
            if book.version == book.top_version:
                return trades  # nothing changed: MEXC's versions only rise
            render = functools.partial(book.render_top, self.sequences.timestamps(feed.symbol))
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
        subscribers = self.subscribers(symbol, channel)
        variants = collections.Counter(subscription.variant for _, subscription in subscribers)
        frames = {}
        for variant, count in variants.items():
            text, rows = render(variant)
            frame = text if type(text) is bytes else text_frame(text)
            frames[variant] = (frame, SharedRows(rows) if count > 1 else rows)
        for connection, subscription in subscribers:
            connection.push(symbol, channel, subscription.token, *frames[subscription.variant])

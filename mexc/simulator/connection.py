"""One client connection: the WebSocket handshake, the client's requests (ping, sub.*,
unsub.*), the market's pushes and the replies, in MEXC's order and timing; or one REST
request, answered and closed."""
import base64
import collections
import dataclasses
import hashlib
import itertools
import json
import random
import re
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Iterator, Optional

from mexc.simulator.feed import CHANNEL_WEIGHTS, DEFAULT_DEPTH_LIMIT, DEPTH_LIMITS, Feed, Sequences
from mexc.simulator.market import Market
from mexc.simulator.pool import FramePool
from mexc.simulator.rest import RestApi
from mexc.simulator.traffic import Traffic
from mexc.simulator.wire import (OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                                 WS_GUID, control_message, dead_letter, encode_frame,
                                 merges_deals, rs_error, text_frame, unmask, wall_ms)

IDLE_MESSAGE = "more than 60 seconds no response, close the channel"
# s; longest an idle sender sleeps: pushes, replies held back and abort() wake it, the idle
# limit and a stall's end are waited for exactly (300 connections polling every 50 ms cost
# 6,000 wake-ups a second, each taking the GIL from the market thread)
SENDER_POLL = 1.0
HANDSHAKE_TIMEOUT = 5.0
BATCH_BYTES = 256 * 1024  # pushes sent in one sendall at most
MAX_CLIENT_FRAME = 1 << 20
OUTBOX_FRAMES = 50_000  # market pushes queued for one connection at most
SERVED = (*CHANNEL_WEIGHTS, "depth")  # channels a sub.* may ask for (depth: the whole book)


@dataclasses.dataclass
class Venue:
    """Everything a connection uses of the exchange it belongs to (server.py builds it)."""
    seed: int
    ssl_context: Optional[ssl.SSLContext]
    idle_timeout: float
    sequences: Sequences
    market: Market
    rest: RestApi
    traffic: Traffic
    contract_exists: Callable[[str], bool]
    stall_remaining: Callable[[], float]  # s the simulator still sends nothing (<= 0: none)
    # Several processes as one exchange (shards.py): hand_off(connection, symbol, request,
    # rest_line) gives the connection to the process that serves symbol; False: serve it here.
    hand_off: Optional[Callable] = None
    tokens: Iterator[int] = dataclasses.field(default_factory=itertools.count)  # subscriptions


class _ConnectionEnded(Exception):
    pass


class _HandedOff(Exception):
    """Another process of the exchange serves this connection now (Venue.hand_off)."""


# variant: what tells this subscriber's frames apart from another's of the same event: the
# depth limit for depth.full, whether deals are merged for deal, nothing for ticker.
Subscription = collections.namedtuple("Subscription", "limit token variant")

class Connection:
    """A reader thread (handshake, client requests; or one REST request) and a sender thread
    (the market's pushes, idle timeout, replies held back by a stall). Every write goes through
    send_lock."""

    def __init__(self, venue: Venue, sock: socket.socket, index: int, peer: tuple,
                 adopted: Optional[tuple] = None):
        """adopted: (WebSocket requests already read, a REST request line or None, bytes
        read past them) of a connection another process of the exchange accepted."""
        self.venue = venue
        self.adopted = adopted
        self.sock = sock
        self.peer = peer  # (host, port) of the client
        self.index = index
        self.rng = random.Random(f"{venue.seed}:{index}")
        self.send_lock = threading.Lock()
        self.reply_lock = threading.Lock()
        self.pending = []  # (frame bytes, records) held back while stalled
        self.wake = threading.Event()
        self.closed = threading.Event()
        self.open = False  # WebSocket handshake done
        # Where symbol-less dead letters (rs.error) are filed: a collector keeps one symbol per
        # connection, so it stores them with that symbol.
        self.first_symbol = None
        self.feeds = {}  # symbol -> Feed
        self.pools = {}  # (symbol, depth limit) -> FramePool
        self.active = {}  # (symbol, channel) -> Subscription
        # Pushes from the market not sent yet: (frame, symbol, rows, (symbol, channel), token).
        # A client that reads nothing loses the oldest beyond OUTBOX_FRAMES, never recorded.
        self.outbox = collections.deque(maxlen=OUTBOX_FRAMES)
        self.last_ping = time.monotonic()
        self.stalled_until = 0.0  # this connection alone sends nothing before (stall_path)
        self.muted_until = 0.0  # the market pushes nothing to it before (mute_data)
        self.buffer = bytearray()
        self.reader = threading.Thread(target=self._run, name=f"mexc-sim-read-{index}", daemon=True)
        self.sender = None
        # Symbols a newer connection has subscribed to since (under traffic.lock): the client
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
        self.venue.traffic.record(records, self)
        return True

    def send_generated(self, symbol: str, make) -> bool:
        """make(feed) -> (bytes, rows), this connection's own frames (not the market's), sent
        after the pushes queued before them: made under the market's lock, so depth versions
        reach the client in the order they were allocated, and sent outside it, so a client
        that reads slowly holds up only its own connection."""
        with self.send_lock:
            with self.venue.market.lock:
                parts, records = self._take_outbox(None)
                data, rows = make(self._feed(symbol))
            return self._send_locked(b"".join(parts) + data, records + [(symbol, rows)])

    def send_pooled(self, symbol: str, n: int) -> bool:
        def make(_feed):
            limit = self.depth_limit(symbol)
            pool = self.pools.get((symbol, limit))
            if pool is None:
                pool = self.pools[(symbol, limit)] = FramePool(
                    symbol, self.venue.seed, self.rng, limit, self.venue.sequences)
            return pool.encode(n)
        return self.send_generated(symbol, make)

    def push(self, symbol: str, channel: str, token: int, frame: bytes, rows: list) -> None:
        """Queue a market push for the sender thread (the market never waits on a client)."""
        if self.muted_until and time.monotonic() < self.muted_until:
            return
        self.outbox.append((frame, symbol, rows, (symbol, channel), token))
        self.wake.set()

    def send_queued(self) -> None:
        """Every queued push now, under send_lock (stop_data(send_queued=True))."""
        self._send_outbox_locked(max_bytes=None)

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
        start: (key, Subscription) the reply acks, started as the reply goes."""
        with self.reply_lock:
            if self.pending or self._stall_remaining() > 0:
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
                    self.venue.traffic.listen(key[0], self)
            self._send_locked(b"".join(frame for frame, _, _ in replies),
                              [record for _, records, _ in replies for record in records])

    def _feed(self, symbol: str) -> Feed:
        feed = self.feeds.get(symbol)
        if feed is None:
            feed = self.feeds[symbol] = Feed(symbol, self.venue.seed, self.rng,
                                             self.venue.sequences)
        return feed

    def depth_limit(self, symbol: str) -> int:
        subscription = self.active.get((symbol, "depth.full"))
        return subscription.limit if subscription else DEFAULT_DEPTH_LIMIT

    def subscribed_to(self, symbol: str) -> bool:
        return any(s == symbol for s, _ in self.active.copy())

    # reader thread

    def _run(self) -> None:
        try:
            requests = self._adopt() if self.adopted else self._handshake()
            self.sender = threading.Thread(target=self._send_loop, daemon=True,
                                           name=f"mexc-sim-send-{self.index}")
            self.sender.start()
            for request in requests:
                self._on_request(request)
            self._read_loop()
        except _HandedOff:  # no shutdown: the socket lives on in the other process
            self.closed.set()
            self.wake.set()
        except (OSError, ValueError, _ConnectionEnded):
            pass
        finally:
            if not self.closed.is_set():
                self.abort()
            if self.sender:
                self.sender.join()
            self.sock.close()
            self.venue.traffic.forget(self)

    def _adopt(self) -> list:
        """A connection handed over by another process: its WebSocket requests to serve, or
        its REST request answered (and _ConnectionEnded)."""
        requests, rest_line, self.buffer = self.adopted[0], self.adopted[1], bytearray(
            self.adopted[2])
        self.sock.settimeout(None)
        if rest_line is not None:
            self._answer_rest(rest_line)
            raise _ConnectionEnded
        self.last_ping = time.monotonic()
        self.venue.traffic.count_websocket(self.peer)
        self.open = True
        return requests

    def _handshake(self) -> list:
        """The WebSocket handshake (or a REST request answered); the requests to serve
        first: none."""
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        if self.venue.ssl_context:
            self.sock = self.venue.ssl_context.wrap_socket(self.sock, server_side=True)
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
        self.venue.traffic.count_websocket(self.peer)
        # Open before the client can see the 101, so a send_* right after connecting finds this
        # connection; the lock makes that send wait until the 101 is out.
        with self.send_lock:
            self.open = True
            self.sock.sendall(response)
            self.sock.settimeout(None)
        return []

    def _answer_rest(self, request_line: str) -> None:
        """One HTTP request that is not a WebSocket upgrade: REST, answered, then closed."""
        symbol = self.venue.rest.symbol_of(request_line)
        if (symbol and not self.adopted and self.venue.hand_off is not None
                and self.venue.hand_off(self, symbol, None, request_line)):
            raise _HandedOff
        response = self.venue.rest.answer(request_line, self.peer[0])
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
        if (self.venue.hand_off is not None and isinstance(method, str)
                and method.startswith("sub.") and not self.active and not self.adopted
                and self.first_symbol is None):
            param = request.get("param")
            symbol = param.get("symbol") if isinstance(param, dict) else None
            if isinstance(symbol, str) and self.venue.hand_off(self, symbol, raw, None):
                raise _HandedOff
        if method == "ping":
            self.last_ping = time.monotonic()
            self.venue.traffic.count_ping()
            self.reply(control_message("pong", str(wall_ms())))
        elif isinstance(method, str):
            action, _, channel = method.partition(".")
            if action in ("sub", "unsub") and channel in SERVED:
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
            self.venue.traffic.log_subscription(symbol, channel, limit, param)
        if not self.venue.contract_exists(symbol):
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
            self.venue.traffic.supersede(self, symbol)
        variant = limit if channel == "depth.full" else merges_deals(param) \
            if channel in ("deal", "depth") else None
        subscription = Subscription(limit, next(self.venue.tokens), variant)
        self.reply(ack, start=((symbol, channel), subscription))
        self.venue.market.open(symbol)
        if channel == "depth":
            self.venue.market.open_book(symbol)

    # sender thread

    def _send_loop(self) -> None:
        while not self.closed.is_set():
            self.wake.clear()
            stalled = self._stall_remaining()
            if stalled > 0:
                self.closed.wait(min(stalled, SENDER_POLL))
                continue
            self._flush_pending()
            if time.monotonic() - self.last_ping > self.venue.idle_timeout:
                self._close_idle()
                return
            with self.send_lock:
                self._send_outbox_locked()
            if not self.outbox:
                idle_in = self.last_ping + self.venue.idle_timeout - time.monotonic()
                self.wake.wait(min(SENDER_POLL, max(0.0, idle_in)))

    def _stall_remaining(self) -> float:
        """Seconds this connection stays silent: the whole exchange's stall, or its own."""
        return max(self.venue.stall_remaining(), self.stalled_until - time.monotonic())

    def _close_idle(self) -> None:
        error = rs_error(IDLE_MESSAGE)
        # An empty close frame, as MEXC's 1005, then the socket goes.
        self.send(text_frame(error) + encode_frame(b"", OP_CLOSE),
                  [(self.first_symbol, [dead_letter(error)])])
        self.abort()

"""The simulator's façade: the listener, its connections, the market and the REST API put
together, with what tests observe and the faults they inject."""
import collections
import gzip
import itertools
import json
import re
import socket
import threading
import time

from mexc.simulator.connection import Connection, Venue
from mexc.simulator.contracts import DEFAULT_CONTRACTS, Contracts
from mexc.simulator.feed import Sequences
from mexc.simulator.market import JOIN_TIMEOUT, Market
from mexc.simulator.rest import RestApi
from mexc.simulator.traffic import Traffic
from mexc.simulator.wire import (OP_BINARY, dead_letter, encode_frame, rs_error, text_frame,
                                 wall_ms)

DEFAULT_SYMBOL = re.compile(r"[A-Z0-9]+_USDT")
ACCEPT_POLL = 0.1  # s; how quickly the acceptor notices stop()
SEND_CHUNK = 512  # frames per sendall in send_frames

class MexcSimulator:
    """A MEXC futures exchange on loopback (WebSocket and REST on one port) that records what
    it sent and every trade its market made.

    rate: events per second per (symbol, channel) stream of an open market on average, split
    as the live mix (CHANNEL_WEIGHTS), whether anyone is subscribed or not; 0 trades only when
    told (trade(); send_frames, burst, ... send per connection, outside the market).
    A symbol's market opens at its first subscription (or open_market()).
    Rows of a symbol get unique event ms; at high rates they run ahead of the event clock.
    contracts: the contract list REST serves (default: known_symbols, else DEFAULT_CONTRACTS);
    list_contract / delist_contract change it at run time.
    listener, hand_off: one process of several serving one exchange (shards.py): the listening
    socket they share, and Venue.hand_off.
    """

    def __init__(self, host="127.0.0.1", port=0, ssl_context=None, rate=50.0,
                 event_clock=None, idle_timeout=60.0, known_symbols=None, seed=1,
                 contracts=None, listener=None, hand_off=None):
        self.host = host
        self.ssl_context = ssl_context
        self.rate = rate
        self.idle_timeout = idle_timeout
        self.known_symbols = None if known_symbols is None else set(known_symbols)
        self.seed = seed
        self._port = port
        self._connection_ids = itertools.count()
        self._wrong_type_variants = itertools.count()
        self._stall_lock = threading.Lock()
        self._stall_until = 0.0
        self._stopping = threading.Event()
        self._listener = listener
        self._acceptor = None
        sequences = Sequences(event_clock or wall_ms)
        self._traffic = Traffic()
        self._market = Market(seed, sequences, rate, self._traffic.subscribers)
        self._contracts = Contracts(contracts if contracts is not None
                                    else sorted(known_symbols or DEFAULT_CONTRACTS))
        self._rest = RestApi(self._market, sequences, self._contract_exists, self._contracts)
        self._venue = Venue(seed, ssl_context, idle_timeout, sequences, self._market, self._rest,
                            self._traffic, self._contract_exists, self._stall_remaining,
                            hand_off)

    # lifecycle

    def start(self) -> "MexcSimulator":
        if self._listener is None:
            self._listener = socket.create_server((self.host, self._port), backlog=128)
        self._port = self._listener.getsockname()[1]
        self._listener.settimeout(ACCEPT_POLL)
        self._acceptor = threading.Thread(target=self._accept_loop, name="mexc-sim-accept",
                                          daemon=True)
        self._acceptor.start()
        self._market.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._acceptor:
            self._acceptor.join(JOIN_TIMEOUT)
        self._market.close()
        if self._listener:
            self._listener.close()
        connections = self._traffic.open_connections()
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

    def book_events(self, symbol: str, count: int = 1) -> None:
        """count events of the symbol's whole book now (1-3 versions each), each pushed to its
        sub.depth subscribers."""
        self._market.book_events(symbol, count)

    def true_books(self, symbol: str, instants: list) -> list:
        """The truth: the whole book after every event with ts <= each instant (ms), as
        (version, bids [(price, size)] best first, asks [(price, size)] best first), prices
        as floats (the double nearest each price's text), sizes as ints."""
        book = self._market.open_book(symbol)
        return [(version, [(book.price(u), s) for u, s in bids],
                 [(book.price(u), s) for u, s in asks])
                for version, bids, asks in self._market.true_books(symbol, instants)]

    def book_fault(self, symbol: str, fault: str, n: int = 1) -> None:
        """A fault of the symbol's sub.depth stream: "drop" (the next n events' frames are not
        sent; the book changes all the same), "jump" (the next version is n more than due),
        "reorder" (the next event's frames go after the following one's), "delay_snapshot"
        (every REST depth snapshot answer waits n seconds, taken before the wait; 0 ends it)."""
        if fault == "delay_snapshot":
            with self._rest.lock:
                self._rest.snapshot_delay = float(n)
        else:
            self._market.book_fault(symbol, fault, n)

    def depth_snapshots_served(self, symbol: str) -> int:
        with self._rest.lock:
            return self._rest.depth_answers[symbol]

    # the contract list

    def list_contract(self, symbol: str, state: int = 0) -> None:
        """Listed (again) with this state; trading (0): its market makes events again."""
        self._contracts.list(symbol, state)
        if state == 0:
            self._market.resume(symbol)
        else:
            self._market.halt(symbol)

    def delist_contract(self, symbol: str, state=None) -> None:
        """Off the contract list (state None: gone, subscriptions refused) or listed with a
        state other than trading (3 offline, 4 paused, 2 settled); its market makes no more
        events either way (a subscribed socket hears only pongs)."""
        self._contracts.delist(symbol, state)
        self._market.halt(symbol)

    def contract_list_requests(self) -> int:
        """Contract list requests received (answered or not)."""
        return self._rest.contract_requests

    # observation

    def expected_rows(self, symbol=None) -> list:
        """(ts, mt, m) rows a correct collector stores for everything sent so far, in send order;
        ts is None for dead letters, and m too for a bad binary frame. symbol=None: all rows."""
        return self._traffic.expected_rows(symbol)

    def expected_rows_to(self, address: str, symbol=None) -> list:
        """expected_rows() of the connections from one client address (a cluster's host): a
        push sent to several hosts is in each one's list."""
        return self._traffic.expected_rows_to(address, symbol)

    def sent_counts(self, symbol=None) -> dict:
        """Expected rows per mt ('t', 'd', 'dp', 'dl'): one 'd' per trade, not per frame."""
        return dict(collections.Counter(mt for _, mt, _ in self.expected_rows(symbol)))

    def sent_counts_by_symbol(self) -> dict:
        """symbol -> sent_counts(symbol), for every symbol with rows."""
        return {symbol: self.sent_counts(symbol) for symbol in self._traffic.symbols()}

    def streaming_to(self, symbol: str) -> bool:
        """An open connection is subscribed to symbol: a send_* for it goes to that symbol's
        own subscriber, not to another connection."""
        return any(c.subscribed_to(symbol) for c in self._traffic.live())

    def orphaned_rows(self, symbol) -> set:
        """The symbol's data rows (ts, mt, m) whose sendall completed on a connection
        after a newer connection had subscribed to the same symbol.  A client reads one
        connection per symbol and opens the next only after leaving the previous one, so nobody
        reads these: the old connection is an orphan the network has not torn down yet (e.g.
        the exit stream of a SIGKILLed tor, which the exit relay closes only later, while the
        kernel buffers keep accepting sendall()).  They are in expected_rows() all the same."""
        return self._traffic.orphaned_rows(symbol)

    @property
    def connections(self) -> int:
        """Open WebSocket connections (REST requests are not counted)."""
        with self._traffic.lock:
            return sum(1 for connection in self._traffic.connections if connection.open)

    @property
    def total_connections(self) -> int:
        with self._traffic.lock:
            return self._traffic.total_connections

    @property
    def pings_received(self) -> int:
        with self._traffic.lock:
            return self._traffic.pings

    @property
    def subscriptions(self) -> list:
        """Every sub.* request received, accepted or not, as (symbol, channel)."""
        with self._traffic.lock:
            return [(symbol, channel) for symbol, channel, _param in self._traffic.subscriptions]

    @property
    def subscription_params(self) -> list:
        """Every sub.* request received, as (symbol, channel, its param object)."""
        with self._traffic.lock:
            return list(self._traffic.subscriptions)

    @property
    def depth_limits(self) -> dict:
        """symbol -> limit of its latest sub.depth.full (5, 10 or 20; anything else means 20)."""
        with self._traffic.lock:
            return dict(self._traffic.depth_limits)

    @property
    def peer_addresses(self) -> list:
        """(host, port) of every WebSocket client so far."""
        with self._traffic.lock:
            return list(self._traffic.peers)

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

    def force_disconnect(self, address=None) -> None:
        """Drop every connection, or those from one client address (a cluster's host)."""
        for connection in self._traffic.open_connections():
            if address is None or connection.peer[0] == address:
                connection.abort()

    def drop_newest(self, symbol=None) -> bool:
        """Drop the newest live connection (subscribed to symbol, if given) without a close
        frame, the others left open: a replacement lost while the old one still reads."""
        connection = self._traffic.newest(symbol, subscribed_only=symbol is not None)
        if connection is not None:
            connection.abort()
        return connection is not None

    def stop_data(self, send_queued: bool = False) -> None:
        """The market stops (send_* still work), and pushes not sent yet are dropped, or sent
        now with send_queued (the market's truth then holds no event its subscribers were
        not sent: the whole book's test compares every version made).  When this returns,
        nothing more is being sent, so expected_rows() is final until the next send_*."""
        self._market.stop_data()  # the market makes no event after this one
        for connection in self._traffic.open_connections():
            with connection.send_lock:
                if send_queued:
                    connection.send_queued()
                connection.outbox.clear()

    def fail_rest(self, seconds: float, mode: str = "error") -> None:
        """For a while every REST request fails: "error" answers HTTP 500, "drop" closes the
        connection without an answer."""
        self._rest.fail(seconds, mode)

    def stall(self, seconds: float) -> None:
        """Send nothing (data, acks, pongs) for a while; replies and the market's pushes go out
        afterwards (those of a connection closed meanwhile never do).  The send_* methods below
        still send."""
        with self._stall_lock:
            self._stall_until = max(self._stall_until, time.monotonic() + seconds)

    def stall_path(self, seconds: float) -> None:
        """The connections open now send nothing (data, acks, pongs) for a while, TCP open,
        as through a frozen exit relay; what they hold goes out afterwards.  Connections
        opened meanwhile are not affected: another path works."""
        until = time.monotonic() + seconds
        for connection in self._traffic.open_connections():
            connection.stalled_until = max(connection.stalled_until, until)

    def mute_data(self, seconds: float) -> None:
        """The market pushes nothing to the connections open now for a while (gone, not held:
        the exchange lost their subscriptions); pongs and acks still go.  Connections opened
        meanwhile are not affected."""
        until = time.monotonic() + seconds
        for connection in self._traffic.open_connections():
            connection.muted_until = max(connection.muted_until, until)

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
        pool.py): prices repeat, times and versions stay unique and rising.  Only to a
        connection subscribed to symbol: its data on another's would be dead letters there."""
        connection = self._traffic.newest(symbol, subscribed_only=True)
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
        """n frames pre-encoded into one buffer and sent with one sendall to a connection
        subscribed to symbol (as send_frames); returns n, or 0 without one."""
        connection = self._traffic.newest(symbol, subscribed_only=True)
        if connection is None:
            return 0
        return n_frames if connection.send_pooled(symbol, n_frames) else 0

    def adopt(self, sock: socket.socket, peer: tuple, requests: list, rest_line,
              buffered: bytes) -> None:
        """Serve a connection another process of the exchange accepted (shards.py): its
        WebSocket requests read so far (or its REST request line) and the bytes after them."""
        connection = Connection(self._venue, sock, next(self._connection_ids), peer,
                                adopted=(requests, rest_line, buffered))
        self._traffic.add(connection)
        connection.start()

    # internals

    def _target(self, symbol):
        """The newest open connection subscribed to symbol, else the newest open one."""
        return self._traffic.newest(symbol)

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
            connection = Connection(self._venue, sock, next(self._connection_ids), tuple(peer[:2]))
            self._traffic.add(connection)
            connection.start()

    def _contract_exists(self, symbol: str) -> bool:
        trading = self._contracts.trading(symbol)
        if trading is not None:
            return trading
        if self.known_symbols is not None:
            return symbol in self.known_symbols
        return DEFAULT_SYMBOL.fullmatch(symbol) is not None

    def _stall_remaining(self) -> float:
        return self._stall_until - time.monotonic()

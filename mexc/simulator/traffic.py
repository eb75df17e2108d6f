"""The simulator's record of its WebSocket connections and of every row it sent: what a
correct collector must store (`expected_rows`), and the rows nobody reads (`orphaned`)."""
import threading


class SharedRows(tuple):
    """The rows of one push sent to several connections: recorded once."""


class Traffic:
    """The open connections, counts of what clients did, and the rows each symbol was sent,
    in send order (symbol None: dead letters without one).  Everything is guarded by `lock`.

    A connection (connection.py) needs `subscribed_to(symbol)`, `open`, `closed`, `index`,
    `active` and `superseded` for this record to be kept."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows = {}  # symbol -> rows in send order
        self.connections = set()
        self.listeners = {}  # symbol -> connections that subscribed to it (the market's pushes)
        self.total_connections = 0
        self.pings = 0
        self.subscriptions = []  # (symbol, channel, param) of every sub.* received
        self.depth_limits = {}  # symbol -> limit of its latest sub.depth.full
        self.peers = []  # (host, port) of every WebSocket client
        self.orphaned = {}  # symbol -> data rows sent on superseded connections
        self.rows_to = {}  # client address -> symbol -> rows sent to it, in send order
        self._shared_sent = set()  # rows of SharedRows recorded already

    # connections

    def add(self, connection) -> None:
        with self.lock:
            self.connections.add(connection)

    def forget(self, connection) -> None:
        with self.lock:
            self.connections.discard(connection)
            for listeners in self.listeners.values():
                listeners.discard(connection)

    def listen(self, symbol: str, connection) -> None:
        """connection started a subscription to symbol: the market's pushes of it look there
        (not through every connection: 300 of them made each event cost 300 checks)."""
        with self.lock:
            self.listeners.setdefault(symbol, set()).add(connection)

    def open_connections(self) -> list:
        with self.lock:
            return list(self.connections)

    def live(self) -> list:
        """Connections past their handshake and not closing."""
        return [c for c in self.open_connections() if c.open and not c.closed.is_set()]

    def newest(self, symbol, subscribed_only: bool = False):
        """The newest live connection subscribed to symbol, else (unless subscribed_only) the
        newest live one."""
        candidates = self.live()
        subscribed = [c for c in candidates if symbol is not None and c.subscribed_to(symbol)]
        return max(subscribed or ([] if subscribed_only else candidates), key=lambda c: c.index,
                   default=None)

    def subscribers(self, symbol: str, channel: str) -> list:
        """(connection, subscription) of every live connection subscribed to the stream."""
        found = []
        with self.lock:
            listeners = list(self.listeners.get(symbol, ()))
        for connection in listeners:
            subscription = connection.active.get((symbol, channel))
            if subscription is not None and connection.open and not connection.closed.is_set():
                found.append((connection, subscription))
        return found

    # what clients did

    def count_websocket(self, peer: tuple) -> None:
        with self.lock:
            self.total_connections += 1
            self.peers.append(peer)

    def count_ping(self) -> None:
        with self.lock:
            self.pings += 1

    def log_subscription(self, symbol: str, channel: str, limit: int, param: dict) -> None:
        with self.lock:
            self.subscriptions.append((symbol, channel, dict(param)))
            if channel == "depth.full":
                self.depth_limits[symbol] = limit

    # what was sent

    def record(self, records, connection=None) -> None:
        """Rows whose sendall completed; a push sent to several connections counts once (a
        collector stores it once), and is orphaned only if no live connection sent it."""
        with self.lock:
            for symbol, rows in records:
                if connection is not None:  # per client host: a cluster's hosts share pushes
                    self.rows_to.setdefault(connection.peer[0], {}).setdefault(
                        symbol, []).extend(rows)
                orphaned = self.orphaned.setdefault(symbol, set())
                if isinstance(rows, SharedRows):
                    if not (connection and symbol in connection.superseded):
                        orphaned.difference_update(rows)
                    if rows[0] in self._shared_sent:
                        continue
                    self._shared_sent.update(rows)
                self.rows.setdefault(symbol, []).extend(rows)
                if connection is not None and symbol in connection.superseded:
                    orphaned.update(row for row in rows if row[0] is not None)

    def supersede(self, newer, symbol: str) -> None:
        """newer is subscribing to symbol: what older connections still send of it is read by
        no one."""
        with self.lock:
            for connection in self.connections:
                if connection.index < newer.index and connection.subscribed_to(symbol):
                    connection.superseded.add(symbol)

    def expected_rows(self, symbol=None) -> list:
        with self.lock:
            if symbol is None:
                return [row for rows in self.rows.values() for row in rows]
            return list(self.rows.get(symbol, ()))

    def expected_rows_to(self, address: str, symbol=None) -> list:
        with self.lock:
            rows = self.rows_to.get(address, {})
            if symbol is None:
                return [row for symbol_rows in rows.values() for row in symbol_rows]
            return list(rows.get(symbol, ()))

    def symbols(self) -> list:
        with self.lock:
            return list(self.rows)

    def orphaned_rows(self, symbol) -> set:
        with self.lock:
            return set(self.orphaned.get(symbol, ()))

"""python -m mexc.simulator --processes K: one exchange served by K processes on one port, each
symbol's market in one of them.

For benchmarks of hundreds of symbols: one process makes every symbol's events in one market
thread, under one GIL, and on a loaded machine it falls behind the rate it was asked for, so a
benchmark would measure the load generator, not the collectors.  Every process accepts on the
listening socket they share; a connection's first subscription, or a REST request, names its
symbol, and the process that owns the symbol (crc32 of its name, modulo K) gets the socket over
a Unix datagram socket (SCM_RIGHTS) with the requests and bytes read so far, and serves it from
then on.  So every connection of a symbol meets the same market, as on one process.  Plain
ws:// only (a TLS session cannot move between processes).
"""
import base64
import json
import os
import signal
import socket
import threading
import zlib

from core.process import die_with_parent
from mexc.simulator.server import MexcSimulator

MAX_HANDOFF_BYTES = 1 << 20  # a handed-off connection's metadata and unread bytes at most


def owner(symbol: str, processes: int) -> int:
    """The process (0 .. processes-1) whose market serves symbol."""
    return zlib.crc32(symbol.encode()) % processes


class Shard:
    """One process of the exchange: what it hands off, and the connections it adopts."""

    def __init__(self, index: int, inboxes: list):
        self.index, self.inboxes = index, inboxes  # inboxes: (receive end, send end) per process
        self.simulator = None

    def hand_off(self, connection, symbol: str, request, rest_line) -> bool:
        target = owner(symbol, len(self.inboxes))
        if target == self.index:
            return False
        meta = json.dumps({"peer": list(connection.peer), "rest": rest_line,
                           "requests": [base64.b64encode(r).decode() for r in
                                        ([request] if request is not None else [])],
                           "buffered": base64.b64encode(bytes(connection.buffer)).decode()})
        socket.send_fds(self.inboxes[target][1], [meta.encode()], [connection.sock.fileno()])
        return True

    def adopt_forever(self) -> None:
        inbox = self.inboxes[self.index][0]
        while True:
            try:
                data, fds, _flags, _address = socket.recv_fds(inbox, MAX_HANDOFF_BYTES, 1)
            except OSError:
                return
            if not fds:
                return
            meta = json.loads(data)
            sock = socket.socket(fileno=fds[0])
            self.simulator.adopt(sock, tuple(meta["peer"]),
                                 [base64.b64decode(r) for r in meta["requests"]],
                                 meta["rest"], base64.b64decode(meta["buffered"]))


def serve(host: str, port: int, rate: float, idle_timeout: float, processes: int) -> int:
    """The exchange as `processes` processes; prints LISTENING as the one-process CLI does,
    and at SIGTERM or SIGINT the rows sent per symbol, summed over the processes."""
    listener = socket.create_server((host, port), backlog=1024)
    inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(processes)]
    parent, children = os.getpid(), []
    for index in range(processes):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            die_with_parent(parent)
            os._exit(_run_shard(index, inboxes, listener, host, rate, idle_timeout, write_end))
        os.close(write_end)
        children.append((pid, read_end))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    port = listener.getsockname()[1]
    print(f"LISTENING ws://{host}:{port}/edge REST http://{host}:{port}", flush=True)
    while not stop.wait(0.2):
        pass
    counts = {}
    for pid, _read_end in children:  # all at once: each takes a while to count its rows
        os.kill(pid, signal.SIGTERM)
    for pid, read_end in children:
        with os.fdopen(read_end) as f:
            for symbol, by_type in json.loads(f.read() or "{}").items():
                for mt, n in by_type.items():
                    counts.setdefault(symbol, {}).setdefault(mt, 0)
                    counts[symbol][mt] += n
        os.waitpid(pid, 0)
    print(json.dumps(counts, sort_keys=True), flush=True)
    return 0


def _run_shard(index, inboxes, listener, host, rate, idle_timeout, counts_fd) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    shard = Shard(index, inboxes)
    simulator = MexcSimulator(host, listener.getsockname()[1], None, rate,
                              idle_timeout=idle_timeout, listener=listener,
                              hand_off=shard.hand_off)
    shard.simulator = simulator
    with simulator:
        threading.Thread(target=shard.adopt_forever, name="mexc-sim-adopt", daemon=True).start()
        while not stop.wait(0.2):
            pass
        counts = {symbol or "": c for symbol, c in simulator.sent_counts_by_symbol().items()}
    try:
        with os.fdopen(counts_fd, "w") as f:
            f.write(json.dumps(counts))
    except BrokenPipeError:  # the parent is gone (killed): no one to tell
        pass
    return 0

"""The ZeroMQ sockets of the bus, all ipc:// in paths.runtime_dir (mode 0700: other local
users cannot reach them).  Nothing listens on TCP.

The supervisor binds; children and `mexc status` connect.  Every receive path decodes with
bus.messages.decode and drops (with a log line) what does not decode.
"""
import logging
import math
import os
import time
from typing import Optional

import zmq

from bus import messages

log = logging.getLogger(__name__)

SOCKET_NAMES = ("control", "events", "reports")


class NotRunning(Exception):
    """No supervisor answered on the control socket."""


def endpoint(runtime_dir: str, name: str) -> str:
    return f"ipc://{os.path.join(runtime_dir, name + '.sock')}"


def prepare_runtime_dir(runtime_dir: str) -> None:
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    os.chmod(runtime_dir, 0o700)


class SupervisorBus:
    """control (REP), events (PUB), reports (PULL), bound in runtime_dir."""

    def __init__(self, runtime_dir: str):
        prepare_runtime_dir(runtime_dir)
        self.runtime_dir = runtime_dir
        self.context = zmq.Context()
        self.control = self._bind(zmq.REP, runtime_dir, "control")
        self.events = self._bind(zmq.PUB, runtime_dir, "events")
        self.reports = self._bind(zmq.PULL, runtime_dir, "reports")
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.reports, zmq.POLLIN)

    def _bind(self, kind: int, runtime_dir: str, name: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        path = os.path.join(runtime_dir, name + ".sock")
        if os.path.exists(path):
            os.unlink(path)  # left by a killed supervisor; the run lock says none is alive
        sock.bind(endpoint(runtime_dir, name))
        return sock

    def poll(self, timeout: float):
        """Wait up to `timeout` s; yield ("control" | "reports", message) for each arrival.

        A control request that does not decode is answered with an error reply at once (REP
        must answer every request before it can receive the next)."""
        for sock, _event in self.poller.poll(int(timeout * 1000)):
            while True:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    message = messages.decode(data)
                except messages.BadMessage as e:
                    log.warning("dropped a bad bus message: %s", e)
                    if sock is self.control:
                        self.reply({"id": None}, ok=False, error=f"bad request: {e}")
                    continue
                yield ("control" if sock is self.control else "reports"), message
                if sock is self.control:
                    break  # the caller replies before the next request can be read

    def reply(self, request: dict, ok: bool, **fields) -> None:
        self.control.send(messages.encode("reply", id=request.get("id"), ok=ok, **fields))

    def publish(self, kind: str, **fields) -> None:
        self.events.send(messages.encode(kind, **fields))

    def close(self) -> None:
        self.context.destroy(linger=0)
        for name in SOCKET_NAMES:  # so `mexc status` says at once that nobody is there
            try:
                os.unlink(os.path.join(self.runtime_dir, name + ".sock"))
            except FileNotFoundError:
                pass


class ChildBus:
    """A child's side: reports (PUSH) to the supervisor, events (SUB) from it.

    Create it in the child after the fork: ZeroMQ contexts do not survive fork()."""

    def __init__(self, runtime_dir: str):
        self.context = zmq.Context()
        self.reports = self.context.socket(zmq.PUSH)
        self.reports.setsockopt(zmq.LINGER, 0)
        self.reports.setsockopt(zmq.SNDHWM, 100)
        self.reports.connect(endpoint(runtime_dir, "reports"))
        self.events = self.context.socket(zmq.SUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.events.connect(endpoint(runtime_dir, "events"))

    def send(self, kind: str, **fields) -> None:
        """Never blocks: with the supervisor gone the report is dropped (it is only news)."""
        try:
            self.reports.send(messages.encode(kind, **fields), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def receive(self, timeout: float) -> Optional[dict]:
        """The next event within `timeout` s, or None.  The wait is rounded up to whole ms:
        rounded down, a caller waiting for a deadline would wake just before it and poll
        again with a zero timeout, a few times per wait."""
        if not self.events.poll(math.ceil(timeout * 1000)):
            return None
        data = self.events.recv()
        try:
            return messages.decode(data)
        except messages.BadMessage as e:
            log.warning("dropped a bad bus message: %s", e)
            return None

    def close(self) -> None:
        self.context.destroy(linger=0)


def request(runtime_dir: str, kind: str, timeout: float = 3.0, **fields) -> dict:
    """One control request -> its reply's fields; NotRunning when nobody answers in time."""
    address = endpoint(runtime_dir, "control")
    if os.path.isdir(runtime_dir) and not os.access(runtime_dir, os.X_OK):
        raise NotRunning(f"cannot open {runtime_dir}: permission denied; run as the user "
                         "mexc runs as, e.g. sudo -u mexc")
    if not os.path.exists(os.path.join(runtime_dir, "control.sock")):
        raise NotRunning(f"no answer on {address} (socket missing)")
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        request_id = f"{os.getpid()}-{time.monotonic_ns()}"
        sock.send(messages.encode(kind, id=request_id, **fields))
        if not sock.poll(int(timeout * 1000)):
            raise NotRunning(f"no answer on {address} within {timeout:.0f}s")
        reply = messages.decode(sock.recv())
        if reply["type"] != "reply" or reply["id"] != request_id:
            raise messages.BadMessage(f"unexpected answer: {reply}")
        return reply
    except zmq.ZMQError as e:
        raise NotRunning(f"no answer on {address}: {e}") from None
    finally:
        context.destroy(linger=0)

"""The fork server: collectors forked from a process that stays still, so they share its pages.

A forked child shares its parent's memory until either writes a page.  The supervisor never
stays still: between two paced collector starts (supervisor.start_rate) it decodes
heartbeats, answers status requests and serves the dashboard, and each page it writes then
stays with the collector forked just before, counted in that collector's private memory alone
(0.3 MiB each at 60 symbols, more at 200).  So the supervisor forks one fork server before the
first collector, and the server, idle but for reading requests, forks every collector of that
config: all of them share its pages, which nobody writes again.

A collector stays the supervisor's own child (it waits for it, signals it, reads its exit
code): the supervisor is a child subreaper (PR_SET_CHILD_SUBREAPER), the server forks a middle
process that forks the collector and exits, and the orphaned collector is handed to the
supervisor.  The server answers a request with the collector's pid once the middle process is
gone, so the supervisor waits for a child that is already its own.  Any other orphan below
the supervisor comes to it too: none of the programs it runs leaves one, but a background
process an alert command leaves would stay a zombie until the daemon stops.

Before serving, the server takes the free blocks of CPython's allocator and the free chunks
of C's malloc, which lie all over its heap: a collector's new objects then go to fresh pages
of its own instead of into shared ones, each first one copying a page (0.1 MiB each).
"""
import ctypes
import gc
import os
import pickle
import re
import select
import signal
import socket
import struct
import sys
import tempfile
import time

from core.process import die_with_parent, set_name
from supervisor.children import ChildProcess, Forked, run_child

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_LENGTH = struct.Struct("<I")
_PID = struct.Struct("<q")
ANSWER_TIMEOUT = 5.0  # s the supervisor waits for a pid (two forks: milliseconds)
STOP_TIMEOUT = 2.0  # s the server has to exit on SIGTERM before SIGKILL
REPARENT_TIMEOUT = 10.0  # s a new collector waits to become the supervisor's child


class ForkServerError(Exception):
    pass


def become_subreaper() -> None:
    """Orphaned descendants of this process (the fork server's collectors) become its
    children, so it waits for them as for any child."""
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class ForkServer:
    """Forks `target(*fixed, *args)` for each start(*args), as a child of this process (a
    subreaper: become_subreaper()); `fixed` is what the server holds from its own fork (a
    reloaded config needs a new server)."""

    def __init__(self, target, fixed: tuple):
        self.fixed = fixed
        ours, theirs = socket.socketpair()
        try:
            self.process = Forked(_serve, (theirs, ours, target, fixed, os.getpid()))
        finally:
            theirs.close()
        self.sock = ours

    def start(self, *args) -> ChildProcess:
        """Fork a child running target(*fixed, *args), once it is this process's child."""
        if not self.process.alive():
            raise ForkServerError(f"the fork server exited ({self.process.exit_description()})")
        request = pickle.dumps(args)
        self.sock.sendall(_LENGTH.pack(len(request)) + request)
        answer = _read(self.sock, _PID.size, ANSWER_TIMEOUT)
        if answer is None:  # out of step with us now: the next start makes a new one
            self.stop()
            raise ForkServerError("the fork server did not answer")
        pid, = _PID.unpack(answer)
        if pid < 0:
            raise ForkServerError(f"the fork server could not fork: {os.strerror(-pid)}")
        return ChildProcess(pid)

    def stop(self) -> None:
        """End the server (and wait for it); the children it forked run on."""
        self.sock.close()
        self.process.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.process.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.process.alive():  # stopped (SIGSTOP) or stuck in a fork
            self.process.signal(signal.SIGKILL)
            while self.process.alive():
                time.sleep(0.01)


def _read(sock: socket.socket, size: int, timeout=None):
    """`size` bytes, or None at the end of the stream (or after `timeout` s)."""
    data = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(data) < size:
        if deadline is not None and not select.select(
                [sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _serve(sock: socket.socket, other: socket.socket, target, fixed: tuple,
           supervisor_pid: int) -> None:
    """The fork server's life: a fork per request until the supervisor closes the socket."""
    other.close()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    die_with_parent(supervisor_pid)
    set_name("mexc-forkserver")
    try:  # held, never used again; a C library without mallinfo2 (not glibc 2.33+) shares less
        filler = _fill_free_blocks(), _fill_free_chunks()  # noqa: F841
    except (AttributeError, OSError):
        pass
    while True:
        header = _read(sock, _LENGTH.size)
        request = header and _read(sock, _LENGTH.unpack(header)[0])
        if request is None:
            os._exit(0)
        sock.sendall(_PID.pack(_fork_orphan(sock, target, (*fixed, *pickle.loads(request)),
                                            supervisor_pid)))


def _fill_free_blocks() -> list:
    """Objects filling the free blocks of the pools CPython's allocator has in use here, so a
    child's new small objects go to pools of their own instead of into these shared pages,
    each first one copying a page (the holes are spread over the whole heap)."""
    filler = []
    for _ in range(2):  # the first pass's own bookkeeping leaves a few holes
        for size, free in _free_blocks():
            if size == 32:  # a float
                filler.extend(i + 0.5 for i in range(free))
            elif size >= 48:  # a bytes object: 33 bytes and its length
                filler.extend(bytes(size - 33) for _ in range(free))
    return filler


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _fill_free_chunks() -> list:
    """The same for C's malloc (objects over 512 bytes, buffers): its free chunks, spread
    over the heap, are taken here, so a child's new chunks come from the top of the heap
    (its own pages) and not from inside pages it shares.  Returns the chunks' addresses."""
    _libc.mallinfo2.restype = _MallInfo
    _libc.malloc.restype = ctypes.c_void_p
    taken = [_libc.malloc(size) for size in range(16, 1040, 16) for _ in range(7)]  # tcache

    info = _libc.mallinfo2()
    budget = info.fordblks - info.keepcost  # free bytes inside: at most this much is taken
    for size in (65536, 16384, 4096, 1024, 256, 64, 16):
        while budget >= size and (info := _libc.mallinfo2()).fordblks > info.keepcost:
            chunk = _libc.malloc(size)
            if _libc.mallinfo2().keepcost < info.keepcost:  # from the top: none that size inside
                _libc.free(ctypes.c_void_p(chunk))
                break
            taken.append(chunk)
            budget -= size
    return taken


def _free_blocks() -> list:
    """(block size, free blocks in pools in use) per size class, from sys._debugmallocstats
    (it writes to the C stderr)."""
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile("w+") as out:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
            os.dup2(saved, 2)
            out.seek(0)
            text = out.read()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    rows = re.findall(r"^\s+\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)$", text, re.MULTILINE)
    return [(int(size), int(free)) for size, free in rows]


def _fork_orphan(sock: socket.socket, target, args: tuple, supervisor_pid: int) -> int:
    """Fork a middle process that forks the child and exits; the child's pid (-errno if a
    fork failed) once the middle one is gone and the child the supervisor's."""
    gc.freeze()  # the request's few objects too: the child's collections never walk them
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError as e:
        os.close(read_end)
        os.close(write_end)
        return -e.errno
    if middle == 0:
        os.close(read_end)
        try:
            pid = os.fork()
        except OSError as e:
            pid = -e.errno
        if pid == 0:
            os.close(write_end)
            sock.close()
            _run_orphan(target, args, supervisor_pid)
        os.write(write_end, _PID.pack(pid))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read(_PID.size)
    os.waitpid(middle, 0)
    return _PID.unpack(answer)[0] if len(answer) == _PID.size else -1


def _run_orphan(target, args: tuple, supervisor_pid: int) -> None:
    """In the child: once the middle process has exited, the supervisor is its parent
    (target's die_with_parent(supervisor_pid) checks that); then target, which never returns."""
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() != supervisor_pid and time.monotonic() < deadline:
        time.sleep(0.001)
    run_child(target, args)

"""Small process helpers every part needs once: die with the parent, stop on the signals a
foreground command gets, a process name, a free loopback port, a file replaced atomically."""
import ctypes
import functools
import json
import os
import signal
import socket
from typing import Optional

_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15
_libc = ctypes.CDLL(None, use_errno=True)
# Ctrl-C, `kill` or `timeout`, and the terminal closing: each ends a foreground command
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """SIGTERM this process when its parent dies, SIGKILL included.  With `parent_pid` (the
    parent's own pid, taken before the fork), a parent that died before this call ends this
    process at once."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def dies_with_this_process():
    """A Popen preexec_fn: the program started gets SIGTERM when this process dies, SIGKILL
    included (strictly, when the thread that started it ends: start it from the main thread)."""
    return functools.partial(die_with_parent, os.getpid())


def stop_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP end this foreground command as Ctrl-C does: the first stop signal
    raises KeyboardInterrupt in the main thread; later ones are ignored, so the stop it
    starts (stopping children, saying what was stored) runs to its end."""
    def interrupt(_signum, _frame):
        ignore_stop_signals()
        raise KeyboardInterrupt

    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)


def ignore_stop_signals() -> None:
    """This process is stopping already: another Ctrl-C (or SIGTERM, SIGHUP) changes nothing.
    A handler, not SIG_IGN: programs started later must not inherit deafness."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda _signum, _frame: None)


def set_name(name: str) -> None:
    """The name `ps -o comm` and `top` show (15 bytes at most)."""
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15].encode()))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json_atomic(path: str, data) -> None:
    """Replace `path` with `data` as JSON: readers see the old file or the new, whole, and
    the new one is on disk before the rename (a crash never leaves an empty file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

"""Small process helpers every part needs once: die with the parent, a process name, a free
loopback port, a file replaced atomically."""
import ctypes
import json
import os
import signal
import socket

_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (also usable as a Popen preexec_fn)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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

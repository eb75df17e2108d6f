"""A lock file that names its holder: an exclusive flock() on a file holding the pid.

Used for one `mexc run` per runtime dir (mexc.lock) and one collector per spool
({name}.spool.lock).  The lock lives as long as the open file: processes forked after
acquire() inherit it, so it is free only once all of them are gone.
"""
import fcntl
import os
import time

import psutil


class Held(Exception):
    """Another process holds the lock; `holder` is the pid it wrote ("?" if none)."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is locked by pid {holder}")
        self.path, self.holder = path, holder


def alive(pid) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.NoSuchProcess):
        return False
    except psutil.Error:  # e.g. access denied: it exists
        return True


def acquire(path: str, wait: float, on_wait=None, give_up=None):
    """Lock path and write our pid into it; returns the open file (keep it open).

    While another process holds it, wait up to `wait` s, calling on_wait(holder) once, unless
    give_up(holder) says waiting is pointless; then raise Held."""
    f = open(path, "a+")
    deadline, warned = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            if (give_up is not None and give_up(holder)) or time.monotonic() >= deadline:
                f.close()
                raise Held(path, holder) from None
            if on_wait is not None and not warned:
                on_wait(holder)
                warned = True
            time.sleep(0.1)
        else:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            return f

"""Loaded by every Python process started with this directory on PYTHONPATH: the cluster bed's
daemon whose clock libfaketime moves (tests/test_cluster_clock.py).

Debian bookworm's libfaketime (0.9.10) with FAKETIME_DONT_FAKE_MONOTONIC passes a negative
deadline to clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), which Python 3.11's time.sleep
calls: EINVAL (libfaketime issue 426, fixed after 0.9.10).  select() sleeps the same without
it, interrupted by signals and resumed as time.sleep is.
"""
import os
import select
import time

if os.environ.get("FAKETIME"):
    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        select.select([], [], [], seconds)

    time.sleep = _sleep

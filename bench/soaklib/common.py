"""What every part of the soak shares: the mexc command, the symbols, the daemon settings
that make faults show quickly, the Parquet file name pattern, say(), wait_for(), SoakError."""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time

from tests.conftest import wait_for as poll

# clickhouse-driver logs every refused connect with a traceback; outages are on purpose here
logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)

MEXC = os.path.join(os.path.dirname(sys.executable), "mexc")
# short name -> contract: the cluster soak collects them all, the one-host soak the first three
MARKETS = {"btc": "BTC_USDT", "eth": "ETH_USDT", "sol": "SOL_USDT", "xrp": "XRP_USDT",
           "doge": "DOGE_USDT", "ltc": "LTC_USDT"}
SYMBOLS = {name: MARKETS[name] for name in ("btc", "eth", "sol")}

# Daemon settings that make faults show quickly (seconds).
HEARTBEAT_TIMEOUT = 6.0  # supervisor.heartbeat_timeout: a SIGSTOP longer than this is a hang
DEAD_AFTER = 6.0  # exchange.dead_after: a stall longer than this makes collectors reconnect
PING_INTERVAL = 2.0
MAX_BUFFERED_ROWS = 5000  # small, so a ClickHouse outage spools rows to disk
EXPORT_DELAY = 60.0  # event seconds after each hour



def daemon_config(soak, names, url: str) -> dict:
    """The config both soaks give `mexc run`: these settings, soak's ch_section(),
    export_dir, state_dir, runtime_dir and event clock (speed, anchor)."""
    return {
        "symbols": [MARKETS[n] for n in names],
        "exchange": {"url": url, "ping_interval": PING_INTERVAL, "dead_after": DEAD_AFTER,
                     "silent_alarm": 10.0, "reconnect_min": 0.2, "reconnect_max": 2.0,
                     "connect_timeout": 5.0},
        "clickhouse": soak.ch_section(),
        "collector": {"max_buffered_rows": MAX_BUFFERED_ROWS, "stats_interval": 10.0},
        "supervisor": {"heartbeat_timeout": HEARTBEAT_TIMEOUT, "restart_min": 0.5,
                       "restart_max": 10.0, "rotation_ack_timeout": 3.0},
        "tor": {"enabled": False},
        "export": {"dir": soak.export_dir, "delay": EXPORT_DELAY, "clock_speed": soak.speed,
                   "clock_anchor_ms": soak.anchor},
        "paths": {"state_dir": soak.state_dir, "runtime_dir": soak.runtime_dir},
        "log": {"level": "info"},
    }


FILE_RE = re.compile(r"^([a-z0-9_]+)_(\d{8})_(\d{2})00\.parquet$")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """The tests' wait_for, failing with SoakError: the soak could not go on."""
    try:
        return poll(predicate, timeout, what, interval)
    except AssertionError as e:
        raise SoakError(str(e)) from None


def on_every_host(hosts, work) -> None:
    """work(host) for every host at once, each in a thread; returns when all are done."""
    threads = [threading.Thread(target=work, args=(host,), name=f"{work.__name__}-{host.name}")
               for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class SoakError(Exception):
    """The soak itself could not go on (not a finding about the data)."""

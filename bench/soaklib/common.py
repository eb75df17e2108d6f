"""What every part of the soak shares: the mexc command, the symbols, the daemon settings
that make faults show quickly, the Parquet file name pattern, say(), wait_for(), SoakError."""
from __future__ import annotations

import logging
import os
import re
import sys
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

FILE_RE = re.compile(r"^([a-z0-9_]+)_(\d{8})_(\d{2})00\.parquet$")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """The tests' wait_for, failing with SoakError: the soak could not go on."""
    try:
        return poll(predicate, timeout, what, interval)
    except AssertionError as e:
        raise SoakError(str(e)) from None


class SoakError(Exception):
    """The soak itself could not go on (not a finding about the data)."""

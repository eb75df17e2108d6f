"""The floor scaling_bench measures mexc against: a minimal collector, one process per symbol.

    python bench/reference_collector.py --url ws://127.0.0.1:PORT --port CH_PORT \
        --database DB SYM1 SYM2 ...

Each process connects, subscribes, and then only receives (websocket-client, a receive
timeout up to the next insert), parses (collector/wire.py, the same parser mexc uses) and
inserts what it has every INSERT_EVERY s into <database>.<name>_current (the Store, the same
driver mexc uses).  Nothing else: no pings, no reconnects, no spool, no bus, no stats, no
exactly-once bookkeeping.  Like mexc's supervisor, the parent imports everything, freezes the
garbage collector's view of it and forks the children, so what they share stays shared.  The
parent prints `READY` once every child has created its table and waits; SIGTERM ends them all.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time

import benchlib  # noqa: F401  (puts the repository root on sys.path)
import websocket

from collector import wire
from core.store import Store, current_table

INSERT_EVERY = 0.5  # s


def collect(url: str, symbol: str, ch: dict) -> None:
    """One symbol until SIGTERM: receive, parse, insert every INSERT_EVERY s."""
    store = Store(ch)
    table = current_table(symbol.split("_", 1)[0].lower())  # the default name rule of core/config.py
    store.create_database()
    store.create_rows_table(table)
    ws = websocket.create_connection(url, skip_utf8_validation=True, suppress_origin=True)
    for request in wire.subscribe_requests(symbol):
        ws.send(request)
    os.write(1, b"+")  # one byte per child: connected and its table exists
    rows, next_insert = [], time.monotonic() + INSERT_EVERY
    while True:
        ws.settimeout(max(0.001, next_insert - time.monotonic()))
        try:
            payload = ws.recv()
            rows.extend(wire.parse(payload, int(time.time() * 1000), symbol)[1])
        except websocket.WebSocketTimeoutException:
            pass
        if time.monotonic() >= next_insert:
            if rows:
                store.insert_rows(table, rows)
                rows = []
            next_insert += INSERT_EVERY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--port", type=int, required=True, help="ClickHouse native port")
    parser.add_argument("--database", required=True)
    parser.add_argument("symbols", nargs="+")
    args = parser.parse_args()
    ch = {"host": "127.0.0.1", "port": args.port, "database": args.database,
          "user": "default", "password": ""}
    gc.collect()
    gc.freeze()
    children = []
    for symbol in args.symbols:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            benchlib.die_with_parent()
            collect(args.url, symbol, ch)
            os._exit(0)
        children.append(pid)

    def stop(_signum, _frame):
        for child in children:
            os.kill(child, signal.SIGTERM)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())

"""Backfill of trades: after a gap, the trades MEXC still has that the WebSocket did not deliver.

fetch() asks the REST API for the latest REST_LIMIT trades as soon as the gap has closed,
along the WebSocket's own path (through its tor's SOCKS port when Tor is on, so the request
leaves by the same exit and IP separation holds).  fill() keeps the trades inside the gap
[start_ms, end_ms], takes away what ClickHouse already holds in that span (the rows at the
gap's edges share their ms with it) as a multiset on (t, p, v, T), and hands the rest to the
writer as ordinary deal rows.  Where the gap reaches into an hour already exported, that hour's
file counts as stored too, and a trade written there is merged into the file by the exporter
like any late row (an hour near the top of the clock is often exported before its gap closes).
Two identical prints in one ms are two trades: the multiset keeps both, or one when one is
stored already, never merges nor doubles them.

A gap is covered when the answer reached back past its start (its oldest trade is older) or
held fewer trades than asked for (that is all MEXC has); a longer gap is recorded as not
covered: its oldest trades are gone from the REST window.
"""
import collections
import logging
import threading
import time
from typing import List, Optional, Tuple

from collector import wire
from collector.connection import http_get
from core import archive
from core.channels import deal_without_id
from core.clock import HOUR_MS
from core.log import first_line

log = logging.getLogger(__name__)

REST_LIMIT = 100  # MEXC's largest page
RATE_REQUESTS, RATE_WINDOW = 20, 2.0  # MEXC's limit per IP
TRIES = 3


class RateBudget:
    """At most `requests` requests per `window` seconds; take() waits for a free slot."""

    def __init__(self, requests: int = RATE_REQUESTS, window: float = RATE_WINDOW):
        self.requests, self.window = requests, window
        self.sent = collections.deque()
        self.lock = threading.Lock()

    def take(self) -> None:
        with self.lock:
            while len(self.sent) >= self.requests:
                wait = self.sent[0] + self.window - time.monotonic()
                if wait <= 0:
                    self.sent.popleft()
                else:
                    time.sleep(wait)
            self.sent.append(time.monotonic())



def rest_body(url: str, ex: dict, socks_proxy, budget) -> bytes:
    """One REST GET within MEXC's rate limit (`budget`, shared by a collector's backfill and
    book snapshots), along the symbol's path; its body, or BadFrame for a status but 200."""
    budget.take()
    status, body = http_get(url, ex["connect_timeout"], ex["ca_file"], socks_proxy)
    if status != 200:
        raise wire.BadFrame(f"HTTP {status}: {body[:200]!r}")
    return body

class Backfill:
    """One collector's backfill: its symbol, its network path, its writer and rate budget."""

    def __init__(self, ex: dict, symbol, socks_proxy, writer, export_dir: str,
                 budget: Optional[RateBudget] = None):
        self.ex = ex
        self.export_dir = export_dir
        self.symbol, self.name = symbol.symbol, symbol.name
        self.socks_proxy = socks_proxy
        self.writer = writer
        self.budget = budget or RateBudget()
        self.url = ex["rest_url"].rstrip("/") + wire.recent_deals_path(symbol.symbol, REST_LIMIT)

    def fetch(self) -> Optional[List[tuple]]:
        """The latest trades as deal rows (newest first), or None when MEXC did not answer
        with them after TRIES tries (logged)."""
        for attempt in range(1, TRIES + 1):
            try:
                body = rest_body(self.url, self.ex, self.socks_proxy, self.budget)
                return wire.recent_deal_rows(body, int(time.time() * 1000))
            except Exception as e:
                log.warning("backfill request failed try=%d/%d url=%s: %s: %s", attempt, TRIES,
                            self.url, type(e).__name__, first_line(e))
        return None

    def fill(self, fetched: List[tuple], start_ms: int, end_ms: int, store) -> Tuple[int, bool]:
        """Store the fetched trades of [start_ms, end_ms] that are not stored yet;
        returns (trades stored, covered).

        What is stored is read from the tables first, then from the files of the hours already
        exported: a row moves from the tables to a file, never back, so it is seen at least
        once (twice at worst, which only stores less).  An exported hour whose file is not in
        export.dir (moved away) is left out, as its trades may be stored there: the gap is
        then not covered."""
        inside = sorted((r for r in fetched if start_ms <= r[0] <= end_ms), key=lambda r: r[0])
        # a trade is known by (ts, m without the trade id): the WebSocket's rows carry MEXC's
        # id, the REST answer's do not
        stored = _without_ids(store.deals_between(self.name, start_ms, end_ms))
        exported_until = store.exported_until(self.symbol)  # read after the rows
        left_out = []
        if inside and inside[0][0] < exported_until:  # only then is a file read (rare)
            filed, without_file = archive.filed_deals(self.export_dir, self.name, inside[0][0],
                                                      min(end_ms, exported_until - 1))
            stored.update(_without_ids(filed.elements()))
            left_out = [(hour, hour + HOUR_MS) for hour in without_file]
        missing, skipped = [], False
        for row in inside:
            if any(a <= row[0] < b for a, b in left_out):
                skipped = True
                continue
            key = (row[0], deal_without_id(row[2]))
            if stored[key]:
                stored[key] -= 1
            else:
                missing.append(row)
        if missing:
            self.writer.submit(missing)
        reached_back = len(fetched) < REST_LIMIT or min(r[0] for r in fetched) < start_ms
        return len(missing), reached_back and not skipped


def _without_ids(deals) -> collections.Counter:
    """(ts, m) deal rows -> a multiset of (ts, m without the trade id)."""
    return collections.Counter((ts, deal_without_id(m)) for ts, m in deals)

"""MEXC's REST API: recent trades (as the backfill uses them) and the whole book's depth
snapshot with its version, under one rate limit, with injectable failures and delays."""
import collections
import json
import re
import threading
import time
import urllib.parse
from typing import NamedTuple, Optional

DEALS_PATH = re.compile(r"/api/v1/contract/deals/([^/?#]+)")
DEPTH_PATH = re.compile(r"/api/v1/contract/depth/([^/?#]+)")
CONTRACTS_PATH = "/api/v1/contract/detail"
REST_LIMIT = 100  # trades per answer at most, and by default
REST_RATE = (20, 2.0)  # requests per seconds per IP, as MEXC allows
REST_FAULTS = ("error", "drop", "limit")
_HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
                 500: "Internal Server Error"}


class RestAnswer(NamedTuple):
    """A deals request the REST API answered with trades: how far back the answer reached, so a
    test can tell whether a gap was within reach of a backfill."""
    ip: str
    symbol: str
    limit: int
    count: int  # trades listed (fewer than limit: every trade the market made)
    oldest_t: Optional[int]  # None when count is 0
    newest_t: Optional[int]
    latest_ms: Optional[int]  # the symbol's latest event ms (any frame) when it was answered


def _rest_error(code: int, message: str) -> str:
    return json.dumps({"success": False, "code": code, "message": message})


class RestApi:
    """GET /api/v1/contract/deals/{symbol}?limit=N as MEXC answers it: the latest trades, newest
    first, at most 100; and GET /api/v1/contract/detail, the contract list.  20 requests per 2 s
    per client IP, then code 510 (MEXC's "too frequent"), with HTTP 429. Served on the
    WebSocket's port: a GET without Upgrade is a REST request."""

    def __init__(self, market, sequences, contract_exists, contracts):
        """market: Market (its trades), sequences: Sequences (each symbol's latest event ms),
        contract_exists(symbol) -> bool, contracts: Contracts (the list)."""
        self.market, self.sequences, self.contract_exists = market, sequences, contract_exists
        self.contracts = contracts
        self.lock = threading.Lock()
        self.served = collections.defaultdict(collections.deque)  # ip -> monotonic times
        self.requests = collections.Counter()  # ip -> requests received
        self.answers = []  # RestAnswer of every deals request answered with trades
        self.fault, self.fault_until = None, 0.0
        self.snapshot_delay = 0.0  # s each depth snapshot answer is held back (taken first)
        self.depth_answers = collections.Counter()  # symbol -> depth snapshots answered
        self.contract_requests = 0  # contract list requests received

    def fail(self, seconds: float, mode: str = "error") -> None:
        """error: HTTP 500; drop: no answer; limit: HTTP 429, code 510, as if rate-limited."""
        if mode not in REST_FAULTS:
            raise ValueError(f"mode must be one of {REST_FAULTS}")
        with self.lock:
            self.fault, self.fault_until = mode, time.monotonic() + seconds

    @staticmethod
    def symbol_of(request_line: str):
        """The symbol a deals or depth request names, else None."""
        path = request_line.partition(" ")[2].rpartition(" ")[0].partition("?")[0]
        match = DEALS_PATH.fullmatch(path) or DEPTH_PATH.fullmatch(path)
        return match.group(1) if match else None

    def answer(self, request_line: str, ip: str):
        """The HTTP response bytes, or None to drop the connection without one."""
        method, _, target = request_line.partition(" ")
        target = target.rpartition(" ")[0] or target
        path = target.partition("?")[0]
        with self.lock:
            self.requests[ip] += 1
            self.contract_requests += path == CONTRACTS_PATH
            if time.monotonic() < self.fault_until:
                if self.fault == "drop":
                    return None
                if self.fault == "limit":
                    return _http(429, _rest_error(510, "Requests are too frequent!"))
                return _http(500, _rest_error(500, "Internal Server Error"))
            match = DEALS_PATH.fullmatch(path)
            depth = DEPTH_PATH.fullmatch(path)
            if method != "GET" or (match is None and depth is None and path != CONTRACTS_PATH):
                return _http(404, _rest_error(404, "Not Found"))
            if not self._admit(ip):
                return _http(429, _rest_error(510, "Requests are too frequent!"))
            delay = self.snapshot_delay
        if depth is not None:
            return _http(200, self._depth(depth.group(1), target, delay))
        if match is None:
            return _http(200, self.contracts.answer())
        return _http(200, self._deals(match.group(1), _query_limit(target), ip))

    def _admit(self, ip: str) -> bool:
        """Within the rate limit: counts served requests in a sliding window."""
        allowed, window = REST_RATE
        now, served = time.monotonic(), self.served[ip]
        while served and served[0] <= now - window:
            served.popleft()
        if len(served) >= allowed:
            return False
        served.append(now)
        return True

    def _depth(self, symbol: str, target: str, delay: float) -> str:
        """The book now, every level unless the query has a limit; sent `delay` s later."""
        if not self.contract_exists(symbol):
            return _rest_error(1001, "Contract does not exist!")
        query = urllib.parse.parse_qs(target.partition("?")[2])
        limit = int(query["limit"][0]) if query.get("limit", [""])[0].isdigit() else None
        answer = self.market.book_snapshot(symbol, limit)
        with self.lock:
            self.depth_answers[symbol] += 1
        if delay > 0:
            time.sleep(delay)
        return answer

    def _deals(self, symbol: str, limit: int, ip: str) -> str:
        if not self.contract_exists(symbol):
            return _rest_error(1001, "Contract does not exist!")
        stamped = self.sequences.latest(symbol)  # before the trades: nothing missed
        latest = self.market.trades(symbol)[-limit:]
        times = [trade.t for trade in latest] or [None]
        with self.lock:
            self.answers.append(RestAnswer(ip, symbol, limit, len(latest), times[0], times[-1],
                                           stamped))
        data = ",".join(trade.rest_json() for trade in reversed(latest))
        return f'{{"success":true,"code":0,"data":[{data}]}}'


def _query_limit(target: str) -> int:
    """limit from the query string, clamped to 1..100; 100 when absent or not a number."""
    query = urllib.parse.parse_qs(target.partition("?")[2])
    try:
        return min(REST_LIMIT, max(1, int(query["limit"][0])))
    except (KeyError, ValueError):
        return REST_LIMIT


def _http(status: int, body: str) -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 {status} {_HTTP_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data

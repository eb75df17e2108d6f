"""Per host and symbol, how far behind the earliest host each host receives MEXC's trades
(docs/cluster.md "Which host sits closest to MEXC").

The same trade reaches every host that collects its symbol, with MEXC's trade id; each host
stores when it received it (rts, its own clock).  Over the last WINDOW_MS of trades, per
trade id seen by two hosts or more: each host's rts minus the earliest; a host's lag is the
median of those, in seconds.  The earliest host of most trades has a lag of 0.  Clocks that
differ add their offset to the figure (NTP keeps it to milliseconds).

Each host's recent trades are read from its own ClickHouse through remote() (core/store.py):
a few thousand (id, rts) pairs per host and symbol.  Every LAG_EVERY seconds at most
SYMBOLS_PER_ROUND symbols are measured, in turn, so 300 symbols cost what 20 do; each keeps
its last figure until its next turn.
"""
import statistics
import time
from typing import Dict, Optional


WINDOW_MS = 60_000
LAG_EVERY = 10.0  # seconds between measurements (the monitor's thread)
SYMBOLS_PER_ROUND = 20


def receive_lag(store, sources: Dict[str, Optional[str]], holders: Dict[str, list],
                previous: Optional[dict] = None, now_ms: Optional[int] = None) -> dict:
    """sources: {host: its ClickHouse for remote(), None for this host}; holders: {name:
    hosts whose copy of it is live}; previous: the last measurement (its symbols not measured
    in this round are kept).  Returns {"ts_ms", "window_s", "symbols": {name: {host:
    seconds}}, "unreachable": {host: why}, "last": the last symbol measured}: symbols held by
    fewer than two answering hosts, or without a trade two received, are left out."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    previous = previous or {}
    names = sorted(n for n, hosts in holders.items() if len(hosts) > 1)
    after = [n for n in names if n > previous.get("last", "")]
    turn = (after + [n for n in names if n not in after])[:SYMBOLS_PER_ROUND]
    since, unreachable = now_ms - WINDOW_MS, {}
    lags = {n: lag for n, lag in previous.get("symbols", {}).items()
            if n in names and n not in turn}
    for name in turn:
        hosts, receipts = holders[name], {}
        for host in sorted(h for h in hosts if h in sources and h not in unreachable):
            with store.asking(host, unreachable):  # a peer away: the others still compared
                receipts[host] = dict(store.recent_trade_receipts(name, since, sources[host]))
        lag = lags_behind_first(receipts)
        if lag:
            lags[name] = lag
    return {"ts_ms": now_ms, "window_s": WINDOW_MS / 1000, "symbols": lags,
            "unreachable": unreachable, "last": turn[-1] if turn else ""}


def lags_behind_first(receipts: Dict[str, Dict[str, int]]) -> Dict[str, float]:
    """{host: {trade id: rts ms}} -> {host: median seconds behind the earliest receipt of
    each trade that two hosts or more received}."""
    first: Dict[str, int] = {}
    seen: Dict[str, int] = {}
    for by_id in receipts.values():
        for trade, rts in by_id.items():
            first[trade] = min(rts, first.get(trade, rts))
            seen[trade] = seen.get(trade, 0) + 1
    lags = {}
    for host, by_id in receipts.items():
        behind = [rts - first[t] for t, rts in by_id.items() if seen[t] > 1]
        if behind:
            lags[host] = round(statistics.median(behind) / 1000, 3)
    return lags


def per_host(lag: dict) -> Dict[str, float]:
    """{host: the median over its symbols of its lag}: one figure per host for status lines
    and the dashboard."""
    values: Dict[str, list] = {}
    for by_host in (lag or {}).get("symbols", {}).values():
        for host, seconds in by_host.items():
            values.setdefault(host, []).append(seconds)
    return {host: round(statistics.median(v), 3) for host, v in sorted(values.items())}

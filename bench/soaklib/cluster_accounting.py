"""The cluster soak's counting and report.  Each host is counted as the one-host soak counts
its daemon (accounting.read_files, read_tables, account_symbol: what reached that host's
connections against what it stored, its windows and its gap ledger); then, per symbol, the
union of every host's rows against the market's truth:

* live: a trade or row made while at least one host was live for the symbol, i.e. outside
  that host's holes (its outage windows, including the time it did not hold the symbol, with
  their slack, and its ledger's gaps).  Missing from every host: a failure.  For rows that
  reached a host (depth, tickers, trades), "missing while live" is a row some host lost
  outside its windows and the extension the one-host soak allows before a window, and that
  no other host holds.
* dark: made inside every host's holes (no replica live).  Trades: never sent to anyone
  (missing before backfill), stored by some host's backfill, and left (missing after
  backfill); a trade left must lie inside some host's ledger gap, else a failure.
* cluster holes: the stretches inside every host's windows (no collector of the symbol
  connected anywhere), after the symbol's first stored row; each must overlap a ledger gap of
  some host, else a failure ("a cluster gap without a record").  A hole in which every trade
  the market made reached some host over its WebSocket, and no row sent in it was lost, was
  no hole in the data (the windows are the status sampler's estimate: a market stall holds
  frames and sends them later, and a host releasing a symbol reads on until the others have
  it): it is counted apart, and so are those of them no gap record overlaps.
* doubled: a row stored twice on one host, a failure (each host holds its own copy, so the
  same row on two hosts is the replica, not a double).

A host's own rows are its copies (export.dir/copies/) and its tables; the merged files in
export.dir are every host's rows and are counted apart (cluster_archive.py)."""
from __future__ import annotations

import collections
import dataclasses
import json
import time
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .accounting import (EVENT_SLACK, Stored, account_symbol, event_ms, read_files, read_tables,
                         window_spans)
from .cluster_archive import ArchiveFigures, account_archive, copies_dir
from .common import MARKETS, say
from .ledger import Spans
from .report import SymbolReport, table

FAILOVER_GOAL = 30.0  # s; the others take a lost host's symbols within this (issue 22)


@dataclass
class ClusterSymbol:
    name: str
    sent: int = 0  # data rows sent to at least one host
    stored: int = 0  # distinct data rows stored on at least one host
    doubled: int = 0  # rows stored twice on one host (summed over hosts)
    corrupt: int = 0
    missing_live: int = 0  # rows sent, stored nowhere, lost by a host that was live: FAIL
    missing_dark: Dict[str, int] = field(default_factory=dict)  # by mt: inside every hole
    trades: int = 0
    trades_live: int = 0
    trades_missing_live: int = 0  # FAIL
    trades_dark: int = 0
    dark_missing_before: int = 0  # never sent, or sent and stored nowhere
    dark_backfilled: int = 0  # never sent, stored by a backfill
    dark_left: int = 0  # missing after backfill
    dark_left_unrecorded: int = 0  # outside every ledger gap of every host: FAIL
    holes: int = 0  # cluster holes (no collector connected anywhere) needing a record
    hole_seconds: float = 0.0
    holes_without_record: int = 0  # FAIL
    hole_spans: List[tuple] = field(default_factory=list)  # event ms, for the merged archive
    holes_delivered: int = 0  # windows overlapping everywhere, yet every trade in them arrived
    # and no row sent in them was lost: no hole in the data, so no record is owed ...
    holes_delivered_unrecorded: int = 0  # ... and none was written (a stall, make before break)
    delivered_examples: List[str] = field(default_factory=list)
    hole_causes: Dict[str, int] = field(default_factory=dict)  # holes per cause of a window in it
    hole_examples: List[str] = field(default_factory=list)
    examples: List[str] = field(default_factory=list)


@dataclass
class ClusterReport:
    seed: int
    minutes: float
    rate: float
    hosts: int
    symbols: int
    replicas: int
    hour_seconds: float
    runtime_s: float = 0.0
    faults: Dict[str, int] = field(default_factory=dict)
    faults_skipped: List[str] = field(default_factory=list)
    failovers: List[dict] = field(default_factory=list)
    failover_median: Optional[float] = None
    failover_max: Optional[float] = None
    per_symbol: List[ClusterSymbol] = field(default_factory=list)
    per_host: Dict[str, List[SymbolReport]] = field(default_factory=dict)
    files: Dict[str, int] = field(default_factory=dict)
    bad_files: List[str] = field(default_factory=list)
    dead_letters_sent: int = 0
    dead_letters_stored: int = 0
    export_once_exits: Dict[str, Optional[int]] = field(default_factory=dict)
    stop_exits: Dict[str, Optional[int]] = field(default_factory=dict)
    stop_seconds: Dict[str, float] = field(default_factory=dict)
    peak_rss_mb: Dict[str, float] = field(default_factory=dict)
    unplanned: List[str] = field(default_factory=list)
    single_host: Optional[dict] = None  # bench/soak.py with the same seed (--single-host)
    archive: Optional[ArchiveFigures] = None  # the merged files (cluster_archive.py)
    tor: Optional[str] = None  # with --tor: the bed's Tor network and its containment
    failures: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def total(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.per_symbol)

    def judge(self) -> None:
        f = self.failures
        for s in self.per_symbol:
            for attr, what in (("doubled", "rows stored twice on one host"),
                               ("corrupt", "stored rows that differ from what was sent"),
                               ("missing_live", "rows missing while a replica was live"),
                               ("trades_missing_live", "trades missing while a replica was live"),
                               ("dark_left_unrecorded", "trades missing outside every gap "
                                                        "record"),
                               ("holes_without_record", "cluster gaps without a record")):
                if getattr(s, attr):
                    f.append(f"{s.name}: {getattr(s, attr)} {what}"
                             + (f" ({'; '.join(s.examples[:2] + s.hole_examples[:2])})"
                                if attr in ("missing_live", "holes_without_record",
                                            "dark_left_unrecorded") else ""))
        if self.bad_files:
            f.append(f"{len(self.bad_files)} corrupt or mis-houred files")
        for host, code in sorted(self.export_once_exits.items()):
            if code != 0:
                f.append(f"{host}: mexc export --once exit {code}")
        for host, code in sorted(self.stop_exits.items()):
            if code != 0:
                f.append(f"{host}: SIGTERM stop exit {code}")
        if self.archive is not None:
            f += self.archive.failures()
        undone = [x for x in self.failovers if x["seconds"] is None and not (
            x["back_first"] is not None and x["back_first"] <= FAILOVER_GOAL)]
        if undone:
            f.append(f"{len(undone)} failovers not done within 60 s, nor the host back within "
                     f"{FAILOVER_GOAL:.0f} s")

    def text(self) -> str:
        lines = [f"mexc cluster soak: seed {self.seed}, {self.minutes:g} min of faults, "
                 f"{self.hosts} hosts, {self.symbols} symbols, replicas {self.replicas}, "
                 f"{self.rate:g} frames/s per stream, an event hour every "
                 f"{self.hour_seconds:g} s; ran {self.runtime_s:.0f} s",
                 "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
                 + (f" ({len(self.faults_skipped)} skipped: {'; '.join(self.faults_skipped[:4])})"
                    if self.faults_skipped else "")]
        done = [x for x in self.failovers if x["seconds"] is not None]
        first = [x for x in self.failovers if x["seconds"] is None and x["back_first"] is not None]
        lines.append(f"failovers: {len(self.failovers)}, "
                     + (f"median {self.failover_median:.1f} s, max {self.failover_max:.1f} s ("
                        + ", ".join(f"{x['kind']} {x['victims']} {x['seconds']:.1f}s"
                                    for x in done) + ")" if done else "none measured")
                     + ("; the host back before the takeover: " + ", ".join(
                         f"{x['kind']} {x['victims']} back after {x['back_first']:.1f}s"
                         for x in first) if first else ""))
        survived = {k: self.faults.get(k, 0) for k in
                    ("zookeeper_outage", "clickhouse_outage", "kill_host", "cut_host",
                     "two_hosts_down")}
        lines.append("outages survived: " + ", ".join(f"{k} {v}" for k, v in survived.items()))
        header = ("symbol", "sent", "stored", "doubled", "missing live", "dark rows",
                  "trades", "dark", "never sent", "backfilled", "left", "unrecorded",
                  "holes", "hole s")
        rows = [header] + [
            (s.name, f"{s.sent:,}", f"{s.stored:,}", s.doubled, s.missing_live + s.trades_missing_live,
             sum(s.missing_dark.values()), f"{s.trades:,}", s.trades_dark, s.dark_missing_before,
             s.dark_backfilled, s.dark_left, s.dark_left_unrecorded + s.holes_without_record,
             s.holes, f"{s.hole_seconds:.1f}") for s in self.per_symbol]
        lines += table(rows)
        for s in self.per_symbol:
            for example in s.examples[:3] + s.hole_examples[:3]:
                lines.append(f"  {s.name}: {example}")
        lines += [
            f"doubled: {self.total('doubled')}",
            f"missing while a replica was live: {self.total('missing_live')} rows, "
            f"{self.total('trades_missing_live')} trades",
            f"trades: {self.total('trades'):,} made, {self.total('trades_dark'):,} while no "
            f"replica was live; missing before backfill: {self.total('dark_missing_before'):,}, "
            f"after: {self.total('dark_left'):,} "
            f"({self.total('dark_left_unrecorded')} outside every gap record)",
            "rows sent while no replica was live and stored nowhere, by type: " + (", ".join(
                f"{mt} {n}" for mt, n in sorted(sum((collections.Counter(s.missing_dark)
                                                     for s in self.per_symbol),
                                                    collections.Counter()).items())) or "none"),
            "cluster holes by the causes of the windows in them (a hole may have several): "
            + (", ".join(f"{k} {v}" for k, v in sorted(sum(
                (collections.Counter(s.hole_causes) for s in self.per_symbol),
                collections.Counter()).items())) or "none"),
            f"cluster holes: {self.total('holes')} ({sum(s.hole_seconds for s in self.per_symbol):.1f}"
            f" s), without a record: {self.total('holes_without_record')}; windows overlapping on "
            f"every host whose trades all arrived (no hole): {self.total('holes_delivered')}, "
            f"{self.total('holes_delivered_unrecorded')} of them without a record",
        ]
        for s in self.per_symbol:
            lines += [f"  {s.name}: {x}" for x in s.delivered_examples[:3]]
        for host, symbols in sorted(self.per_host.items()):
            lines.append(
                f"  {host}: {sum(s.stored for s in symbols):,} rows stored, "
                f"{sum(s.duplicates for s in symbols)} doubled, "
                f"{sum(s.lost_in_windows for s in symbols):,} lost inside its windows, "
                f"{sum(s.lost_outside for s in symbols)} outside them, "
                f"{sum(s.ledger.gaps for s in symbols)} gap records, "
                f"{sum(s.backfilled for s in symbols)} rows backfilled, "
                f"{self.files.get(host, 0)} copies")
        lines += [
            f"dead letters: {self.dead_letters_sent} sent, {self.dead_letters_stored} stored",
            "mexc export --once: " + ", ".join(f"{h} exit {c}" for h, c in
                                               sorted(self.export_once_exits.items())),
            "SIGTERM stop: " + ", ".join(f"{h} exit {c} in {self.stop_seconds.get(h, 0):.1f}s"
                                         for h, c in sorted(self.stop_exits.items())),
            "peak RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in sorted(self.peak_rss_mb.items())),
            f"unplanned reconnects and restarts: {len(self.unplanned)}"
            + (f" ({'; '.join(self.unplanned[:4])})" if self.unplanned else ""),
        ]
        if self.archive is not None:
            lines += self.archive.lines()
        if self.tor is not None:
            lines.append(self.tor)
        lines += [f"FAIL: {x}" for x in self.failures]
        lines.append(f"RESULT: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)

    def single_host_line(self) -> str:
        one = self.single_host
        return (f"side by side, seed {self.seed}: one host (bench/soak.py, "
                f"{one['minutes']:g} min, {one['rate']:g} frames/s) {one['trades']:,} trades, "
                f"missing before backfill {one['before']:,}, after {one['after']:,} "
                f"({'PASS' if one['passed'] else 'FAIL'}); the cluster {self.total('trades'):,} "
                f"trades, missing before backfill {self.total('dark_missing_before'):,}, after "
                f"{self.total('dark_left'):,}")


def to_json(report: ClusterReport) -> str:
    data = dataclasses.asdict(report)
    data["passed"] = report.passed
    return json.dumps(data, sort_keys=True)


def intersect(a: List[tuple], b: List[tuple]) -> List[tuple]:
    """The intersection of two sorted lists of merged (start, end) spans."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def merged(spans) -> List[tuple]:
    s = Spans(spans)
    return list(zip(s.starts, s.ends))


def account(soak) -> None:
    """Every host's files and tables read back, each host counted, then the union."""
    r = soak.report
    stored: Dict[str, Dict[str, Stored]] = {}
    for host in soak.hosts.values():
        say(f"reading {host.name}'s files and tables back")
        stored[host.name] = {name: Stored() for name in soak.names}
        # the host's own rows: its copies (export.dir holds the merged files, every host's)
        read_files(types.SimpleNamespace(export_dir=copies_dir(host), report=host.report),
                   stored[host.name])
        stop = soak.stop_sent.get(host.name)
        read_tables(host, stored[host.name], None if stop is None else int(stop * 1000))
        r.files[host.name] = host.report.files
        r.bad_files += [f"{host.name} {x}" for x in host.report.bad_files]
        r.per_host[host.name] = [account_symbol(host, name, stored[host.name][name])
                                 for name in soak.names]
    for name in soak.names:
        r.per_symbol.append(account_symbol_cluster(soak, name, stored))
    if r.archive is not None:
        say("reading the merged archive back")
        account_archive(soak, stored, {s.name: s.hole_spans for s in r.per_symbol}, r.archive)
    sent_dl = [m for _ts, mt, m in soak.sim.expected_rows() if mt == "dl"]
    r.dead_letters_sent = len(sent_dl)
    r.dead_letters_stored = sum(sum(s[n].dead.values()) for s in stored.values()
                                for n in soak.names)


def wall_of(soak, event_ms: int) -> str:
    wall = (soak.anchor + (event_ms - soak.anchor) / soak.speed) / 1000
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def hole_causes(soak, name: str, start: int, end: int) -> set:
    """The causes of every host's windows of the symbol that overlap a cluster hole."""
    causes = set()
    for host in soak.hosts.values():
        for w in host.windows:
            if w.symbol == name and event_ms(soak, w.start - EVENT_SLACK) <= end \
                    and start <= event_ms(soak, w.end + EVENT_SLACK):
                causes.update(w.causes)
    return causes


def account_symbol_cluster(soak, name: str, stored: Dict[str, Dict[str, Stored]]) -> ClusterSymbol:
    s = ClusterSymbol(name)
    hosts = list(soak.hosts.values())
    mine = {h.name: stored[h.name][name] for h in hosts}
    reports = {h.name: next(x for x in soak.report.per_host[h.name] if x.name == name)
               for h in hosts}
    windows = {h.name: merged(window_spans(h, name)) for h in hosts}
    ledgers = {h.name: h.ledger.get(name, []) for h in hosts}
    holes = {h.name: Spans(windows[h.name] + [(g.start_ms, g.end_ms) for g in ledgers[h.name]])
             for h in hosts}
    recorded = Spans((g.start_ms, g.end_ms) for gaps in ledgers.values() for g in gaps)
    lost_live = set().union(*(set(reports[h].lost_outside_ts) for h in mine))

    def live(t: int) -> bool:
        return any(t not in holes[h] for h in mine)

    rows = [row for row in soak.sim.expected_rows(MARKETS[name]) if row[0] is not None]
    content = {ts: hash((mt, m)) for ts, mt, m in rows}
    # a sent trade lost live and backfilled from REST is stored without its trade id
    rest_form = {t.t: hash(t.rest_row[1:]) for t in soak.sim.trades(MARKETS[name])}
    s.sent = len(rows)
    union = collections.Counter()
    for st in mine.values():
        for ts, n in st.count.items():
            union[ts] += 1
            s.doubled += n - 1
            if ts in content and st.content[ts] not in (content[ts], rest_form.get(ts)):
                s.corrupt += 1
    s.stored = len(union)
    dark = collections.Counter()
    for ts, mt, _m in rows:
        if union[ts]:
            continue
        if ts in lost_live:
            s.missing_live += 1
            if len(s.examples) < 3:
                s.examples.append(f"{mt} ts={ts} ({wall_of(soak, ts)}) lost by " + ", ".join(
                    h for h in mine if ts in set(reports[h].lost_outside_ts)) +
                    ", stored nowhere")
        else:
            dark[mt] += 1
    s.missing_dark = dict(dark)
    # the symbol's first row stored anywhere: before it the market had opened (a first
    # subscription) but no host had the symbol yet, which no gap record can say
    first = min((min(st.count) for st in mine.values() if st.count), default=None)
    trades = soak.sim.trades(MARKETS[name])
    # likewise for trades, from the first trade stored anywhere: the deal channel's first push
    # can come after the ticker's (seed 5: two eth trades made between them, "outside every
    # gap record")
    first_trade = min((t.t for t in trades if any(st.count[t.t] for st in mine.values())),
                      default=None)
    traded = {t.t: hash(t.row[1:]) for t in trades}
    stream_end = max((ts for ts, mt, _m in rows if mt == "d"), default=None)
    delivered = set()  # trades that reached some host over its WebSocket
    for trade in trades:
        if stream_end is None or trade.t > stream_end:
            continue
        s.trades += 1
        is_stored = any(st.count[trade.t] and st.content.get(trade.t)
                        in (traded[trade.t], rest_form[trade.t]) for st in mine.values())
        if trade.t in content and any(st.count[trade.t] and st.content.get(trade.t)
                                      == traded[trade.t] for st in mine.values()):
            delivered.add(trade.t)
        if live(trade.t):
            s.trades_live += 1
            s.trades_missing_live += not is_stored
            continue
        s.trades_dark += 1
        was_sent = trade.t in content
        s.dark_missing_before += not was_sent or not is_stored
        s.dark_backfilled += is_stored and not was_sent
        if not is_stored:
            s.dark_left += 1
            if trade.t not in recorded and first_trade is not None and trade.t > first_trade:
                s.dark_left_unrecorded += 1
                if len(s.examples) < 3:
                    s.examples.append(f"trade t={trade.t} ({wall_of(soak, trade.t)}) left "
                                      "outside every gap record")
    common = None
    for h in hosts:
        common = windows[h.name] if common is None else intersect(common, windows[h.name])
    for a, b in common or []:
        if first is None or first >= a:
            continue  # the start: nothing stored before, nothing to record
        inside = [t.t for t in trades if a <= t.t <= b]
        recorded_here = any(g.start_ms <= b and a <= g.end_ms
                            for gaps in ledgers.values() for g in gaps)
        if inside and all(t in delivered for t in inside) and not any(
                a <= ts <= b and not union[ts] for ts, _mt, _m in rows):
            s.holes_delivered += 1
            if not recorded_here:  # what issue 23's flaky "hole without a record" was
                s.holes_delivered_unrecorded += 1
                s.delivered_examples.append(
                    f"windows from {wall_of(soak, a)} ({(b - a) / soak.speed / 1000:.1f}s; "
                    f"{', '.join(sorted(hole_causes(soak, name, a, b)))}) on every host, no "
                    f"record, yet all {len(inside)} trades in it arrived over a WebSocket")
            continue
        s.holes += 1
        s.hole_spans.append((a, b))
        s.hole_seconds += (b - a) / soak.speed / 1000
        for cause in hole_causes(soak, name, a, b):
            s.hole_causes[cause] = s.hole_causes.get(cause, 0) + 1
        if not recorded_here:
            s.holes_without_record += 1
            if len(s.hole_examples) < 3:
                s.hole_examples.append(f"hole from {wall_of(soak, a)} "
                                       f"({(b - a) / soak.speed / 1000:.1f}s) without a record")
    return s

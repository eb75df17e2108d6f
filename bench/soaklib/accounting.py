"""Counting: every Parquet file and table read back (Stored), then per symbol the rows sent
against the rows stored, lost rows inside and outside the outage windows, and the dead letters
(see "What counts as loss" in bench/soak.py)."""
from __future__ import annotations

import bisect
import calendar
import collections
import os
import re
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from core.clock import HOUR_MS
from core.store import Store
from core.vocabulary import DEAL, GAP_DEAD_SOCKET, GAP_DISCONNECT, GAP_STALL

from .common import DEAD_AFTER, FILE_RE, HEARTBEAT_TIMEOUT, MARKETS, PING_INTERVAL, say
from .ledger import NO_FAULT, count_trades, ledger_figures
from .schedule import CONNECTION_FAULTS
from .windows import Window
from .report import LONG_WINDOW, SymbolReport

EVENT_SLACK = 0.5  # wall s on each side of a window when mapped to event time
# wall s of rows a SIGKILL may cost (README: collector.latency_target, 1 s, plus the insert in
# flight and the scheduling of a loaded machine)
KILL_ALLOWANCE = 2.5
FAULT_SLACK = 2.0  # wall s on each side of a fault within which a gap counts as its doing


class Stored:
    """One symbol's stored rows: data rows by ts (count, content hash), dead letters by text."""

    def __init__(self):
        self.count = collections.Counter()  # ts -> times stored
        self.content: Dict[int, int] = {}  # ts -> hash((mt, m)) of the first copy
        self.dead = collections.Counter()  # m -> times stored
        self.at_stop = set()  # ts of rows in a table received after the stop was asked for

    def add(self, ts: int, mt: str, m: str) -> None:
        if mt == "dl":
            self.dead[m] += 1
            return
        self.count[ts] += 1
        self.content.setdefault(ts, hash((mt, m)))


def read_files(soak, stored: Dict[str, Stored]) -> None:
    """Every Parquet file: readable, mt never null, every ts inside the file's hour."""
    r = soak.report
    for filename in sorted(os.listdir(soak.export_dir)):
        match = FILE_RE.match(filename)
        if match is None:
            if filename.endswith(".tmp"):
                r.temp_files_left += 1
                r.temp_file_names.append(filename)
            continue
        name, day, hour = match.groups()
        hour_ms = calendar.timegm(time.strptime(day + hour, "%Y%m%d%H")) * 1000
        try:
            table = pq.read_table(os.path.join(soak.export_dir, filename),
                                  columns=["ts", "mt", "m"])
            if table.column("mt").null_count:
                raise ValueError(f"{table.column('mt').null_count} null mt")
            ts = table.column("ts").cast(pa.int64()).to_pylist()
            mts, ms = table.column("mt").to_pylist(), table.column("m").to_pylist()
        except Exception as e:
            r.bad_files.append(f"{filename}: {type(e).__name__}: {str(e)[:120]}")
            continue
        outside = sum(1 for t in ts if not hour_ms <= t < hour_ms + HOUR_MS)
        if outside:
            r.bad_files.append(f"{filename}: {outside} rows outside its hour")
        if name not in stored:
            r.bad_files.append(f"{filename}: unknown symbol")
            continue
        r.files += 1
        r.file_rows += len(ts)
        add = stored[name].add
        for t, mt, m in zip(ts, mts, ms):
            add(t, mt, m)


def read_tables(soak, stored: Dict[str, Stored], stop_ms: Optional[int] = None) -> None:
    """stop_ms: when the daemon was asked to stop; rows received later (a gap open then is
    recorded and backfilled at the stop) are noted in Stored.at_stop: in the tables, exported
    at the next start."""
    store = Store(soak.ch_section(), timeout=60.0)
    try:
        for name in soak.names:
            for table in (f"{name}_current", f"{name}_previous", f"{name}_fresh"):
                if not store.exists(table):
                    continue
                add, n = stored[name].add, 0
                for ts, mt, m, rts in store.rows(table):
                    add(ts, mt, m)
                    if stop_ms is not None and rts >= stop_ms:
                        stored[name].at_stop.add(ts)
                    n += 1
                if table.endswith("_fresh"):
                    soak.report.fresh_rows += n
            soak.ledger[name] = store.gaps(name)
    finally:
        store.close()


def event_ms(soak, wall_s: float) -> int:
    return int(soak.anchor + (wall_s * 1000 - soak.anchor) * soak.speed)


def fault_kinds(soak, name: str, gaps) -> List[str]:
    """Per ledger gap, the kinds of the connection faults injected while it was open (those
    aimed at the symbol or at every one, as for the windows: a ClickHouse outage or a stopped
    exporter opens no gap), joined by '+'; NO_FAULT when none was."""
    spans = [(e.kind, event_ms(soak, e.wall - FAULT_SLACK),
              event_ms(soak, e.wall + e.duration + FAULT_SLACK
                       + (HEARTBEAT_TIMEOUT if e.kind == "stop_collector" else 0.0)))
             for e in soak.events
             if e.kind in CONNECTION_FAULTS and (CONNECTION_FAULTS[e.kind] or e.target == name)]
    return ["+".join(sorted({kind for kind, a, b in spans if a <= g.end_ms and g.start_ms <= b}))
            or NO_FAULT for g in gaps]


def window_spans(soak, name: str) -> List[Tuple[int, int]]:
    """Each of the symbol's outage windows in event ms, with slack, in order."""
    return sorted((event_ms(soak, w.start - EVENT_SLACK), event_ms(soak, w.end + EVENT_SLACK))
                  for w in soak.windows if w.symbol == name)


def describe_span(soak, span: Tuple[int, int]) -> str:
    start = soak.anchor + (span[0] - soak.anchor) / soak.speed
    return (f"{time.strftime('%H:%M:%S', time.localtime(start / 1000))} for "
            f"{(span[1] - span[0]) / soak.speed / 1000:.1f}s (event ms {span[0]}..{span[1]})")


def merged_windows(soak, name: str) -> List[Tuple[int, int, List[Window]]]:
    """The symbol's outage windows in event ms, with slack, overlapping ones merged:
    (start, end, the windows merged)."""
    windows = sorted((w for w in soak.windows if w.symbol == name), key=lambda w: w.start)
    merged: List[list] = []
    for w in windows:
        a, b = event_ms(soak, w.start - EVENT_SLACK), event_ms(soak, w.end + EVENT_SLACK)
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
            merged[-1][2].append(w)
        else:
            merged.append([a, b, [w]])
    return [(a, b, ws) for a, b, ws in merged]


def gap_seconds(ts: List[int], indices: List[int], speed: float) -> float:
    """Wall seconds spanned by lost rows: per run of consecutive lost rows (send order), from
    its first row's time to its last's, summed."""
    total, run_start = 0.0, 0
    for j in range(1, len(indices) + 1):
        if j == len(indices) or indices[j] != indices[j - 1] + 1:
            run = ts[run_start:j]
            total += (max(run) - min(run)) / speed / 1000
            run_start = j
    return total


def describe_outage(windows: List[Window], lost: int, gap: float, extension_s: float) -> str:
    start, end = windows[0].start, max(w.end for w in windows)
    causes = sorted({c for w in windows for c in w.causes}) or ["unplanned"]
    return (f"{time.strftime('%H:%M:%S', time.localtime(start))} for {end - start:.1f}s "
            f"({', '.join(causes)}): {lost:,} rows lost, {gap:.1f} gap seconds"
            + (f", reaching {extension_s:.1f}s before the window" if extension_s else ""))


class RecordedBefore(NamedTuple):
    """What the gap ledger says of the time just before an outage window (event ms)."""
    gaps: List  # the symbol's ledger gaps that reach into the window from before it
    silent_from: float  # a dead socket's silence began here (inf: none recorded)
    stepping_limit: int  # backfilled deals are stepped over back to here, no further

    def backfilled(self, ts: int) -> bool:
        """A deal stored inside a recorded gap came from REST, not live: the collector that
        lost the rows around it never stored it, so it does not end their run."""
        return ts >= self.stepping_limit and any(g.start_ms < ts <= g.end_ms for g in self.gaps)


def recorded_before(gaps, span: Tuple[int, int], speed: float) -> RecordedBefore:
    """The ledger's gaps that start before the window and end inside it.  A dead socket is
    found DEAD_AFTER (plus a ping) after its last frame, so its recorded silence before the
    window is explained, back to the gap's start, but never more than that; backfilled deals
    are stepped over for at most a SIGKILL's allowance (KILL_ALLOWANCE), so a real loss of
    seconds before a kill (issue 28) still counts."""
    start, end = span
    reaching = [g for g in gaps if g.start_ms < start <= g.end_ms <= end]
    silences = [g.start_ms for g in reaching if g.reason == "dead_socket"]
    silent_from = max([min(silences), start - (DEAD_AFTER + PING_INTERVAL + 1.0) * 1000 * speed],
                      default=float("inf")) if silences else float("inf")
    return RecordedBefore(reaching, silent_from, int(start - KILL_ALLOWANCE * 1000 * speed))


def account_symbol(soak, name: str, stored: Stored) -> SymbolReport:
    report = SymbolReport(name)
    rows = [row for row in soak.sim.expected_rows(MARKETS[name]) if row[0] is not None]
    spans = merged_windows(soak, name)
    starts = [a for a, _b, _ws in spans]

    def window_of(ts: int) -> Optional[int]:
        i = bisect.bisect_right(starts, ts) - 1
        return i if i >= 0 and ts <= spans[i][1] else None

    report.sent = len(rows)
    report.windows = sum(1 for w in soak.windows if w.symbol == name)
    windows = [w for w in soak.windows if w.symbol == name]
    report.window_seconds = sum(w.end - w.start for w in windows)
    report.long_windows = sum(1 for w in windows if w.end - w.start > LONG_WINDOW)
    if windows:
        w = max(windows, key=lambda w: w.end - w.start)
        report.longest_window = (f"{w.end - w.start:.1f}s from "
                                 f"{time.strftime('%H:%M:%S', time.localtime(w.start))} "
                                 f"({', '.join(w.causes) or 'unplanned'})")
    sent_content = {}
    missing = []
    for ts, mt, m in rows:
        sent_content[ts] = hash((mt, m))
        missing.append(stored.count[ts] == 0)
    trades = soak.sim.trades(MARKETS[name])
    traded = {trade.t: hash(trade.rest_row[1:]) for trade in trades}  # REST: no id
    for ts, times in stored.count.items():
        report.stored += 1
        report.duplicates += times - 1
        expected = sent_content.get(ts)
        if expected is None and traded.get(ts) == stored.content[ts]:
            report.backfilled += 1  # a trade the market made, never sent: from REST
        elif expected is None:
            if window_of(ts) is None:
                report.unrecorded_outside += 1
            else:
                report.unrecorded_in_windows += 1
        elif expected != stored.content[ts] and traded.get(ts) != stored.content[ts]:
            report.corrupt += 1  # (a sent trade lost live and backfilled has no trade id)
    # lost rows: in a window, or in the contiguous run of lost rows just before one
    explained = [False] * len(rows)
    lost_by_window = collections.defaultdict(list)  # window index -> its lost rows' indices
    extension = collections.defaultdict(float)  # window index -> s its run reached back
    first_index = {}  # window index -> first send index inside it
    for i, (ts, _mt, _m) in enumerate(rows):
        w = window_of(ts)
        if w is None:
            continue
        first_index.setdefault(w, i)
        if missing[i]:
            explained[i] = True
            lost_by_window[w].append(i)
    gaps = soak.ledger.get(name, [])
    for w, i in first_index.items():
        k, start = i - 1, spans[w][0]
        recorded = recorded_before(gaps, spans[w][:2], soak.speed)
        while k >= 0 and not explained[k] and (missing[k] or rows[k][1] == DEAL
                                               and recorded.backfilled(rows[k][0])):
            if missing[k]:
                explained[k] = True
                lost_by_window[w].append(k)
                extension[w] = max(extension[w], (start - rows[k][0]) / soak.speed / 1000)
            k -= 1
        for k in range(i - 1, -1, -1):  # a silence the ledger recorded, found only after it
            if rows[k][0] < recorded.silent_from:
                break
            if missing[k] and not explained[k]:
                explained[k] = True
                lost_by_window[w].append(k)
                extension[w] = max(extension[w], (start - rows[k][0]) / soak.speed / 1000)
    # Rows the simulator sent on a connection its collector had already left (a newer one for
    # the symbol had subscribed): the killed tor's exit stream, say, still open at the exit
    # relay and accepting sendall() into kernel buffers.  They can outlive the outage window,
    # which closes once the collector is connected again; no collector could have read them.
    orphaned = soak.sim.orphaned_rows(MARKETS[name])
    for i, row in enumerate(rows):
        if missing[i] and not explained[i] and row in orphaned:
            explained[i] = True
            report.lost_orphaned += 1
    for w, lost in sorted(lost_by_window.items()):
        gap = gap_seconds([rows[i][0] for i in sorted(lost)], sorted(lost), soak.speed)
        report.lost_in_windows += len(lost)
        report.gap_seconds += gap
        report.max_extension_s = max(report.max_extension_s, extension[w])
        report.outages.append(describe_outage(spans[w][2], len(lost), gap, extension[w]))
    # A silence the collector judged and recorded (dead_socket, stall), or the old connection
    # of a handover lost before the new one brought data (disconnect), while make before
    # break kept it connected: no sampler window, but the ledger's record says what was lost.
    silences = [(g.start_ms, g.end_ms) for g in gaps
                if g.reason in (GAP_DEAD_SOCKET, GAP_STALL, GAP_DISCONNECT)]
    for i, (ts, _mt, _m) in enumerate(rows):
        if missing[i] and not explained[i] and any(a < ts <= b for a, b in silences):
            explained[i] = True
            report.lost_in_windows += 1
            report.lost_in_recorded_silences += 1
    outside = [i for i in range(len(rows)) if missing[i] and not explained[i]]
    report.lost_outside = len(outside)
    report.lost_outside_ts = [rows[i][0] for i in outside]
    run_start = 0  # describe the first runs of consecutive rows lost outside windows
    for j in range(1, len(outside) + 1):
        if j < len(outside) and outside[j] == outside[j - 1] + 1:
            continue
        if len(report.examples) < 5:
            first, last = outside[run_start], outside[j - 1]
            wall = (soak.anchor + (rows[first][0] - soak.anchor) / soak.speed) / 1000
            report.examples.append(
                f"{last - first + 1:,} rows from #{first} of {len(rows):,} (ts={rows[first][0]}, "
                f"sent about {time.strftime('%H:%M:%S', time.localtime(wall))}"
                f".{int(wall * 1000) % 1000:03d})")
        run_start = j
    spans, gaps = window_spans(soak, name), soak.ledger.get(name, [])
    answers = soak.sim.rest_answers(MARKETS[name])
    report.ledger = ledger_figures(spans, gaps, answers, min(stored.count, default=None),
                                   lambda span: describe_span(soak, span), soak.speed,
                                   fault_kinds(soak, name, gaps))
    count_trades(report.ledger, spans, gaps, answers, trades, sent=sent_content.__contains__,
                 stored=lambda trade: stored.count[trade.t] > 0
                 and stored.content[trade.t] in (traded[trade.t], hash(trade.row[1:])))
    report.dead_letters_injected = sum(1 for _w, n, _k in soak.injections if n == name)
    report.dead_letters_stored = sum(stored.dead.values())
    return report


def account_dead_letters(soak, stored: Dict[str, Stored]) -> None:
    """Dead letters have no event time: compare the multisets of texts over all symbols."""
    r = soak.report
    expected = collections.Counter(m for ts, mt, m in soak.sim.expected_rows() if mt == "dl")
    got = collections.Counter()
    for s in stored.values():
        got.update(s.dead)
    binary_expected = expected.pop(None, 0)
    binary_got = sum(n for m, n in got.items() if m.startswith("binary:"))
    got = collections.Counter({m: n for m, n in got.items() if not m.startswith("binary:")})
    r.dead_letters_sent = sum(expected.values()) + binary_expected
    r.dead_letters_stored = sum(got.values()) + binary_got
    r.dead_letters_missing = (sum((expected - got).values())
                              + max(0, binary_expected - binary_got))
    r.dead_letters_extra = sum((got - expected).values()) + max(0, binary_got - binary_expected)
    windows = collections.defaultdict(list)
    for w in soak.windows:
        windows[w.symbol].append((w.start - 1.0, w.end + 1.0))
    r.dead_letters_missing_allowed = sum(
        1 for wall, name, _kind in soak.injections
        if any(a <= wall <= b for a, b in windows[name]))


def account(soak) -> None:
    say("reading every file and table back")
    stored = {name: Stored() for name in soak.names}
    read_files(soak, stored)
    read_tables(soak, stored)
    soak.report.symbols = [account_symbol(soak, name, stored[name]) for name in soak.names]
    account_dead_letters(soak, stored)
    excuse_missing_hours(soak, stored)


MISSING_HOUR = re.compile(r"^❌ ([a-z0-9_]+): hour ([a-z0-9_]+_\d{8}_\d{2}00\.parquet) missing$")


def excuse_missing_hours(soak, stored: Dict[str, Stored]) -> None:
    """`mexc verify` calls an hour missing between a symbol's first and last file.  With an event
    hour every few seconds an outage can span a whole hour; the failure is excused when every
    problem it names is such an hour, with no row of that symbol stored."""
    r = soak.report
    if not r.verify_exit:
        return
    problems = [line for line in r.verify_output.splitlines()
                if line.startswith("❌") and "some checks failed" not in line]
    excused = []
    for line in problems:
        match = MISSING_HOUR.match(line)
        if match is None or match.group(1) not in stored:
            return
        name, filename = match.groups()
        day, hour = FILE_RE.match(filename).group(2, 3)
        start = calendar.timegm(time.strptime(day + hour, "%Y%m%d%H")) * 1000
        if any(start <= ts < start + HOUR_MS for ts in stored[name].count):
            return
        excused.append(filename)
    r.verify_excused = excused

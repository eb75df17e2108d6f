"""The soak's findings: per symbol (SymbolReport) and for the whole run (Report), the verdict
(Report.judge), and the report as text and as JSON."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .ledger import ReasonFigures, TradeFigures

# s; no single fault keeps a collector away this long, so such a window is reported (not failed:
# a slow tor bootstrap on the small test network is one cause) and the work dir is kept
LONG_WINDOW = 60.0


@dataclass
class SymbolReport:
    name: str
    sent: int = 0  # data rows the simulator sent
    stored: int = 0  # distinct data rows stored (files + tables)
    duplicates: int = 0
    corrupt: int = 0
    unrecorded_in_windows: int = 0
    unrecorded_outside: int = 0
    lost_in_windows: int = 0
    lost_in_recorded_silences: int = 0  # of those: in a dead_socket/stall/disconnect record
    lost_outside: int = 0
    lost_outside_ts: List[int] = field(default_factory=list)  # their ts (a cluster's hosts
    #                                   compare them: a row one host lost, another may hold)
    # sent on a connection after a newer one for the symbol had subscribed: nobody reads them
    lost_orphaned: int = 0
    gap_seconds: float = 0.0
    windows: int = 0
    window_seconds: float = 0.0
    max_extension_s: float = 0.0
    longest_window: str = ""  # its length, start and causes
    long_windows: int = 0  # windows over LONG_WINDOW s: a recovery this slow is worth a look
    dead_letters_injected: int = 0
    dead_letters_stored: int = 0
    backfilled: int = 0  # stored trades the market made and no WebSocket sent: from REST
    ledger: TradeFigures = field(default_factory=TradeFigures)  # gaps and trades, see ledger.py
    examples: List[str] = field(default_factory=list)  # first runs lost outside windows
    outages: List[str] = field(default_factory=list)  # the windows that cost rows


@dataclass
class Report:
    seed: int
    minutes: float
    rate: float
    hour_seconds: float
    tor: bool
    clickhouse: str
    disk_full_method: str = ""
    runtime_s: float = 0.0
    faults: Dict[str, int] = field(default_factory=dict)
    faults_skipped: List[str] = field(default_factory=list)
    symbols: List[SymbolReport] = field(default_factory=list)
    dead_letters_sent: int = 0
    dead_letters_stored: int = 0
    dead_letters_missing: int = 0
    dead_letters_missing_allowed: int = 0
    dead_letters_extra: int = 0
    files: int = 0
    file_rows: int = 0
    bad_files: List[str] = field(default_factory=list)
    temp_files_left: int = 0
    temp_file_names: List[str] = field(default_factory=list)
    fresh_rows: int = 0
    export_once_exit: Optional[int] = None
    export_once_attempts: int = 0
    verify_exit: Optional[int] = None
    # verify failed only by "hour ... missing" for hours of which no row of that symbol was
    # stored (outages of 10 s are whole event hours here): a true gap, not a bad export
    verify_excused: List[str] = field(default_factory=list)
    verify_attempts: int = 0
    verify_output: str = ""
    rotations: int = 0
    restarts: Dict[str, int] = field(default_factory=dict)
    peak_rss_mb: Dict[str, float] = field(default_factory=dict)
    unplanned: List[str] = field(default_factory=list)
    crashes: List[str] = field(default_factory=list)
    supervisor_restart_refusals: int = 0
    healthy: bool = False
    health_notes: List[str] = field(default_factory=list)
    flapping_lines: int = 0
    tracebacks: int = 0
    traceback_errors: List[str] = field(default_factory=list)  # each one's exception line
    stop_exit: Optional[int] = None
    stop_seconds: Optional[float] = None
    loopback_only: Optional[bool] = None
    failures: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def long_windows(self) -> int:
        return sum(s.long_windows for s in self.symbols)

    def judge(self) -> None:
        """Fill `failures` from the figures."""
        f = self.failures
        for s in self.symbols:
            if s.duplicates:
                f.append(f"{s.name}: {s.duplicates} duplicate rows")
            if s.corrupt:
                f.append(f"{s.name}: {s.corrupt} stored rows differ from what was sent")
            if s.lost_outside:
                f.append(f"{s.name}: {s.lost_outside} rows lost outside outage windows")
            if s.unrecorded_outside:
                f.append(f"{s.name}: {s.unrecorded_outside} rows stored that were never sent")
            g = s.ledger
            if g.windows_without_record:
                f.append(f"{s.name}: {g.windows_without_record} outage windows without a gap "
                         f"record ({'; '.join(g.without_record_examples[:2])})")
            if g.missing_in_reachable_gaps:
                f.append(f"{s.name}: {g.missing_in_reachable_gaps} trades missing inside gaps "
                         "a REST answer reached")
            if g.missing_elsewhere:
                f.append(f"{s.name}: {g.missing_elsewhere} trades stored nowhere outside every "
                         "outage window and gap")
            if g.missing_in_covered_gaps:
                f.append(f"{s.name}: {g.missing_in_covered_gaps} trades missing inside gaps "
                         "the ledger calls covered")
        if self.dead_letters_extra:
            f.append(f"{self.dead_letters_extra} dead letters stored twice or never sent")
        if self.dead_letters_missing > self.dead_letters_missing_allowed:
            f.append(f"{self.dead_letters_missing} dead letters lost "
                     f"({self.dead_letters_missing_allowed} sent inside outage windows)")
        if self.bad_files:
            f.append(f"{len(self.bad_files)} corrupt or mis-houred files")
        if self.temp_files_left:
            f.append(f"{self.temp_files_left} temporary files left in the export dir")
        if self.supervisor_restart_refusals:
            f.append(f"mexc run refused to start {self.supervisor_restart_refusals} times "
                     "after a supervisor kill")
        if self.export_once_exit != 0:
            f.append(f"mexc export --once exit {self.export_once_exit}")
        if self.verify_exit != 0 and not self.verify_excused:
            f.append(f"mexc verify exit {self.verify_exit}")
        if self.crashes:
            f.append(f"{len(self.crashes)} unplanned collector crashes")
        if not self.healthy:
            f.append("daemon unhealthy at the end: " + "; ".join(self.health_notes))
        if self.stop_exit != 0:
            f.append(f"SIGTERM stop: exit {self.stop_exit}")
        elif self.stop_seconds is not None and self.stop_seconds > 15.0:
            f.append(f"SIGTERM stop took {self.stop_seconds:.1f}s (the promise is 15 s)")
        if self.loopback_only is False:
            f.append("a tor socket outside 127.0.0.0/8")

    def text(self) -> str:
        lines = [f"mexc soak: seed {self.seed}, {self.minutes:g} min of faults, {self.rate:g} "
                 f"frames/s per stream, an event hour every {self.hour_seconds:g} s, tor "
                 f"{'on' if self.tor else 'off'}, clickhouse {self.clickhouse}, full disk by "
                 f"{self.disk_full_method}; ran {self.runtime_s:.0f} s",
                 "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
                 + (f" ({len(self.faults_skipped)} skipped: "
                    f"{', '.join(self.faults_skipped[:6])})" if self.faults_skipped else "")]
        header = ("symbol", "sent", "stored", "dup", "corrupt", "lost", "in windows", "gap s",
                  "windows", "window s", "ext s", "outside", "dl inj", "dl stored")
        rows = [header] + [(s.name, f"{s.sent:,}", f"{s.stored:,}", s.duplicates, s.corrupt,
                            s.lost_in_windows + s.lost_outside + s.lost_orphaned,
                            s.lost_in_windows,
                            f"{s.gap_seconds:.1f}", s.windows, f"{s.window_seconds:.1f}",
                            f"{s.max_extension_s:.1f}", s.lost_outside,
                            s.dead_letters_injected, s.dead_letters_stored)
                           for s in self.symbols]
        lines += table(rows)
        for s in self.symbols:
            for outage in s.outages[:8]:
                lines.append(f"  {s.name} outage {outage}")
            if len(s.outages) > 8:
                lines.append(f"  {s.name}: {len(s.outages) - 8} more outages with loss")
        lines.append("longest outage window: " + "; ".join(
            f"{s.name} {s.longest_window or '-'}" for s in self.symbols)
            + (f" ({self.long_windows} over {LONG_WINDOW:.0f}s: work dir kept)"
               if self.long_windows else ""))
        for s in self.symbols:
            for example in s.examples:
                lines.append(f"  {s.name} LOST OUTSIDE WINDOWS: {example}")
        total = lambda attr: sum(getattr(s, attr) for s in self.symbols)  # noqa: E731
        lines += [
            f"duplicates: {total('duplicates')}",
            f"lost outside outage windows: {total('lost_outside')}",
            f"lost on superseded connections (sent after the symbol's next connection had "
            f"subscribed): {total('lost_orphaned')}"
            + (" (" + ", ".join(f"{s.name} {s.lost_orphaned}" for s in self.symbols
                                if s.lost_orphaned) + ")" if total('lost_orphaned') else ""),
            f"lost inside outage windows: {total('lost_in_windows')} rows, "
            f"{sum(s.gap_seconds for s in self.symbols):.1f} gap seconds (of them "
            f"{total('lost_in_recorded_silences')} in silences the ledger recorded while make "
            f"before break kept the collector connected)",
            f"stored rows that differ or were never sent: "
            f"{total('corrupt') + total('unrecorded_outside')} "
            f"(+{total('unrecorded_in_windows')} delivered by half-sent frames inside windows)",
            *self.ledger_lines(),
            f"dead letters: {self.dead_letters_sent} sent, {self.dead_letters_stored} stored, "
            f"{self.dead_letters_missing} missing ({self.dead_letters_missing_allowed} allowed), "
            f"{self.dead_letters_extra} extra",
            f"files: {self.files} Parquet files, {self.file_rows:,} rows; "
            f"corrupt or mis-houred files: {len(self.bad_files)}"
            + (f" ({'; '.join(self.bad_files[:3])})" if self.bad_files else "")
            + f"; temporary files left: {self.temp_files_left}"
            + (f" ({', '.join(self.temp_file_names[:3])})" if self.temp_file_names else "")
            + (f"; rows in *_fresh tables: {self.fresh_rows}" if self.fresh_rows else ""),
            f"mexc export --once: exit {self.export_once_exit} after "
            f"{self.export_once_attempts} attempt(s); mexc verify: exit {self.verify_exit} "
            f"after {self.verify_attempts} attempt(s)"
            + (f" (only for {len(self.verify_excused)} hours in which no row of the symbol was "
               f"stored: {', '.join(self.verify_excused[:4])})" if self.verify_excused else "")
            + f"; rotations: {self.rotations}",
            "restarts: " + (", ".join(f"{k} {v}" for k, v in sorted(self.restarts.items()))
                            or "none"),
            "peak RSS: " + ", ".join(f"{k} {v:.0f} MiB"
                                     for k, v in sorted(self.peak_rss_mb.items())),
            f"unplanned reconnects and daemon-initiated restarts: {len(self.unplanned)}"
            + (f" ({'; '.join(self.unplanned[:5])})" if self.unplanned else ""),
            f"unplanned collector crashes: {len(self.crashes)}"
            + (f" ({'; '.join(self.crashes[:5])})" if self.crashes else ""),
            f"supervisor restarts refused: {self.supervisor_restart_refusals}; "
            f"flapping log lines: {self.flapping_lines}; tracebacks in logs: {self.tracebacks}"
            + (f" ({'; '.join(self.traceback_errors[:3])})" if self.traceback_errors else ""),
        ]
        if self.loopback_only is not None:
            lines.append(f"tor sockets loopback only: {'yes' if self.loopback_only else 'NO'}")
        lines.append(f"daemon healthy at end: {'yes' if self.healthy else 'NO'}"
                     + (f" ({'; '.join(self.health_notes)})" if self.health_notes else "")
                     + f"; SIGTERM stop: exit {self.stop_exit}"
                     + (f" in {self.stop_seconds:.1f}s" if self.stop_seconds is not None else ""))
        if self.verify_exit not in (0, None) and not self.verify_excused:
            said = self.verify_output.strip().replace("\n", " | ")
            lines.append("mexc verify said: " + said[-600:])
        lines += [f"FAIL: {f}" for f in self.failures]
        lines.append(f"RESULT: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


    def ledger_lines(self) -> List[str]:
        """The gap ledger against the windows, and the trades missing before and after
        backfill (the truth: every trade the simulator's market made)."""
        total = lambda attr: sum(getattr(s.ledger, attr) for s in self.symbols)  # noqa: E731
        reasons = collections.Counter()
        for s in self.symbols:
            reasons.update(s.ledger.reasons)
        return [
            f"gap ledger: {total('gaps')} records ("
            + (", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none")
            + f"); outage windows without a record: {total('windows_without_record')} of "
            f"{total('windows_needing_record')} that need one; covered {total('covered')}, "
            f"reachable by a REST answer {total('reachable')}; backfilled "
            f"{total('backfilled')} trades (ledger), "
            f"{sum(s.backfilled for s in self.symbols)} stored rows never sent",
            f"trades: {total('trades'):,} made, {total('in_holes'):,} inside outage windows "
            f"or gaps ({total('never_sent'):,} never sent); missing there before backfill: "
            f"{total('missing_before_backfill'):,}, after: {total('missing_after_backfill'):,} "
            f"({total('missing_in_reachable_gaps')} in reachable gaps, "
            f"{total('missing_in_covered_gaps')} in covered ones); lost elsewhere: "
            f"{total('missing_elsewhere')}",
            *self.reason_lines(),
        ]

    def merged(self, by: str) -> Dict[str, ReasonFigures]:
        """Every symbol's gaps and missing trades, by `by` ("by_reason" or "by_kind": the
        fault kinds that explain each gap), ledger.NO_RECORD included."""
        merged: Dict[str, ReasonFigures] = {}
        for s in self.symbols:
            for key, r in getattr(s.ledger, by).items():
                m = merged.setdefault(key, ReasonFigures())
                m.gaps += r.gaps
                m.seconds += r.seconds
                m.missing_before_backfill += r.missing_before_backfill
                m.missing_after_backfill += r.missing_after_backfill
        return merged

    def reason_lines(self) -> List[str]:
        """Per reason, then per fault kind: gaps, their length in wall seconds (median, p95),
        the trades missing inside them before and after backfill."""
        lines = []
        for by, what in (("by_reason", "reason"), ("by_kind", "fault kind")):
            lines.append(f"gaps by {what} (wall seconds; trades missing inside, before -> "
                         "after backfill):")
            for key, r in sorted(self.merged(by).items()):
                seconds = sorted(r.seconds)
                length = (f"median {_quantile(seconds, 0.5):.1f} s, p95 "
                          f"{_quantile(seconds, 0.95):.1f} s" if seconds else "no record")
                lines.append(f"  {key}: {r.gaps} gaps, {length}; trades missing "
                             f"{r.missing_before_backfill:,} -> {r.missing_after_backfill:,}")
        return lines


def _quantile(ordered: List[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def table(rows: list) -> List[str]:
    """Rows of cells as aligned lines: the first column left, the others right."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                             for i, (v, w) in enumerate(zip(r, widths))) for r in rows]


def to_json(report: Report) -> str:
    """The report as one line of JSON, with `passed`."""
    data = dataclasses.asdict(report)
    data["passed"] = report.passed
    return json.dumps(data, sort_keys=True)

"""The gap ledger and the truth: every outage window the soak measured must have its record in
the ledger (core.vocabulary.Gap, read back with Store.gaps), and every trade the simulator's
market made inside a window is counted twice: missed by the stream (never sent on a
WebSocket), and still missing once backfill has run (stored nowhere).

A gap is "reachable" when a REST answer the simulator served after the gap's end reached back
to its start (or listed every trade there was): a correct backfill then leaves no trade of the
gap missing, whatever the collector believes (`covered`).  Pure functions: the soak's
accounting feeds them (accounting.account_symbol), tests/test_soak_ledger.py checks them."""
from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

Span = Tuple[int, int]  # event ms, both ends inclusive
NO_RECORD = "(window, no record)"  # trades missing in an outage window no gap record covers
NO_FAULT = "(no fault)"  # a gap no injected fault explains (the market stopping at the end)


def overlaps(a: Span, b: Span) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def needs_record(window: Span, first_stored_ms: Optional[int]) -> bool:
    """A window needs a ledger record once the symbol had data stored before it: the ledger's
    gap runs from the last data frame before a stretch, and a symbol's very first subscription
    (the soak's startup) has none."""
    return first_stored_ms is not None and first_stored_ms < window[0]


def without_record(windows: Sequence[Span], gaps: Sequence,
                   first_stored_ms: Optional[int]) -> List[Span]:
    """The windows that need a record and overlap no gap of the ledger."""
    return [w for w in windows if needs_record(w, first_stored_ms)
            and not any(overlaps(w, (g.start_ms, g.end_ms)) for g in gaps)]


def reachable(gap, answers: Iterable) -> bool:
    """Some REST answer (simulator.RestAnswer) for the gap's symbol, served once the frame
    ending the gap existed, listed every trade from the gap's start to its end."""
    return any(a.symbol == gap.symbol and a.latest_ms is not None and a.latest_ms >= gap.end_ms
               and (a.count < a.limit or a.oldest_t <= gap.start_ms) for a in answers)


class Spans:
    """A set of event-ms spans, merged, for fast membership tests of millions of trades."""

    def __init__(self, spans: Iterable[Span]):
        merged: List[list] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _b in merged]
        self.ends = [b for _a, b in merged]

    def __contains__(self, t: int) -> bool:
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and t <= self.ends[i]


@dataclass
class ReasonFigures:
    """The gaps of one reason (core.vocabulary GAP_*): how long each was, in wall seconds
    (event ms / the soak's clock speed), and the trades missing inside them."""
    gaps: int = 0
    seconds: List[float] = field(default_factory=list)
    missing_before_backfill: int = 0
    missing_after_backfill: int = 0


@dataclass
class TradeFigures:
    """One symbol's ledger against its windows, and its trades against the truth.  A "hole" is
    an outage window or a ledger gap; trades made after the symbol's last row sent (the end of
    the run) are left out."""
    gaps: int = 0  # ledger records
    reasons: Dict[str, int] = field(default_factory=dict)
    covered: int = 0  # records saying backfill reached back to their start
    reachable: int = 0  # records a REST answer reached (see module doc)
    backfilled: int = 0  # trades the ledger says backfill stored
    windows_needing_record: int = 0
    windows_without_record: int = 0  # must be 0
    without_record_examples: List[str] = field(default_factory=list)
    trades: int = 0  # made by the market while the run's stream ran
    in_holes: int = 0
    never_sent: int = 0  # in holes, no WebSocket sent them
    missing_before_backfill: int = 0  # in holes, stored nowhere or only by backfill
    missing_after_backfill: int = 0  # in holes, stored nowhere
    missing_in_reachable_gaps: int = 0  # a backfill fault: must be 0
    missing_in_covered_gaps: int = 0  # the ledger says covered, yet missing: must be 0
    missing_elsewhere: int = 0  # outside every hole, stored nowhere: lost silently, must be 0
    by_reason: Dict[str, ReasonFigures] = field(default_factory=dict)  # and NO_RECORD
    # the same by the fault kinds that explain each gap (ledger_figures' `kinds`)
    by_kind: Dict[str, ReasonFigures] = field(default_factory=dict)
    kinds: List[str] = field(default_factory=list)  # per gap, in the order of `gaps`


def ledger_figures(windows: Sequence[Span], gaps: Sequence, answers: Sequence,
                   first_stored_ms: Optional[int], describe: Callable[[Span], str] = str,
                   speed: float = 1.0, kinds: Optional[Sequence[str]] = None) -> TradeFigures:
    """windows: the symbol's outage windows in event ms (with slack); gaps: its ledger records;
    answers: the REST answers served (simulator.RestAnswer); speed: event ms per wall ms;
    kinds: per gap, the fault kinds that explain it (accounting.fault_kinds)."""
    f = TradeFigures(gaps=len(gaps), kinds=list(kinds or [NO_FAULT] * len(gaps)))
    for g, kind in zip(gaps, f.kinds):
        for r in (f.by_reason.setdefault(g.reason, ReasonFigures()),
                  f.by_kind.setdefault(kind, ReasonFigures())):
            r.gaps += 1
            r.seconds.append((g.end_ms - g.start_ms) / 1000.0 / speed)
    f.reasons = dict(collections.Counter(g.reason for g in gaps))
    f.covered = sum(1 for g in gaps if g.covered)
    f.reachable = sum(1 for g in gaps if reachable(g, answers))
    f.backfilled = sum(g.backfilled for g in gaps)
    f.windows_needing_record = sum(1 for w in windows if needs_record(w, first_stored_ms))
    missed = without_record(windows, gaps, first_stored_ms)
    f.windows_without_record = len(missed)
    f.without_record_examples = [describe(w) for w in missed[:5]]
    return f


def count_trades(f: TradeFigures, windows: Sequence[Span], gaps: Sequence, answers: Sequence,
                 trades: Sequence, sent: Callable[[int], bool],
                 stored: Callable[[object], bool]) -> None:
    """trades: every trade the market made (simulator.Trade); sent(t): a WebSocket sent the
    trade's row; stored(trade): its row is stored.  Adds the trade counts to f."""
    spans = [(g.start_ms, g.end_ms) for g in gaps]
    holes = Spans(list(windows) + spans)
    by_start = sorted(zip(spans, gaps, f.kinds), key=lambda sgk: sgk[0])
    starts = [a for (a, _b), _g, _k in by_start]

    def figures_of(t: int) -> Tuple[ReasonFigures, ReasonFigures]:
        """The figures (by reason, by fault kind) of the gap holding t (one symbol's gaps do
        not overlap), else of NO_RECORD: t is in an outage window only."""
        i = bisect.bisect_right(starts, t) - 1
        reason, kind = ((by_start[i][1].reason, by_start[i][2])
                        if i >= 0 and by_start[i][0][1] >= t else (NO_RECORD, NO_RECORD))
        return (f.by_reason.setdefault(reason, ReasonFigures()),
                f.by_kind.setdefault(kind, ReasonFigures()))
    in_reached = Spans(span for span, g in zip(spans, gaps) if reachable(g, answers))
    in_covered = Spans(span for span, g in zip(spans, gaps) if g.covered)
    stream_end = max((t.t for t in trades if sent(t.t)), default=None)
    for trade in trades:
        if stream_end is None or trade.t > stream_end:
            continue
        f.trades += 1
        was_sent, is_stored = sent(trade.t), stored(trade)
        if trade.t not in holes:
            f.missing_elsewhere += not is_stored
            continue
        f.in_holes += 1
        f.never_sent += not was_sent
        f.missing_before_backfill += not is_stored or not was_sent
        if not is_stored or not was_sent:
            for r in figures_of(trade.t):
                r.missing_before_backfill += 1
        if not is_stored:
            f.missing_after_backfill += 1
            for r in figures_of(trade.t):
                r.missing_after_backfill += 1
            f.missing_in_reachable_gaps += trade.t in in_reached
            f.missing_in_covered_gaps += trade.t in in_covered

"""`mexc gaps`: the gap ledger as an operator reads it, or as JSON for a program."""
import json
import time
from typing import List

from core.vocabulary import Gap


def utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"


def as_json(gaps: List[Gap]) -> str:
    """One object per gap: every ledger field, plus its length in seconds."""
    return json.dumps([{**g._asdict(), "seconds": (g.end_ms - g.start_ms) / 1000}
                       for g in gaps], indent=1)


def table(gaps: List[Gap]) -> str:
    if not gaps:
        return "no gaps recorded"
    lines = [f"{'symbol':<14} {'start (UTC)':<23} {'end (UTC)':<23} {'seconds':>9} "
             f"{'reason':<17} {'backfilled':>10} covered  detail"]
    for g in gaps:
        lines.append(f"{g.symbol:<14} {utc(g.start_ms):<23} {utc(g.end_ms):<23} "
                     f"{(g.end_ms - g.start_ms) / 1000:>9.3f} {g.reason:<17} {g.backfilled:>10} "
                     f"{'yes' if g.covered else 'no':<8} {g.detail}")
    lines.append(f"{len(gaps)} gaps, {sum(g.end_ms - g.start_ms for g in gaps) / 1000:.3f} s, "
                 f"{sum(g.backfilled for g in gaps)} trades backfilled, "
                 f"{sum(1 for g in gaps if not g.covered)} not covered")
    return "\n".join(lines)

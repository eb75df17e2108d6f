"""`mexc gaps`: the gap ledger as an operator reads it, or as JSON for a program."""
import json
import re
import time
from datetime import datetime, timezone
from typing import List, Optional

from core.vocabulary import Gap

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now_ms: Optional[int] = None) -> int:
    """`2h`, `30m`, `90s`, `1d` ago; an ISO time (`2026-11-26T10:00`, UTC unless it says
    otherwise); or epoch milliseconds -> epoch ms.  ValueError for anything else."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    ago = _AGO.match(text)
    if ago:
        return now_ms - int(float(ago.group(1)) * _UNIT_S[ago.group(2)] * 1000)
    if text.isdigit():
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


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

"""`mexc gaps`: the gap ledger as an operator reads it, or as JSON for a program.  In a
cluster, every live host's ledger (read through remote()), each gap with its host and the
hosts that collected the symbol during some of it (`covered_by`): a gap another host covered
is no gap of the merged archive (docs/cluster.md)."""
import json
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from core.vocabulary import Gap
from exporter.merge import CLOCK_SKEW_MS, covered


class HostGap(NamedTuple):
    host: str
    gap: Gap
    covered_by: Sequence[str]


def of_cluster(config, store, name: Optional[str], since_ms: Optional[int]
               ) -> Tuple[List[HostGap], Dict[str, str]]:
    """Every reachable live host's ledger records (and this host's), oldest first, with
    covered_by; and {host: why} of the hosts whose ClickHouse (or ZooKeeper, OTHERS) did not
    answer: their ledgers are missing, and they count as covering nothing."""
    from cluster.exports import cluster_hosts

    sources, unreachable = cluster_hosts(config.cluster)
    ledgers = {}
    for host, source in sorted(sources.items()):
        with store.asking(host, unreachable, required=source is None):
            ledgers[host] = store.gaps(name, since_ms=since_ms, source=source)
    found, skew_ms = [], int(CLOCK_SKEW_MS * config.export["clock_speed"])
    for host, gaps in ledgers.items():
        for g in gaps:
            by = []
            for other in sorted(ledgers):
                if other == host or other in unreachable:
                    continue
                with store.asking(other, unreachable):
                    holdings = store.holdings(g.name, g.start_ms, g.end_ms, sources[other])
                if other in unreachable:
                    continue
                if covered([(ts, held) for h, ts, held in holdings if h == other],
                           [o for o in ledgers[other] if o.name == g.name], g.start_ms,
                           g.end_ms, skew_ms):
                    by.append(other)
            found.append(HostGap(host, g, by))
    return sorted(found, key=lambda f: (f.gap.start_ms, f.gap.name, f.host)), unreachable


def unreachable_lines(unreachable: Dict[str, str], missing: str) -> List[str]:
    """One line per host that did not answer, for stderr; `missing`: what of it the answer
    lacks ("gaps are missing")."""
    from cluster.exports import OTHERS

    return [f"mexc: warning: the other hosts are unknown ({why}): their {missing}"
            if host == OTHERS else f"mexc: warning: host {host} unreachable ({why}): its {missing}"
            for host, why in sorted(unreachable.items())]


def utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"


def as_json(gaps: List[Gap]) -> str:
    """One object per gap: every ledger field, plus its length in seconds."""
    return json.dumps([{**g._asdict(), "seconds": (g.end_ms - g.start_ms) / 1000}
                       for g in gaps], indent=1)


def cluster_json(found: List[HostGap]) -> str:
    """as_json's objects plus `host` and `covered_by`."""
    return json.dumps([{**f.gap._asdict(), "seconds": (f.gap.end_ms - f.gap.start_ms) / 1000,
                        "host": f.host, "covered_by": list(f.covered_by)} for f in found],
                      indent=1)


def cluster_table(found: List[HostGap]) -> str:
    """table() with each gap's host first and who covered it last."""
    if not found:
        return "no gaps recorded on any live host"
    lines = table([f.gap for f in found]).split("\n")
    width = max(len("host"), *(len(f.host) for f in found))
    rows = [f"{'host':<{width}} {lines[0]}  covered by"]
    rows += [f"{f.host:<{width}} {line}  {', '.join(f.covered_by) or '-'}"
             for f, line in zip(found, lines[1:])]
    uncovered = sum(1 for f in found if not f.covered_by)
    return "\n".join(rows + [lines[-1] + f"; {uncovered} covered by no other host"])


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

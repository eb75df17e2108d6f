"""Several hosts' copies of one symbol-hour -> one table with each exchange event once (issue 22,
docs/cluster.md "One merged archive").  Pure logic on Arrow tables; no I/O.

What counts as one event:
  - a trade with MEXC's trade id (the 4th field of a deal's m, core/channels.py): its id;
  - a trade without one (REST backfill, rows of mexc before 0.3), a ticker, a depth snapshot:
    its (ts, m) with the trade id left out, as a multiset: each copy holds every event of the
    time its host covered exactly once, so where copies overlap they hold the same count of a
    key and the merge keeps that count (2 and 2 make 2, not 4); where only one covered, its
    count.  The n-th row of a key in one copy stands against the n-th in another (each copy's
    rows of a key ordered by rts, host); a copy's id-less rows of a key come after its rows
    with ids, and only those beyond the key's distinct ids are kept (a trade one host got from
    the WebSocket, another from REST, is one trade);
  - a dead letter: never merged away; the same (host, ts, m, rts) counts as in the copy that
    holds it most often (a newer version of a host's copy against the merged file holding the
    older one).
Of the copies of an event the earliest receive time (rts) wins; ties go to the lower host name,
and the `host` column says whose row it is.

Deterministic: the same copies in any order give the same table, row for row (sorted by ts,
mt, m, rts, host; dictionaries built from that order), so every host writing it writes the
same bytes.  Associative: merging the merged table with a late copy gives what merging every
copy at once gives, which is how a host's late copy becomes a new version of the file.
"""
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.channels import DEAL_WITH_ID
from core.vocabulary import DEAD_LETTER, DEAL, Gap
from exporter.parquet_files import MERGED_SCHEMA

_ORDER = ["ts", "mt", "m", "rts", "host"]  # the output's order: a total order of distinct rows


def merge(copies: Sequence[Tuple[str, pa.Table]]) -> pa.Table:
    """[(host, table)] -> the merged table (MERGED_SCHEMA).  A table has the hour file's
    columns (ts, mt, m, rts), and `host` when it is itself a merged file (then that column
    says whose each row is and the host given is not used)."""
    rows = _together(copies)
    # The choosing works on a narrow table: texts replaced by codes that only say which are
    # equal (their order follows the input's, so no choice depends on it), and `row`, the
    # row's index in `rows`; only the rows kept are taken whole, once.
    narrow = pa.table({"ts": rows.column("ts"), "mt": _codes(rows.column("mt")),
                       "m": _codes(rows.column("m")), "rts": rows.column("rts"),
                       "host": rows.column("host"), "src": rows.column("src"),
                       "row": pa.array(np.arange(rows.num_rows, dtype=np.int64))})
    is_dead = pc.equal(rows.column("mt"), DEAD_LETTER)
    is_deal = pc.equal(rows.column("mt"), DEAL)
    kept = pa.chunked_array([
        _multiset_union(narrow.filter(is_dead), ["host", "ts", "m", "rts"], []).column("row"),
        _multiset_union(narrow.filter(pc.invert(pc.or_(is_dead, is_deal))), ["mt", "ts", "m"],
                        ["rts", "host"]).column("row"),
        *_merge_deals(narrow.filter(is_deal), rows.column("m").filter(is_deal))],
        pa.int64())
    chosen = rows.select(_ORDER).take(kept)
    return _as_file_table(_sorted(chosen, _ORDER))


def _codes(values) -> pa.Array:
    """Equal values, equal integers (nulls stay null)."""
    if isinstance(values, pa.ChunkedArray):  # one dictionary: unifying many costs more
        values = values.combine_chunks()
    return pc.dictionary_encode(values).indices


def _together(copies) -> pa.Table:
    """Every copy's rows as plain columns (ts, rts int64; mt, m, host string) plus src, the
    copy's index (only ever compared for equality: the result never depends on it)."""
    tables = []
    for src, (host, table) in enumerate(copies):
        n = table.num_rows
        hosts = (table.column("host").cast(pa.string()) if "host" in table.column_names
                 else pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)),
                                                     pa.array([host])).cast(pa.string()))
        tables.append(pa.table({
            "ts": table.column("ts").cast(pa.int64()),
            "mt": table.column("mt").cast(pa.string()),
            "m": table.column("m").cast(pa.string()),
            "rts": table.column("rts").cast(pa.int64()),
            "host": hosts,
            "src": pa.array(np.full(n, src, np.int32)),
        }))
    if not tables:
        return pa.table({name: pa.array([], t) for name, t in (
            ("ts", pa.int64()), ("mt", pa.string()), ("m", pa.string()), ("rts", pa.int64()),
            ("host", pa.string()), ("src", pa.int32()))})
    return pa.concat_tables(tables)


def _merge_deals(deals: pa.Table, texts) -> list:
    """The rows kept of the deals (narrow, with `texts` their m): trades with an id once per
    id; trades without one as a multiset on (ts, m without the id), each copy's rows with ids
    counted first.  Returns arrays of `row`."""
    parts = pc.extract_regex(texts, DEAL_WITH_ID)  # null where m has no id
    trade_id = _codes(pc.struct_field(parts, [1]))
    deals = deals.append_column("id", trade_id)
    deals = deals.append_column("core", _codes(pc.coalesce(pc.struct_field(parts, [0]), texts)))
    deals = deals.append_column("no_id", pc.cast(pc.is_null(trade_id), pa.int8()))
    with_id = deals.filter(pc.is_valid(trade_id))
    by_id = _sorted(with_id, ["id", "rts", "host"])
    by_id = by_id.filter(pa.array(_groups(by_id, ["id"])[1]))  # the earliest of each id
    # id-less rows: ranked in their copy behind its rows with ids of the same key
    ranked = _ranked(deals, ["ts", "core"], ["no_id", "rts", "host"])
    without_id = _first_per_rank(ranked.filter(pc.equal(ranked.column("no_id"), 1)),
                                 ["ts", "core"], ["rts", "host"])
    ids_per_key = by_id.group_by(["ts", "core"]).aggregate([("id", "count")])
    without_id = without_id.join(ids_per_key, ["ts", "core"], join_type="left outer")
    ids = pc.fill_null(without_id.column("id_count"), 0)
    kept = without_id.filter(pc.greater_equal(without_id.column("rank"), ids))
    return [*by_id.column("row").chunks, *kept.column("row").chunks]


def _multiset_union(rows: pa.Table, key: List[str], order: List[str]) -> pa.Table:
    """Of each key, as many rows as the copy holding it most often, the n-th being the least
    (by `order`) of the copies' n-th rows."""
    return _first_per_rank(_ranked(rows, key, order), key, order)


def _ranked(rows: pa.Table, key: List[str], order: List[str]) -> pa.Table:
    """rows plus `rank`: a row's place among its copy's rows of the same key, by `order`."""
    rows = _sorted(rows, key + ["src"] + order)
    rank, _ = _groups(rows, key + ["src"])
    return rows.append_column("rank", pa.array(rank, pa.int64()))


def _first_per_rank(ranked: pa.Table, key: List[str], order: List[str]) -> pa.Table:
    ranked = _sorted(ranked, key + ["rank"] + order)
    return ranked.filter(pa.array(_groups(ranked, key + ["rank"])[1]))


def _sorted(rows: pa.Table, columns: List[str]) -> pa.Table:
    if rows.num_rows == 0:
        return rows
    indices = pc.sort_indices(rows, sort_keys=[(c, "ascending") for c in columns])
    return rows.take(indices).combine_chunks()


def _groups(rows: pa.Table, columns: List[str]):
    """For rows sorted by `columns`: (each row's index within its run of equal values, whether
    it starts a run) as numpy arrays."""
    n = rows.num_rows
    starts = np.zeros(n, bool)
    if n == 0:
        return np.zeros(0, np.int64), starts
    starts[0] = True
    for column in columns:
        values = rows.column(column)
        differs = pc.not_equal(values.slice(1), values.slice(0, n - 1))
        starts[1:] |= np.asarray(pc.fill_null(differs, True).to_numpy(zero_copy_only=False))
    index = np.arange(n)
    return index - np.maximum.accumulate(np.where(starts, index, 0)), starts


def _as_file_table(rows: pa.Table) -> pa.Table:
    return pa.table([
        rows.column("ts").cast(MERGED_SCHEMA.field("ts").type),
        rows.column("mt").dictionary_encode().cast(MERGED_SCHEMA.field("mt").type),
        rows.column("m"),
        rows.column("rts").cast(MERGED_SCHEMA.field("rts").type),
        rows.column("host").dictionary_encode().cast(MERGED_SCHEMA.field("host").type),
    ], schema=MERGED_SCHEMA)


# --- the merged file's gaps ------------------------------------------------------------------

# Holdings are stamped by a host's own clock, its ledger's gaps by the exchange's (its last
# row before a stop, its first after): within this much of a clock difference, a gap of the
# host's own that spans a stretch it did not hold says when it stopped and started collecting.
# (Event time: an event clock running faster, export.clock_speed, scales it.)
CLOCK_SKEW_MS = 5_000


def covered(holdings: Sequence[Tuple[int, int]], gaps, start_ms: int, end_ms: int,
            skew_ms: int = CLOCK_SKEW_MS) -> list:
    """[(start, end)] of [start_ms, end_ms) a host covered: while it held the symbol
    (holdings: its (ts, held) takes and releases, oldest first; none recorded: held all along,
    as when every host collects every symbol) and not inside one of its ledger's gaps.  A
    stretch not held that one of its gaps spans (a release and a take again: the gap runs from
    its last row to its first) is the gap's alone, so a host's clock a few seconds off moves
    no edge (skew_ms)."""
    held, state, since = [], not holdings, start_ms
    for ts, take in sorted(holdings):
        ts = min(max(ts, start_ms), end_ms)
        if state and not take:
            held.append((since, ts))
        if take and not state:
            since = ts
        state = bool(take)
    if state:
        held.append((since, end_ms))
    spans = [(g.start_ms, g.end_ms) for g in gaps]
    restarts = [(a, b) for a, b in _minus([(start_ms, end_ms)], held)
                if any(gs < b and ge > a and gs <= a + skew_ms and ge >= b - skew_ms
                       for gs, ge in spans)]
    return joined(_minus(joined(held + restarts), spans))


def joined(spans) -> list:
    """Spans sorted, those touching or overlapping as one."""
    result = []
    for start, end in sorted(spans):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(end, result[-1][1]))
        else:
            result.append((start, end))
    return result


def cluster_gaps(hosts: dict, symbol: str, name: str, start_ms: int, end_ms: int,
                 skew_ms: int = CLOCK_SKEW_MS):
    """hosts: {host: (holdings, ledger gaps)} of the hosts whose copies the file merges ->
    (the file's gaps: the stretches no host covered, as Gap records; the holes of single
    hosts that others covered: [{host, start_ms, end_ms, reason, covered_by: [hosts]}])."""
    coverage = {host: covered(h, g, start_ms, end_ms, skew_ms)
                for host, (h, g) in hosts.items()}
    everyone = sorted(span for spans in coverage.values() for span in spans)
    # Before the symbol's first take by any host nothing was ever collected: no gap, as a
    # single host records none before its first row.
    first_take = min((ts for h, _g in hosts.values() for ts, _take in h), default=None)
    if first_take is not None and first_take > start_ms:
        everyone = sorted(everyone + [(start_ms, min(first_take, end_ms))])
    merged_gaps = []
    for start, end in _minus([(start_ms, end_ms)], everyone):
        why = sorted({(host, g.reason) for host, (_h, gaps) in hosts.items() for g in gaps
                      if g.start_ms < end and g.end_ms > start})
        merged_gaps.append(Gap(symbol, name, start, end,
                               ",".join(sorted({r for _h, r in why})) or "not_collected",
                               "no host covered it: " + ("; ".join(f"{h} {r}" for h, r in why)
                                                         or "no host held the symbol"),
                               0, False, max([g.recorded_ms for _h, (_x, gaps) in hosts.items()
                                              for g in gaps] or [0])))
    holes = []
    for host, (_h, gaps) in sorted(hosts.items()):
        for g in gaps:
            start, end = max(g.start_ms, start_ms), min(g.end_ms, end_ms)
            if start >= end:
                continue
            by = sorted(other for other, spans in coverage.items() if other != host
                        and any(a < end and b > start for a, b in spans))
            holes.append({"host": host, "start_ms": start, "end_ms": end, "reason": g.reason,
                          "covered_by": by})
    return merged_gaps, holes


def _minus(spans, holes) -> list:
    """Spans [(start, end)] without the parts inside any hole."""
    result = []
    for start, end in spans:
        pieces = [(start, end)]
        for h_start, h_end in holes:
            pieces = [piece for a, b in pieces for piece in
                      ((a, min(b, h_start)), (max(a, h_end), b)) if piece[0] < piece[1]]
        result += pieces
    return sorted(result)

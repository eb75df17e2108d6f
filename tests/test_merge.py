"""exporter/merge.py: several hosts' copies of a symbol-hour -> each exchange event once.

The property tests draw one truth (trades with ids, trades without, tickers and depth
snapshots, identical ones among them) and a copy per host that holds every event of the
times its host covered, each once, with its own receive times, some trades as REST backfill
stores them (no id), plus the host's own dead letters."""
import collections
import hashlib

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from core.channels import deal_without_id
from core.vocabulary import Gap
from exporter import merge, parquet_files

H = 1_763_938_800_000  # an hour start
HOSTS = ("tokyo", "frankfurt", "virginia", "sydney")


def table(rows):
    """(ts, mt, m, rts) rows -> an hour file's table (SCHEMA)."""
    ts, mt, m, rts = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
    return pa.table({
        "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "mt": pa.array(mt, pa.string()).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
        "m": pa.array(m, pa.string()),
        "rts": pa.array(rts, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))},
        schema=parquet_files.SCHEMA)


def plain(merged):
    """The merged table's rows as (ts ms, mt, m, rts ms, host)."""
    return [(r["ts"], r["mt"], r["m"], r["rts"], r["host"]) for r in merged.cast(pa.schema([
        ("ts", pa.int64()), ("mt", pa.string()), ("m", pa.string()), ("rts", pa.int64()),
        ("host", pa.string())])).to_pylist()]


def file_digest(merged, tmp_path, name):
    path = str(tmp_path / name)
    hour_file = parquet_files.HourFile(path, "BTC_USDT", H, merged.num_rows,
                                       schema=parquet_files.MERGED_SCHEMA)
    hour_file.write(merged)
    hour_file.commit()
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_trade_the_websocket_and_rest_brought_is_one_row_and_keeps_its_id():
    a = table([(H + 1, "d", "1.5|2|1|100", H + 9), (H + 2, "t", "1|2|3|4|5", H + 6)])
    b = table([(H + 1, "d", "1.5|2|1", H + 4), (H + 2, "t", "1|2|3|4|5", H + 3),
               (H + 3, "dp", "[1,2]|[3,4]", H + 5)])
    assert plain(merge.merge([("tokyo", a), ("frankfurt", b)])) == [
        (H + 1, "d", "1.5|2|1|100", H + 9, "tokyo"),
        (H + 2, "t", "1|2|3|4|5", H + 3, "frankfurt"),  # the earlier receipt
        (H + 3, "dp", "[1,2]|[3,4]", H + 5, "frankfurt")]


def test_a_key_twice_in_each_copy_is_two_rows_and_dead_letters_stay_from_every_host():
    twice = [(H + 5, "d", "1|1|1", H + 6), (H + 5, "d", "1|1|1", H + 7),
             (H + 5, "dl", "junk", H + 5)]
    merged = plain(merge.merge([("tokyo", table(twice)), ("frankfurt", table(twice))]))
    assert merged == [(H + 5, "d", "1|1|1", H + 6, "frankfurt"),
                      (H + 5, "d", "1|1|1", H + 7, "frankfurt"),
                      (H + 5, "dl", "junk", H + 5, "frankfurt"),
                      (H + 5, "dl", "junk", H + 5, "tokyo")]


# --- properties --------------------------------------------------------------------------

KINDS = ("deal", "deal_no_id", "t", "dp")


@st.composite
def truths(draw):
    """Events (ts, mt, m), ts in a few ms and m from few values so that keys repeat."""
    events, next_id = [], 1000
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(KINDS))
        ts = H + draw(st.integers(0, 12))
        value = draw(st.integers(1, 2))
        if kind == "deal":
            events.append((ts, "d", f"1.{value}|{value}|1|{next_id}"))
            next_id += draw(st.integers(1, 3))
        elif kind == "deal_no_id":
            events.append((ts, "d", f"1.{value}|{value}|2"))
        elif kind == "t":
            events.append((ts, "t", f"{value}|1|1|1|0.1"))
        else:
            events.append((ts, "dp", f"[{value},1]|[2,1]"))
    return events


@st.composite
def copies(draw, events):
    """Per host: the ms it covered, its rows (receive times its own, some trades without
    their id as REST backfill stores them), its dead letters."""
    result = []
    for host in HOSTS[:draw(st.integers(1, 4))]:
        covered = draw(st.sets(st.integers(0, 12)))
        rows = []
        for ts, mt, m in events:
            if ts - H in covered:
                if mt == "d" and draw(st.booleans()) and draw(st.booleans()):
                    m = deal_without_id(m)
                rows.append((ts, mt, m, ts + draw(st.integers(0, 3))))
        for _ in range(draw(st.integers(0, 3))):
            ts = H + draw(st.integers(0, 12))
            rows.append((ts, "dl", draw(st.sampled_from(["junk", "{}"])), ts))
        draw(st.randoms()).shuffle(rows)
        result.append((host, covered, rows))
    return result


@st.composite
def cases(draw):
    events = draw(truths())
    return events, draw(copies(events))


@settings(max_examples=150, deadline=None)
@given(cases(), st.randoms())
def test_the_merge_is_the_union_of_the_copies_each_event_once(case, rng):
    events, hosts = case
    merged = plain(merge.merge([(host, table(rows)) for host, _c, rows in hosts]))

    covered = set().union(*(c for _h, c, _r in hosts))
    seen = [e for e in events if e[0] - H in covered]  # every event some host covered
    assert collections.Counter((ts, mt, deal_without_id(m) if mt == "d" else m)
                               for ts, mt, m, _rts, _host in merged if mt != "dl") == \
        collections.Counter((ts, mt, deal_without_id(m) if mt == "d" else m)
                            for ts, mt, m in seen)
    with_id = {}  # trade id -> the earliest (rts, host) of a copy that had it
    for host, _c, rows in hosts:
        for ts, mt, m, rts in rows:
            if mt == "d" and m.count("|") == 3:
                with_id[m] = min(with_id.get(m, (rts, host)), (rts, host))
    assert {m: (rts, host) for _ts, mt, m, rts, host in merged
            if mt == "d" and m.count("|") == 3} == with_id
    assert collections.Counter((host, ts, m, rts) for ts, mt, m, rts, host in merged
                               if mt == "dl") == \
        collections.Counter((host, ts, m, rts) for host, _c, rows in hosts
                            for ts, mt, m, rts in rows if mt == "dl")


@settings(max_examples=60, deadline=None)
@given(cases(), st.randoms())
def test_the_order_of_the_copies_changes_nothing(case, rng):
    _events, hosts = case
    given_order = [(host, table(rows)) for host, _c, rows in hosts]
    shuffled = list(given_order)
    rng.shuffle(shuffled)
    assert merge.merge(shuffled).equals(merge.merge(given_order))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_a_late_copy_merged_into_the_merged_table_is_the_merge_of_all(case):
    """How a host's late copy, or a newer version of its copy, becomes a new file version."""
    _events, hosts = case
    tables = [(host, table(rows)) for host, _c, rows in hosts]
    merged_first = merge.merge(tables[:-1])
    assert merge.merge([("", merged_first), tables[-1]]).equals(merge.merge(tables))
    host, _covered, rows = hosts[0]
    newer = rows + [(H + 13, "dl", "late", H + 13), (H + 13, "t", "9|1|1|1|0.1", H + 14)]
    assert merge.merge([("", merge.merge(tables)), (host, table(newer))]).equals(
        merge.merge([(host, table(newer))] + tables[1:]))


def test_the_same_copies_in_any_order_write_the_same_bytes(tmp_path):
    rows = [[(H + i, "d", f"1|{i}|1|{100 + i}", H + i + k) for i in range(0, 500, 1 + k)]
            + [(H + i, "dp", f"[{i},1]|", H + i + 2 * k) for i in range(0, 500, 2 + k)]
            + [(H + 7, "dl", f"junk{k}", H + 7)] for k in range(3)]
    tables = [(host, table(r)) for host, r in zip(HOSTS, rows)]
    digests = {file_digest(merge.merge(order), tmp_path, f"f{n}.parquet")
               for n, order in enumerate([tables, tables[::-1], tables[1:] + tables[:1]])}
    assert len(digests) == 1
    merged = parquet_files.read(str(tmp_path / "f0.parquet"))
    assert merged.schema.names == parquet_files.MERGED_SCHEMA.names
    parquet_files.verify(str(tmp_path / "f0.parquet"), merged.num_rows, H)


# --- the merged file's gaps ------------------------------------------------------------------

def gap(start, end, reason="disconnect"):
    return Gap("BTC_USDT", "btc", H + start, H + end, reason, "", 0, False, H + end)


def test_only_what_no_host_covered_is_a_gap_and_a_covered_hole_names_who_covered_it():
    hosts = {"tokyo": ([], [gap(100, 500)]),  # no holdings recorded: held all along
             "frankfurt": ([(H + 50, 1), (H + 900, 0)], [gap(300, 400, "collector_restart")])}
    gaps, holes = merge.cluster_gaps(hosts, "BTC_USDT", "btc", H, H + 1000)
    assert [(g.start_ms - H, g.end_ms - H, g.reason, g.covered) for g in gaps] == [
        (300, 400, "collector_restart,disconnect", False)]
    assert holes == [
        {"host": "frankfurt", "start_ms": H + 300, "end_ms": H + 400,
         "reason": "collector_restart", "covered_by": []},
        {"host": "tokyo", "start_ms": H + 100, "end_ms": H + 500, "reason": "disconnect",
         "covered_by": ["frankfurt"]}]
    assert merge.covered([(H + 50, 1), (H + 900, 0)], [gap(300, 400)], H, H + 1000) == [
        (H + 50, H + 300), (H + 400, H + 900)]


def test_before_the_first_take_of_any_host_nothing_was_collected_and_nothing_is_a_gap():
    """As a single host records no gap before its first row: the cluster's first hour of a
    symbol starts where a host first took it.  A stretch after that which no host held is."""
    hosts = {"tokyo": ([(H + 200, 1), (H + 600, 0)], []),
             "frankfurt": ([(H + 300, 1), (H + 500, 0), (H + 800, 1)], [])}
    gaps, _holes = merge.cluster_gaps(hosts, "BTC_USDT", "btc", H, H + 1000)
    assert [(g.start_ms - H, g.end_ms - H, g.reason) for g in gaps] == [
        (600, 800, "not_collected")]


def test_a_host_whose_clock_is_2s_off_moves_no_edge_of_a_gap():
    """tokyo's holdings are stamped by its clock, 2 s behind or ahead: it stopped after its
    last row at 10 s (release stamped 8 s or 12 s) and started again a second before its first
    row at 40 s (take stamped 37 s or 41 s), its ledger's gap running from row to row;
    frankfurt was down from 5 s to 50 s.  No host had the symbol from 10 s to 40 s, exactly,
    either way (behind, the release alone made it 8 s to 40 s)."""
    frankfurt = ([], [gap(5_000, 50_000, "daemon_restart")])
    for skew in (-2_000, 2_000):
        tokyo = ([(H - 60_000, 1), (H + 10_000 + skew, 0), (H + 39_000 + skew, 1)],
                 [gap(10_000, 40_000, "daemon_restart")])
        gaps, _holes = merge.cluster_gaps({"tokyo": tokyo, "frankfurt": frankfurt},
                                          "BTC_USDT", "btc", H, H + 60_000)
        assert [(g.start_ms - H, g.end_ms - H) for g in gaps] == [(10_000, 40_000)], skew
        assert merge.covered(*tokyo, H, H + 60_000) == [(H, H + 10_000),
                                                        (H + 40_000, H + 60_000)]


def test_a_gap_of_a_host_that_ends_before_it_let_a_symbol_go_does_not_cover_the_rest():
    """A disconnect gap, then a release 3 s later and no take again: from the release on the
    host did not collect, whatever its gaps."""
    assert merge.covered([(H - 60_000, 1), (H + 20_000, 0)], [gap(10_000, 17_000)], H,
                         H + 60_000) == [(H, H + 10_000), (H + 17_000, H + 20_000)]

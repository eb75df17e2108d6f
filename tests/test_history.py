"""mexc.history and `mexc trades|book|ticker|bars`: typed rows of a time range from the archive
the real exporter wrote and the live table, each exactly once, with the ledger's gaps.

The archive is built as in production: the simulator sends frames (its event clock set by the
test), a real collector (`mexc collect`) stores them, the Exporter (in this process, with a
clock the test sets, as in test_exporter.py) rotates and writes the hour's file; more frames
then land in {name}_current only."""
import collections
import csv
import io
import shutil
import subprocess
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.archive import GAPS_KEY, gaps_json
from core.archive import file_name as archive_file_name
from core.clock import HOUR_MS
from core.process import free_port
from core.store import Store, rows_batch
from core.vocabulary import GAP_DISCONNECT, Gap
from exporter import parquet_files
from exporter.exporter import Exporter
from mexc import history
from mexc.simulator import MexcSimulator
from tests.conftest import MEXC, World, wait_for
from tests.test_exporter import (H, SetClock, export_dying_after_the_file, insert,
                                 make_config, rows_for)

pytestmark = pytest.mark.timeout(180)
MINUTE = 60_000
GAP = Gap("BTC_USDT", "btc", H - 15 * MINUTE, H - 12 * MINUTE, GAP_DISCONNECT,
          "close code 1006", 0, False, H - 11 * MINUTE)


class Clock:
    def __init__(self, now_ms):
        self.now = now_ms

    def __call__(self):
        return self.now


def ms(value) -> int:
    return int(value.timestamp() * 1000)


@pytest.fixture(scope="module")
def archive(clickhouse, tmp_path_factory):
    """Frames in hour H-1 (exported to a file) and hour H (in btc_current), a gap in H-1; one
    per server for the module's tests, which only read it.  Yields (Archive, the (ts, mt, m)
    rows the simulator sent, its World)."""
    env = World(tmp_path_factory.mktemp("history"), clickhouse)
    try:
        yield build_archive(env)
    finally:
        env.cleanup()


def build_archive(env):
    clock = Clock(H - 20 * MINUTE)
    with MexcSimulator(rate=0, event_clock=clock) as sim:
        config = env.write_config(sim.url)
        collector = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT")
        wait_for(lambda: sim.streaming_to("BTC_USDT"), 20, "the collector subscribed")
        for now in (H - 20 * MINUTE, H - 10 * MINUTE, H + 5 * MINUTE):
            clock.now = now
            sim.send_frames("BTC_USDT", 120)
        sent = wait_for_stored(env, sim)
        # the start's gap is settled before the export: after it, the exported hour would be
        # the lower bound of "what was stored last" (README, "Gaps"), a gap of 40 minutes
        wait_for(lambda: "nothing stored before, no gap" in collector.log(), 20,
                 "the first start's gap settled")
        ok, files, _ = Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
        assert ok and [f.rsplit("/", 1)[1] for f in files] == ["btc_20251123_2300.parquet"]
        clock.now = H + 10 * MINUTE
        sim.send_frames("BTC_USDT", 120)
        sent = wait_for_stored(env, sim, in_files=len(pq.read_table(files[0])))
        collector.stop()
    with env.store() as store:
        store.record_gaps([GAP])
    return history.Archive.from_config(make_config(env)), sent, env


def wait_for_stored(env, sim, in_files=0):
    sent = sim.expected_rows("BTC_USDT")
    wait_for(lambda: env.count() + in_files >= len(sent), 30, f"{len(sent)} rows stored")
    return sent


def sent_of(sent, mt, start=H - HOUR_MS, end=H + HOUR_MS):
    """The fields of the rows of one type sent; a deal's without its trade id (the typed
    trades have no such column)."""
    fields = {"d": 3}.get(mt)
    return [(ts, m.split("|")[:fields]) for ts, kind, m in sent
            if kind == mt and start <= ts < end]


@pytest.mark.slow
def test_trades_ticker_and_book_typed_exactly_once_across_file_and_live_table(archive):
    archive, sent, env = archive
    assert env.count() > 0 and env.rows("btc_previous") == []  # both sources hold rows
    trades = archive.trades("BTC_USDT", H - HOUR_MS, H + HOUR_MS)
    expected = sent_of(sent, "d")
    assert collections.Counter(
        (ms(r["ts"]), r["price"], r["volume"], r["side"]) for r in trades.to_pylist()
    ) == collections.Counter((ts, float(p), float(v), {"1": "buy", "2": "sell"}[d])
                             for ts, (p, v, d) in expected)
    assert str(trades.schema.field("ts").type) == "timestamp[ms, tz=UTC]"
    assert trades.schema.field("side").type == pa.dictionary(pa.int8(), pa.string())
    assert any(ms(r["ts"]) < H for r in trades.to_pylist()) and ms(trades["ts"][-1].as_py()) > H
    assert trades["ts"].to_pylist() == sorted(trades["ts"].to_pylist())

    exact = archive.trades("btc", H - HOUR_MS, H + HOUR_MS, exact=True)
    prices = collections.Counter((ms(r["ts"]), r["price"], r["volume"]) for r in exact.to_pylist())
    assert prices == collections.Counter((ts, Decimal(p), Decimal(v)) for ts, (p, v, _) in expected)
    texts = [p for _ts, (p, _v, _d) in expected]
    assert any("E" in p for p in texts) and any(p.endswith("0") and "." in p for p in texts)

    ticker = archive.ticker("BTC_USDT", H - HOUR_MS, H + HOUR_MS, exact=True)
    assert sorted(tuple(r.values())[:6] for r in ticker.to_pylist()) == sorted(
        (datetime_of(ts), *map(Decimal, fields)) for ts, fields in sent_of(sent, "t"))

    book = archive.book("BTC_USDT", H - HOUR_MS, H + HOUR_MS, levels=20)
    expected_books = sorted((ts, levels(bids), levels(asks))
                            for ts, (bids, asks) in sent_of(sent, "dp"))
    assert sorted((ms(r["ts"]), list(zip(r["bid_price"], r["bid_size"])),
                   list(zip(r["ask_price"], r["ask_size"]))) for r in book.to_pylist()) \
        == expected_books
    top5 = archive.book("BTC_USDT", H - HOUR_MS, H + HOUR_MS, levels=5, per_level=True)
    assert top5.num_rows == 10 * len(expected_books)
    best = [r for r in top5.to_pylist() if r["level"] == 1 and r["side"] == "ask"]
    assert sorted((ms(r["ts"]), r["price"], r["size"]) for r in best) == sorted(
        (ts, *asks[0]) for ts, _bids, asks in expected_books)


def datetime_of(ts_ms):
    return pa.scalar(ts_ms, history.TIMESTAMP).as_py()


def levels(text):
    """`[p,s],[p,s]` -> [(p, s)] as floats."""
    return [tuple(float(x) for x in pair.split(",")) for pair in text[1:-1].split("],[")]


@pytest.mark.slow
def test_gaps_and_bars(archive):
    archive, sent, _env = archive
    start, end = H - 30 * MINUTE, H + 30 * MINUTE
    bars = archive.bars("BTC_USDT", start, end, interval="1m")
    assert history.gaps_of(bars) == [GAP] == archive.gaps("BTC_USDT", start, end)
    assert bars.num_rows == 60
    rows = bars.to_pylist()
    marked = [ms(r["ts"]) for r in rows if r["gap"]]
    assert marked == list(range(GAP.start_ms, GAP.end_ms, MINUTE))
    trades = sent_of(sent, "d", start, end)
    assert sum(r["trades"] for r in rows) == len(trades)
    by_minute = collections.defaultdict(list)
    for ts, (p, v, d) in trades:
        by_minute[ts // MINUTE * MINUTE].append((float(p), float(v), d))
    for r in rows:
        minute = by_minute.get(ms(r["ts"]), [])
        if not minute:
            assert r["trades"] == 0 and r["open"] is None and r["volume"] == 0
            continue
        assert (r["open"], r["close"]) == (minute[0][0], minute[-1][0]) or \
            len({t for t, *_ in minute}) < len(minute)  # same-ms trades have no order
        assert r["high"] == max(p for p, _, _ in minute) and r["low"] == min(
            p for p, _, _ in minute)
        assert r["volume"] == pytest.approx(sum(v for _, v, _ in minute))
        assert r["buy_volume"] == pytest.approx(sum(v for _, v, d in minute if d == "1"))
        assert r["vwap"] == pytest.approx(sum(p * v for p, v, _ in minute) / r["volume"])
    assert archive.gaps("BTC_USDT", H, end) == []  # the gap ended before the hour


@pytest.mark.slow
def test_offline_reads_the_files_and_their_gap_metadata(archive, tmp_path):
    archive, sent, _env = archive
    export_dir = str(shutil.copytree(archive.export_dir, tmp_path / "export"))  # shared: a copy
    path = f"{export_dir}/{archive_file_name('btc', H - HOUR_MS)}"
    table = pq.read_table(path)  # the exporter of the gap-ledger issue writes this key
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                  GAPS_KEY: gaps_json([GAP])}),
                   path)
    offline = history.Archive(export_dir)
    trades = offline.trades("BTC_USDT", H - HOUR_MS, H + HOUR_MS)
    assert trades.num_rows == len(sent_of(sent, "d", H - HOUR_MS, H))  # the file's hour only
    assert history.gaps_of(trades) == [GAP]
    assert offline.gaps("BTC_USDT", H - 13 * MINUTE, H - 12 * MINUTE) == [GAP]
    assert offline.gaps("BTC_USDT", H - 12 * MINUTE, H) == []
    away = history.Archive(export_dir, {**archive.clickhouse, "port": free_port()})
    away_trades = away.trades("btc", H - HOUR_MS, H + HOUR_MS)
    assert away_trades == trades and history.gaps_of(away_trades) == [GAP]  # files, their gaps
    assert away.live.startswith("ClickHouse unavailable")


@pytest.mark.slow
@pytest.mark.one_clickhouse  # the command line over the API tested on both above
def test_command_line(archive):
    _archive, sent, env = archive
    config = env.tmp / "mexc.toml"
    result = run("trades", "BTC_USDT", "--from", "2025-11-23T23:00", "--to",
                 "2025-11-24T01:00:00Z", "--format", "csv", "--config", str(config))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(sent_of(sent, "d"))
    assert set(rows[0]) == {"ts", "price", "volume", "side", "rts"}
    assert rows[0]["ts"].startswith("2025-11-23T23:") and rows[0]["ts"].endswith("Z")
    assert "1 gaps" in result.stderr and "disconnect" in result.stderr
    out = env.tmp / "bars.parquet"
    result = run("bars", "btc", "--from", "2025-11-23T23:30", "--to", "2025-11-24T00:30",
                 "--out", str(out), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert pq.read_table(out).num_rows == 60 and history.gaps_of(pq.read_table(out)) == [GAP]
    result = run("book", "BTC_USDT", "--from", "2025-11-24T00:00", "--to", "2025-11-24T01:00",
                 "--levels", "2", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 + 4 * len(sent_of(sent, "dp", H))
    assert run("ticker", "BTC_USDT", "--from", "yesterday", "--config",
               str(config)).returncode == 2
    recent = run("ticker", "BTC_USDT", "--from", "-2h", "--to", "-1h", "--config", str(config))
    assert recent.returncode == 0 and "0 ticker rows" in recent.stderr, recent.stderr


def run(*args):
    return subprocess.run([MEXC, *args], capture_output=True, text=True, timeout=60)


def test_exactly_once_while_an_export_is_half_done(env, monkeypatch):
    """A crash (or a read) between the exporter's steps: rows sit in previous and a file, or
    in previous and current; each comes back once."""
    sent = rows_for(H - HOUR_MS, 40, "1") + rows_for(H, 6, "2")
    insert(env, sent)
    export_dying_after_the_file(env, monkeypatch)
    assert env.count("btc_previous") == 46 and env.count("btc_current") == 6
    archive = history.Archive.from_config(make_config(env))
    trades = archive.trades("BTC_USDT", H - HOUR_MS, H + HOUR_MS)
    assert collections.Counter(ms(t) for t in trades["ts"].to_pylist()) == collections.Counter(
        ts for ts, _mt, _m in sent)
    assert history.Archive(archive.export_dir).trades("btc", H - HOUR_MS, H).num_rows == 40


def test_exactly_once_after_a_crash_in_the_middle_of_a_swap(env):
    """A crash can leave {name}_fresh holding rows (EXCHANGE TABLES done, RENAME not), and
    the next exporter copies them into previous before dropping fresh."""
    sent = rows_for(H - HOUR_MS, 10, "1")
    insert(env, sent[:4])
    for table in ("btc_previous", "btc_fresh"):
        env.query(f"CREATE TABLE {env.database}.{table} AS {env.database}.btc_current")
    insert_into(env, "btc_fresh", sent[4:])
    insert_into(env, "btc_previous", sent[4:7])  # recover_fresh copied, not dropped yet
    trades = history.Archive.from_config(make_config(env)).trades("btc", H - HOUR_MS, H)
    assert sorted(ms(t) for t in trades["ts"].to_pylist()) == [ts for ts, _mt, _m in sent]


def insert_into(env, table, rows):
    with env.store() as store:
        store.insert_rows(table, [(ts, mt, m, ts + 5) for ts, mt, m in rows])


def test_a_rotation_between_the_reads_is_read_again(env, monkeypatch):
    """The exporter writes the hour's file right after history read the live table: the rows
    it read there are now in the file too; history notices the new file and reads again."""
    sent = rows_for(H - HOUR_MS, 30, "1") + rows_for(H, 5, "2")
    insert(env, sent)
    real_live_rows, reads = Store.live_rows, []

    def live_rows_then_rotate(store, *args):
        rows = real_live_rows(store, *args)
        reads.append(len(rows[0]))
        if len(reads) == 1:
            assert Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()[0]
        return rows
    monkeypatch.setattr(Store, "live_rows", live_rows_then_rotate)
    trades = history.Archive.from_config(make_config(env)).trades("btc", H - HOUR_MS,
                                                                  H + HOUR_MS)
    assert reads == [35, 5]  # all rows live, then 30 in the file and 5 live
    assert collections.Counter(ms(t) for t in trades["ts"].to_pylist()) == collections.Counter(
        ts for ts, _mt, _m in sent)


def test_times_and_intervals():
    now = H + 123
    assert history.parse_time("-2h", now) == now - 2 * HOUR_MS
    assert history.parse_time("-1.5d", now) == now - 36 * HOUR_MS
    assert history.parse_time("now", now) == now
    assert history.parse_time("2025-11-24", now) == H
    assert history.parse_time("2025-11-24T01:00:00.5+01:00", now) == H + 500
    assert history.parse_time("2025-11-23T23:00Z", now) == H - HOUR_MS
    assert history.parse_interval("5m") == 5 * MINUTE
    for bad in ("yesterday", "-2x", "2025-13-01"):
        with pytest.raises(history.HistoryError):
            history.parse_time(bad, now)
    with pytest.raises(history.HistoryError):
        history.parse_interval("0m")


def test_book_sides_may_be_empty_and_levels_are_cut(tmp_path):
    rows = [(H + 1, "dp", "[1.5,2],[1.4,3E+1]|"), (H + 2, "dp", "|[2.0,7]"), (H + 3, "d", "1|1|1")]
    table = parquet_files.to_table([rows_batch([(ts, mt, m, ts + 5) for ts, mt, m in rows])])
    parquet_files.write_hour(str(tmp_path / archive_file_name("btc", H)), table,
                             "BTC_USDT", H)
    archive = history.Archive(str(tmp_path))
    book = archive.book("BTC_USDT", H, H + HOUR_MS, levels=1, exact=True).to_pylist()
    assert [(r["bid_price"], r["bid_size"], r["ask_price"]) for r in book] == [
        ([Decimal("1.5")], [Decimal(2)], []), ([], [], [Decimal("2.0")])]
    per_level = archive.book("BTC_USDT", H, H + HOUR_MS, per_level=True).to_pylist()
    assert [(r["side"], r["level"], r["price"], r["size"]) for r in per_level] == [
        ("bid", 1, 1.5, 2.0), ("bid", 2, 1.4, 30.0), ("ask", 1, 2.0, 7.0)]


def test_trades_with_and_without_a_trade_id_read_alike(tmp_path):
    """Rows of mexc before 0.3 and REST backfill rows have no trade id (3 fields), the
    WebSocket's rows have it (a 4th field): one file may hold both, and both read the same."""
    rows = [(H + 1, "d", "1.5|2|1"), (H + 2, "d", "1.50|3|2|13064218826")]
    table = parquet_files.to_table([rows_batch([(ts, mt, m, ts + 5) for ts, mt, m in rows])])
    parquet_files.write_hour(str(tmp_path / archive_file_name("btc", H)), table, "BTC_USDT", H)
    trades = history.Archive(str(tmp_path)).trades("BTC_USDT", H, H + HOUR_MS, exact=True)
    assert [(r["price"], r["volume"], r["side"]) for r in trades.to_pylist()] == [
        (Decimal("1.5"), Decimal(2), "buy"), (Decimal("1.50"), Decimal(3), "sell")]


def test_a_clusters_merged_file_reads_like_a_single_hosts(tmp_path):
    """A merged file has a fifth column, host (docs/cluster.md): history reads its four."""
    from exporter import merge
    rows = [(H + 1, "d", "1.5|2|1|7", H + 6), (H + 2, "t", "1|2|3|4|5", H + 7)]
    table = parquet_files.to_table([rows_batch(rows)])
    merged = merge.merge([("tokyo", table), ("frankfurt", table)])
    hour_file = parquet_files.HourFile(str(tmp_path / archive_file_name("btc", H)), "BTC_USDT",
                                       H, merged.num_rows, schema=parquet_files.MERGED_SCHEMA)
    hour_file.write(merged)
    hour_file.commit()
    archive = history.Archive(str(tmp_path))
    assert [(r["price"], r["side"]) for r in archive.trades("BTC_USDT", H, H + HOUR_MS)
            .to_pylist()] == [(1.5, "buy")]
    assert archive.ticker("BTC_USDT", H, H + HOUR_MS).num_rows == 1

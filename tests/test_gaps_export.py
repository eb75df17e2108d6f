"""The ledger beyond ClickHouse: each hour's Parquet metadata (mexc.gaps, mexc.completeness),
`mexc gaps`, and `mexc verify`'s per-hour report, with a gap recorded after its hour's export."""
import json
import subprocess

import pytest

from core.clock import HOUR_MS, parse_time
from core.vocabulary import GAP_COLLECTOR_CRASH, GAP_DISCONNECT, Gap
from exporter import parquet_files
from exporter.exporter import Exporter
from tests.conftest import MEXC, toml_dump
from tests.test_exporter import H, SetClock, insert, make_config, rows_for

pytestmark = pytest.mark.timeout(120)


def gap(start, end, reason=GAP_DISCONNECT, backfilled=3, covered=True):
    return Gap("BTC_USDT", "btc", start, end, reason, "test", backfilled, covered, start + 9)


def record(env, *gaps):
    with env.store() as store:
        store.setup(["btc"])
        store.record_gaps(gaps)


def mexc(env, *args):
    config = env.tmp / "mexc.toml"
    config.write_text(toml_dump({"symbols": ["BTC_USDT"], "clickhouse": env.ch_section(),
                                 "tor": {"enabled": False},
                                 "export": {"dir": str(env.tmp / "export")},
                                 "paths": {"state_dir": str(env.tmp / "state"),
                                           "runtime_dir": str(env.tmp / "run")}}))
    return subprocess.run([MEXC, *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60)


def test_completeness_counts_overlapping_gaps_once():
    hour = H
    assert parquet_files.completeness([], hour) == "1.000000"
    two = [gap(hour - 5000, hour + 360_000), gap(hour + 180_000, hour + 720_000)]
    assert parquet_files.completeness(two, hour) == "0.800000"  # 12 of 60 minutes


def test_since_takes_a_time_ago_with_or_without_a_minus_an_iso_time_or_epoch_ms():
    assert parse_time("2h", now_ms=10_000_000) == 10_000_000 - 7_200_000
    assert parse_time("-2h", now_ms=10_000_000) == 10_000_000 - 7_200_000
    assert parse_time("2025-11-24T00:00") == H == parse_time("2025-11-24T00:00:00Z")
    assert parse_time(str(H)) == H
    with pytest.raises(ValueError):
        parse_time("yesterday")


@pytest.mark.quick_on_one_clickhouse
def test_hour_files_carry_their_gaps_and_verify_recomputes_from_the_ledger(env):
    first, second, empty, last = H - 4 * HOUR_MS, H - 3 * HOUR_MS, H - 2 * HOUR_MS, H - HOUR_MS
    insert(env, rows_for(first, 40, "a") + rows_for(second, 40, "b") + rows_for(last, 40, "c"))
    crash = gap(first + 600_000, first + 960_000, GAP_COLLECTOR_CRASH, covered=False)  # 6 min
    across = gap(second + HOUR_MS - 30_000, last + 30_000)  # the end of second, all of empty
    record(env, crash, across)
    ok, files, _error = Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
    assert ok and len(files) == 3

    meta = parquet_files.metadata(files[0])
    assert json.loads(meta[b"mexc.gaps"]) == [crash._asdict()]
    assert meta[b"mexc.completeness"] == b"0.900000"
    assert json.loads(parquet_files.metadata(files[1])[b"mexc.gaps"]) == [across._asdict()]
    assert parquet_files.metadata(files[2])[b"mexc.completeness"] == b"0.991667"

    late = gap(last + 1_800_000, last + 1_836_000)  # recorded after its hour was exported
    record(env, late)
    verify = mexc(env, "verify")
    assert "btc_20251123_2200.parquet missing" in verify.stdout  # empty: all inside `across`
    assert "no live data in it" in verify.stdout
    assert "btc_20251123_2000.parquet: completeness 0.900000, 1 gaps (collector_crash)" \
        in verify.stdout
    assert "btc_20251123_2300.parquet: completeness 0.981667" in verify.stdout
    assert "the file says 0.991667 (written before a gap was recorded)" in verify.stdout
    assert "❌ btc:" not in verify.stdout, verify.stdout  # the files are right

    listed = mexc(env, "gaps", "--json")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)
    assert [(g["start_ms"], g["end_ms"], g["reason"]) for g in found] == [
        (g.start_ms, g.end_ms, g.reason) for g in (crash, across, late)]
    assert {"symbol", "start_ms", "end_ms", "reason", "backfilled", "covered"} <= set(found[0])
    assert found[0]["covered"] is False and found[1]["covered"] is True
    since = mexc(env, "gaps", "--symbol", "btc", "--since", str(last + 60_000))
    assert since.returncode == 0 and "3 gaps" not in since.stdout
    assert "1 gaps, 36.000 s, 3 trades backfilled, 0 not covered" in since.stdout
    assert mexc(env, "gaps", "--since", "never").returncode == 2

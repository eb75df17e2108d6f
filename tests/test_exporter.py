"""The exporter: hourly rotation and Parquet files, every row exactly once, whatever fails.

Most tests run the Exporter in this process against the real test ClickHouse with a clock the
test sets, and inject crashes by making one step raise (what is on disk and in ClickHouse at
that moment is what a SIGKILL would leave).  The last test runs the whole daemon with an
accelerated event clock."""
import collections
import json
import logging
import os
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from exporter import parquet_files
from core import archive, config as configuration
from core.clock import HOUR_MS, EventClock
from core.store import Store
from exporter.exporter import Exporter, HourExport, Phase, Progress, SymbolState
from mexc.simulator import MexcSimulator
from tests.conftest import MEXC, toml_dump, wait_for

pytestmark = pytest.mark.timeout(180)
H = 1_763_942_400_000  # 2025-11-24T00:00:00Z, an hour boundary


class SetClock:
    def __init__(self, now_ms):
        self.now = now_ms

    def now_ms(self):
        return self.now

    def wall_seconds_until(self, _event_ms):
        return 0.0


def make_config(env, symbols=("BTC_USDT",), **export):
    data = {"symbols": list(symbols), "clickhouse": env.ch_section(), "tor": {"enabled": False},
            "export": {"dir": str(env.tmp / "export"), **export},
            "paths": {"state_dir": str(env.tmp / "state"), "runtime_dir": str(env.tmp / "run")}}
    return configuration.parse(data, "test")


def insert(env, rows, name="btc"):
    """rows: (ts_ms, mt, m); rts is ts + 5 ms."""
    with env.store() as store:
        store.create_database()
        store.create_rows_table(f"{name}_current")
        store.insert_rows(f"{name}_current", [(ts, mt, m, ts + 5) for ts, mt, m in rows])


def rows_for(hour, n, tag):
    return [(hour + i * (HOUR_MS // n), "d", f"{tag}|{i}|1") for i in range(n)]


def files_rows(env):
    """Every row of every Parquet file, and per file the hour its rows fall in."""
    rows, directory = collections.Counter(), env.tmp / "export"
    for name in sorted(os.listdir(directory)) if directory.exists() else []:
        table = pq.read_table(directory / name)
        assert table.column("mt").null_count == 0
        for r in table.to_pylist():
            ts = int(r["ts"].timestamp() * 1000)
            assert archive.file_name("btc", ts // HOUR_MS * HOUR_MS) == name, name
            rows[(ts, r["mt"], r["m"])] += 1
    return rows


def stored(env, table="btc_current"):
    return collections.Counter(env.rows(table))


def assert_exactly_once(env, sent):
    union = files_rows(env) + stored(env) + stored(env, "btc_previous")
    assert union == collections.Counter(sent), "rows lost or doubled"


class ShuttingDownSupervisor:
    """The exporter's bus while the supervisor stops its collectors: no rotate_ready comes,
    and the exporter gets its SIGTERM while it waits."""

    def __init__(self):
        self.exporter = None

    def send(self, kind, **fields):
        pass

    def receive(self, timeout):
        self.exporter.stopping = True
        return None


def test_a_state_file_of_an_interrupted_cycle_is_read_typed_and_written_back_the_same(tmp_path):
    text = ('{"phase": "exporting", "boundary": 1764000000000, "hours": {"1763996400000": '
            '{"before_sha": null, "before_rows": 0, "done": true}, "1763992800000": '
            '{"before_sha": "ab12", "before_rows": 7, "done": false}}}')
    (tmp_path / "btc.json").write_text(text)
    state = SymbolState(str(tmp_path), "btc")
    assert state.progress == Progress(Phase.EXPORTING, 1764000000000, {
        1763996400000: HourExport(None, 0, True), 1763992800000: HourExport("ab12", 7)})
    state.save()
    assert json.loads((tmp_path / "btc.json").read_text()) == json.loads(text)
    state.clear()
    assert SymbolState(str(tmp_path), "btc").progress is None


def test_sigterm_while_waiting_for_the_rotation_is_no_error(env, caplog):
    insert(env, rows_for(H, 10, "a"))
    bus = ShuttingDownSupervisor()
    bus.exporter = Exporter(make_config(env), bus=bus, clock=SetClock(H + HOUR_MS + 60_000))
    with caplog.at_level(logging.INFO):
        ok, files, error = bus.exporter.cycle()
    assert (ok, files, error) == (False, [], "stopped before the rotation")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert env.count("btc_current") == 10 and not os.path.exists(env.tmp / "export" / "btc")


def test_rows_straddling_the_hour_and_late_rows(env):
    sent = rows_for(H - 2 * HOUR_MS, 50, "a") + rows_for(H - HOUR_MS, 60, "b") + rows_for(H, 7, "c")
    insert(env, sent)
    clock = SetClock(H + 61_000)  # 00:01:01: hours before 00:00 are over, 00:00 is not
    ok, files, error = Exporter(make_config(env), clock=clock).cycle()
    assert ok and error is None
    assert [os.path.basename(f) for f in files] == ["btc_20251123_2200.parquet",
                                                    "btc_20251123_2300.parquet"]
    assert env.count("btc_current") == 7 and env.rows("btc_previous") == []
    assert_exactly_once(env, sent)
    late = rows_for(H - HOUR_MS + 1, 5, "late") + rows_for(H + 2, 3, "d")
    insert(env, late)
    clock.now = H + HOUR_MS + 61_000
    ok, files, _ = Exporter(make_config(env), clock=clock).cycle()
    assert ok and sorted(os.path.basename(f) for f in files) == ["btc_20251123_2300.parquet",
                                                                 "btc_20251124_0000.parquet"]
    assert pq.read_metadata(env.tmp / "export" / "btc_20251123_2300.parquet").num_rows == 65
    assert_exactly_once(env, sent + late)
    with env.store() as store:
        logged = [(hour, rows) for hour, _path, rows, _sha in store.logged_exports("BTC_USDT")]
    assert logged == [(H - 2 * HOUR_MS, 50), (H - HOUR_MS, 65), (H, 10)]


def test_file_format_for_pandas_polars_duckdb_readers(env):
    sent = rows_for(H - HOUR_MS, 30, "x")
    insert(env, sent)
    ok, files, _ = Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
    assert ok
    path = files[0]
    schema_ = pq.read_schema(path)
    assert str(schema_.field("ts").type) == "timestamp[ms, tz=UTC]"
    assert str(schema_.field("mt").type) == "dictionary<values=string, indices=int8, ordered=0>"
    meta = pq.read_metadata(path)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.metadata[b"symbol"] == b"BTC_USDT" and meta.metadata[b"rows"] == b"30"
    assert meta.metadata[b"hour"] == b"2025-11-23T23:00:00Z"
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"
    import duckdb  # a second, independent Parquet reader (test extra)
    result = duckdb.connect().execute(
        f"SELECT count(*), count(DISTINCT mt), min(ts), max(ts) FROM '{path}'")
    count, kinds, low, high = result.fetchall()[0]
    assert (count, kinds) == (30, 1)
    assert int(low.timestamp() * 1000) == H - HOUR_MS and high.timestamp() * 1000 < H


def export_dying_after_the_file(env, monkeypatch):
    """One export cycle killed right after an hour's file is renamed into place."""
    real_commit = parquet_files.HourFile.commit

    def commit_then_die(self):
        real_commit(self)
        raise SystemExit("killed after the rename")
    monkeypatch.setattr(parquet_files.HourFile, "commit", commit_then_die)
    with pytest.raises(SystemExit):
        Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()


def test_crash_after_the_file_before_dropping_previous(env, monkeypatch):
    sent = rows_for(H - HOUR_MS, 40, "a") + rows_for(H, 4, "b")
    insert(env, sent)
    export_dying_after_the_file(env, monkeypatch)
    assert env.count("btc_previous") == 44  # nothing dropped (its 4 new rows are copied back)
    monkeypatch.undo()
    ok, files, _ = Exporter(make_config(env), clock=SetClock(H + 62_000)).cycle()
    assert ok and [os.path.basename(f) for f in files] == ["btc_20251123_2300.parquet"]
    assert pq.read_metadata(files[0]).num_rows == 40
    assert_exactly_once(env, sent)


def test_crash_between_swap_and_move_back(env, monkeypatch):
    sent = rows_for(H - HOUR_MS, 20, "a") + rows_for(H, 6, "b")
    insert(env, sent)
    monkeypatch.setattr(Store, "move_back", lambda *a: (_ for _ in ()).throw(SystemExit))
    with pytest.raises(SystemExit):
        Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
    assert env.count("btc_previous") == 26 and env.count("btc_current") == 0
    monkeypatch.undo()
    insert(env, rows_for(H + 1, 2, "c"))  # collectors kept writing meanwhile
    ok, _files, _ = Exporter(make_config(env), clock=SetClock(H + 62_000)).cycle()
    assert ok
    assert_exactly_once(env, sent + rows_for(H + 1, 2, "c"))
    assert env.count("btc_current") == 8


def test_exporter_down_for_hours_writes_one_file_per_hour(env):
    sent = [row for k in range(5, 0, -1) for row in rows_for(H - k * HOUR_MS, 10, f"h{k}")]
    insert(env, sent)
    ok, files, _ = Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
    assert ok and len(files) == 5
    assert_exactly_once(env, sent)


def test_unwritable_export_dir_keeps_data_and_retries(env):
    sent = rows_for(H - HOUR_MS, 10, "a")
    insert(env, sent)
    (env.tmp / "export").write_text("a file where the directory should be")
    ok, files, error = Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
    assert not ok and files == [] and "btc" in error
    assert env.count("btc_previous") == 10  # data stays in ClickHouse
    (env.tmp / "export").unlink()
    ok, files, _ = Exporter(make_config(env), clock=SetClock(H + 62_000)).cycle()
    assert ok and len(files) == 1
    assert_exactly_once(env, sent)


def test_a_symbol_removed_from_the_config_is_exported_until_its_tables_are_empty(env):
    Exporter(make_config(env, ("BTC_USDT", "ETH_USDT")), clock=SetClock(H - HOUR_MS)).cycle()
    late = rows_for(H - 2 * HOUR_MS, 10, "old") + rows_for(H - HOUR_MS, 10, "last")
    current = rows_for(H, 5, "open")  # the hour is not over at the first cycle below
    insert(env, late + current, name="eth")
    exporter = Exporter(make_config(env, ("BTC_USDT",)), clock=SetClock(H + 61_000))
    ok, files, _ = exporter.cycle()
    assert ok and sorted(os.path.basename(f) for f in files) == [
        archive.file_name("eth", H - 2 * HOUR_MS), archive.file_name("eth", H - HOUR_MS)]
    assert collections.Counter(env.rows("eth_current")) == collections.Counter(current)
    exporter.clock = SetClock(H + HOUR_MS + 61_000)
    ok, files, _ = exporter.cycle()
    assert ok and [os.path.basename(f) for f in files] == [archive.file_name("eth", H)]
    assert env.count("eth_current") == 0
    exported = collections.Counter()
    for f in os.listdir(env.tmp / "export"):
        if f.startswith("eth_"):
            exported.update((int(r["ts"].timestamp() * 1000), r["mt"], r["m"])
                            for r in pq.read_table(env.tmp / "export" / f).to_pylist())
    assert exported == collections.Counter(late + current), "eth rows lost or doubled"
    assert "eth" not in (env.tmp / "state" / "exporter" / "known-symbols.json").read_text()
    exporter.clock = SetClock(H + 2 * HOUR_MS + 61_000)
    assert exporter.cycle()[:2] == (True, [])


def test_full_export_disk_keeps_data_and_leaves_no_temporary_files(env):
    export_dir = env.tmp / "export"
    export_dir.mkdir()
    # 256 KiB of disk for ~2 MB of rows that do not compress (distinct random text)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(export_dir)],
                   check=True)
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()  # a pid no process has: its temporary file is a crashed exporter's
        stale = export_dir / f".btc_20251123_2300.parquet.{dead.pid}.tmp"
        stale.write_bytes(b"half a file")
        sent = [(H - HOUR_MS + i, "d", os.urandom(1000).hex()) for i in range(1000)]
        insert(env, sent)
        ok, files, error = Exporter(make_config(env), clock=SetClock(H + 61_000)).cycle()
        assert not ok and files == [] and "No space left" in error
        assert os.listdir(export_dir) == [], "temporary files left on the full disk"
        assert env.count("btc_previous") == len(sent)  # the data stays in ClickHouse
    finally:
        subprocess.run(["umount", str(export_dir)], check=True)
    ok, files, _ = Exporter(make_config(env), clock=SetClock(H + 62_000)).cycle()
    assert ok and len(files) == 1
    assert_exactly_once(env, sent)


@pytest.mark.slow
def test_clickhouse_down_during_rotation(env, own_clickhouse):
    # own_clickhouse: a server of the test's release, which the test may stop
    env.clickhouse = own_clickhouse
    sent = rows_for(H - HOUR_MS, 10, "a")
    insert(env, sent)
    exporter = Exporter(make_config(env), clock=SetClock(H + 61_000))
    own_clickhouse.stop()
    ok, files, error = exporter.cycle()
    assert not ok and files == [] and error
    own_clickhouse.start()
    ok, files, _ = exporter.cycle()
    assert ok and len(files) == 1
    assert_exactly_once(env, sent)
    exporter.store.close()  # the server's stop need not wait for an idle session


@pytest.mark.slow
def test_daemon_with_an_accelerated_clock(env):
    """Hours pass in 6 s: rotations while data flows; then `mexc export --once`, `mexc verify`."""
    anchor = int(time.time() * 1000)
    clock = EventClock(speed=600, anchor_ms=anchor)
    with MexcSimulator(rate=40, event_clock=clock.now_ms) as sim:
        config = env.write_config(sim.url, export={"clock_speed": 600.0, "clock_anchor_ms": anchor,
                                                  "delay": 5.0},
                                  supervisor={"heartbeat_timeout": 10.0})
        daemon = env.mexc("run", "--config", config, name="daemon")
        wait_for(lambda: len(os.listdir(env.tmp / "export")) >= 3 if (env.tmp / "export").exists()
                 else False, 60, "three hourly files")
        sim.stop_data()
        result = subprocess.run([MEXC, "export", "--once", "--config", config],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        sent = collections.Counter(r for r in sim.expected_rows("BTC_USDT"))
        wait_for(lambda: sum((files_rows(env) + stored(env)).values()) >= sum(sent.values()), 30,
                 "every row in files or current")
        assert files_rows(env) + stored(env) + stored(env, "btc_previous") == sent
        verify = subprocess.run([MEXC, "verify", "--config", config], capture_output=True,
                                text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "files verified" in verify.stdout and "btc_current:" in verify.stdout
        version = env.query("SELECT version()")[0][0]
        assert f": ClickHouse {version}, time columns " in verify.stdout
        assert daemon.stop(15) == 0
        assert "Traceback" not in daemon.log()


def test_verif_reports_no_recent_data(env):
    insert(env, rows_for(H - HOUR_MS, 3, "old"))
    path = env.tmp / "mexc.toml"
    path.write_text(toml_dump({"symbols": ["BTC_USDT"], "clickhouse": env.ch_section(),
                               "tor": {"enabled": False}}))
    result = subprocess.run([MEXC, "verif", "--config", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "btc_current: 3 records (t: 0, d: 3, dp: 0)" in result.stdout
    assert "no data in the last 5 minutes" in result.stdout

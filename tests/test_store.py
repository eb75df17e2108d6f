"""The ClickHouse store: what the server supports decides the column types; each named
operation does what it says on a real server; setup-db is idempotent."""
import subprocess

import pytest

from core import store
from core.clock import HOUR_MS
from tests.chdb_server import SERVERS
from tests.conftest import MEXC, wait_for
from tests.tor_network import free_port

HOUR = 1_700_000_000_000 // HOUR_MS * HOUR_MS


def rows(hour, n, tag):
    return [(hour + i * (HOUR_MS // n), "d", f"{tag}|{i}|1", hour + i) for i in range(n)]


def test_features_follow_the_server(env):
    session = env.store()
    try:
        session.setup(["btc"])
        features = session.features
        version = tuple(int(x) for x in features.version.split(".")[:2])
        assert features.datetime64 == (version >= (20, 1))
        assert features.exchange_tables is False or version >= (20, 1)
        columns = dict(row[:2] for row in session.client.execute(
            f"DESCRIBE TABLE {env.database}.btc_current"))
    finally:
        session.close()
    time_type = "DateTime64(3, 'UTC')" if features.datetime64 else "UInt64"
    assert columns == {"ts": time_type, "m": "String", "rts": time_type,
                       "mt": "Enum8('t' = 1, 'd' = 2, 'dp' = 3, 'dl' = 4, 'bu' = 5, 'bs' = 6)"}
    assert features.ms() == ("toUnixTimestamp64Milli(ts)" if features.datetime64 else "ts")


@pytest.mark.one_clickhouse
def test_an_http_port_of_another_server_is_not_used(env, tmp_path, caplog):
    """http_port pointing at another ClickHouse on the host (here the other release): the
    export must not read that server's rows; it falls back to the native protocol."""
    other = SERVERS["ch26"](str(tmp_path / "other")).start()
    try:
        with store.Store({**env.ch_section(), "http_port": other.http_port}) as session:
            assert session.features.http_format is None
        assert f"http_port {other.http_port} is another server (ClickHouse 26." in caplog.text
    finally:
        other.stop()


def test_tables_made_before_an_upgrade_keep_deciding_the_time_type(env):
    """A server upgraded from 18.16 keeps its UInt64 tables: reads must not treat them as
    DateTime64 just because the server could."""
    with env.store() as session:
        session.create_database()
        session.client.execute(f"CREATE TABLE {env.database}.export_log (symbol String, "
                               f"hour_start UInt64) ENGINE = Memory")
        assert session.features.datetime64 is False
        assert "time columns UInt64" in session.features.describe()


def test_rotation_operations_keep_every_row_once(env):
    """swap, move_back, hours, hour_rows, drop: the exporter's steps, one by one."""
    session = env.store()
    try:
        session.setup(["btc"])
        old, new = rows(HOUR, 30, "old"), rows(HOUR + HOUR_MS, 20, "new")
        session.insert_rows("btc_current", old + new)
        assert session.contains("btc_current", old[3]) and session.rows_by_type("btc_current") == {"d": 50}
        session.swap("btc")
        assert session.count("btc_current") == 0 and session.count("btc_previous") == 50
        assert not session.moved_back("btc", HOUR + HOUR_MS)
        session.move_back("btc", HOUR + HOUR_MS)
        assert session.moved_back("btc", HOUR + HOUR_MS)
        assert sorted(session.client.execute(
            f"SELECT m FROM {env.database}.btc_current")) == sorted((m,) for _t, _mt, m, _r in new)
        assert session.hours("btc", before=HOUR + HOUR_MS) == [(HOUR, 30)]
        assert session.hours("btc") == [(HOUR, 30), (HOUR + HOUR_MS, 20)]
        assert list(session.hour_rows("btc", HOUR)) == old  # in ts order, times as ms
        session.drop("btc_previous")
        assert not session.exists("btc_previous") and session.exists("btc_current")
        assert session.recover_fresh("btc") is None
    finally:
        session.close()


def test_hour_batches_over_http_are_the_native_rows_exactly(env):
    """The export's fast path (Arrow or CSV over HTTP) gives what the native protocol gives,
    byte for byte, for every awkward text; with the HTTP port closed it falls back."""
    texts = ["", "a,b", 'say "hi"', "two\nlines", "cr\r\n", "tab\there", "back\\slash",
             "ünï €", "\\N", "NULL", " lead", "x" * 5000]
    hour = [(HOUR + i, "dp" if i % 2 else "t", text, HOUR + i + 7)
            for i, text in enumerate(texts * 3)]
    with env.store() as session:
        session.setup(["btc"])
        session.insert_rows("btc_current", hour + rows(HOUR + HOUR_MS, 5, "next"))
        session.swap("btc")
        assert session.features.http_format == ("ArrowStream" if session.features.datetime64
                                                else "CSV")
        native = list(session.hour_rows("btc", HOUR))
        over_http = [tuple(row.values()) for batch in session.hour_batches("btc", HOUR)
                     for row in batch.to_pylist()]
    assert native == sorted(hour) and over_http == native
    with store.Store({**env.ch_section(), "http_port": 1}) as closed:
        assert closed.features.http_format is None
        assert [tuple(row.values()) for batch in closed.hour_batches("btc", HOUR)
                for row in batch.to_pylist()] == native


def test_gap_ledger_round_trip(env):
    """record_gaps then gaps(): every field back as written; the filters select by overlap."""
    from core.vocabulary import GAP_COLLECTOR_CRASH, GAP_DISCONNECT, Gap
    first = Gap("BTC_USDT", "btc", HOUR + 1_000, HOUR + 5_000, GAP_DISCONNECT,
                "close code 1006", 12, True, HOUR + 6_000)
    second = Gap("ETH_USDT", "eth", HOUR + 4_000, HOUR + HOUR_MS + 1, GAP_COLLECTOR_CRASH,
                 "SIGKILL", 0, False, HOUR + HOUR_MS + 2)
    with env.store() as session:
        assert session.ledger_total() == (0, 0)  # no database yet
        session.setup(["btc", "eth"])
        assert session.newest_gap_end_ms("btc", 2 ** 62) is None
        session.record_gaps([second, first])
        assert session.ledger_total() == (2, HOUR + HOUR_MS + 2)
        assert session.gaps() == [first, second]
        assert session.gaps(name="eth") == [second]
        assert session.gaps(since_ms=HOUR + 5_000) == [second]  # first ends where this starts
        assert session.gaps(until_ms=HOUR + 4_000) == [first]
        # where a next start's gap begins: the latest recorded end at or before its end
        assert session.newest_gap_end_ms("btc", HOUR + 5_000) == HOUR + 5_000
        assert session.newest_gap_end_ms("btc", HOUR + 4_999) is None
        assert session.newest_gap_end_ms("eth", 2 ** 62) == HOUR + HOUR_MS + 1


def test_cluster_holdings_round_trip(env):
    """Only a clustered setup makes cluster_holdings; holdings() answers a span with each
    host's state at its start, then its takes and releases in it, oldest first."""
    with env.store() as session:
        session.setup(["btc"])
        assert not session.exists("cluster_holdings")
        session.setup(["btc"], clustered=True)
        assert [c[:2] for c in session.client.execute(
            f"DESCRIBE TABLE {env.database}.cluster_holdings")] == [
            ("name", "String"), ("host", "String"), ("ts", "UInt64"), ("held", "UInt8")]
        for host, ts, held in [("h1", 100, True), ("h2", 150, True), ("h1", 200, False),
                               ("h2", 5_000, False), ("h3", 9_000, True)]:
            session.record_holding("btc", host, ts, held)
        session.record_holding("eth", "h1", 300, True)
        assert session.holdings("btc", 1_000, 9_000) == [
            ("h2", 150, True), ("h1", 200, False), ("h2", 5_000, False)]
        assert session.holdings("eth", 0, 1_000) == [("h1", 300, True)]
        # what a host still held when it went down: its last record before its start a take
        assert session.held_before("h1", 10_000) == ["eth"]
        assert session.held_before("h2", 10_000) == []
        assert session.held_before("h2", 1_000) == ["btc"]
        assert session.held_before("h4", 10_000) == []
        assert session.held_before("h3") == ["btc"]  # now: its latest record
        # an hour file's bytes and its export_log entry; the bytes pruned by hour
        session.put_hour_file("btc", HOUR, store.COPY, "h1", "a" * 64, 2, b"bytes")
        session.put_hour_file("btc", HOUR + HOUR_MS, store.COPY, "h1", "b" * 64, 2, b"more")
        session.log_export("BTC_USDT", HOUR, 1, "/x", 2, 5, "a" * 64)
        session.log_export("BTC_USDT", HOUR, 2, "/x", 3, 7, "c" * 64)
        assert session.logged_file("BTC_USDT", HOUR) == ("c" * 64, 7)
        assert session.logged_file("BTC_USDT", HOUR + HOUR_MS) is None
        assert session.drop_hour_files(HOUR + HOUR_MS) == 1
        wait_for(lambda: session.hour_file("btc", HOUR, store.COPY, "h1", "a" * 64) is None, 30,
                 "the pruned hour's bytes gone")
        assert session.hour_file("btc", HOUR + HOUR_MS, store.COPY, "h1", "b" * 64) == b"more"


def test_live_rows_of_current_and_previous_in_one_read(env):
    with env.store() as session:
        assert session.live_rows("btc", "d", 0, 2 * HOUR) == [[], [], [], []]  # no table
        session.setup(["btc"])
        old, new = rows(HOUR, 4, "old"), rows(HOUR + HOUR_MS, 3, "new")
        session.insert_rows("btc_current", old)
        session.swap("btc")  # old rows now in previous
        session.insert_rows("btc_current", new + [(HOUR + 1, "t", "1|2|3|4|5", HOUR + 2)])
        session.client.execute(f"CREATE TABLE {env.database}.btc_fresh AS "
                               f"{env.database}.btc_current")  # as a crash mid-swap leaves it
        session.insert_rows("btc_fresh", old[-1:])
        ts, m, rts, pending = session.live_rows("btc", "d", HOUR + 1, HOUR + 2 * HOUR_MS)
    expected = sorted([(r[0], r[2], r[3], 1) for r in old[1:] + old[-1:]] +
                      [(r[0], r[2], r[3], 0) for r in new])
    assert sorted(zip(ts, m, rts, pending)) == expected  # the range, mt 'd' only
    assert list(ts) == sorted(ts)


def test_identifiers_are_quoted():
    assert store.quote("1000pepe_current") == "`1000pepe_current`"
    assert store.quote("a`b") == "`a\\`b`"


def test_setup_db_is_idempotent(env):
    config = env.write_config("ws://127.0.0.1:1/edge", symbols=["BTC_USDT", "1000PEPE_USDT"])
    for _ in range(2):
        result = subprocess.run([MEXC, "setup-db", "--config", config], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "btc_current, 1000pepe_current, export_log, gaps" in result.stderr
    tables = {name for (name,) in env.query(f"SHOW TABLES FROM {env.database}")}
    assert tables == {"btc_current", "1000pepe_current", "export_log", "gaps", "schema_version"}
    columns = env.query(f"DESCRIBE TABLE {env.database}.btc_current")
    assert [c[0] for c in columns] == ["ts", "mt", "m", "rts"]


def test_setup_db_without_clickhouse_fails_clearly(env):
    config = env.write_config("ws://127.0.0.1:1/edge", clickhouse={"port": 1})
    result = subprocess.run([MEXC, "setup-db", "--config", config], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot set up ClickHouse at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def make_release_0_1_0_store(session, old_mt: str) -> None:
    """Tables as mexc 0.1.0 left them (no schema_version), and a rows table of each kind
    whose mt Enum lacks today's last message type, as after a release that adds one."""
    session.create_database()
    session.create_export_log()
    session.create_gaps_table()
    session.log_export("BTC_USDT", HOUR, HOUR + 1, "/x/btc_1.parquet", 7, 100, "ab")
    t = session.features.time_type
    for table in ("btc_current", "btc_previous"):
        session.client.execute(f"CREATE TABLE {session.db}.{table} (ts {t}, mt {old_mt}, "
                               f"m String, rts {t}) ENGINE = StripeLog")
        session.insert_rows(table, rows(HOUR, 50, table))


def test_an_older_store_is_migrated_at_the_daemons_start_and_loses_nothing(env):
    old_mt = store.MT_ENUM.rsplit(",", 1)[0] + ")"  # without the last message type
    session = env.store()
    try:
        make_release_0_1_0_store(session, old_mt)
        session.setup(["btc", "eth"])  # the exporter, setup-db: no migration
        assert session.schema_version() == 1
        session.client.execute(f"CREATE TABLE {session.db}.btc_current_migration "
                               "(x UInt8) ENGINE = StripeLog")  # a copy a crash left
        before = {table: sorted(session.client.execute(
            f"SELECT {session.features.ms()}, toString(mt), m FROM {session.db}.{table}"))
            for table in ("btc_current", "btc_previous")}
        session.setup(["btc", "eth"], migrate=True)
        assert session.schema_version() == store.SCHEMA_VERSION
        for table, kept in before.items():
            assert session.client.execute(f"SELECT type FROM system.columns WHERE database = "
                                          f"'{env.database}' AND table = '{table}' AND "
                                          "name = 'mt'")[0][0] == store.MT_ENUM
            assert sorted(session.client.execute(
                f"SELECT {session.features.ms()}, toString(mt), m FROM {session.db}.{table}")) \
                == kept and len(kept) == 50
        session.insert_rows("btc_current", [(HOUR, store.MESSAGE_TYPES[-1], "new", HOUR)])
        assert session.logged_exports("BTC_USDT") == [(HOUR, "/x/btc_1.parquet", 7, "ab")]
        assert not session.exists("btc_current_migration")
        session.setup(["btc"], migrate=True)  # once is enough
        assert session._one(f"SELECT count() FROM {session.db}.schema_version") == 1
    finally:
        session.close()


def test_a_newer_store_is_refused_with_a_clear_message(env):
    session = env.store()
    try:
        session.setup(["btc"])
        assert session.schema_version() == store.SCHEMA_VERSION  # a new database: today's
        session.client.execute(f"INSERT INTO {session.db}.schema_version VALUES", [(99, 0, "x")])
        with pytest.raises(store.SchemaTooNew, match=f"database {env.database} has store "
                                                     "schema 99, written by a newer mexc"):
            session.setup(["btc"], migrate=True)
    finally:
        session.close()
    config = env.write_config("ws://127.0.0.1:1/edge")
    result = subprocess.run([MEXC, "run", "--config", config], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "refusing to start: database" in result.stderr and "schema 99" in result.stderr


def test_a_clusters_hour_files_holdings_and_logs_read_here_and_through_remote(env, monkeypatch):
    """The SQL a cluster host runs (docs/cluster.md): an hour file's bytes in parts, holdings,
    the export_log and the ledger of a peer, here the same server reached through remote()."""
    monkeypatch.setattr(store, "FILE_PART_BYTES", 1000)  # several parts
    data = bytes(range(256)) * 20
    peer = f"127.0.0.1:{env.clickhouse.port}"
    with env.store() as session:
        session.setup(["btc"])
        session.create_cluster_tables()
        session.put_hour_file("btc", HOUR, store.COPY, "tokyo", "abc", 7, data)
        session.put_hour_file("btc", HOUR, store.COPY, "tokyo", "abc", 7, data)  # a retry
        for source in (None, peer):
            assert session.hour_file("btc", HOUR, store.COPY, "tokyo", "abc", source) == data
        assert session.hour_file("btc", HOUR, store.MERGED, "tokyo", "abc") is None
        assert session.has_hour_file("btc", HOUR, store.COPY, "tokyo", "abc")
        session.record_holding("btc", "tokyo", HOUR - 5, True)
        session.record_holding("btc", "tokyo", HOUR + 10, False)
        session.record_holding("btc", "tokyo", HOUR + 20, True)
        session.record_holding("btc", "frankfurt", HOUR + HOUR_MS, True)  # after the hour
        assert sorted(session.holdings("btc", HOUR, HOUR + HOUR_MS, peer)) == [
            ("tokyo", HOUR - 5, 1), ("tokyo", HOUR + 10, 0), ("tokyo", HOUR + 20, 1)]
        session.log_export("BTC_USDT", HOUR, HOUR + 1, "/x", 7, 100, "old")
        session.log_export("BTC_USDT", HOUR, HOUR + 2, "/x", 7, 100, "new")
        session.log_export("BTC_USDT", HOUR, HOUR + 3, "/copy", 7, 100, "mine",
                           table=store.COPY_LOG)
        assert session.logged_sha256("BTC_USDT", HOUR, peer) == "new"
        assert session.logged_sha256("BTC_USDT", HOUR + HOUR_MS) is None
        assert store.Store(env.ch_section(), files_log=store.COPY_LOG).latest_exported_hour(
            "BTC_USDT") == HOUR
        gap = store.Gap("BTC_USDT", "btc", HOUR + 1, HOUR + 9, "disconnect", "", 0, False, 1)
        session.record_gaps([gap])
        assert session.gaps("btc", HOUR, HOUR + HOUR_MS, source=peer) == [gap]
        # a peer that does not answer: recorded as unreachable, and the next query answers
        unreachable, away = {}, f"127.0.0.1:{free_port('127.0.0.1')}"
        with session.asking("osaka", unreachable):
            session.gaps("btc", HOUR, HOUR + HOUR_MS, source=away)
        assert list(unreachable) == ["osaka"] and unreachable["osaka"], unreachable
        assert session.gaps("btc", HOUR, HOUR + HOUR_MS, source=peer) == [gap]
        with pytest.raises(Exception), session.asking("here", unreachable, required=True):
            session.gaps("btc", HOUR, HOUR + HOUR_MS, source=away)
        assert "here" not in unreachable


def test_a_store_of_the_previous_schema_gets_the_whole_books_types(env):
    """Schema 2 (mexc 0.2.0): rows tables whose mt lacks 'bu' and 'bs'."""
    old_mt = store.MT_ENUM.split(", 'bu'")[0] + ")"
    session = env.store()
    try:
        session.setup(["btc"])
        session.client.execute(f"DROP TABLE {session.db}.btc_current")
        session.client.execute(f"DROP TABLE {session.db}.schema_version")
        session.client.execute(f"CREATE TABLE {session.db}.schema_version (version UInt32, "
                               "applied_ms UInt64, release String) ENGINE = MergeTree "
                               "ORDER BY version")
        session.client.execute(f"INSERT INTO {session.db}.schema_version VALUES",
                               [(2, 0, "mexc 0.2.0")])
        t = session.features.time_type
        session.client.execute(f"CREATE TABLE {session.db}.btc_current (ts {t}, mt {old_mt}, "
                               f"m String, rts {t}) ENGINE = StripeLog")
        session.insert_rows("btc_current", rows(HOUR, 20, "old"))
        with pytest.raises(Exception):  # the old table refuses the new types
            session.insert_rows("btc_current", [(HOUR, "bu", "1|1||", HOUR)])
        session.setup(["btc"], migrate=True)
        assert session.schema_version() == store.SCHEMA_VERSION == 3
        session.insert_rows("btc_current", [(HOUR, "bu", "1|1||[2,3]", HOUR),
                                            (HOUR, "bs", "1|[1,1]|[2,3]", HOUR)])
        assert session.rows_by_type("btc_current") == {"d": 20, "bu": 1, "bs": 1}
        assert session.newest_book_update("btc", HOUR + 1) == (HOUR, "1|1||[2,3]")
        # one received later (a restarted collector's own, stored before it looked): not it
        session.insert_rows("btc_current", [(HOUR + 10, "bu", "2|2||[2,4]", HOUR + 5)])
        assert session.newest_book_update("btc", HOUR + 5) == (HOUR, "1|1||[2,3]")
        assert session.newest_book_update("btc", HOUR + 6) == (HOUR + 10, "2|2||[2,4]")
    finally:
        session.close()

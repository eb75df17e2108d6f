"""The ClickHouse schema: what the server supports decides the column types; setup-db is
idempotent."""
import subprocess

from mexc import schema
from tests.conftest import MEXC

NEW = schema.Features(version="24.8.1", datetime64=True, exchange_tables=True)
OLD = schema.Features(version="18.16.1", datetime64=False, exchange_tables=False)


def test_detect_on_the_test_server(env):
    client = env.client()
    try:
        features = schema.detect(client, "default")
    finally:
        client.disconnect()
    version = tuple(int(x) for x in features.version.split(".")[:2])
    assert features.datetime64 == (version >= (20, 1))
    assert features.exchange_tables is False or version >= (20, 1)


def test_time_columns_follow_the_server():
    assert "ts DateTime64(3, 'UTC')" in schema.create_rows_table("mexc", "btc_current", NEW)
    assert "rts DateTime64(3, 'UTC')" in schema.create_rows_table("mexc", "btc_current", NEW)
    assert "ts UInt64" in schema.create_rows_table("mexc", "btc_current", OLD)
    assert NEW.ts_ms() == "toUnixTimestamp64Milli(ts)" and OLD.ts_ms() == "ts"
    assert "ENGINE = StripeLog" in schema.create_rows_table("mexc", "btc_current", OLD)
    assert "mt Enum8('t' = 1, 'd' = 2, 'dp' = 3, 'dl' = 4)" in \
        schema.create_rows_table("mexc", "btc_current", OLD)


def test_identifiers_are_quoted():
    assert schema.quote("1000pepe_current") == "`1000pepe_current`"
    assert schema.quote("a`b") == "`a\\`b`"


def test_setup_db_is_idempotent(env):
    config = env.write_config("ws://127.0.0.1:1/edge", symbols=["BTC_USDT", "1000PEPE_USDT"])
    for _ in range(2):
        result = subprocess.run([MEXC, "setup-db", "--config", config], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "btc_current, 1000pepe_current, export_log" in result.stderr
    tables = {name for (name,) in env.query(f"SHOW TABLES FROM {env.database}")}
    assert tables == {"btc_current", "1000pepe_current", "export_log"}
    columns = env.query(f"DESCRIBE TABLE {env.database}.btc_current")
    assert [c[0] for c in columns] == ["ts", "mt", "m", "rts"]


def test_setup_db_without_clickhouse_fails_clearly(env):
    config = env.write_config("ws://127.0.0.1:1/edge", clickhouse={"port": 1})
    result = subprocess.run([MEXC, "setup-db", "--config", config], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot set up ClickHouse at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr

"""The ClickHouse schema: table names, DDL, and what the connected server supports.

Rows are (ts, mt, m, rts):
  ts   event time at the exchange, ms since the epoch, UTC
  mt   message type: 't' ticker, 'd' deal, 'dp' depth, 'dl' dead letter
  m    the message text (see README, "Row format")
  rts  local receive time, ms since the epoch, UTC

Time columns are DateTime64(3, 'UTC') where the server has it and UInt64 milliseconds on old
servers (18.16, Debian's package).  Both accept the same integer milliseconds on insert, so
everything above this module has one code path; readers use `ts_ms()` to select milliseconds.
"""
from dataclasses import dataclass

from clickhouse_driver import Client
from clickhouse_driver.errors import ServerException

MESSAGE_TYPES = ("t", "d", "dp", "dl")
ROW_COLUMNS = ("ts", "mt", "m", "rts")
MT_ENUM = "Enum8('t' = 1, 'd' = 2, 'dp' = 3, 'dl' = 4)"


@dataclass(frozen=True)
class Features:
    """What the server can do, probed once per connection."""
    version: str
    datetime64: bool
    exchange_tables: bool

    @property
    def time_type(self) -> str:
        return "DateTime64(3, 'UTC')" if self.datetime64 else "UInt64"

    def ts_ms(self, column: str = "ts") -> str:
        """SQL expression giving a time column as integer milliseconds."""
        return f"toUnixTimestamp64Milli({column})" if self.datetime64 else column


def connect(ch: dict, database: bool = True, timeout: float = 10.0) -> Client:
    """A clickhouse-driver client for the [clickhouse] config section."""
    return Client(host=ch["host"], port=ch["port"], user=ch["user"], password=ch["password"],
                  database=ch["database"] if database else "default",
                  connect_timeout=timeout, send_receive_timeout=timeout,
                  settings={"strings_as_bytes": False})


def detect(client: Client, database: str) -> Features:
    version = client.execute("SELECT version()")[0][0]
    try:
        client.execute("SELECT toDateTime64(0, 3, 'UTC')")
        datetime64 = True
    except ServerException:
        datetime64 = False
    engine = client.execute("SELECT engine FROM system.databases WHERE name = %(db)s",
                            {"db": database})
    # EXCHANGE TABLES exists only for Atomic databases (ClickHouse 20.x and later).
    exchange = bool(engine) and engine[0][0] == "Atomic"
    return Features(version=version, datetime64=datetime64, exchange_tables=exchange)


def quote(identifier: str) -> str:
    """Backtick-quote an identifier; config validation already restricts the characters."""
    return "`" + identifier.replace("\\", "\\\\").replace("`", "\\`") + "`"


def current_table(name: str) -> str:
    return f"{name}_current"


def previous_table(name: str) -> str:
    return f"{name}_previous"


def fresh_table(name: str) -> str:
    """Exists only during a swap; a crash may leave it behind (the exporter cleans it up)."""
    return f"{name}_fresh"


def swap_statements(database: str, name: str, features: Features):
    """SQL that makes {name}_current empty and the old one {name}_previous, with no moment in
    which {name}_current does not exist (an insert could fail or land in a doomed table)."""
    db = quote(database)
    current, previous = quote(current_table(name)), quote(previous_table(name))
    fresh = quote(fresh_table(name))
    statements = [f"CREATE TABLE {db}.{fresh} AS {db}.{current}"]
    if features.exchange_tables:
        statements += [f"EXCHANGE TABLES {db}.{current} AND {db}.{fresh}",
                       f"RENAME TABLE {db}.{fresh} TO {db}.{previous}"]
    else:  # one RENAME of both tables: ClickHouse applies it under one lock
        statements.append(f"RENAME TABLE {db}.{current} TO {db}.{previous}, "
                          f"{db}.{fresh} TO {db}.{current}")
    return statements


def create_rows_table(database: str, table: str, features: Features) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {quote(database)}.{quote(table)} ("
            f"ts {features.time_type}, mt {MT_ENUM}, m String, rts {features.time_type}"
            f") ENGINE = StripeLog")


def create_export_log(database: str, features: Features) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {quote(database)}.export_log ("
            f"symbol String, hour_start {features.time_type}, export_time {features.time_type}, "
            f"filepath String, row_count UInt64, file_bytes UInt64, sha256 String"
            f") ENGINE = MergeTree ORDER BY (symbol, hour_start)")


def create_database(database: str) -> str:
    return f"CREATE DATABASE IF NOT EXISTS {quote(database)}"


def ensure_database(ch: dict) -> None:
    client = connect(ch, database=False)
    try:
        client.execute(create_database(ch["database"]))
    finally:
        client.disconnect()


def ensure_tables(client: Client, database: str, names, features: Features) -> None:
    """Create export_log and every {name}_current that is missing.  Idempotent."""
    client.execute(create_export_log(database, features))
    for name in names:
        client.execute(create_rows_table(database, current_table(name), features))


def setup_db(ch: dict, names) -> Features:
    """`mexc setup-db`: database, export_log and every current table."""
    ensure_database(ch)
    client = connect(ch)
    try:
        features = detect(client, ch["database"])
        ensure_tables(client, ch["database"], names, features)
        return features
    finally:
        client.disconnect()


def insert_rows_sql(database: str, table: str) -> str:
    return f"INSERT INTO {quote(database)}.{quote(table)} ({', '.join(ROW_COLUMNS)}) VALUES"

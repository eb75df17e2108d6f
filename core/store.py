"""The ClickHouse store: the schema, and every statement mexc ever sends to ClickHouse.

Tables, per symbol short name (e.g. btc), all in the configured database:
  {name}_current   rows being collected; collectors insert here (StripeLog)
  {name}_previous  the rows of the last rotation, until the exporter has written their files
  {name}_fresh     exists only during a swap; a crash may leave it behind (recover_fresh)
  export_log       one row per Parquet file written (MergeTree)
  gaps             the gap ledger: one row per stretch without a live subscription (MergeTree)
  schema_version   one row per schema version this database was brought to (MergeTree)
In a cluster ([cluster] host set, docs/cluster.md) also:
  hour_copies      the bytes of hour files other hosts pull with remote(): each host's copy
                   of a symbol-hour and the merged file, base64 in parts (MergeTree)
  copy_log         this host's own hour files (its copies), as export_log lists the merged ones
  cluster_holdings when each host took (1) and released (0) each symbol (MergeTree)

Rows are (ts, mt, m, rts), see core/vocabulary.py.  Time columns are DateTime64(3, 'UTC')
where the server has it and UInt64 milliseconds on old servers (18.16, Debian's package).
Both accept the same integer milliseconds on insert and every read here selects
milliseconds, so nothing above this module sees the difference.

`Store` is one session: it connects on first use, probes what the server supports once per
connection (Features), and names each operation.  Most statements go over the native protocol
(clickhouse-driver); the export reads each hour over HTTP where the server answers there
(`clickhouse.http_port`): as Arrow on servers that have the format, as CSV (parsed by Arrow)
on older ones, so no row becomes a Python object on the way to its file.  Writer, exporter,
supervisor, verify and status all go through it; nobody else writes SQL.
"""
import base64
import contextlib
import functools
import logging
import os
import pwd
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import clickhouse_driver.defines
from clickhouse_driver import Client
from clickhouse_driver.errors import ServerException

from core.clock import HOUR_MS
from core.log import first_line
from core.vocabulary import (BOOK_UPDATE, DEAD_LETTER, DEAL, GAP_COLUMNS, MESSAGE_TYPES,
                             ROW_COLUMNS, Gap, Row)

if TYPE_CHECKING:  # imported where Arrow is used: the supervisor and collectors never load it
    import pyarrow as pa

log = logging.getLogger(__name__)

UNKNOWN_TABLE = 60  # ClickHouse's error codes for a table, a database that does not exist
UNKNOWN_DATABASE = 81
Refused = ServerException  # the server answered with an error: the statement did not apply
MT_ENUM = "Enum8(" + ", ".join(f"'{mt}' = {i}" for i, mt in enumerate(MESSAGE_TYPES, 1)) + ")"
# The layout of the tables this release reads and writes.  1: mexc 0.1.0, which recorded none;
# 2: the version recorded in schema_version.  A daemon meeting an older database brings it up
# to this at its start (Store.setup(migrate=True)); one meeting a newer refuses (SchemaTooNew).
# A new message type changes MT_ENUM: raise this, and the start rebuilds every rows table
# whose mt is not MT_ENUM (StripeLog cannot ALTER a column, on either release).
# 3: mt has the whole book's types, 'bu' and 'bs'.
SCHEMA_VERSION = 3
BLOCK_ROWS = 65536
# clickhouse-driver gives each connection a read and a write buffer of this size, zero-filled
# when it connects: its default, 1 MiB each, made 2 MiB of every session private memory, and a
# collector holds two sessions for its whole life to insert a few KB a second.  A read or write
# larger than the buffer goes through it in pieces (one more system call per 16 KiB).
clickhouse_driver.defines.BUFFER_SIZE = 16 * 1024
# per HTTP output format: settings it needs (String as Arrow's string, not binary; a server
# without the setting refuses it, and the probe then falls back to CSV)
FORMAT_SETTINGS = {"ArrowStream": {"output_format_arrow_string_as_string": 1}}
HOUR_COPIES = "hour_copies"
FILE_PART_BYTES = 4 << 20  # an hour file's bytes go into hour_copies in parts of this size
COPY, MERGED = "copy", "merged"  # hour_copies.kind: a host's copy of an hour, the merged file
# export_log's twin for a cluster host's own copies (export_log holds the merged files)
COPY_LOG = "copy_log"
# reads through remote(): a peer away fails the statement within seconds, not minutes
REMOTE_SETTINGS = {"connect_timeout_with_failover_ms": 1000, "connect_timeout": 2,
                   "receive_timeout": 10, "send_timeout": 10}


class SchemaTooNew(Exception):
    """The database was brought to a schema version this release does not know."""


@dataclass(frozen=True)
class Features:
    """What the server can do, probed once per connection."""
    version: str
    datetime64: bool
    exchange_tables: bool
    http_format: Optional[str] = None  # ArrowStream, CSV, or None: no HTTP, native rows only

    @property
    def time_type(self) -> str:
        return "DateTime64(3, 'UTC')" if self.datetime64 else "UInt64"

    def ms(self, column: str = "ts") -> str:
        """SQL expression giving a time column as integer milliseconds."""
        return f"toUnixTimestamp64Milli({column})" if self.datetime64 else column

    def describe(self) -> str:
        """For operators: `ClickHouse 26.9.2.1, time columns DateTime64(3, 'UTC'), export
        over ArrowStream`."""
        return (f"ClickHouse {self.version}, time columns {self.time_type}, export over "
                f"{self.http_format or 'native protocol rows (no HTTP port answering)'}")


def _release() -> str:
    from core import __version__  # core/__init__ imports nothing of core: no cycle
    return f"mexc {__version__}"


@functools.lru_cache(maxsize=None)
def rows_schema() -> "pa.Schema":
    """An hour's rows as the export reads them: times as integer milliseconds, mt as its name."""
    import pyarrow as pa

    return pa.schema([("ts", pa.int64()), ("mt", pa.string()), ("m", pa.string()),
                      ("rts", pa.int64())])


def rows_batch(rows: List[tuple]) -> "pa.RecordBatch":
    """(ts ms, mt, m, rts ms) rows -> a record batch of rows_schema()."""
    import pyarrow as pa

    schema = rows_schema()
    return pa.RecordBatch.from_arrays(
        [pa.array(column, type) for column, type in zip(zip(*rows), schema.types)],
        schema=schema)


def _name_the_os_user() -> None:
    """clickhouse-driver sends the OS user's name with every query; without $USER (or LOGNAME,
    LNAME, USERNAME: a systemd service has none of them) it reads /etc/passwd again for each
    query.  Look it up once for the whole process."""
    if not any(os.environ.get(k) for k in ("LOGNAME", "USER", "LNAME", "USERNAME")):
        try:
            os.environ["USER"] = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:  # a uid without a passwd entry: the driver sends '' then
            pass


def quote(identifier: str) -> str:
    """Backtick-quote an identifier; config validation already restricts the characters."""
    return "`" + identifier.replace("\\", "\\\\").replace("`", "\\`") + "`"


def current_table(name: str) -> str:
    return f"{name}_current"


def previous_table(name: str) -> str:
    return f"{name}_previous"


def fresh_table(name: str) -> str:
    return f"{name}_fresh"


class Store:
    """A session with the ClickHouse of the [clickhouse] config section.

    Not bound to the database (so a missing one can be created): every statement names it.
    On any error the caller may call close(); the next operation connects again."""

    def __init__(self, ch: dict, timeout: float = 10.0, files_log: str = "export_log"):
        """files_log: the log of this host's own files, which latest_exported_hour and
        exported_until read (COPY_LOG in a cluster)."""
        self.ch = ch
        self.files_log = files_log
        self.timeout = timeout
        self.database = ch["database"]
        self.db = quote(self.database)
        self._client: Optional[Client] = None
        self._features: Optional[Features] = None

    # --- the session -----------------------------------------------------------------------

    @property
    def client(self) -> Client:
        if self._client is None:
            _name_the_os_user()
            ch = self.ch
            self._client = Client(host=ch["host"], port=ch["port"], user=ch["user"],
                                  password=ch["password"], database="default",
                                  connect_timeout=self.timeout,
                                  send_receive_timeout=self.timeout,
                                  settings={"strings_as_bytes": False})
        return self._client

    @property
    def features(self) -> Features:
        """Probed on first use after each (re)connect."""
        if self._features is None:
            self._features = self._probe()
        return self._features

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
        self._client = self._features = None

    @contextlib.contextmanager
    def asking(self, host: str, unreachable: dict, required: bool = False) -> Iterator[None]:
        """Around a query of one cluster host's ClickHouse (through remote()): a failure is
        recorded as unreachable[host] = why, and the connection is dropped so the next host's
        query starts afresh; the caller goes on with the hosts that answer.  required (this
        host's own ClickHouse, without which there is no answer): the failure is raised."""
        try:
            yield
        except Exception as e:
            if required:
                raise
            unreachable[host] = first_line(e) or type(e).__name__
            self.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def probe(self) -> Optional[Features]:
        """What the server supports, None when it does not answer.  Never raises."""
        try:
            return self.features
        except Exception:
            self.close()
            return None

    def _probe(self) -> Features:
        version = self._one("SELECT version()")
        try:
            self.client.execute("SELECT toDateTime64(0, 3, 'UTC')")
            datetime64 = True
        except ServerException:
            datetime64 = False
        # Tables made before the server was upgraded keep their UInt64 columns: they decide.
        made = self.client.execute(
            "SELECT type FROM system.columns WHERE database = %(db)s AND table = 'export_log' "
            "AND name = 'hour_start'", {"db": self.database})
        if made:
            datetime64 = made[0][0].startswith("DateTime64")
        engine = self.client.execute("SELECT engine FROM system.databases WHERE name = %(db)s",
                                     {"db": self.database})
        # EXCHANGE TABLES exists only for Atomic databases (ClickHouse 20.x and later).
        exchange = bool(engine) and engine[0][0] == "Atomic"
        return Features(version=version, datetime64=datetime64, exchange_tables=exchange,
                        http_format=self._probe_http())

    def _probe_http(self) -> Optional[str]:
        """The best format the HTTP port answers in (the version string alone does not say
        what a build has, and the port may be closed), None when it does not answer."""
        if not self.ch.get("http_port"):  # a session for one quick question (health, demo)
            return None
        if not self._same_server_over_http():
            return None
        for fmt in ("ArrowStream", "CSV"):
            try:
                with self._http("SELECT 1", fmt, timeout=2.0) as response:
                    response.read()
                return fmt
            except urllib.error.HTTPError:  # the server answered: not this format
                continue
            except OSError:  # nothing listening, or not ClickHouse
                return None
        return None

    def _same_server_over_http(self) -> bool:
        """Is http_port the server of `port`?  A wrong http_port (another ClickHouse on this
        host) must not feed the export another server's rows: same version, same uptime."""
        sql = "SELECT version(), uptime()"
        try:
            with self._http(sql, "TabSeparated", timeout=2.0) as response:
                version, uptime = response.read().decode().split()
        except (OSError, ValueError):  # nothing listening, or not ClickHouse
            return False
        native_version, native_uptime = self.client.execute(sql)[0]
        if version == native_version and abs(int(uptime) - native_uptime) <= 2:
            return True
        log.warning("clickhouse.http_port %s is another server (ClickHouse %s, up %s s) than "
                    "clickhouse.port %s; the export reads over the native protocol",
                    self.ch["http_port"], version, uptime, self.ch["port"])
        return False

    def _http(self, sql: str, fmt: str, timeout: Optional[float] = None):
        """A streaming HTTP response to one query in output format `fmt` (user and password
        as Basic auth, never in the URL, so they do not end up in the server's logs)."""
        ch = self.ch
        credentials = base64.b64encode(f"{ch['user']}:{ch['password']}".encode()).decode()
        url = (f"http://{ch['host']}:{ch['http_port']}/?" + urllib.parse.urlencode(
            {"query": f"{sql} FORMAT {fmt}", **FORMAT_SETTINGS.get(fmt, {})}))
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {credentials}"})
        return urllib.request.urlopen(request, timeout=timeout or self.timeout)

    def reachable(self) -> bool:
        """Does the server answer a trivial query?  Never raises."""
        try:
            return self._one("SELECT 1") == 1
        except Exception:
            self.close()
            return False

    def _one(self, sql: str, params=None):
        return self.client.execute(sql, params)[0][0]

    def _table(self, table: str) -> str:
        return f"{self.db}.{quote(table)}"

    # --- schema ----------------------------------------------------------------------------

    def create_database(self) -> None:
        self.client.execute(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        self._features = None  # the database engine decides EXCHANGE TABLES

    def create_rows_table(self, table: str) -> None:
        t = self.features.time_type
        self.client.execute(f"CREATE TABLE IF NOT EXISTS {self._table(table)} ("
                            f"ts {t}, mt {MT_ENUM}, m String, rts {t}) ENGINE = StripeLog")

    def create_export_log(self, table: str = "export_log") -> None:
        t = self.features.time_type
        self.client.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table(table)} ("
            f"symbol String, hour_start {t}, export_time {t}, filepath String, "
            f"row_count UInt64, file_bytes UInt64, sha256 String"
            f") ENGINE = MergeTree ORDER BY (symbol, hour_start)")

    def create_gaps_table(self) -> None:
        t = self.features.time_type
        self.client.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table('gaps')} ("
            f"symbol String, name String, start_ms {t}, end_ms {t}, reason String, "
            f"detail String, backfilled UInt32, covered UInt8, recorded_ms {t}"
            f") ENGINE = MergeTree ORDER BY (name, start_ms)")

    def create_holdings_table(self) -> None:
        """In a cluster: one row per take (held 1) and release (held 0) of a symbol by a
        host, ts in ms, whatever the server's time type (the merge reads it from each host)."""
        self.client.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table('cluster_holdings')} ("
            f"name String, host String, ts UInt64, held UInt8"
            f") ENGINE = MergeTree ORDER BY (name, ts)")

    def setup(self, names: Sequence[str], migrate: bool = False,
              clustered: bool = False) -> Features:
        """Database, export_log, gaps, schema_version and every {name}_current that is
        missing.  Idempotent.  SchemaTooNew if a newer mexc made the database.  An older
        schema is brought up to SCHEMA_VERSION only with `migrate`: where no collector inserts
        (the daemon's start, before its collectors; `mexc setup-db`)."""
        self.create_database()
        found = self.schema_version()
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database {self.database} has store schema {found}, written by a newer mexc; "
                f"{_release()} knows schemas up to {SCHEMA_VERSION}: run the newer release "
                "again, or give this one another clickhouse.database")
        self.create_export_log()
        self.create_gaps_table()
        self.client.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table('schema_version')} ("
            f"version UInt32, applied_ms UInt64, release String"
            f") ENGINE = MergeTree ORDER BY version")
        for name in names:
            self.create_rows_table(current_table(name))
        if clustered:
            self.create_cluster_tables()
        if found < SCHEMA_VERSION and migrate:
            for table in self._outdated_rows_tables():
                self._rebuild_rows_table(table)
            log.info("store: database %s brought from schema %d to %d", self.database, found,
                     SCHEMA_VERSION)
        if found == SCHEMA_VERSION or migrate:
            self._record_schema()
        return self.features

    def schema_version(self) -> int:
        """The version recorded; 1 for tables 0.1.0 made (it recorded none); SCHEMA_VERSION
        for a database without mexc's tables (setup makes them so)."""
        if self.exists("schema_version"):
            recorded = self._one(f"SELECT max(version) FROM {self._table('schema_version')}")
            if recorded:
                return recorded
        return 1 if self.exists("export_log") else SCHEMA_VERSION

    def _record_schema(self) -> None:
        table = self._table("schema_version")
        if self._one(f"SELECT max(version) FROM {table}") != SCHEMA_VERSION:
            self.client.execute(f"INSERT INTO {table} (version, applied_ms, release) VALUES",
                                [(SCHEMA_VERSION, int(time.time() * 1000), _release())])

    def _outdated_rows_tables(self) -> List[str]:
        """Rows tables ({name}_current, _previous, _fresh) whose mt is not today's MT_ENUM."""
        return [table for table, in self.client.execute(
            "SELECT table FROM system.columns WHERE database = %(db)s AND name = 'mt' "
            "AND type != %(mt)s AND match(table, '_(current|previous|fresh)$')",
            {"db": self.database, "mt": MT_ENUM})]

    def _rebuild_rows_table(self, table: str) -> None:
        """Copy a rows table into one of today's layout, then swap the two.  The table keeps
        every row at every step, so a leftover copy (a crash) is dropped and made again.
        Only where no collector inserts (setup's `migrate`)."""
        copy = f"{table}_migration"
        self.drop(copy)
        self.create_rows_table(copy)
        self.client.execute(f"INSERT INTO {self._table(copy)} SELECT ts, toString(mt), m, rts "
                            f"FROM {self._table(table)}")
        rows, copied = self.count(table), self.count(copy)
        if rows != copied:
            raise RuntimeError(f"store: copying {table} gave {copied} rows of {rows}")
        if self.features.exchange_tables:
            self.client.execute(f"EXCHANGE TABLES {self._table(table)} AND {self._table(copy)}")
        else:  # one statement: ClickHouse renames under one lock
            old = f"{table}_premigration"
            self.client.execute(f"RENAME TABLE {self._table(table)} TO {self._table(old)}, "
                                f"{self._table(copy)} TO {self._table(table)}, "
                                f"{self._table(old)} TO {self._table(copy)}")
        self.drop(copy)
        log.info("store: %s rebuilt with mt %s, %d rows", table, MT_ENUM, rows)

    # --- rows tables -----------------------------------------------------------------------

    def exists(self, table: str) -> bool:
        return bool(self._one(f"EXISTS TABLE {self._table(table)}"))

    def count(self, table: str) -> int:
        return self._one(f"SELECT count() FROM {self._table(table)}")

    def insert_rows(self, table: str, rows: List[Row]) -> None:
        """One INSERT of (ts, mt, m, rts) rows; a block lands whole or not at all."""
        self.client.execute(f"INSERT INTO {self._table(table)} ({', '.join(ROW_COLUMNS)}) VALUES",
                            [list(column) for column in zip(*rows)], columnar=True)

    def contains(self, table: str, row: Row) -> bool:
        """Is this exact row in the table?"""
        ts, mt, m, rts = row
        f = self.features
        return self._one(f"SELECT count() FROM {self._table(table)} WHERE {f.ms()} = %(ts)s "
                         f"AND mt = %(mt)s AND m = %(m)s AND {f.ms('rts')} = %(rts)s",
                         {"ts": ts, "mt": mt, "m": m, "rts": rts}) > 0

    def rows_by_type(self, table: str) -> dict:
        """{mt: rows}"""
        return dict(self.client.execute(
            f"SELECT toString(mt), count() FROM {self._table(table)} GROUP BY mt"))

    def newest_receive_ms(self, table: str, source: Optional[str] = None) -> int:
        """The latest rts in the table (0 when empty); here, or on the server at `source`."""
        return self._one(f"SELECT max({self.features.ms('rts')}) "
                         f"FROM {self._source(table, source)}") or 0

    def drop(self, table: str) -> None:
        self.client.execute(f"DROP TABLE IF EXISTS {self._table(table)}")

    # --- rotation: current -> previous -------------------------------------------------------

    def swap(self, name: str) -> None:
        """Make {name}_current empty and the old one {name}_previous, with no moment in which
        {name}_current does not exist (an insert could fail or land in a doomed table)."""
        current, previous = self._table(current_table(name)), self._table(previous_table(name))
        fresh = self._table(fresh_table(name))
        self.client.execute(f"CREATE TABLE {fresh} AS {current}")
        if self.features.exchange_tables:
            self.client.execute(f"EXCHANGE TABLES {current} AND {fresh}")
            self.client.execute(f"RENAME TABLE {fresh} TO {previous}")
        else:  # one RENAME of both tables: ClickHouse applies it under one lock
            self.client.execute(f"RENAME TABLE {current} TO {previous}, {fresh} TO {current}")

    def recover_fresh(self, name: str) -> Optional[int]:
        """Finish a swap a crash interrupted: fold a leftover {name}_fresh into previous.
        Returns the rows it held, None when there was none."""
        fresh, previous = fresh_table(name), previous_table(name)
        if not self.exists(fresh):
            return None
        rows = self.count(fresh)
        if rows == 0:
            self.drop(fresh)
        elif not self.exists(previous):
            self.client.execute(f"RENAME TABLE {self._table(fresh)} TO {self._table(previous)}")
        else:
            self.client.execute(f"INSERT INTO {self._table(previous)} "
                                f"SELECT * FROM {self._table(fresh)}")
            self.drop(fresh)
        return rows

    def move_back(self, name: str, boundary: int) -> None:
        """Rows of previous from `boundary` on (an hour not over yet) go back into current."""
        previous = self._table(previous_table(name))
        where = f"WHERE {self.features.ms()} >= {int(boundary)}"
        if self._one(f"SELECT count() FROM {previous} {where}"):
            self.client.execute(f"INSERT INTO {self._table(current_table(name))} "
                                f"SELECT * FROM {previous} {where}")

    def moved_back(self, name: str, boundary: int) -> bool:
        """Are previous's rows from `boundary` on all in current already?"""
        previous = self._table(previous_table(name))
        where = f"WHERE {self.features.ms()} >= {int(boundary)}"
        late = self._one(f"SELECT count() FROM {previous} {where}")
        if late == 0:
            return True
        found = self._one(f"SELECT count() FROM {self._table(current_table(name))} "
                          f"WHERE (ts, mt, m, rts) IN (SELECT ts, mt, m, rts FROM {previous} "
                          f"{where})")
        return found >= late

    # --- export: previous -> hourly files ----------------------------------------------------

    def hours(self, name: str, before: Optional[int] = None) -> List[Tuple[int, int]]:
        """[(hour start ms, rows)] held by {name}_previous, oldest first; rows before
        `before` only, when given."""
        ts = self.features.ms()
        where = f"WHERE {ts} < {int(before)}" if before is not None else ""
        return self.client.execute(
            f"SELECT intDiv({ts}, {HOUR_MS}) * {HOUR_MS} AS h, count() FROM "
            f"{self._table(previous_table(name))} {where} GROUP BY h ORDER BY h")

    def _hour_where(self, hour: int) -> str:
        ts = self.features.ms()
        return f"WHERE {ts} >= {int(hour)} AND {ts} < {int(hour) + HOUR_MS} ORDER BY {ts}"

    def hour_rows(self, name: str, hour: int) -> Iterator[tuple]:
        """The hour's rows from {name}_previous as (ts ms, mt, m, rts ms), in ts order,
        streamed block by block (memory stays bounded however big the hour is)."""
        return self.rows(previous_table(name), self._hour_where(hour))

    def hour_batches(self, name: str, hour: int) -> Iterator["pa.RecordBatch"]:
        """The same rows as Arrow record batches of rows_schema(), streamed: over HTTP where
        the server answers there (Features.http_format), else built from native rows."""
        fmt = self.features.http_format
        if fmt is None:
            return self._batches_of_rows(self.hour_rows(name, hour))
        return self._http_batches(name, hour, fmt)

    def hour_stream(self, name: str, hour: int, fmt: str):
        """An HTTP response streaming the hour's rows (ts ms, mt, m, rts ms), in ts order, in
        ClickHouse's format `fmt` (a context manager; read() it)."""
        f = self.features
        # aliases unlike the column names: WHERE and ORDER BY must see the columns
        return self._http(
            f"SELECT {f.ms()} AS ts_ms, toString(mt) AS mt_name, m, {f.ms('rts')} AS rts_ms "
            f"FROM {self._table(previous_table(name))} {self._hour_where(hour)}", fmt)

    def _http_batches(self, name: str, hour: int, fmt: str) -> Iterator["pa.RecordBatch"]:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.ipc

        schema = rows_schema()
        with self.hour_stream(name, hour, fmt) as response:
            if fmt == "ArrowStream":
                reader = pa.ipc.open_stream(response)
            else:  # ClickHouse's CSV quotes strings RFC 4180 style: newlines, quotes survive
                reader = pa.csv.open_csv(
                    response, read_options=pa.csv.ReadOptions(column_names=schema.names,
                                                              block_size=1 << 22),
                    parse_options=pa.csv.ParseOptions(newlines_in_values=True),
                    convert_options=pa.csv.ConvertOptions(
                        column_types=schema, strings_can_be_null=False,
                        quoted_strings_can_be_null=False))
            for batch in reader:
                yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)

    @staticmethod
    def _batches_of_rows(rows: Iterator[tuple]) -> Iterator["pa.RecordBatch"]:
        block = []
        for row in rows:
            block.append(row)
            if len(block) == BLOCK_ROWS:
                yield rows_batch(block)
                block = []
        if block:
            yield rows_batch(block)

    def rows(self, table: str, where: str = "") -> Iterator[tuple]:
        """A table's rows as (ts ms, mt, m, rts ms), streamed block by block."""
        ts, rts = self.features.ms(), self.features.ms("rts")
        return self.client.execute_iter(
            f"SELECT {ts}, toString(mt), m, {rts} FROM {self._table(table)} {where}",
            settings={"max_block_size": BLOCK_ROWS})

    def live_rows(self, name: str, mt: str, since_ms: int, until_ms: int) -> list:
        """Rows of type mt with ts in [since_ms, until_ms) not exported yet: those of
        {name}_current and of the tables of an export in progress ({name}_previous, and a
        {name}_fresh a crash left in the middle of a swap), read in one statement (so one
        snapshot of which tables exist), in ts order, as columns:
        [ts ms], [m], [rts ms], [1 if from previous or fresh, else 0].
        No such table (a symbol never collected here): no rows."""
        names = [current_table(name), previous_table(name), fresh_table(name)]
        if not any(self.exists(table) for table in names):
            return [[], [], [], []]
        f = self.features
        columns = self.client.execute(
            f"SELECT {f.ms()}, m, {f.ms('rts')}, _table != %(current)s FROM merge(%(db)s, "
            f"%(tables)s) WHERE mt = %(mt)s AND {f.ms()} >= {int(since_ms)} AND "
            f"{f.ms()} < {int(until_ms)} ORDER BY {f.ms()}",
            {"db": self.database, "tables": "^(" + "|".join(map(re.escape, names)) + ")$",
             "mt": mt, "current": current_table(name)}, columnar=True)
        return columns or [[], [], [], []]

    # --- export_log ------------------------------------------------------------------------

    def log_export(self, symbol: str, hour: int, export_ms: int, path: str, rows: int,
                   file_bytes: int, sha256: str, table: str = "export_log") -> None:
        self.client.execute(
            f"INSERT INTO {self._table(table)} "
            f"(symbol, hour_start, export_time, filepath, row_count, file_bytes, sha256) VALUES",
            [(symbol, hour, export_ms, path, rows, file_bytes, sha256)])

    def logged_exports(self, symbol: str) -> List[Tuple[int, str, int, str]]:
        """[(hour start ms, path, rows, sha256)], the latest entry per hour, oldest first."""
        return self.client.execute(
            f"SELECT {self.features.ms('hour_start')}, argMax(filepath, export_time), "
            f"argMax(row_count, export_time), argMax(sha256, export_time) "
            f"FROM {self._table('export_log')} WHERE symbol = %(symbol)s "
            f"GROUP BY hour_start ORDER BY hour_start", {"symbol": symbol})

    def logged_sha256(self, symbol: str, hour: int, source: Optional[str] = None
                      ) -> Optional[str]:
        """The sha256 of the latest export_log entry of a symbol-hour (here, or on the server
        at `source`), None when there is none."""
        f = self.features
        rows = self.client.execute(
            f"SELECT argMax(sha256, export_time) FROM {self._source('export_log', source)} "
            f"WHERE symbol = %(symbol)s AND {f.ms('hour_start')} = {int(hour)} "
            f"GROUP BY symbol", {"symbol": symbol})
        return rows[0][0] if rows else None

    def logged_file(self, symbol: str, hour: int) -> Optional[Tuple[str, int]]:
        """(sha256, file bytes) of the latest export_log entry of a symbol-hour, or None."""
        rows = self.client.execute(
            f"SELECT argMax(sha256, export_time), argMax(file_bytes, export_time) "
            f"FROM {self._table('export_log')} WHERE symbol = %(symbol)s "
            f"AND {self.features.ms('hour_start')} = {int(hour)} GROUP BY symbol",
            {"symbol": symbol})
        return (rows[0][0], rows[0][1]) if rows else None

    def exported_hours(self, since_ms: int) -> List[Tuple[str, int]]:
        """[(symbol, hour start ms)] of every hour with a file in export_log from since_ms on."""
        hour = self.features.ms("hour_start")
        return self.client.execute(
            f"SELECT DISTINCT symbol, {hour} FROM {self._table('export_log')} "
            f"WHERE {hour} >= {int(since_ms)} ORDER BY symbol, {hour}")

    # --- the gap ledger --------------------------------------------------------------------

    def record_gaps(self, gaps: Sequence[Gap]) -> None:
        self.client.execute(f"INSERT INTO {self._table('gaps')} ({', '.join(GAP_COLUMNS)}) VALUES",
                            [tuple(int(v) if isinstance(v, bool) else v for v in gap)
                             for gap in gaps])

    def gap_recorded(self, gap: Gap) -> bool:
        """Is this gap in the ledger already?  A gap ends at the first data frame after it, so
        its symbol, end and reason name it (its start and backfill may differ when a later
        run records it again)."""
        return self._one(f"SELECT count() FROM {self._table('gaps')} WHERE name = %(name)s "
                         f"AND {self.features.ms('end_ms')} = {int(gap.end_ms)} "
                         f"AND reason = %(reason)s", {"name": gap.name, "reason": gap.reason}) > 0

    def gaps(self, name: Optional[str] = None, since_ms: Optional[int] = None,
             until_ms: Optional[int] = None, source: Optional[str] = None) -> List[Gap]:
        """Ledger records, oldest first: of one symbol (short name) when given, and only
        those overlapping [since_ms, until_ms) when given; of the server at `source` (another
        host of a cluster, through remote(), its time columns of the same type) when given."""
        f = self.features
        start, end, recorded = f.ms("start_ms"), f.ms("end_ms"), f.ms("recorded_ms")
        where, params = [], {}
        if name is not None:
            where.append("name = %(name)s")
            params["name"] = name
        if since_ms is not None:
            where.append(f"{end} > {int(since_ms)}")
        if until_ms is not None:
            where.append(f"{start} < {int(until_ms)}")
        rows = self.client.execute(
            f"SELECT symbol, name, {start}, {end}, reason, detail, backfilled, covered, "
            f"{recorded} FROM {self._source('gaps', source)} "
            f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {start}, name", params)
        return [Gap(*row[:7], bool(row[7]), row[8]) for row in rows]

    def ledger_total(self) -> Tuple[int, int]:
        """(records, the newest recorded_ms) of the whole ledger ((0, 0) before it exists):
        changes with every record."""
        try:
            count, newest = self.client.execute(
                f"SELECT count(), max({self.features.ms('recorded_ms')}) "
                f"FROM {self._table('gaps')}")[0]
        except ServerException as e:
            if e.code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
                return 0, 0
            raise
        return count, newest or 0

    def newest_gap_end_ms(self, name: str, before_ms: int) -> Optional[int]:
        """The latest end of a symbol's ledger record at or before `before_ms` (None: no
        record, or no ledger yet)."""
        if not self.exists("gaps"):
            return None
        end = self.features.ms("end_ms")
        return self._one(f"SELECT max({end}) FROM {self._table('gaps')} WHERE name = %(name)s "
                         f"AND {end} <= {int(before_ms)}", {"name": name}) or None

    # --- a cluster: hour files shared over remote(), holdings (docs/cluster.md) ------------

    def create_cluster_tables(self) -> None:
        self.create_export_log(COPY_LOG)
        self.client.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table(HOUR_COPIES)} ("
            f"name String, hour UInt64, kind String, host String, sha256 String, rows UInt64, "
            f"part UInt32, parts UInt32, data String"
            f") ENGINE = MergeTree ORDER BY (name, hour, kind, host, sha256, part)")
        self.create_holdings_table()

    def _source(self, table: str, source: Optional[str], database: Optional[str] = None) -> str:
        """This server's table, or the same table on the server at `source` (host:port, the
        native port) read through remote() with this session's user and password."""
        if source is None:
            return self._table(table) if database is None else f"{quote(database)}.{quote(table)}"
        ch = self.ch
        args = [source, database or self.database, table, ch["user"], ch["password"]]
        return "remote(" + ", ".join("'" + a.replace("\\", "\\\\").replace("'", "\\'") + "'"
                                     for a in args) + ")"

    def put_hour_file(self, name: str, hour: int, kind: str, host: str, sha256: str,
                      rows: int, data: bytes) -> None:
        """An hour file's bytes, for other hosts to pull (an insert repeated after a failure
        stores the parts twice: hour_file reads each part once)."""
        text = base64.b64encode(data).decode()
        parts = [text[i:i + FILE_PART_BYTES] for i in range(0, len(text), FILE_PART_BYTES)]
        parts = parts or [""]
        for index, part in enumerate(parts):  # one part per insert: memory stays bounded
            self.client.execute(
                f"INSERT INTO {self._table(HOUR_COPIES)} "
                f"(name, hour, kind, host, sha256, rows, part, parts, data) VALUES",
                [(name, hour, kind, host, sha256, rows, index, len(parts), part)])

    def hour_file(self, name: str, hour: int, kind: str, host: str, sha256: str,
                  source: Optional[str] = None) -> Optional[bytes]:
        """The bytes put_hour_file stored (here, or on the server at `source`); None when
        they are not there whole.  The caller checks the sha256."""
        rows = self.client.execute(
            f"SELECT part, parts, data FROM {self._source(HOUR_COPIES, source)} "
            f"WHERE name = %(name)s AND hour = {int(hour)} AND kind = %(kind)s "
            f"AND host = %(host)s AND sha256 = %(sha)s ORDER BY part",
            {"name": name, "kind": kind, "host": host, "sha": sha256})
        parts = {}
        for part, count, data in rows:
            parts.setdefault(part, (count, data))
        if not parts or sorted(parts) != list(range(next(iter(parts.values()))[0])):
            return None
        return base64.b64decode("".join(parts[i][1] for i in sorted(parts)))

    def has_hour_file(self, name: str, hour: int, kind: str, host: str, sha256: str) -> bool:
        return self._one(
            f"SELECT count() FROM {self._table(HOUR_COPIES)} WHERE name = %(name)s "
            f"AND hour = {int(hour)} AND kind = %(kind)s AND host = %(host)s "
            f"AND sha256 = %(sha)s", {"name": name, "kind": kind, "host": host,
                                      "sha": sha256}) > 0

    def drop_hour_files(self, before_ms: int) -> int:
        """Delete the hour_copies rows of hours before `before_ms` (a mutation: ClickHouse
        rewrites the parts holding them in the background); returns how many there were."""
        where = f"WHERE hour < {int(before_ms)}"
        rows = self._one(f"SELECT count() FROM {self._table(HOUR_COPIES)} {where}")
        if rows:
            self.client.execute(f"ALTER TABLE {self._table(HOUR_COPIES)} DELETE {where}")
        return rows

    def record_holding(self, name: str, host: str, ts_ms: int, held: bool) -> None:
        """This host took (held) or released a symbol at ts_ms."""
        self.client.execute(f"INSERT INTO {self._table('cluster_holdings')} "
                            f"(name, host, ts, held) VALUES",
                            [(name, host, int(ts_ms), int(held))])

    def holdings(self, name: str, start_ms: int, end_ms: int, source: Optional[str] = None
                 ) -> List[Tuple[str, int, bool]]:
        """A symbol's takes and releases as (host, ts ms, held), oldest first: those in
        [start_ms, end_ms), preceded by each host's last one before start_ms (whether it held
        the symbol when the span began); here, or on the server at `source`."""
        table, params = self._source("cluster_holdings", source), {"name": name}
        before = self.client.execute(
            f"SELECT host, max(ts), argMax(held, ts) FROM {table} WHERE name = %(name)s "
            f"AND ts < {int(start_ms)} GROUP BY host", params)
        during = self.client.execute(
            f"SELECT host, ts, held FROM {table} WHERE name = %(name)s "
            f"AND ts >= {int(start_ms)} AND ts < {int(end_ms)}", params)
        return sorted(((host, ts, bool(held)) for host, ts, held in before + during),
                      key=lambda record: (record[1], record[0]))

    def held_before(self, host: str, before_ms: Optional[int] = None,
                    source: Optional[str] = None) -> List[str]:
        """The symbols `host` held (its last take or release before `before_ms` a take): those
        a host killed there held when it went down; with no `before_ms` those it holds now
        (its latest record; the records carry its export clock's ms); here, or on the server
        at `source`."""
        if source is None and not self.exists("cluster_holdings"):
            return []
        before = "" if before_ms is None else f"AND ts < {int(before_ms)} "
        return sorted(name for name, held in self.client.execute(
            f"SELECT name, argMax(held, ts) FROM {self._source('cluster_holdings', source)} "
            f"WHERE host = %(host)s {before}GROUP BY name", {"host": host})
            if held)

    # --- a cluster: every host's rows, for answers from any host (mexc/history.py) ---------

    def rows_tables(self, name: str, source: Optional[str] = None) -> List[str]:
        """Which of a symbol's current, previous and fresh tables exist (here, or on the
        server at `source`), in that order."""
        names = [current_table(name), previous_table(name), fresh_table(name)]
        found = {t for t, in self.client.execute(
            f"SELECT name FROM {self._source('tables', source, 'system')} "
            f"WHERE database = %(db)s AND name IN %(names)s",
            {"db": self.database, "names": tuple(names)}, settings=REMOTE_SETTINGS)}
        return [t for t in names if t in found]

    def host_live_rows(self, name: str, mt: str, since_ms: int, until_ms: int,
                       tables: Sequence[str], source: Optional[str] = None) -> list:
        """live_rows' columns from the given rows tables of one host (here, or at `source`,
        through remote()): [ts ms], [m], [rts ms], [1 if not from current]."""
        if not tables:
            return [[], [], [], []]
        f = self.features
        where = (f"WHERE mt = %(mt)s AND {f.ms()} >= {int(since_ms)} "
                 f"AND {f.ms()} < {int(until_ms)}")
        union = " UNION ALL ".join(
            f"SELECT {f.ms()} AS t, m, {f.ms('rts')} AS r, "
            f"toUInt8({int(table != current_table(name))}) AS p "
            f"FROM {self._source(table, source)} {where}" for table in tables)
        columns = self.client.execute(f"SELECT t, m, r, p FROM ({union}) ORDER BY t",
                                      {"mt": mt}, columnar=True, settings=REMOTE_SETTINGS)
        return columns or [[], [], [], []]

    def logged_copies(self, symbol: str, since_ms: int, until_ms: int,
                      source: Optional[str] = None) -> dict:
        """{hour start ms: sha256} of a host's copies (copy_log, the latest entry per hour)
        of the hours overlapping [since_ms, until_ms); here or at `source`."""
        hour = self.features.ms("hour_start")
        return dict(self.client.execute(
            f"SELECT {hour}, argMax(sha256, export_time) FROM {self._source(COPY_LOG, source)} "
            f"WHERE symbol = %(symbol)s AND {hour} > {int(since_ms) - HOUR_MS} "
            f"AND {hour} < {int(until_ms)} GROUP BY hour_start",
            {"symbol": symbol}, settings=REMOTE_SETTINGS))

    def recent_trade_receipts(self, name: str, since_ms: int, source: Optional[str] = None,
                              limit: int = 5000) -> List[Tuple[str, int]]:
        """(MEXC trade id, rts ms) of a symbol's trades received from since_ms on, the newest
        `limit`, in its current table here or at `source` (the receive lag behind the
        earliest host)."""
        rts = self.features.ms("rts")
        return self.client.execute(
            f"SELECT extract(m, '^[^|]*[|][^|]*[|][^|]*[|]([0-9]+)$') AS id, {rts} FROM "
            f"{self._source(current_table(name), source)} WHERE mt = '{DEAL}' "
            f"AND {rts} >= {int(since_ms)} AND id != '' ORDER BY {rts} DESC LIMIT {int(limit)}",
            settings=REMOTE_SETTINGS)

    def newest_table_ms(self, name: str, before_ms: int) -> Optional[int]:
        """The newest exchange time of a data row (not a dead letter) before `before_ms` in a
        symbol's current and previous tables.  None: they hold none."""
        f, newest = self.features, 0
        for table in (current_table(name), previous_table(name)):
            if self.exists(table):
                newest = max(newest, self._one(
                    f"SELECT max({f.ms()}) FROM {self._table(table)} "
                    f"WHERE mt != '{DEAD_LETTER}' AND {f.ms()} < {int(before_ms)}") or 0)
        return newest or None

    def latest_exported_hour(self, symbol: str, before_ms: Optional[int] = None
                             ) -> Optional[int]:
        """The start of the symbol's latest exported hour (that starts before `before_ms`)."""
        if not self.exists(self.files_log):
            return None
        f = self.features
        before = "" if before_ms is None else f" AND {f.ms('hour_start')} < {int(before_ms)}"
        return self._one(
            f"SELECT max({f.ms('hour_start')}) FROM {self._table(self.files_log)} "
            f"WHERE symbol = %(symbol)s{before}", {"symbol": symbol}) or None

    def newest_book_update(self, name: str, received_before_ms: int) -> Optional[Tuple[int, str]]:
        """(ts ms, m) of the newest whole-book increment in the tables ({name}_current and
        {name}_previous) received before received_before_ms, None when there is none: where a
        restarted collector's book broke (its own rows, received since, may be stored too)."""
        names = [current_table(name), previous_table(name)]
        if not any(self.exists(table) for table in names):
            return None
        f = self.features
        rows = self.client.execute(
            f"SELECT {f.ms()}, m FROM merge(%(db)s, %(tables)s) WHERE mt = %(mt)s "
            f"AND {f.ms('rts')} < {int(received_before_ms)} ORDER BY {f.ms()} DESC LIMIT 1",
            {"db": self.database, "tables": "^(" + "|".join(map(re.escape, names)) + ")$",
             "mt": BOOK_UPDATE})
        return tuple(rows[0]) if rows else None

    def deals_between(self, name: str, start_ms: int, end_ms: int) -> List[Tuple[int, str]]:
        """(ts, m) of every deal row stored for a symbol with start_ms <= ts <= end_ms, in
        current and previous, read in one statement (one entry per row: identical trades stay
        apart).  Rows already exported are not here: see exported_until."""
        f = self.features
        where = (f"WHERE mt = '{DEAL}' AND {f.ms()} >= {int(start_ms)} "
                 f"AND {f.ms()} <= {int(end_ms)}")
        tables = [t for t in (current_table(name), previous_table(name)) if self.exists(t)]
        if not tables:
            return []
        return self.client.execute(" UNION ALL ".join(
            f"SELECT {f.ms()}, m FROM {self._table(t)} {where}" for t in tables))

    def exported_until(self, symbol: str) -> int:
        """The end of the symbol's latest exported hour (ms; 0 when none): rows before it are
        in files, and a row written there now would be merged into its hour's file."""
        latest = self.latest_exported_hour(symbol)
        return latest + HOUR_MS if latest is not None else 0

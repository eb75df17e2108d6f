"""Hourly Parquet files: `{name}_YYYYMMDD_HH00.parquet`, one UTC hour of one symbol.

Columns: ts timestamp[ms, UTC], mt string (dictionary encoded, never null), m string,
rts timestamp[ms, UTC]; rows in ts order; zstd; key-value metadata (symbol, hour, row count,
mexc version, and the hour's gaps from the ledger: GAPS_KEY, COMPLETENESS_KEY).  A file is
written under a temporary name in the same directory, fsynced, read back and checked, and only
then renamed into place: a reader never sees half a file or a bad one, and a file being
replaced (late rows merged in) stays intact until its successor is good.
"""
import hashlib
import os
import time
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import __version__, pidlock
from core.archive import GAPS_KEY, gaps_json
from core.clock import HOUR_MS
from core.vocabulary import GAP_BOOK_RESYNC

SCHEMA = pa.schema([
    pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("mt", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    pa.field("m", pa.string(), nullable=False),
    pa.field("rts", pa.timestamp("ms", tz="UTC"), nullable=False),
])
# A cluster's merged file (exporter/merge.py): the same columns plus whose copy each row is.
# A reader that asks for the four columns above reads both kinds alike.
MERGED_SCHEMA = SCHEMA.append(pa.field("host", pa.dictionary(pa.int8(), pa.string()),
                                       nullable=False))


COMPLETENESS_KEY = b"mexc.completeness"  # seconds with a live subscription / 3600, decimal text


def completeness(gaps: Sequence, hour_ms: int) -> str:
    """The share of the hour not inside any gap (gaps may overlap), as decimal text.  A book
    resync is not a gap of the subscription: it does not count."""
    spans = sorted((max(g.start_ms, hour_ms), min(g.end_ms, hour_ms + HOUR_MS)) for g in gaps
                   if g.reason != GAP_BOOK_RESYNC)
    lost, reached = 0, hour_ms
    for start, end in spans:
        start = max(start, reached)
        if end > start:
            lost += end - start
            reached = end
    return f"{(HOUR_MS - lost) / HOUR_MS:.6f}"


def gap_metadata(gaps: Sequence, hour_ms: int) -> dict:
    """The two metadata keys for an hour and the ledger's records that touch it."""
    return {GAPS_KEY: gaps_json(gaps),
            COMPLETENESS_KEY: completeness(gaps, hour_ms).encode()}


def metadata(path: str) -> dict:
    """A file's key-value metadata (bytes -> bytes), read from its footer only."""
    return pq.read_schema(path).metadata or {}


class VerifyError(Exception):
    """A written file is not what it must be; nothing is dropped."""


def to_table(batches) -> pa.Table:
    """Record batches as the store reads them (ts, rts int64 ms; mt, m strings) -> a table of
    the file's SCHEMA (no copy of `m`, most of the bytes)."""
    rows = pa.Table.from_batches(batches)
    return pa.table([
        rows.column("ts").cast(SCHEMA.field("ts").type),
        rows.column("mt").dictionary_encode().cast(SCHEMA.field("mt").type),
        rows.column("m"),
        rows.column("rts").cast(SCHEMA.field("rts").type),
    ], schema=SCHEMA)


def read(path: str) -> pa.Table:
    """A file's rows: SCHEMA, or MERGED_SCHEMA for a cluster's merged file."""
    table = pq.read_table(path)
    return table.cast(MERGED_SCHEMA if "host" in table.column_names else SCHEMA)


class HourFile:
    """One hour's file, written in row groups under a temporary name: write() Arrow tables in
    ts order, then commit() (fsync, verify, rename; returns the sha256) or discard()."""

    def __init__(self, path: str, symbol: str, hour_ms: int, rows: int,
                 mode: int = 0o640, group: Optional[int] = None, gaps: Sequence = (),
                 schema: pa.Schema = SCHEMA, extra: Optional[dict] = None):
        self.path, self.hour_ms, self.rows = path, hour_ms, rows
        self.mode, self.group = mode, group
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        hour = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(hour_ms // 1000))
        self.schema = schema.with_metadata({
            b"symbol": symbol.encode(), b"hour": hour.encode(), b"rows": str(rows).encode(),
            b"mexc_version": __version__.encode(), **gap_metadata(gaps, hour_ms),
            **(extra or {})})
        try:
            # a dictionary only for mt (and host): ts, m and rts hardly repeat, and trying one
            # for them costs write time, file size and the verify's read-back time
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd",
                                           use_dictionary=[c for c in ("mt", "host")
                                                           if c in schema.names])
        except BaseException:  # e.g. the disk is full: the file may exist, empty
            _unlink(self.tmp)
            raise

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table.replace_schema_metadata(self.schema.metadata))

    def commit(self) -> str:
        try:
            self.writer.close()
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.fchmod(fd, self.mode)
                if self.group is not None:
                    os.fchown(fd, -1, self.group)
            finally:
                os.close(fd)
            verify(self.tmp, self.rows, self.hour_ms)
            digest = sha256(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_directory(os.path.dirname(self.path))
        return digest

    def discard(self) -> None:
        try:
            self.writer.close()  # flushes: fails again on a full disk
        except Exception:
            pass
        finally:
            _unlink(self.tmp)


def write_hour(path: str, table: pa.Table, symbol: str, hour_ms: int,
               mode: int = 0o640, group: Optional[int] = None, gaps: Sequence = ()) -> str:
    """Write a whole table (sorted here) as the hour's file; see HourFile."""
    hour_file = HourFile(path, symbol, hour_ms, table.num_rows, mode, group, gaps)
    try:
        hour_file.write(table.sort_by("ts"))
    except BaseException:
        hour_file.discard()
        raise
    return hour_file.commit()


def verify(path: str, expected_rows: int, hour_ms: int) -> None:
    """Read the file back: row count, no null mt, every ts inside the hour, in order.
    (Only the columns checked are read: `m` is most of the bytes.)"""
    table = pq.read_table(path, columns=["ts", "mt"])
    if table.num_rows != expected_rows:
        raise VerifyError(f"{path}: {table.num_rows} rows, expected {expected_rows}")
    if table.column("mt").null_count:
        raise VerifyError(f"{path}: {table.column('mt').null_count} rows with null mt")
    if table.num_rows:
        ts = table.column("ts").cast(pa.int64())
        low, high = pc.min(ts).as_py(), pc.max(ts).as_py()
        if low < hour_ms or high >= hour_ms + HOUR_MS:
            raise VerifyError(f"{path}: ts {low}..{high} outside the hour starting {hour_ms}")
        if table.num_rows > 1 and not pc.all(pc.less_equal(ts[:-1], ts[1:])).as_py():
            raise VerifyError(f"{path}: rows not in ts order")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(directory: str) -> list:
    """Temporary files (`.{file}.{pid}.tmp`) of an exporter that died mid-write (SIGKILL,
    power loss); those of a live process (`mexc export --once` next to the daemon) stay."""
    stale = []
    for name in os.listdir(directory):
        parts = name.split(".")
        if name.startswith(".") and name.endswith(".parquet.%s.tmp" % parts[-2]) \
                and parts[-2].isdigit() and not pidlock.alive(parts[-2]):
            _unlink(os.path.join(directory, name))
            stale.append(name)
    return stale


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

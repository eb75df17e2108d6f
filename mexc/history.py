"""Typed history: trades, books, tickers and bars of any time range, in one call.

    from mexc import history
    archive = history.Archive.from_config()          # the config's export dir and ClickHouse
    trades = archive.trades("BTC_USDT", "2026-11-24T14:00", "2026-11-25T02:00")
    df = history.to_pandas(trades)                   # or history.to_polars(trades)

Rows come from the hourly Parquet files (exporter/parquet_files.py) and, for what is not
exported yet (the hour in progress, late rows, an export still pending), from ClickHouse's
{name}_current and {name}_previous, each row exactly once (see `Archive._rows`).  Without a
reachable ClickHouse (`offline`) the files alone answer.  Every result carries the gap
ledger's gaps inside its range in its schema metadata (`gaps_of(table)`); `bars` marks the
intervals overlapping one.

Prices and sizes are float64 by default: pandas, polars and numpy compute on it natively, and
every MEXC number (at most ~12 significant digits) comes back as the double nearest to the
exchange's text, so `float(text) == value`.  `exact=True` gives decimal128(38, 18) instead:
the exchange's value to the last digit, trailing zeros and exponent forms included; a number
that does not fit raises, nothing is rounded silently.  The text itself stays in the archive.

In a cluster ([cluster] host set) an answer is the whole cluster's from any host: the merged
files here and every host's rows they do not hold yet, read through ClickHouse's remote() and
merged as the exporter merges copies (exporter/merge.py), with a `host` column; a host that
does not answer is left out and named in `Archive.unreachable` (docs/cluster.md).

All heavy lifting is pyarrow compute (already a dependency): splitting the `m` text, casting,
grouping bars.  Memory stays bounded by the answer: each hour's file is read, filtered to one
message type and typed before the next one is read.
"""
import concurrent.futures
import contextlib
import datetime
import hashlib
import io
import json
import os
import time
from typing import Dict, Iterable, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from core import archive, clock, config as configuration
from core.clock import HOUR_MS, hour_start, iso
from core.log import first_line
from core.store import COPY, Store
from core.symbols import resolved_symbols
from core.channels import (BOOK_CHANNEL, DEAL_CHANNEL, DEAL_SIDES,
                           DEPTH_CHANNEL, FIELD_SEPARATOR, LEVEL_CLOSE, LEVEL_FIELDS, LEVEL_OPEN,
                           LEVEL_SEPARATOR, TICKER_CHANNEL, Layout)
from cluster.exports import OTHERS
from core.vocabulary import BOOK_SNAPSHOT, Gap
from exporter import merge
from mexc import fullbook

TIMESTAMP = pa.timestamp("ms", tz="UTC")
EXACT = pa.decimal128(38, 18)
SIDES = pa.array(DEAL_SIDES)
BOOK_SIDES = pa.array(["bid", "ask"])
RANGE_KEY = b"mexc.range"  # beside archive.GAPS_KEY in an answer's metadata
READERS = 2  # hourly files read at the same time
ATTEMPTS = 5  # reads of a range that a rotation changed midway before giving up
KEYS = ["ts", "m", "rts"]  # a row's identity within one symbol and message type
LIVE = "files and ClickHouse"  # Archive.live when ClickHouse answered
HOSTS_FRESH = 5.0  # seconds a cluster's host list from ZooKeeper is used for answers


class HistoryError(Exception):
    """A range that cannot be answered (bad time, the archive changing under every read)."""


# --- times ---------------------------------------------------------------------------------

def parse_time(value, now_ms: Optional[int] = None) -> int:
    """ms since the epoch from: an int (ms), a datetime (naive = UTC), or text as
    core/clock.py parse_time reads it ("now", "-2h", "2026-11-24T14:00", ...)."""
    if isinstance(value, int):
        return value
    if isinstance(value, datetime.datetime):
        return clock.datetime_ms(value)
    try:
        return clock.parse_time(str(value), now_ms)
    except ValueError as e:
        raise HistoryError(str(e)) from None


def parse_interval(text: str) -> int:
    """"1m" -> 60000; s, m, h, d."""
    try:
        interval = clock.duration_ms(text)
    except ValueError:
        interval = 0
    if interval <= 0:
        raise HistoryError(f"not an interval: {text!r} (like 1s, 5m, 1h, 1d)")
    return interval


# --- the archive ---------------------------------------------------------------------------

class Archive:
    """One export directory, and the ClickHouse whose live tables hold what is not exported
    yet (clickhouse=None: the files only).  With `cluster` (a [cluster] section), the whole
    cluster's: see "A cluster" below."""

    def __init__(self, export_dir: str, clickhouse: Optional[dict] = None,
                 symbols: Sequence[configuration.Symbol] = (), cluster: Optional[dict] = None):
        self.export_dir = export_dir
        self.clickhouse = clickhouse
        self.symbols = list(symbols)
        self.cluster = cluster
        self.live = None  # where the last answer came from (files, ClickHouse), for users
        self.unreachable: Dict[str, str] = {}  # in a cluster: hosts the last answer lacks: why
        self._hosts_seen = (0.0, {}, {})  # (when, {host: source}, ZooKeeper's problem)

    @classmethod
    def from_config(cls, config=None, offline: bool = False) -> "Archive":
        """From a Config or a config file path (None: the usual search, core/config.py)."""
        if not isinstance(config, configuration.Config):
            config = configuration.load(config)
        return cls(config.export["dir"], None if offline else config.clickhouse,
                   resolved_symbols(config), config.cluster if config.clustered else None)

    def symbol(self, symbol: str) -> configuration.Symbol:
        """A configured symbol by contract or short name; else the default short name (a
        symbol no longer configured still has its files)."""
        for s in self.symbols:
            if symbol in (s.symbol, s.name):
                return s
        s = configuration.Symbol(symbol, configuration.default_name(symbol))
        self.symbols.append(s)  # its short name now finds the contract (a cluster's logs)
        return s

    # --- the four kinds ---------------------------------------------------------------------

    def trades(self, symbol: str, start, end, exact: bool = False) -> pa.Table:
        """ts, price, volume, side (dictionary buy/sell), rts: one row per trade, ts order."""
        return self._typed(symbol, DEAL_CHANNEL.mt, start, end, lambda raw: _trades(raw, exact))

    def ticker(self, symbol: str, start, end, exact: bool = False) -> pa.Table:
        """ts, last_price, fair_price, index_price, hold_vol, funding_rate, rts."""
        return self._typed(symbol, TICKER_CHANNEL.mt, start, end,
                           lambda raw: _ticker(raw, exact))

    def book(self, symbol: str, start, end=None, levels: int = 20, per_level: bool = False,
             exact: bool = False, full: bool = False) -> pa.Table:
        """Order-book snapshots: ts, bid_price, bid_size, ask_price, ask_size (lists, best
        first, at most `levels`), rts.  per_level=True: one row per level instead: ts, side
        (dictionary bid/ask), level (1 = best), price, size, rts.

        full=True: the whole book rebuilt at the instant `start` (end: None) from the nearest
        whole-book snapshot and the increments after it (exchange.book "full" or "both"), in
        the same columns (ts: the instant; rts: the exchange ms of the last change applied),
        float64 only; HistoryError when the book is unknown then (no snapshot before it, or a
        hole in the versions: the collector was resyncing)."""
        if full:
            if end is not None or exact:
                raise HistoryError("full=True rebuilds the book at one instant (start), float64")
            at = parse_time(start, int(time.time() * 1000))
            book = self.books_at(symbol, [at])[0]
            if isinstance(book, fullbook.BookUnknown):
                raise HistoryError(f"{symbol}: no whole book at {iso(at)}: {book}")
            s = self.symbol(symbol)
            return _with_metadata(_book_at(at, book, levels, per_level), s, at, at + 1,
                                  self._gaps(s.name, at, at + 1, ledger=self.live == LIVE),
                                  self.live, self.unreachable)
        return self._typed(symbol, DEPTH_CHANNEL.mt, start, end,
                           lambda raw: _book(raw, levels, per_level, exact))

    def books_at(self, symbol: str, instants: Sequence) -> list:
        """The whole book at each instant: a fullbook.BookAt (version, ts, bids, asks: best
        first, [(price, size)] floats), or the fullbook.BookUnknown saying why there is none.
        One read of the archive for all of them."""
        now = int(time.time() * 1000)
        ats = [parse_time(t, now) for t in instants]
        name = self.symbol(symbol).name
        for lookback in (2 * HOUR_MS, 26 * HOUR_MS):  # a snapshot starts every hour
            start_ms, end_ms = min(ats) - lookback, max(ats) + 1
            snaps = self._rows(name, BOOK_SNAPSHOT, start_ms, end_ms, _identity)
            snaps = fullbook.snapshots(_ms_list(snaps), snaps.column("m").to_pylist())
            if snaps and snaps[0].ts <= min(ats):
                break
        # increments from the snapshot the earliest instant starts from (at most
        # book_snapshot_interval or an hour back), not from the start of the look-back
        base = max((s.ts for s in snaps if s.ts <= min(ats)), default=start_ms)
        ups = self._rows(name, BOOK_CHANNEL.mt, base - fullbook.CLOCK_SLACK_MS, end_ms,
                         _identity)
        ups = fullbook.updates(_ms_list(ups), ups.column("m").to_pylist())
        return fullbook.books_at(ats, snaps, ups)

    def book_updates(self, symbol: str, start, end, exact: bool = False) -> pa.Table:
        """The whole book's increments, one row per level set: ts, begin, end (the versions
        the increment takes the book through), side (dictionary bid/ask), price, size (0:
        the level is gone), rts; in ts order, levels in the frame's order."""
        return self._typed(symbol, BOOK_CHANNEL.mt, start, end,
                           lambda raw: _book_updates(raw, exact))

    def bars(self, symbol: str, start, end, interval: str = "1m") -> pa.Table:
        """One row per interval of [start, end), empty intervals included: ts (interval
        start), open, high, low, close, volume, vwap, trades, buy_volume, sell_volume (float64;
        prices null where no trade), gap (the interval overlaps a gap in which trades may be
        missing: a ledger gap the REST backfill did not cover)."""
        start_ms, end_ms = self._range(start, end)
        trades = self.trades(symbol, start_ms, end_ms)
        gaps = gaps_of(trades)
        table = _bars(trades, start_ms, end_ms, parse_interval(interval),
                      [g for g in gaps if not g.covered])
        return _with_metadata(table, self.symbol(symbol), start_ms, end_ms, gaps, self.live,
                              self.unreachable)

    def gaps(self, symbol: str, start, end) -> List[Gap]:
        """The gaps overlapping [start, end): from the ledger (ClickHouse's `gaps` table) when
        it answers, else from the hourly files' `mexc.gaps` metadata (offline use)."""
        start_ms, end_ms = self._range(start, end)
        self.unreachable = {}  # what an earlier answer found, not this one's
        return self._gaps(self.symbol(symbol).name, start_ms, end_ms,
                          ledger=self.clickhouse is not None)

    # --- reading -----------------------------------------------------------------------------

    def _range(self, start, end):
        now = int(time.time() * 1000)
        start_ms, end_ms = parse_time(start, now), parse_time(end, now)
        if end_ms <= start_ms:
            raise HistoryError(f"empty range: {iso(start_ms)} to {iso(end_ms)}")
        return start_ms, end_ms

    def _gaps(self, name: str, start_ms: int, end_ms: int, ledger: bool) -> List[Gap]:
        if ledger:
            try:
                if self.cluster is not None:
                    return self._cluster_gaps(name, start_ms, end_ms)
                with Store(self.clickhouse) as store:
                    return store.gaps(name, start_ms, end_ms)
            except Exception:  # ClickHouse away: the files know the gaps of exported hours
                pass
        return self._file_gaps(name, start_ms, end_ms)

    def _typed(self, symbol: str, mt: str, start, end, convert) -> pa.Table:
        start_ms, end_ms = self._range(start, end)
        s = self.symbol(symbol)
        table = self._rows(s.name, mt, start_ms, end_ms, convert)
        gaps = self._gaps(s.name, start_ms, end_ms, ledger=self.live == LIVE)
        return _with_metadata(table, s, start_ms, end_ms, gaps, self.live, self.unreachable)

    def _rows(self, name: str, mt: str, start_ms: int, end_ms: int, convert) -> pa.Table:
        """Every row of type mt with ts in [start_ms, end_ms), exactly once, typed.

        A row is in an hourly file, in {name}_current or in {name}_previous, but a rotation
        (bus/rotation.py, exporter/exporter.py) copies and moves rows between them while we
        read, and between its steps a row may be in two places at once: previous and a file
        (the hour written, previous not dropped yet) or previous and current (rows of the
        hour in progress moved back).  So:
          1. note the identity (inode, size, mtime) of each hour's file in the range;
          2. read current and the pending tables (previous; a fresh left by a crash
             mid-swap) in one statement, so one snapshot of which tables exist;
          3. read the files, each hour filtered and typed before the next is read;
          4. pending rows also in current or in a file (the same ts, m, rts) are dropped:
             pending is only what the exporter has not finished yet;
          5. if any file changed since step 1 (a rotation wrote or merged an hour, possibly
             with rows read in step 2), read again.
        Current is never compared with files: its late rows for an exported hour are new.
        In a cluster: every host's rows, merged (_cluster_rows)."""
        if self.cluster is not None and self.clickhouse is not None:
            return self._cluster_rows(name, mt, start_ms, end_ms, convert)
        for _attempt in range(ATTEMPTS):
            before = self._file_identities(name, start_ms, end_ms)
            current, pending = self._live_rows(name, mt, start_ms, end_ms)
            pending = _anti_join(pending, current)
            chunks = []
            for raw, typed in self._read_files(before, mt, start_ms, end_ms, convert):
                pending = _anti_join(pending, raw)
                chunks.append(typed)
            if self._file_identities(name, start_ms, end_ms) == before:
                chunks += [convert(current), convert(pending)]
                table = pa.concat_tables(chunks)
                live = current.num_rows + pending.num_rows
                return table.sort_by("ts") if live else table  # files are in ts order
        raise HistoryError(f"{name}: the files of {iso(start_ms)}..{iso(end_ms)} changed during "
                           f"each of {ATTEMPTS} reads (an export running?); try again")

    @staticmethod
    def _read_files(files: dict, mt: str, start_ms: int, end_ms: int, convert):
        """(raw rows, typed rows) of each file, in hour order, READERS files at a time (Arrow
        reads and computes without the GIL; memory holds a few hours' raw rows at most)."""
        def read(item):
            path, (hour, *_identity) = item
            raw = _file_rows(path, mt, start_ms, end_ms, hour)
            return raw, convert(raw)
        with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
            yield from pool.map(read, files.items())

    def _file_identities(self, name: str, start_ms: int, end_ms: int) -> dict:
        """{path: (hour, inode, size, mtime)} of the hourly files of the range that exist."""
        identities = {}
        for hour in range(hour_start(start_ms), end_ms, HOUR_MS):
            path = archive.hour_path(self.export_dir, name, hour)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            identities[path] = (hour, st.st_ino, st.st_size, st.st_mtime_ns)
        return identities

    def _live_rows(self, name: str, mt: str, start_ms: int, end_ms: int):
        """(current, pending) rows of the range as (ts, m, rts) tables, pending being those
        of an export in progress (Store.live_rows); empty offline or when ClickHouse does
        not answer (then `self.live` says why)."""
        current = pending = _raw_table([], [], [])
        if self.clickhouse is None:
            self.live = "offline: the files only"
            return current, pending
        try:
            with Store(self.clickhouse) as store:
                ts, m, rts, is_pending = store.live_rows(name, mt, start_ms, end_ms)
        except Exception as e:  # the archive still answers for every exported hour
            self.live = f"ClickHouse unavailable, the files only: {first_line(e)}"
            return current, pending
        self.live = LIVE
        table = _raw_table(ts, m, rts)
        in_pending = pa.array(is_pending, pa.uint8()).cast(pa.bool_())  # 0 or 1
        # distinct: a crash's fresh rows are copied into previous before fresh is dropped
        pending = table.filter(in_pending).group_by(KEYS, use_threads=False).aggregate([])
        return table.filter(pc.invert(in_pending)), pending.select(KEYS)

    def _file_gaps(self, name: str, start_ms: int, end_ms: int) -> List[Gap]:
        """The gaps the range's files carry in their metadata, once each, oldest first."""
        found = set()
        for path in self._file_identities(name, start_ms, end_ms):
            metadata = pq.read_schema(path).metadata or {}
            found.update(archive.gaps_from_json(metadata.get(archive.GAPS_KEY, b"[]")))
        return sorted((g for g in found if g.end_ms > start_ms and g.start_ms < end_ms),
                      key=lambda g: (g.start_ms, g.end_ms))

    # --- a cluster: every host's rows (docs/cluster.md "The whole cluster from any host") --

    def _hosts(self):
        """({host: its ClickHouse as remote() reaches it; None for this host}, {OTHERS: why}
        when ZooKeeper did not answer (then this host alone)): the hosts registered in
        ZooKeeper, asked at most once per HOSTS_FRESH seconds."""
        when, hosts, problem = self._hosts_seen
        if time.monotonic() - when < HOSTS_FRESH:
            return dict(hosts), dict(problem)
        from cluster.exports import cluster_hosts  # kazoo only in a cluster
        hosts, problem = cluster_hosts(self.cluster)
        self._hosts_seen = (time.monotonic(), hosts, problem)
        return dict(hosts), dict(problem)

    def _cluster_rows(self, name: str, mt: str, start_ms: int, end_ms: int,
                      convert) -> pa.Table:
        """Every row of type mt in the range that any host holds, each exchange event once,
        merged as the exporter merges an hour (exporter/merge.py; `host` says whose row it
        is): per hour, the merged file here if there is one, and from every host the rows
        that file does not have yet (its copies of hours not merged here, its live tables),
        read through remote().  A host that does not answer is left out and named in
        `unreachable`; the others answer.  This host's ClickHouse away: the files only."""
        hosts, unreachable = self._hosts()
        for _attempt in range(ATTEMPTS):
            before = self._file_identities(name, start_ms, end_ms)
            merged_hours = {hour for hour, *_rest in before.values()}
            read, self.live = {}, LIVE
            try:
                with Store(self.clickhouse) as store:
                    for host, source in sorted(hosts.items()):
                        with store.asking(host, unreachable, required=source is None):
                            read[host] = self._read_host(store, host, source, name, mt,
                                                         start_ms, end_ms, merged_hours)
            except Exception as e:  # the files still answer for every merged hour
                self.live = f"ClickHouse unavailable, the files only: {first_line(e)}"
                read = {}
            rows = {host: _host_table(*columns) for host, columns in read.items()}
            files = {hour: _file_rows(path, mt, start_ms, end_ms, hour, host=True)
                     for path, (hour, *_rest) in before.items()}
            if self._file_identities(name, start_ms, end_ms) == before:
                break
        else:
            raise HistoryError(f"{name}: the files of {iso(start_ms)}..{iso(end_ms)} changed "
                               f"during each of {ATTEMPTS} reads (an export running?)")
        self.unreachable = unreachable
        chunks = [convert(_merged_hour(mt, hour, files.get(hour), rows))
                  for hour in range(hour_start(start_ms), end_ms, HOUR_MS)]
        return pa.concat_tables(chunks)  # hours in order, each in ts order

    def _read_host(self, store: Store, host: str, source: Optional[str], name: str, mt: str,
                   start_ms: int, end_ms: int, merged_hours: set):
        """One host's rows of the range that the merged files here do not hold, for
        _host_table: its live tables' columns (Store.host_live_rows) and its copies of the
        other hours (their bytes in its hour_copies); read again while its export moves rows
        (which tables exist, which copies are logged: the same before and after)."""
        symbol = self.symbol(name).symbol
        for _attempt in range(ATTEMPTS):
            state = (store.rows_tables(name, source),
                     store.logged_copies(symbol, start_ms, end_ms, source))
            ts, m, rts, is_pending = store.host_live_rows(name, mt, start_ms, end_ms, state[0],
                                                          source)
            copies = [self._copy_rows(store, host, source, name, mt, start_ms, end_ms, hour,
                                      sha) for hour, sha in sorted(state[1].items())
                      if hour not in merged_hours]
            if None not in copies and state == (
                    store.rows_tables(name, source),
                    store.logged_copies(symbol, start_ms, end_ms, source)):
                break
        else:
            raise HistoryError(f"{name}: the rows of {host} moved during each of {ATTEMPTS} "
                               "reads (an export running?)")
        return (ts, m, rts, is_pending), copies

    @staticmethod
    def _copy_rows(store: Store, host: str, source: Optional[str], name: str, mt: str,
                   start_ms: int, end_ms: int, hour: int, sha256: str) -> Optional[pa.Table]:
        """A host's copy of an hour (its rows of type mt in the range), None while its bytes
        are not whole in hour_copies yet (logged a moment before they are stored)."""
        data = store.hour_file(name, hour, COPY, host, sha256, source)
        if data is None or hashlib.sha256(data).hexdigest() != sha256:
            return None
        return _file_rows(io.BytesIO(data), mt, start_ms, end_ms, hour)

    def _cluster_gaps(self, name: str, start_ms: int, end_ms: int) -> List[Gap]:
        """The stretches of the range no host covered, from every answering host's ledger and
        holdings, as a merged file's gaps are made (exporter/merge.py cluster_gaps); hosts
        the rows of this answer found unreachable are not asked again."""
        hosts = {}
        with Store(self.clickhouse) as store:
            for host, source in sorted(self._hosts()[0].items()):
                if host in self.unreachable:
                    continue
                with store.asking(host, self.unreachable, required=source is None):
                    hosts[host] = ([(ts, held) for h, ts, held in
                                    store.holdings(name, start_ms, end_ms, source) if h == host],
                                   store.gaps(name, start_ms, end_ms, source))
        return merge.cluster_gaps(hosts, self.symbol(name).symbol, name, start_ms, end_ms)[0]


def _host_table(columns, copies: List[pa.Table]) -> pa.Table:
    """One host's rows (ts, m, rts) from what _read_host read, each row once as _rows has
    this host's own: pending rows (an export under way) also in current or in a copy are
    dropped."""
    ts, m, rts, is_pending = columns
    table = _raw_table(ts, m, rts)
    in_pending = pa.array(is_pending, pa.uint8()).cast(pa.bool_())
    current = table.filter(pc.invert(in_pending))
    pending = table.filter(in_pending).group_by(KEYS, use_threads=False).aggregate([])
    pending = _anti_join(pending.select(KEYS), current)
    copies = [_identity(copy) for copy in copies]  # the file's non-null fields as ClickHouse's
    for copy in copies:
        pending = _anti_join(pending, copy)
    return pa.concat_tables([*copies, current, pending])


def _merged_hour(mt: str, hour: int, merged_file: Optional[pa.Table], hosts: dict) -> pa.Table:
    """One hour's rows (ts, m, rts, host): the merged file's and every host's, each event once
    (exporter/merge.py)."""
    def in_hour(table):
        ts = table.column("ts")
        return table.filter(pc.and_(pc.greater_equal(ts, pa.scalar(hour, TIMESTAMP)),
                                    pc.less(ts, pa.scalar(hour + HOUR_MS, TIMESTAMP))))
    inputs = [(host, in_hour(table)) for host, table in sorted(hosts.items())]
    inputs = [(host, table) for host, table in inputs if table.num_rows]
    if merged_file is not None and merged_file.num_rows:
        if not inputs:  # merged already
            return merged_file
        inputs.insert(0, ("", merged_file))
    rows = merge.merge([(host, table.append_column("mt", pa.array([mt] * table.num_rows,
                                                                  pa.string())))
                        for host, table in inputs])
    return rows.select(["ts", "m", "rts", "host"])


def _raw_table(ts, m, rts) -> pa.Table:
    return pa.table({"ts": pa.array(ts, pa.int64()).cast(TIMESTAMP), "m": pa.array(m, pa.string()),
                     "rts": pa.array(rts, pa.int64()).cast(TIMESTAMP)})


def _file_rows(path, mt: str, start_ms: int, end_ms: int, hour: int,
               host: bool = False) -> pa.Table:
    """One hourly file's rows of type mt in the range, as (ts, m, rts), and `host` (a merged
    file's) if asked.  path: a path or a file object."""
    columns = ["ts", "m", "rts"] + (["host"] if host else [])
    table = pq.read_table(path, columns=["ts", "mt"] + columns[1:])
    keep = _is_type(table.column("mt"), mt)
    if start_ms > hour or end_ms < hour + HOUR_MS:  # the range cuts this hour
        ts = table.column("ts")
        keep = pc.and_(keep, pc.and_(pc.greater_equal(ts, pa.scalar(start_ms, TIMESTAMP)),
                                     pc.less(ts, pa.scalar(end_ms, TIMESTAMP))))
    return table.filter(keep).select(columns)


def _is_type(mt_column: pa.ChunkedArray, mt: str) -> pa.ChunkedArray:
    """mt == mt for a dictionary column, comparing the small int codes (decoding the
    dictionary for a plain comparison costs more than the rest of the filter)."""
    masks = []
    for chunk in mt_column.chunks:
        code = chunk.dictionary.index(mt).as_py()  # -1 when this chunk has no such row
        masks.append(pc.equal(chunk.indices, pa.scalar(code, chunk.indices.type)))
    return pa.chunked_array(masks, pa.bool_())


def _anti_join(rows: pa.Table, others: pa.Table) -> pa.Table:
    """rows minus those also in others (same ts, m, rts)."""
    if rows.num_rows == 0 or others.num_rows == 0:
        return rows
    return rows.join(others.select(KEYS), keys=KEYS, join_type="left anti").select(KEYS)


# --- typing the message text (its layouts: core/channels.py) --------------------------------

def _fields(m, layout: Layout) -> list:
    """The fields of each message, as string arrays, in the layout's order (a field after
    them, a deal's trade id, is split off and left out)."""
    count = len(layout.fields)
    parts = pc.split_pattern(m, FIELD_SEPARATOR, max_splits=count)
    return [pc.list_element(parts, i) for i in range(count)]


def _tail(raw: pa.Table, parents=None) -> dict:
    """The typed table's last columns: rts, and in a cluster `host` (whose copy the row is),
    taken per row of the raw rows (`parents`: the raw row of each typed row)."""
    names = ["rts"] + (["host"] if "host" in raw.column_names else [])
    return {n: raw.column(n) if parents is None else pc.take(raw.column(n), parents)
            for n in names}


def _number(text, exact: bool):
    return pc.cast(text, EXACT if exact else pa.float64())


def _trades(raw: pa.Table, exact: bool) -> pa.Table:
    price, volume, direction = _fields(raw.column("m"), DEAL_CHANNEL.layout)
    codes = pc.subtract(pc.cast(direction, pa.int8()), 1).cast(pa.int8())  # DEAL_SIDES index
    side = pa.DictionaryArray.from_arrays(_array(codes), SIDES, safe=True)  # raises if not 1/2
    return pa.table({"ts": raw.column("ts"), "price": _number(price, exact),
                     "volume": _number(volume, exact), "side": side, **_tail(raw)})


def _ticker(raw: pa.Table, exact: bool) -> pa.Table:
    layout = TICKER_CHANNEL.layout
    fields = _fields(raw.column("m"), layout)
    return pa.table({"ts": raw.column("ts"),
                     **{name: _number(f, exact) for name, f in zip(layout.fields, fields)},
                     **_tail(raw)})


def _array(values) -> pa.Array:
    """One array from a chunked one (compute functions hand back either)."""
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _levels(side_text, levels: int, exact: bool):
    """`[p,s],[p,s],...` texts -> (price lists, size lists), at most `levels` each."""
    side_text = _array(side_text)
    counts = pc.count_substring(side_text, LEVEL_OPEN)  # levels per row; 0 for an empty side
    inner = pc.utf8_slice_codeunits(side_text, len(LEVEL_OPEN), -len(LEVEL_CLOSE))
    pairs = pc.list_flatten(pc.split_pattern(inner, LEVEL_CLOSE + LEVEL_SEPARATOR + LEVEL_OPEN))
    pairs = pairs.filter(pc.not_equal(pairs, ""))  # an empty side splits to one ""
    price, size = (pc.list_element(pc.split_pattern(pairs, LEVEL_FIELDS), i) for i in (0, 1))
    offsets = pa.concat_arrays([pa.array([0], pa.int32()),
                                pc.cumulative_sum(counts).cast(pa.int32())])
    return [pc.list_slice(pa.ListArray.from_arrays(offsets, _number(column, exact)), 0, levels)
            for column in (price, size)]


def _identity(raw: pa.Table) -> pa.Table:
    """The raw rows, in one schema whether from a file (not null) or ClickHouse."""
    return pa.table({name: raw.column(name) for name in raw.column_names})


def _ms_list(raw: pa.Table) -> list:
    return raw.column("ts").cast(pa.int64()).to_pylist()


def _book_updates(raw: pa.Table, exact: bool) -> pa.Table:
    begin, end, bids, asks = _fields(raw.column("m"), BOOK_CHANNEL.layout)
    sides = []
    for code, text in ((0, bids), (1, asks)):
        price, size = _levels(text, 2**31 - 1, exact)
        parents = pc.list_parent_indices(price)
        sides.append(pa.table({
            "ts": pc.take(raw.column("ts"), parents),
            "begin": pc.take(pc.cast(begin, pa.int64()), parents),
            "end": pc.take(pc.cast(end, pa.int64()), parents),
            "side": pa.array([code] * len(parents), pa.int8()),
            "price": pc.list_flatten(price), "size": pc.list_flatten(size),
            **_tail(raw, parents)}))
    table = pa.concat_tables(sides).sort_by([("ts", "ascending"), ("begin", "ascending"),
                                              ("side", "ascending")])
    side = pa.DictionaryArray.from_arrays(_array(table.column("side")), BOOK_SIDES)
    return table.set_column(3, "side", side)


def _book_at(at: int, book, levels: int, per_level: bool) -> pa.Table:
    """A rebuilt whole book as one row of _book's columns (or its per-level rows)."""
    (bid_price, bid_size), (ask_price, ask_size) = (
        (list(column) for column in zip(*side)) if side else ([], [])
        for side in (book.bids[:levels], book.asks[:levels]))
    one = pa.table({"ts": pa.array([at], pa.int64()).cast(TIMESTAMP),
                    "bid_price": pa.array([bid_price], pa.list_(pa.float64())),
                    "bid_size": pa.array([bid_size], pa.list_(pa.float64())),
                    "ask_price": pa.array([ask_price], pa.list_(pa.float64())),
                    "ask_size": pa.array([ask_size], pa.list_(pa.float64())),
                    "rts": pa.array([book.ts], pa.int64()).cast(TIMESTAMP)})
    if not per_level:
        return one
    sides = [_one_row_per_level(one, 0, one.column("bid_price").combine_chunks(),
                                one.column("bid_size").combine_chunks()),
             _one_row_per_level(one, 1, one.column("ask_price").combine_chunks(),
                                one.column("ask_size").combine_chunks())]
    table = pa.concat_tables(sides)
    side = pa.DictionaryArray.from_arrays(_array(table.column("side")), BOOK_SIDES)
    return table.set_column(1, "side", side)


def _book(raw: pa.Table, levels: int, per_level: bool, exact: bool) -> pa.Table:
    bids, asks = _fields(raw.column("m"), DEPTH_CHANNEL.layout)
    bid_price, bid_size = _levels(bids, levels, exact)
    ask_price, ask_size = _levels(asks, levels, exact)
    if not per_level:
        return pa.table({"ts": raw.column("ts"), "bid_price": bid_price, "bid_size": bid_size,
                         "ask_price": ask_price, "ask_size": ask_size, **_tail(raw)})
    sides = [_one_row_per_level(raw, 0, bid_price, bid_size),
             _one_row_per_level(raw, 1, ask_price, ask_size)]
    table = pa.concat_tables(sides)  # all bids, then all asks: sort each snapshot together
    table = table.sort_by([("ts", "ascending"), ("side", "ascending"), ("level", "ascending")])
    side = pa.DictionaryArray.from_arrays(_array(table.column("side")), BOOK_SIDES)
    return table.set_column(1, "side", side)


def _one_row_per_level(raw: pa.Table, side: int, price, size) -> pa.Table:
    parents = pc.list_parent_indices(price)
    row_start = pa.concat_arrays([pa.array([0], pa.int64()),
                                  pc.cumulative_sum(pc.list_value_length(price).cast(pa.int64()))])
    n = len(parents)
    level = pc.add(pc.subtract(pa.array(range(n), pa.int64()),  # position in the row, from 1
                               pc.take(row_start, parents)), 1).cast(pa.int8())
    return pa.table({"ts": pc.take(raw.column("ts"), parents),
                     "side": pa.array([side] * n, pa.int8()),  # 0 bid, 1 ask; see _book
                     "level": level, "price": pc.list_flatten(price),
                     "size": pc.list_flatten(size), **_tail(raw, parents)})


# --- bars ------------------------------------------------------------------------------------

def _bars(trades: pa.Table, start_ms: int, end_ms: int, interval_ms: int,
          gaps: Sequence[Gap]) -> pa.Table:
    ts_ms = trades.column("ts").cast(pa.int64())
    bucket = pc.multiply(pc.divide(ts_ms, interval_ms), interval_ms)  # int division
    is_buy = pc.equal(trades.column("side").cast(pa.string()), "buy")
    volume = trades.column("volume")
    zero = pa.scalar(0.0)
    work = pa.table({"bucket": bucket, "price": trades.column("price"), "volume": volume,
                     "notional": pc.multiply(trades.column("price"), volume),
                     "buy": pc.if_else(is_buy, volume, zero),
                     "sell": pc.if_else(is_buy, zero, volume)})
    grouped = work.group_by("bucket", use_threads=False).aggregate([
        ("price", "first"), ("price", "max"), ("price", "min"), ("price", "last"),
        ("volume", "sum"), ("notional", "sum"), ("price", "count"), ("buy", "sum"),
        ("sell", "sum")])
    first = start_ms // interval_ms * interval_ms
    grid = pa.table({"bucket": pa.array(range(first, end_ms, interval_ms), pa.int64())})
    bars = grid.join(grouped, "bucket", join_type="left outer").sort_by("bucket")
    column = bars.column
    volume_sum = pc.fill_null(column("volume_sum"), 0.0)
    return pa.table({
        "ts": column("bucket").cast(TIMESTAMP),
        "open": column("price_first"), "high": column("price_max"),
        "low": column("price_min"), "close": column("price_last"),
        "volume": volume_sum,
        "vwap": pc.divide(column("notional_sum"), column("volume_sum")),
        "trades": pc.fill_null(column("price_count"), 0),
        "buy_volume": pc.fill_null(column("buy_sum"), 0.0),
        "sell_volume": pc.fill_null(column("sell_sum"), 0.0),
        "gap": _overlaps(column("bucket"), interval_ms, gaps),
    })


def _overlaps(bucket, interval_ms: int, gaps: Sequence[Gap]):
    """Per interval [bucket, bucket + interval): does it overlap any of the gaps?"""
    marked = pa.array([False] * len(bucket), pa.bool_())
    for gap in gaps:
        marked = pc.or_(marked, pc.and_(pc.less(bucket, gap.end_ms),
                                        pc.greater(pc.add(bucket, interval_ms), gap.start_ms)))
    return marked


# --- gaps in the answer ----------------------------------------------------------------------

def _with_metadata(table: pa.Table, symbol, start_ms: int, end_ms: int,
                   gaps: Iterable[Gap], source: str, unreachable=None) -> pa.Table:
    """unreachable: in a cluster, {host: why} of the hosts whose rows the answer lacks."""
    about = {"symbol": symbol.symbol, "name": symbol.name, "start": iso(start_ms),
             "end": iso(end_ms), "start_ms": start_ms, "end_ms": end_ms, "source": source}
    if unreachable:
        about["unreachable"] = unreachable
    return table.replace_schema_metadata({archive.GAPS_KEY: archive.gaps_json(gaps),
                                          RANGE_KEY: json.dumps(about).encode()})


def gaps_of(table: pa.Table) -> List[Gap]:
    """The gaps inside the range of a table this module returned."""
    return archive.gaps_from_json((table.schema.metadata or {}).get(archive.GAPS_KEY, b"[]"))


# --- output (mexc trades|book|ticker|bars) ---------------------------------------------------

def write(table: pa.Table, output: str, out) -> None:
    """Write a table as parquet, csv or an aligned text table to a path or a text stream
    (book lists need per_level rows for csv and table)."""
    if output == "parquet":
        pq.write_table(table, out, compression="zstd")  # the metadata (gaps) goes along
        return
    text = pa.table([_text(column) for column in table.columns], names=table.column_names)
    with _opened(out, binary=output == "csv") as stream:
        if output == "csv":
            stream.write((",".join(text.column_names) + "\n").encode())
            # numbers, times and categories never hold a comma or a quote: nothing to quote
            pa_csv.write_csv(text, stream, pa_csv.WriteOptions(include_header=False,
                                                               quoting_style="none"))
        else:
            _write_aligned(text, stream)


@contextlib.contextmanager
def _opened(out, binary: bool):
    """A path opened for writing (closed after), or a text stream (its bytes if binary)."""
    if isinstance(out, str):
        with open(out, "wb" if binary else "w") as stream:
            yield stream
    else:
        out.flush()
        yield out.buffer if binary else out
        (out.buffer if binary else out).flush()


def _write_aligned(text: pa.Table, stream) -> None:
    """Columns right-aligned under their names, a batch of rows at a time."""
    widths = [max(len(name), pc.max(pc.utf8_length(column)).as_py() or 0)
              for name, column in zip(text.column_names, text.columns)]
    stream.write("  ".join(n.rjust(w) for n, w in zip(text.column_names, widths)) + "\n")
    for batch in text.to_batches(65536):
        for row in zip(*(column.to_pylist() for column in batch.columns)):
            stream.write("  ".join((v or "").rjust(w) for v, w in zip(row, widths)) + "\n")


def _text(column) -> pa.ChunkedArray:
    """A column as text: times as ISO-8601 UTC, numbers as pyarrow prints them."""
    if pa.types.is_timestamp(column.type):
        return pc.strftime(column, format="%Y-%m-%dT%H:%M:%SZ")  # %S has the milliseconds
    return pc.cast(column, pa.string())


def summary(table: pa.Table, kind: str) -> str:
    """One line for stderr: what came back, from where; then one line per gap."""
    about = json.loads(table.schema.metadata[RANGE_KEY])
    gaps = gaps_of(table)
    lines = [f"{table.num_rows:,} {kind} rows of {about['symbol']} from {about['start']} to "
             f"{about['end']} ({about['source']}); {len(gaps)} gaps"]
    lines += [f"  gap {iso(g.start_ms)} to {iso(g.end_ms)}: {g.reason} {g.detail}".rstrip()
              + (f", {g.backfilled} trades backfilled" if g.backfilled else "")
              + ("" if g.covered else ", trades may be missing") for g in gaps]
    lines += [_unreachable(host, why) for host, why in sorted(about.get("unreachable", {}).items())]
    return "\n".join(lines)


def _unreachable(host: str, why: str) -> str:
    if host == OTHERS:
        return f"  warning: the other hosts are unknown ({why}): this host's rows only"
    return (f"  warning: host {host} unreachable ({why}): its rows not in the merged files here "
            f"are missing")


# --- conversions -----------------------------------------------------------------------------

def to_pandas(table: pa.Table):
    """A pandas DataFrame (pandas is not a dependency of mexc: pip install pandas)."""
    return table.to_pandas()


def to_polars(table: pa.Table):
    """A polars DataFrame (polars is not a dependency of mexc: pip install polars)."""
    import polars  # only for users who asked for it

    return polars.from_arrow(table)

"""The archive on disk: one Parquet file per symbol and UTC hour, `{name}_YYYYMMDD_HH00.parquet`
in export.dir (written by exporter/parquet_files.py), and what other parts may read of it.

The readers import pyarrow when called: a collector reads a file only after a gap that reaches
into an exported hour, and a collector that never does should not carry pyarrow (a forked
collector paid about 0.5 MiB of private memory for it being loaded in the supervisor)."""
import collections
import json
import os
import time
from typing import Counter, Iterable, List, Optional, Tuple

from core.clock import HOUR_MS
from core.vocabulary import BOOK_UPDATE, DEAD_LETTER, DEAL, GAP_COLUMNS, Gap

BATCH_ROWS = 65_536
# metadata key of an hour file (and of mexc/history.py's answers): the gap ledger's records
# touching its time, as gaps_json() spells them
GAPS_KEY = b"mexc.gaps"


# In a cluster (docs/cluster.md) each host's own files are its copies, in this subdirectory;
# export.dir itself holds the merged files.
COPIES_DIR = "copies"


def own_files_dir(export_dir: str, clustered: bool) -> str:
    """Where this host's own hour files are: export.dir, or its copies/ in a cluster."""
    return os.path.join(export_dir, COPIES_DIR) if clustered else export_dir


def file_name(name: str, hour_ms: int) -> str:
    return f"{name}_{time.strftime('%Y%m%d_%H00', time.gmtime(hour_ms // 1000))}.parquet"


def hour_path(export_dir: str, name: str, hour_ms: int) -> str:
    return os.path.join(export_dir, file_name(name, hour_ms))


def gaps_json(gaps: Iterable[Gap]) -> bytes:
    """A JSON list of objects with the Gap fields."""
    return json.dumps([g._asdict() for g in gaps], separators=(",", ":")).encode()


def gaps_from_json(text: bytes) -> List[Gap]:
    return [Gap(**{k: entry[k] for k in GAP_COLUMNS}) for entry in json.loads(text)]


def filed_deals(export_dir: str, name: str, start_ms: int, end_ms: int
                ) -> Tuple[Counter, List[int]]:
    """The deal rows of [start_ms, end_ms] in the hour files, as a multiset of (ts, m), and
    the hours in that span that have no file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    deals, without_file = collections.Counter(), []
    for hour in range(start_ms // HOUR_MS * HOUR_MS, end_ms + 1, HOUR_MS):
        try:
            hour_file = pq.ParquetFile(hour_path(export_dir, name, hour))
        except OSError:  # no file (or export.dir not there): its trades are unknown
            without_file.append(hour)
            continue
        # in batches, keeping only the matching rows (a row group is still decoded whole: about
        # 190 MiB at peak for a 1,000,000-row hour, 540 MiB for the hour read as one table)
        with hour_file:
            for batch in hour_file.iter_batches(BATCH_ROWS, columns=["ts", "mt", "m"]):
                ms = batch.column(0).cast(pa.int64())
                kept = batch.filter(pc.and_(
                    pc.equal(batch.column(1).cast(pa.string()), DEAL),
                    pc.and_(pc.greater_equal(ms, start_ms), pc.less_equal(ms, end_ms))))
                if kept.num_rows:
                    deals.update(zip(kept.column(0).cast(pa.int64()).to_pylist(),
                                     kept.column(2).to_pylist()))
    return deals, without_file


def newest_data_ms(export_dir: str, name: str, hour_ms: int, before_ms: int) -> Optional[int]:
    """The newest exchange time of a data row (not a dead letter) before `before_ms` in an
    hour's file (None: it has none); OSError when the file is not there."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetFile(hour_path(export_dir, name, hour_ms)) as hour_file:
        table = hour_file.read(columns=["ts", "mt"])  # 9 bytes a row: no `m`
    ms = table.column("ts").cast(pa.int64())
    kept = ms.filter(pc.and_(pc.not_equal(table.column("mt").cast(pa.string()), DEAD_LETTER),
                             pc.less(ms, before_ms)))
    return pc.max(kept).as_py() if len(kept) else None


def holds_rows(files_dir: str, name: str, rows) -> bool:
    """Is each of these (ts, mt, m, rts) rows in its hour's file (exactly)?  False when a
    file is not there."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for ts, mt, m, rts in rows:
        try:
            hour_file = pq.ParquetFile(hour_path(files_dir, name, ts // HOUR_MS * HOUR_MS))
        except OSError:
            return False
        with hour_file:
            table = hour_file.read(columns=["ts", "mt", "m", "rts"])
        found = table.filter(pc.and_(
            pc.and_(pc.equal(table.column("ts").cast(pa.int64()), ts),
                    pc.equal(table.column("rts").cast(pa.int64()), rts)),
            pc.and_(pc.equal(table.column("mt").cast(pa.string()), mt),
                    pc.equal(table.column("m"), m))))
        if not found.num_rows:
            return False
    return True


def newest_book_update(export_dir: str, name: str, hour_ms: int, received_before_ms: int
                       ) -> Optional[Tuple[int, str]]:
    """(ts ms, m) of the newest whole-book increment in an hour's file received before
    received_before_ms (None: it has none); OSError when the file is not there."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetFile(hour_path(export_dir, name, hour_ms)) as hour_file:
        table = hour_file.read(columns=["ts", "mt", "m", "rts"])
    table = table.filter(pc.and_(
        pc.equal(table.column("mt").cast(pa.string()), BOOK_UPDATE),
        pc.less(table.column("rts").cast(pa.int64()), received_before_ms)))
    if not table.num_rows:
        return None
    last = table.num_rows - 1  # the file is in ts order
    return table.column("ts").cast(pa.int64())[last].as_py(), table.column("m")[last].as_py()

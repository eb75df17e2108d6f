"""The archive on disk: one Parquet file per symbol and UTC hour, `{name}_YYYYMMDD_HH00.parquet`
in export.dir (written by exporter/parquet_files.py), and what other parts may read of it."""
import collections
import os
import time
from typing import Counter, List, Tuple

import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.clock import HOUR_MS


def file_name(name: str, hour_ms: int) -> str:
    return f"{name}_{time.strftime('%Y%m%d_%H00', time.gmtime(hour_ms // 1000))}.parquet"


def filed_deals(export_dir: str, name: str, start_ms: int, end_ms: int
                ) -> Tuple[Counter, List[int]]:
    """The deal rows of [start_ms, end_ms] in the hour files, as a multiset of (ts, m), and
    the hours in that span that have no file."""
    deals, without_file = collections.Counter(), []
    for hour in range(start_ms // HOUR_MS * HOUR_MS, end_ms + 1, HOUR_MS):
        path = os.path.join(export_dir, file_name(name, hour))
        try:
            table = pq.read_table(path, columns=["ts", "mt", "m"])
        except OSError:  # no file (or export.dir not there): its trades are unknown
            without_file.append(hour)
            continue
        ms = table.column("ts").cast("int64")
        keep = pc.and_(pc.equal(table.column("mt").cast("string"), "d"),
                       pc.and_(pc.greater_equal(ms, start_ms), pc.less_equal(ms, end_ms)))
        kept = table.filter(keep)
        deals.update(zip(kept.column("ts").cast("int64").to_pylist(),
                         kept.column("m").to_pylist()))
    return deals, without_file

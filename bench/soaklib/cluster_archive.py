"""The merged archive of a cluster soak (docs/cluster.md "One merged archive"): each host's
`export.dir` holds the merged files (`{name}_YYYYMMDD_HH00.parquet`, every host's copy of the
hour merged, the same bytes on every host) and its own copies in `export.dir/copies/`.

Checked per symbol-hour: the file on at least min(replicas, hosts) hosts and byte-identical on
all of them; every row is inside its hour; no event twice (a data row's ts is unique per symbol
in the simulator's market); every row any host stored of the hour (its copy, its tables) in the
file, and nothing else; the file's gaps (`mexc.gaps` metadata: the stretches no host covered)
overlapping every cluster hole of the hour.  Then `mexc verify` on every host."""
from __future__ import annotations

import calendar
import collections
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from core.clock import HOUR_MS

from . import ROOT
from .accounting import Stored
from .common import FILE_RE, MEXC, say, wait_for

COPIES = "copies"  # export.dir/copies/: a cluster host's own copies of its hours


@dataclass
class ArchiveFigures:
    hours: int = 0  # symbol-hours with a merged file
    rows: int = 0
    doubled: int = 0  # an event twice in one merged file
    missing: int = 0  # stored by a host, in a merged hour, not in its file
    extra: int = 0  # in a merged file, stored by no host
    outside_hour: int = 0
    under_replicated: List[str] = field(default_factory=list)  # fewer holders than replicas
    differing: List[str] = field(default_factory=list)  # holders with different bytes
    holes_without_gap: int = 0  # cluster holes in merged hours with no gap in the files
    gaps_in_files: int = 0
    not_merged_rows: int = 0  # rows of hours no merged file holds yet (the last hour)
    verify_exits: Dict[str, int] = field(default_factory=dict)
    verify_said: Dict[str, str] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)

    def failures(self) -> List[str]:
        f = []
        for attr, what in (("doubled", "events twice in a merged file"),
                           ("missing", "rows a host stored missing from the merged file"),
                           ("extra", "rows in merged files no host stored"),
                           ("outside_hour", "merged rows outside their hour"),
                           ("holes_without_gap", "cluster holes without a gap in the merged "
                                                 "file")):
            if getattr(self, attr):
                f.append(f"archive: {getattr(self, attr)} {what}"
                         + (f" ({'; '.join(self.examples[:2])})" if self.examples else ""))
        if self.under_replicated:
            f.append(f"archive: {len(self.under_replicated)} merged files on too few hosts "
                     f"({', '.join(self.under_replicated[:3])})")
        if self.differing:
            f.append(f"archive: {len(self.differing)} merged files differ between hosts "
                     f"({', '.join(self.differing[:3])})")
        for host, code in sorted(self.verify_exits.items()):
            if code != 0:
                f.append(f"archive: {host} mexc verify exit {code}: {self.verify_said[host]}")
        return f

    def line(self) -> str:
        return (f"merged archive: {self.hours} symbol-hours, {self.rows:,} rows; doubled "
                f"{self.doubled}, missing {self.missing}, extra {self.extra}; byte-identical "
                f"copies: {self.hours - len(self.differing)} of {self.hours}, on too few hosts "
                f"{len(self.under_replicated)}; {self.gaps_in_files} gaps in the files, cluster "
                f"holes without one {self.holes_without_gap}; rows not merged yet (last hour) "
                f"{self.not_merged_rows:,}; mexc verify: "
                + ", ".join(f"{h} exit {c}" for h, c in sorted(self.verify_exits.items())))


def merged_files(host) -> Dict[Tuple[str, int], str]:
    """{(name, hour ms): path} of the merged files in a host's export.dir."""
    files = {}
    for filename in os.listdir(host.export_dir):
        match = FILE_RE.match(filename)
        if match:
            name, day, hour = match.groups()
            hour_ms = calendar.timegm(time.strptime(day + hour, "%Y%m%d%H")) * 1000
            files[(name, hour_ms)] = os.path.join(host.export_dir, filename)
    return files


def merging() -> bool:
    """This tree's exporter merges a cluster's copies into one archive (issue 22 item 3)."""
    return os.path.exists(os.path.join(ROOT, "exporter", "merge.py"))


def copies_dir(host) -> str:
    return os.path.join(host.export_dir, COPIES)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def wait_merged(soak, timeout: float = 180.0) -> None:
    """Until every hour a host has a copy of has its merged file on every host, the same
    bytes everywhere (a late copy makes a new version: wait for it to settle)."""
    def done() -> bool:
        wanted = set()
        for host in soak.hosts.values():
            directory = copies_dir(host)
            for filename in os.listdir(directory) if os.path.isdir(directory) else []:
                match = FILE_RE.match(filename)
                if match:
                    wanted.add(filename)
        sums = collections.defaultdict(set)
        for host in soak.hosts.values():
            for filename in wanted:
                path = os.path.join(host.export_dir, filename)
                sums[filename].add(_sha256(path) if os.path.exists(path) else None)
        return all(None not in s and len(s) == 1 for s in sums.values())
    try:
        wait_for(done, timeout, "every copied hour merged on every host", 2.0)
    except Exception as e:  # judged by the accounting, which names the hours
        say(f"archive: {e}")


def verify(soak, figures: ArchiveFigures) -> None:
    for host in soak.hosts.values():
        done = subprocess.run([MEXC, "verify", "--config", host.config_path], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
        figures.verify_exits[host.name] = done.returncode
        problems = [line for line in done.stdout.splitlines() if line.startswith("❌")]
        figures.verify_said[host.name] = "; ".join(problems[:3])[:400]
        say(f"{host.name} mexc verify: exit {done.returncode}")


def account_archive(soak, stored: Dict[str, Dict[str, Stored]], holes: Dict[str, list],
                    a: ArchiveFigures) -> ArchiveFigures:
    """stored: {host: {name: its rows (copies and tables)}}; holes: {name: [(start, end)]}
    cluster holes in event ms; a: the figures so far (mexc verify's)."""
    holders = collections.defaultdict(dict)  # (name, hour) -> {host: path}
    for host in soak.hosts.values():
        for key, path in merged_files(host).items():
            holders[key][host.name] = path
    wanted = min(soak.args.replicas, len(soak.hosts))
    merged = {name: Stored() for name in soak.names}
    merged_hours = collections.defaultdict(set)
    gaps = collections.defaultdict(list)
    for (name, hour), paths in sorted(holders.items()):
        label = f"{name} {time.strftime('%Y%m%d_%H00', time.gmtime(hour // 1000))}"
        a.hours += 1
        if len(paths) < wanted:
            a.under_replicated.append(f"{label} on {len(paths)}")
        if len({_sha256(p) for p in paths.values()}) > 1:
            a.differing.append(label)
        if name not in merged:
            continue
        merged_hours[name].add(hour)
        path = next(iter(paths.values()))
        table = pq.read_table(path, columns=["ts", "mt", "m"])
        meta = pq.read_schema(path).metadata or {}
        gaps[name] += [(g["start_ms"], g["end_ms"]) for g in
                       json.loads(meta.get(b"mexc.gaps", b"[]").decode() or "[]")]
        ts = table.column("ts").cast(pa.int64()).to_pylist()
        a.rows += len(ts)
        a.outside_hour += sum(1 for t in ts if not hour <= t < hour + HOUR_MS)
        for t, mt, m in zip(ts, table.column("mt").to_pylist(), table.column("m").to_pylist()):
            merged[name].add(t, mt, m)
    a.gaps_in_files = sum(len(g) for g in gaps.values())
    for name in soak.names:
        in_merged = merged[name].count
        a.doubled += sum(n - 1 for n in in_merged.values())
        union = set()
        for host_rows in stored.values():
            union.update(host_rows[name].count)
        for t in union:
            if t - t % HOUR_MS not in merged_hours[name]:
                a.not_merged_rows += 1
            elif t not in in_merged:
                a.missing += 1
                if len(a.examples) < 3:
                    a.examples.append(f"{name} ts={t} stored by a host, not merged")
        a.extra += sum(1 for t in in_merged if t not in union)
        for start, end in holes.get(name, []):
            if start - start % HOUR_MS in merged_hours[name] and not any(
                    g0 <= end and start <= g1 for g0, g1 in gaps[name]):
                a.holes_without_gap += 1
    return a

"""The merged archive of a cluster soak (docs/cluster.md "One merged archive"): each host's
`export.dir` holds the merged files (`{name}_YYYYMMDD_HH00.parquet`, every host's copy of the
hour merged, the same bytes on every host, a `host` column saying whose row each is) and its
own copies in `export.dir/copies/`; ZooKeeper names each hour's copies and merged file
(cluster/exports.py HourNodes).

settle() waits, with a deadline, until the last export and merge are done: every host's tables
empty, every copy in copies/ registered as it is, every hour merged from every copy's current
version and held with its sha256 by every host.  verify() runs `mexc verify` on every host.
account_archive() then checks each symbol-hour with a merged file:
  - holders: the file on at least min(replicas, hosts) hosts, the same bytes on all of them,
    and the version ZooKeeper names;
  - every row inside its hour;
  - each exchange event once: a trade by its trade id where the row has one, else by (ts, m)
    (a trade without its id, from REST, is also doubled by a row with the id of the same ts
    and text); depth snapshots, tickers and book rows by (ts, mt, m).  The simulator's market
    makes no two equal events at one ms (the soak keys its rows by ts), so any event twice is
    a double;
  - every row any host stored of the hour (its copy, its tables) in the file, nothing no host
    stored, each row's `host` one that stored it; dead letters: each host's own, once;
  - every cluster hole (no collector of the symbol anywhere, account_symbol_cluster) in an
    hour with a merged file overlapping a gap of the files' `mexc.gaps`."""
from __future__ import annotations

import calendar
import collections
import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.exports import HourNodes, hour_label
from core import archive
from core.channels import DEAL_WITH_ID
from core.clock import HOUR_MS
from core.store import Store
from core.vocabulary import DEAD_LETTER, DEAL
from exporter.cluster_archive import _stale

from . import ROOT
from .accounting import MISSING_HOUR, Stored
from .common import FILE_RE, MEXC, SoakError, on_every_host, say, wait_for

# `mexc verify`'s collection check wants rows received in the last minutes in every symbol's
# current table: the market has stopped by now, the rotations have emptied the tables, and a
# host collects only the symbols it holds.  Those lines are counted apart, not failures.
NO_RECENT_DATA = "no data in the last"
# with Tor, after the market stopped (ClusterSoak.wait_exits_apart checked it while it traded)
IP_SEPARATION = "IP Separation Failure"
SETTLE_TIMEOUT = 240.0  # s for the last hours to be exported, merged and pulled everywhere
WITH_ID = re.compile(DEAL_WITH_ID)


@dataclass
class ArchiveFigures:
    files: int = 0  # symbol-hours with a merged file on some host
    rows: int = 0  # rows in those files (one holder's copy each)
    holders: Dict[str, int] = field(default_factory=dict)  # hosts holding a file -> files
    settled_s: Optional[float] = None  # s the last export and merge took (None: not settled)
    unsettled: str = ""  # what was still pending at the deadline
    doubled: int = 0  # an event twice in one merged file
    missing: int = 0  # stored by a host in an hour with a merged file, not in that file
    extra: int = 0  # in a merged file, stored by no host
    misattributed: int = 0  # a row whose `host` did not store it
    dead_letters: int = 0  # in the merged files
    dead_letters_missing: int = 0  # a host's dead letter of the hour not in the file
    dead_letters_extra: int = 0
    outside_hour: int = 0
    under_replicated: List[str] = field(default_factory=list)  # fewer holders than replicas
    differing: List[str] = field(default_factory=list)  # holders with different bytes
    not_named: List[str] = field(default_factory=list)  # not the version ZooKeeper names
    # a host holding the version settled before the stop, ZooKeeper naming one merged after
    # the first SIGTERM (gaps open at a stop are recorded, the hour merged again): a note
    newer_after_stop: List[str] = field(default_factory=list)
    temp_files: int = 0  # temporary files left in export.dir
    gaps_in_files: int = 0
    holes_checked: int = 0  # cluster holes in hours with a merged file
    holes_without_gap: int = 0
    rows_in_gaps: int = 0  # depth and ticker rows strictly inside a file's gap (a note)
    gap_examples: List[str] = field(default_factory=list)  # such gaps, with their rows
    not_merged_rows: int = 0  # rows of hours no merged file holds
    # rows of a merged hour every host that stored them received during its stop (a gap open
    # then, recorded and backfilled): in its tables, exported at its next start (a note)
    stored_at_stop: int = 0
    verify_exits: Dict[str, Optional[int]] = field(default_factory=dict)
    verify_problems: Dict[str, int] = field(default_factory=dict)  # its failures but those
    verify_excused: Dict[str, int] = field(default_factory=dict)  # lines not counted (verify())
    verify_said: Dict[str, str] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)

    def example(self, text: str) -> None:
        if len(self.examples) < 6:
            self.examples.append(text)

    def failures(self) -> List[str]:
        f = []
        if self.settled_s is None:
            f.append(f"archive: the last export and merge did not settle within "
                     f"{SETTLE_TIMEOUT:.0f} s ({self.unsettled})")
        for attr, what in (("doubled", "events twice in a merged file"),
                           ("missing", "rows a host stored missing from the merged file"),
                           ("extra", "rows in merged files no host stored"),
                           ("misattributed", "merged rows whose host did not store them"),
                           ("dead_letters_missing", "dead letters missing from the merged file"),
                           ("dead_letters_extra", "dead letters in a merged file no host "
                                                  "stored (or twice)"),
                           ("outside_hour", "merged rows outside their hour"),
                           ("holes_without_gap", "cluster holes without a gap in the merged "
                                                 "file"),
                           ("temp_files", "temporary files left in export.dir")):
            if getattr(self, attr):
                f.append(f"archive: {getattr(self, attr)} {what}"
                         + (f" ({'; '.join(self.examples[:2])})" if self.examples else ""))
        for attr, what in (("under_replicated", "merged files on too few hosts"),
                           ("differing", "merged files whose bytes differ between hosts"),
                           ("not_named", "merged files not the version ZooKeeper names")):
            if getattr(self, attr):
                f.append(f"archive: {len(getattr(self, attr))} {what} "
                         f"({', '.join(getattr(self, attr)[:3])})")
        for host, code in sorted(self.verify_exits.items()):
            if code is None or self.verify_problems.get(host) or code not in (0, 1):
                f.append(f"archive: {host} mexc verify exit {code}: {self.verify_said[host]}")
        return f

    def lines(self) -> List[str]:
        return [
            f"merged archive: {self.files} files, {self.rows:,} rows, "
            + (f"settled {self.settled_s:.0f} s after the last export" if self.settled_s
               is not None else "NOT settled") + "; holders per file: "
            + (", ".join(f"{n} hosts {k}" for n, k in sorted(self.holders.items(), reverse=True))
               or "none")
            + f"; on too few hosts {len(self.under_replicated)}, bytes differing "
            f"{len(self.differing)}, not ZooKeeper's version {len(self.not_named)}; "
            f"the settled version, a newer one merged during the stop: "
            f"{len(self.newer_after_stop)}"
            + (f" ({', '.join(self.newer_after_stop[:4])})" if self.newer_after_stop else ""),
            f"merged archive events: doubled {self.doubled}, missing {self.missing}, extra "
            f"{self.extra}, host column wrong {self.misattributed}; dead letters "
            f"{self.dead_letters} (missing {self.dead_letters_missing}, extra "
            f"{self.dead_letters_extra}); rows of hours not merged {self.not_merged_rows:,}; "
            f"rows stored during the stop, exported at the next start {self.stored_at_stop}",
            f"merged archive gaps: {self.gaps_in_files} in the files, cluster holes in merged "
            f"hours {self.holes_checked}, without a gap {self.holes_without_gap}; depth and "
            f"ticker rows inside a gap {self.rows_in_gaps}; mexc verify: "
            + (", ".join(f"{h} exit {c} ({self.verify_problems.get(h, 0)} problems, "
                         f"{self.verify_excused.get(h, 0)} excused)"
                         for h, c in sorted(self.verify_exits.items())) or "not run"),
        ] + [f"  {x}" for x in self.examples[:6] + self.gap_examples[:4]]


def hour_of(filename: str) -> Optional[Tuple[str, int]]:
    match = FILE_RE.match(filename)
    if match is None:
        return None
    name, day, hour = match.groups()
    return name, calendar.timegm(time.strptime(day + hour, "%Y%m%d%H")) * 1000


def files_in(directory: str) -> Dict[Tuple[str, int], str]:
    """{(name, hour ms): path} of the hour files in a directory."""
    found = {}
    for filename in os.listdir(directory) if os.path.isdir(directory) else []:
        key = hour_of(filename)
        if key is not None:
            found[key] = os.path.join(directory, filename)
    return found


def copies_dir(host) -> str:
    return archive.own_files_dir(host.export_dir, clustered=True)


def hour_nodes(soak):
    """The cluster's hour nodes as the hosts write them, read with a client of our own."""
    nodes = HourNodes({"root": soak.zk_root, "host": "soak", "zookeeper":
                       soak.bed.zookeeper.hosts, "session_timeout": 10.0})
    nodes.start(15.0)
    return nodes


def _sha256(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def _table_rows(host, names) -> int:
    """Rows still in a host's tables (not exported yet)."""
    store = Store(host.ch_section(), timeout=10.0)
    try:
        return sum(store.count(f"{name}_{kind}") for name in names
                   for kind in ("current", "previous", "fresh")
                   if store.exists(f"{name}_{kind}"))
    finally:
        store.close()


def pending(soak, nodes) -> str:
    """What the last export and merge still owe ('' when settled): rows in a host's tables, a
    copy not registered as it is on disk, an hour not merged from every copy's current
    version, a host not holding its merged file."""
    hosts = soak.hosts
    for host in hosts.values():
        rows = _table_rows(host, soak.names)
        if rows:
            return f"{host.name}: {rows} rows in its tables"
    for host in hosts.values():
        for (name, hour), path in sorted(files_in(copies_dir(host)).items()):
            node = nodes.copies(name, hour).get(host.name)
            if node is None or node.get("sha256") != _sha256(path):
                return f"{host.name}: its copy {os.path.basename(path)} not registered as it is"
    for name in soak.names:
        for hour in nodes.hours(name):
            label = os.path.basename(archive.hour_path("", name, hour))
            copies = nodes.copies(name, hour)
            if set(hosts) - set(copies):
                return f"{label}: no word from {','.join(sorted(set(hosts) - set(copies)))}"
            real = {h: c for h, c in copies.items() if not c.get("none")}
            if not real:
                continue
            merged, _version = nodes.merged(name, hour)
            if merged is None:
                return f"{label}: not merged"
            stale = sorted(_stale(merged, real))  # the exporter's own test: merge again
            if stale:
                return f"{label}: {','.join(stale)}'s copy not merged yet"
            for host in hosts.values():
                if _sha256(archive.hour_path(host.export_dir, name, hour)) != merged["sha256"]:
                    return f"{label}: {host.name} does not hold {merged['sha256'][:12]}"
    return ""


def settle(soak, figures: ArchiveFigures) -> None:
    """Wait (SETTLE_TIMEOUT) until pending() is empty; the figures say how long, or what was
    still pending (then the accounting names the hours)."""
    nodes = hour_nodes(soak)
    began, last = time.monotonic(), ["not asked"]

    def done() -> bool:
        try:
            last[0] = pending(soak, nodes)
        except Exception as e:  # a host's ClickHouse or ZooKeeper busy: ask again
            last[0] = f"{type(e).__name__}: {str(e)[:100]}"
        return not last[0]
    try:
        wait_for(done, SETTLE_TIMEOUT, "the last export and merge", 2.0)
        figures.settled_s = time.monotonic() - began
        soak.settled_versions = {(name, hour): nodes.merged(name, hour)[0]["sha256"]
                                 for name in soak.names for hour in nodes.hours(name)
                                 if nodes.merged(name, hour)[0] is not None}
        say(f"archive settled in {figures.settled_s:.1f}s")
    except SoakError:
        figures.unsettled = last[0]
        say(f"archive NOT settled within {SETTLE_TIMEOUT:.0f}s: {last[0]}")
    finally:
        nodes.stop()


def verify(soak, figures: ArchiveFigures) -> None:
    """`mexc verify` on every host at once (the daemons still running)."""
    on_every_host(soak.hosts.values(), lambda host: verify_host(soak, host, figures))


def verify_host(soak, host, figures: ArchiveFigures) -> None:
    try:
        done = subprocess.run([MEXC, "verify", "--config", host.config_path],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": ROOT})
    except subprocess.TimeoutExpired:
        figures.verify_exits[host.name], figures.verify_said[host.name] = None, "timed out"
        return
    figures.verify_exits[host.name] = done.returncode
    problems = [line for line in done.stdout.splitlines()
                if line.startswith("❌") and "some checks failed" not in line]
    excused = [p for p in problems if NO_RECENT_DATA in p or hour_of_nothing(soak, p)
               or (IP_SEPARATION in p and getattr(soak, "exits_apart_live", False))]
    figures.verify_excused[host.name] = len(excused)
    figures.verify_problems[host.name] = len(problems) - len(excused)
    figures.verify_said[host.name] = "; ".join(
        [p for p in problems if p not in excused][:3])[:400]
    say(f"{host.name} mexc verify: exit {done.returncode}, {len(problems) - len(excused)} "
        f"problems, {len(excused)} excused (no data in the last 5 minutes, an hour no "
        "host stored, IP separation after the market stopped)"
        + (f": {figures.verify_said[host.name]}" if figures.verify_said[host.name] else ""))
    with open(os.path.join(host.dir, "verify.txt"), "w") as f:
        f.write(done.stdout + done.stderr)


def hour_of_nothing(soak, problem: str) -> bool:
    """`mexc verify` calls an hour missing between a symbol's first and last file; excused, as
    the one-host soak excuses it (accounting.excuse_missing_hours), when no host has a copy of
    it: no host stored a row of it.  (The simulator stamps its junk with the wall clock, the
    market with the event clock: a dead letter makes a file hours before the market's first,
    and the hours between, while the daemons start, hold nothing; with Tor they start slowly
    enough for whole event hours to pass.)"""
    match = MISSING_HOUR.match(problem)
    return match is not None and not any(
        os.path.exists(os.path.join(copies_dir(host), match.group(2)))
        for host in soak.hosts.values())


def event_keys(ts: int, mt: str, m: str) -> List[tuple]:
    """The identities a row stands for: a trade with an id its id and (ts, its text without
    the id) (a REST row of the same trade has that text); any other row (ts, mt, m)."""
    if mt == DEAL:
        match = WITH_ID.match(m)
        if match:
            return [("id", match.group("id")), (ts, mt, match.group("core"))]
    return [(ts, mt, m)]


def read_merged(path: str) -> pa.Table:
    return pq.read_table(path, columns=["ts", "mt", "m", "host"])


def copy_dead_letters(soak, name: str, hour: int) -> collections.Counter:
    """(host, m) of every dead letter in the hosts' copies of the hour."""
    letters = collections.Counter()
    for host in soak.hosts.values():
        path = archive.hour_path(copies_dir(host), name, hour)
        if not os.path.exists(path):
            continue
        table = pq.read_table(path, columns=["mt", "m"])
        letters.update((host.name, m) for mt, m in zip(table.column("mt").to_pylist(),
                                                        table.column("m").to_pylist())
                       if mt == DEAD_LETTER)
    return letters


def account_archive(soak, stored: Dict[str, Dict[str, Stored]], holes: Dict[str, list],
                    a: ArchiveFigures) -> ArchiveFigures:
    """stored: {host: {name: its own rows (copies and tables)}}; holes: {name: [(start, end)]}
    cluster holes in event ms; a: the figures so far (settle's and mexc verify's)."""
    holders = collections.defaultdict(dict)  # (name, hour) -> {host: path}
    for host in soak.hosts.values():
        for key, path in files_in(host.export_dir).items():
            holders[key][host.name] = path
        a.temp_files += sum(1 for f in os.listdir(host.export_dir) if f.endswith(".tmp"))
    nodes = hour_nodes(soak)
    wanted = min(soak.args.replicas, len(soak.hosts))
    merged_hours = collections.defaultdict(set)
    gaps = collections.defaultdict(list)
    in_files = {name: set() for name in soak.names}
    try:
        for (name, hour), paths in sorted(holders.items()):
            label = os.path.basename(archive.hour_path("", name, hour))
            a.files += 1
            a.holders[str(len(paths))] = a.holders.get(str(len(paths)), 0) + 1
            if len(paths) < wanted:
                a.under_replicated.append(f"{label} on {','.join(sorted(paths))}")
            sums = {h: _sha256(p) for h, p in paths.items()}
            node, _version = nodes.merged(name, hour)
            if node is not None:
                late = late_holders(soak, nodes, name, hour, node, sums)
                a.newer_after_stop += [f"{h} {label}" for h in late]
                sums = {h: s for h, s in sums.items() if h not in late}
            if len(set(sums.values())) > 1:
                a.differing.append(label)
            if node is None or set(sums.values()) != {node["sha256"]}:
                a.not_named.append(label)
            if name not in in_files:
                continue
            merged_hours[name].add(hour)
            path = paths[sorted(paths)[0]]
            file_gaps = archive.gaps_from_json(
                (pq.read_schema(path).metadata or {}).get(archive.GAPS_KEY, b"[]"))
            gaps[name] += [(g.start_ms, g.end_ms) for g in file_gaps]
            a.gaps_in_files += len(file_gaps)
            account_file(soak, a, name, hour, label, read_merged(path), stored, in_files[name],
                         file_gaps)
    finally:
        nodes.stop()
    for name in soak.names:
        union = set()
        for host_rows in stored.values():
            union.update(host_rows[name].count)
        for t in sorted(union):
            if t - t % HOUR_MS not in merged_hours[name]:
                a.not_merged_rows += 1
            elif t not in in_files[name] and all(t in s[name].at_stop for s in stored.values()
                                                  if s[name].count[t]):
                a.stored_at_stop += 1
            elif t not in in_files[name]:
                a.missing += 1
                a.example(f"{name} ts={t}: stored by "
                          f"{','.join(h for h, s in stored.items() if s[name].count[t])}, "
                          "not in its merged file")
        for t in sorted(in_files[name] - union):
            a.extra += 1
            a.example(f"{name} ts={t}: in its merged file, stored by no host")
        for start, end in holes.get(name, []):
            if not any(h in merged_hours[name] for h in
                       range(start - start % HOUR_MS, end + 1, HOUR_MS)):
                continue
            a.holes_checked += 1
            if not any(g0 <= end and start <= g1 for g0, g1 in gaps[name]):
                a.holes_without_gap += 1
                a.example(f"{name}: cluster hole {start}..{end} "
                          f"({(end - start) / soak.speed / 1000:.1f}s) in no merged file's gaps")
    return a


def late_holders(soak, nodes, name: str, hour: int, node: dict, sums: dict) -> List[str]:
    """Hosts holding the version of an hour settled before the stop while ZooKeeper names one
    merged after the first SIGTERM: a stopping host records the gaps open then, so its last
    hours are merged once more, while the others stop too (they would pull it at their next
    start).  Any other difference is a failure."""
    stat = nodes.zk.exists(f"{soak.zk_root}/hours/{name}/{hour_label(hour)}/merged")
    settled = soak.settled_versions.get((name, hour))
    if stat is None or settled is None or not soak.stop_sent \
            or stat.mtime < min(soak.stop_sent.values()) * 1000:
        return []
    return sorted(h for h, sha in sums.items() if sha != node["sha256"] and sha == settled)


def account_file(soak, a: ArchiveFigures, name: str, hour: int, label: str, table: pa.Table,
                 stored: Dict[str, Dict[str, Stored]], seen: set, file_gaps) -> None:
    """One merged file's rows: inside the hour, each event once, each row's host one that
    stored it, dead letters each host's own; `seen` gets the data rows' ts."""
    ts = table.column("ts").cast(pa.int64()).to_pylist()
    mts, ms = table.column("mt").to_pylist(), table.column("m").to_pylist()
    row_hosts = table.column("host").cast(pa.string()).to_pylist()
    a.rows += len(ts)
    events = collections.Counter()
    letters = collections.Counter()
    inside = collections.Counter()  # gap index -> depth and ticker rows strictly inside
    for t, mt, m, host in zip(ts, mts, ms, row_hosts):
        if not hour <= t < hour + HOUR_MS:
            a.outside_hour += 1
        if mt == DEAD_LETTER:
            letters[(host, m)] += 1
            continue
        seen.add(t)
        events.update(event_keys(t, mt, m))
        if host not in stored or not stored[host][name].count[t]:
            a.misattributed += 1
            a.example(f"{label}: ts={t} says host {host}, which did not store it")
        if mt != DEAL:
            for i, g in enumerate(file_gaps):
                if g.start_ms < t < g.end_ms:
                    inside[(i, host)] += 1
    for key, n in events.items():
        if n > 1:
            a.doubled += n - 1
            a.example(f"{label}: {key[:2]} {n} times")
    a.rows_in_gaps += sum(inside.values())
    for (i, host), n in sorted(inside.items()):
        g = file_gaps[i]
        if len(a.gap_examples) < 6:
            a.gap_examples.append(
                f"{label}: {n} rows of {host} inside its gap {g.start_ms}..{g.end_ms} "
                f"({(g.end_ms - g.start_ms) / soak.speed / 1000:.1f}s, {g.reason}: {g.detail})")
    a.dead_letters += sum(letters.values())
    own = copy_dead_letters(soak, name, hour)
    a.dead_letters_missing += sum((own - letters).values())
    a.dead_letters_extra += sum((letters - own).values())

"""One merged archive, stored more than once: the exporter's part in a cluster
(docs/cluster.md "One merged archive").

Each host exports its own hour exactly as a single host does, but the file is this host's COPY
of the hour, in `{export.dir}/copies/`; its bytes go into the host's ClickHouse (hour_copies)
and ZooKeeper hears of it (cluster/exports.py).  Then, on every host, `tick()`:
  1. says "none" for an hour other hosts have copies of and this host has no rows of;
  2. merges an hour once every live host has spoken for it (a copy or none), or export_wait
     after the first copy: under the hour's lock, exactly one host reads every copy (its own
     from disk, the others' from their ClickHouse through remote()), merges them
     (exporter/merge.py), writes the file into export.dir with the gaps no host covered,
     stores its bytes in hour_copies, logs it in export_log and names it in ZooKeeper;
     a copy registered after that (a host back from an outage, late rows) is merged into the
     merged file the same way: a new version, never a second file;
  3. pulls a merged file it does not hold from a host that does, checks its sha256, writes it
     into export.dir atomically and logs it in its own export_log: the same bytes everywhere.
Nothing here blocks the host's own export: ZooKeeper or a peer away only delays the merge.
"""
import hashlib
import io
import json
import logging
import os
import time
from typing import Dict, Optional

import pyarrow.parquet as pq

from cluster.exports import HourNodes, hour_label
from core import archive, store
from core.clock import HOUR_MS
from core.log import first_line
from exporter import merge, parquet_files

log = logging.getLogger(__name__)

CLUSTER_KEY = b"mexc.cluster"  # metadata: the hosts merged, their holes others covered
TICK = 2.0  # seconds between ticks while the exporter waits
RECHECK = 10.0  # seconds before an hour settled here is looked at again (a newer version)


def copies_dir(export_dir: str) -> str:
    return archive.own_files_dir(export_dir, clustered=True)


class ClusterArchive:
    """The exporter's cluster side (module docstring): copy_exported() after each copy,
    exported_before() after each cycle, tick() between cycles.  `store_session` is the
    exporter's own; `group` the files' group id (None: the process's)."""

    def __init__(self, config, store_session: store.Store, group=None):
        self.config = config
        self.cluster = config.cluster
        self.host = self.cluster["host"]
        self.address = self.cluster["clickhouse"]
        self.export = config.export
        self.store = store_session
        self.group = group
        self.nodes = HourNodes(self.cluster)
        self.boundary: Optional[int] = None  # hours before it: this host's copies are out
        # (name, hour) -> when it was last seen merged from every copy and held here
        self.settled: Dict[tuple, float] = {}
        self.ready = False
        self.failing: Optional[str] = None  # the last tick's failure, logged once
        self.hashed: Dict[str, tuple] = {}  # path -> ((inode, mtime, size), sha256)

    def stop(self) -> None:
        self.nodes.stop()

    def _start(self) -> None:
        if not self.ready:
            self.store.create_cluster_tables()
            self.nodes.start()
            self.ready = True

    # --- this host's copy ------------------------------------------------------------------

    def copy_exported(self, symbol: str, name: str, hour: int, path: str, rows: int,
                      sha256: str) -> None:
        """The per-host export wrote (or rewrote, with late rows) this host's copy: logged in
        copy_log (what its collectors' gap ledger and backfill read), its bytes in
        hour_copies, its node in ZooKeeper."""
        self._start()
        self.store.log_export(symbol, hour, int(time.time() * 1000), path, rows,
                              os.path.getsize(path), sha256, table=store.COPY_LOG)
        if not self.store.has_hour_file(name, hour, store.COPY, self.host, sha256):
            with open(path, "rb") as f:
                self.store.put_hour_file(name, hour, store.COPY, self.host, sha256, rows,
                                         f.read())
        self.nodes.register_copy(name, hour, sha256, rows, self.address,
                                 self._ledger(name, hour))
        log.info("cluster: copy of %s %s registered rows=%d sha256=%s", name,
                 hour_label(hour), rows, sha256[:12])

    def _ledger(self, name: str, hour: int) -> str:
        """What this host's gap ledger holds of the hour, as a stamp that changes with each
        record: a gap recorded after the hour was merged (data back after an outage) makes a
        new version of the file with the gaps right."""
        gaps = self.store.gaps(name, hour, hour + HOUR_MS)
        return f"{len(gaps)}:{max((g.recorded_ms for g in gaps), default=0)}"

    def exported_before(self, boundary: int) -> None:
        """Every row of this host before `boundary` is in its copies."""
        self.boundary = boundary

    # --- the tick --------------------------------------------------------------------------

    def tick(self, symbols) -> list:
        """Speak, merge, pull for every hour not settled; returns the merged files written
        here.  Errors are logged and left for the next tick."""
        written, problems = [], []
        try:
            self._start()
            live = self.nodes.live_hosts()
            for symbol in symbols:
                for hour in self.nodes.hours(symbol.name):
                    if time.monotonic() < self.settled.get((symbol.name, hour), 0) + RECHECK:
                        continue
                    try:  # one hour's trouble (a holder away) holds up no other hour
                        written += self._hour(symbol, hour, live)
                    except Exception as e:
                        problems.append(f"{symbol.name} {hour_label(hour)}: "
                                        f"{type(e).__name__}: {first_line(e)}")
                        self.store.close()
        except Exception as e:  # ZooKeeper or this host's ClickHouse away
            problems.append(f"{type(e).__name__}: {first_line(e)}")
            self.store.close()
        if problems:
            problem = "; ".join(problems)
            if problem != self.failing:  # once per kind of failure, not every TICK
                log.warning("cluster: merges and pulls wait, retried every %.0fs: %s", TICK,
                            problem)
            self.failing = problem
            return written
        if self.failing:
            log.info("cluster: merges and pulls go on (%s is over)", self.failing)
            self.failing = None
        return written

    def _hour(self, symbol, hour: int, live: dict) -> list:
        name = symbol.name
        copies = self.nodes.copies(name, hour)
        own = copies.get(self.host)
        if own is None and self.boundary is not None and hour + HOUR_MS <= self.boundary:
            self.nodes.register_none(name, hour)
            copies = self.nodes.copies(name, hour)
        elif own is not None and not own.get("none"):
            ledger = self._ledger(name, hour)
            if own.get("ledger") != ledger:  # a gap of the hour recorded since
                self.nodes.register_copy(name, hour, own["sha256"], own["rows"], self.address,
                                         ledger)
                copies = self.nodes.copies(name, hour)
        merged, _version = self.nodes.merged(name, hour)
        written = []
        if self._wants_merge(name, hour, copies, merged, live):
            written += self._merge(symbol, hour)
            merged, _version = self.nodes.merged(name, hour)
        if merged is not None:
            self._hold(symbol, hour, merged)
            if self._complete(copies, merged, live) and self.host in merged["holders"]:
                self.settled[(name, hour)] = time.monotonic()
        return written

    def _wants_merge(self, name: str, hour: int, copies: dict, merged, live: dict) -> bool:
        real = {h: c for h, c in copies.items() if not c.get("none")}
        if not real:
            return False
        if merged is not None:  # a copy or a ledger new or changed since: merge it in now
            return bool(_stale(merged, real))
        if set(live) <= set(copies):
            return True
        first = self.nodes.first_copy_ms(name, hour)
        waited = time.time() - (first or time.time() * 1000) / 1000
        if waited >= self.cluster["export_wait"]:
            log.warning("cluster: merging %s %s without %s (no copy after %.0fs)", name,
                        hour_label(hour), ",".join(sorted(set(live) - set(copies))), waited)
            return True
        return False

    @staticmethod
    def _complete(copies: dict, merged: dict, live: dict) -> bool:
        real = {h: c for h, c in copies.items() if not c.get("none")}
        return set(live) <= set(copies) and not _stale(merged, real)

    # --- merging ---------------------------------------------------------------------------

    def _merge(self, symbol, hour: int) -> list:
        name = symbol.name
        lock = self.nodes.lock(name, hour)
        if not lock.acquire(timeout=0.5):  # another host merges it now
            return []
        try:
            copies = self.nodes.copies(name, hour)
            merged, version = self.nodes.merged(name, hour)
            real = {h: c for h, c in copies.items() if not c.get("none")}
            if merged is not None:
                if not _stale(merged, real):
                    return []
                self._hold(symbol, hour, merged)  # the base: this host must hold it
                base = [("", parquet_files.read(archive.hour_path(self.export["dir"], name,
                                                                   hour)))]
                new = {h: c for h, c in real.items() if merged["copies"].get(h) != c["sha256"]}
            else:
                base, new = [], real
            started = time.monotonic()
            inputs = base + [(h, self._copy_table(name, hour, c)) for h, c in sorted(new.items())]
            table = merge.merge(inputs)
            included = {**(merged["copies"] if merged else {}),
                        **{h: c["sha256"] for h, c in new.items()}}
            ledgers = {**(merged.get("ledgers", {}) if merged else {}),
                       **{h: c.get("ledger") for h, c in real.items() if h in included}}
            gaps, holes = self._gaps(symbol, hour, included, real)
            path = archive.hour_path(self.export["dir"], name, hour)
            os.makedirs(self.export["dir"], exist_ok=True)
            hour_file = parquet_files.HourFile(
                path, symbol.symbol, hour, table.num_rows, self.export["file_mode"], self.group,
                gaps, schema=parquet_files.MERGED_SCHEMA,
                extra={CLUSTER_KEY: _json({"hosts": sorted(included), "holes": holes})})
            try:
                hour_file.write(table)
            except BaseException:
                hour_file.discard()
                raise
            sha = hour_file.commit()
            with open(path, "rb") as f:
                self.store.put_hour_file(name, hour, store.MERGED, self.host, sha,
                                         table.num_rows, f.read())
            self.store.log_export(symbol.symbol, hour, int(time.time() * 1000), path,
                                  table.num_rows, os.path.getsize(path), sha)
            value = {"sha256": sha, "rows": table.num_rows, "merged_by": self.host,
                     "copies": included, "ledgers": ledgers,
                     "holders": {self.host: self.address}}
            if merged is not None and merged["sha256"] == sha:
                # the same bytes again (a ledger stamp changed, not the gaps): whoever held
                # them still does, under the name their hour_copies rows carry
                value["merged_by"] = merged["merged_by"]
                value["holders"] = {**merged["holders"], self.host: self.address}
            if not self.nodes.set_merged(name, hour, value, version):
                raise RuntimeError("the merged node changed under the lock")
            log.info("cluster: merged %s from %s rows=%d gaps=%d in %.3fs sha256=%s", path,
                     (",".join(f"{h}:{c['rows']}" for h, c in sorted(new.items()))
                      or "no new copy (a ledger changed)")
                     + (" into the previous version" if base else ""), table.num_rows,
                     len(gaps), time.monotonic() - started, sha[:12])
            return [path]
        finally:
            lock.release()

    def _copy_table(self, name: str, hour: int, copy: dict):
        """A host's copy of the hour: this host's from its file, another's through remote()."""
        if copy["host"] == self.host:
            path = archive.hour_path(copies_dir(self.export["dir"]), name, hour)
            if self._file_sha256(path) == copy["sha256"]:
                return parquet_files.read(path)
        data = self.store.hour_file(name, hour, store.COPY, copy["host"], copy["sha256"],
                                    None if copy["host"] == self.host else copy["clickhouse"])
        if data is None or _digest(data) != copy["sha256"]:
            raise RuntimeError(f"the copy of {copy['host']} is not whole at "
                               f"{copy['clickhouse']} (sha256 {copy['sha256'][:12]})")
        return pq.read_table(io.BytesIO(data))

    def _gaps(self, symbol, hour: int, included: dict, copies: dict):
        """The merged file's gaps and the covered holes, from each merged host's ledger and
        holdings (its own ClickHouse, read through remote())."""
        hosts = {}
        for host in included:
            source = None if host == self.host else copies.get(host, {}).get("clickhouse")
            if host != self.host and source is None:
                continue
            hosts[host] = (
                [(ts, held) for h, ts, held in
                 self.store.holdings(symbol.name, hour, hour + HOUR_MS, source) if h == host],
                self.store.gaps(symbol.name, hour, hour + HOUR_MS, source))
        return merge.cluster_gaps(hosts, symbol.symbol, symbol.name, hour, hour + HOUR_MS,
                                  int(merge.CLOCK_SKEW_MS * self.export["clock_speed"]))

    def _file_sha256(self, path: str) -> Optional[str]:
        """A file's sha256 (None: no file), hashed again only when it changed: an hour waiting
        for copies is looked at every TICK."""
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        known = self.hashed.get(path)
        if known is None or known[0] != key:
            known = self.hashed[path] = (key, parquet_files.sha256(path))
        return known[1]

    # --- holding the merged file -----------------------------------------------------------

    def _hold(self, symbol, hour: int, merged: dict) -> None:
        """Have the merged file `merged` names in export.dir, logged and in hour_copies."""
        name, sha = symbol.name, merged["sha256"]
        path = archive.hour_path(self.export["dir"], name, hour)
        if self.host in merged["holders"] and self._file_sha256(path) == sha:
            return
        if self._file_sha256(path) != sha:
            data = None
            for holder, source in sorted(merged["holders"].items()):
                try:
                    data = self.store.hour_file(name, hour, store.MERGED, merged["merged_by"],
                                                sha, source)
                except Exception as e:
                    log.warning("cluster: %s %s not readable from %s (%s): %s", name,
                                hour_label(hour), holder, source, first_line(e))
                    self.store.close()
                if data is not None and _digest(data) == sha:
                    break
                data = None
            if data is None:
                raise RuntimeError(f"no holder of {os.path.basename(path)} {sha[:12]} answers")
            _write_atomic(path, data, self.export["file_mode"], self.group)
            parquet_files.verify(path, merged["rows"], hour)
            self.store.log_export(symbol.symbol, hour, int(time.time() * 1000), path,
                                  merged["rows"], len(data), sha)
            log.info("cluster: pulled %s rows=%d sha256=%s", path, merged["rows"], sha[:12])
        if not self.store.has_hour_file(name, hour, store.MERGED, merged["merged_by"], sha):
            with open(path, "rb") as f:
                self.store.put_hour_file(name, hour, store.MERGED, merged["merged_by"], sha,
                                         merged["rows"], f.read())
        self.nodes.add_holder(name, hour, sha, self.address)


def _stale(merged: dict, copies: dict) -> set:
    """Hosts whose copy (sha256) or ledger stamp differs from what `merged` was made of."""
    return {host for host, copy in copies.items()
            if merged["copies"].get(host) != copy["sha256"]
            or merged.get("ledgers", {}).get(host) != copy.get("ledger")}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _write_atomic(path: str, data: bytes, mode: int, group) -> None:
    """The bytes under a temporary name, fsynced, then renamed into place."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), mode)
        if group is not None:
            os.fchown(f.fileno(), -1, group)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    parquet_files.fsync_directory(os.path.dirname(path))

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

What a tick looks at does not grow with the archive's age: per symbol one read of its change
log (cluster/exports.py: an entry naming the hour comes with every write of a copy, a "none" or
the merged node), then only the hours named since this host's cursor, the hours it has not
settled yet (unsettled: waiting for copies, a merge, a pull) and those whose gap-ledger stamp
changed (one query of the ledger's count and newest record per tick).  Cursors and unsettled
hours persist in the exporter's state (cluster-hours.json); without them (a first start, or a
host away while the log was pruned past its cursor) every hour of the symbol is examined once.
A file this host holds is trusted by export_log's sha256 and its size, as on one host; `mexc
verify` hashes every file.  Hours older than cluster.retention_hours are pruned (nodes and
hour_copies rows); a late copy of such an hour is refused, never merged without the file.
"""
import hashlib
import io
import json
import logging
import os
import time
from typing import Dict, Optional

import pyarrow.parquet as pq

from cluster.exports import HourNodes, HourPruned, hour_label
from core import archive, store
from core.clock import HOUR_MS, EventClock, hour_start
from core.log import first_line
from core.process import write_json_atomic
from exporter import merge, parquet_files

log = logging.getLogger(__name__)

CLUSTER_KEY = b"mexc.cluster"  # metadata: the hosts merged, their holes others covered
TICK = 2.0  # seconds between ticks while the exporter waits
STATE_FILE = "cluster-hours.json"  # in the exporter's state dir: cursors, unsettled hours


def copies_dir(export_dir: str) -> str:
    return archive.own_files_dir(export_dir, clustered=True)


class ClusterArchive:
    """The exporter's cluster side (module docstring): copy_exported() after each copy,
    exported_before() after each cycle, tick() between cycles.  `store_session` is the
    exporter's own; `group` the files' group id (None: the process's)."""

    def __init__(self, config, store_session: store.Store, group=None,
                 state_dir: Optional[str] = None):
        self.config = config
        self.cluster = config.cluster
        self.host = self.cluster["host"]
        self.address = self.cluster["clickhouse"]
        self.export = config.export
        self.store = store_session
        self.group = group
        self.nodes = HourNodes(self.cluster)
        self.boundary: Optional[int] = None  # hours before it: this host's copies are out
        self.hours = HourState(os.path.join(state_dir, STATE_FILE) if state_dir else None)
        self.seen: Dict[str, Optional[int]] = {}  # name -> its change log's cversion read
        self.ledger = Ledger()
        self.clock = EventClock(self.export["clock_speed"], self.export["clock_anchor_ms"])
        self.pruned_until: Optional[int] = None  # the retention's last boundary applied here
        self.ready = False
        self.failing: Optional[str] = None  # the last tick's failure, logged once

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
        self.ledger.refresh(self.store, self.hours)
        try:
            self.nodes.register_copy(name, hour, sha256, rows, self.address,
                                     self.ledger.stamp(name, hour))
        except HourPruned as e:  # never merged without the file made then: refused
            log.warning("cluster: late copy of %s %s refused, not merged: %s; its %d rows "
                        "stay in %s (copy_log)", name, hour_label(hour), e, rows, path)
            return
        log.info("cluster: copy of %s %s registered rows=%d sha256=%s", name,
                 hour_label(hour), rows, sha256[:12])

    def exported_before(self, boundary: int) -> None:
        """Every row of this host before `boundary` is in its copies."""
        self.boundary = boundary

    # --- the tick --------------------------------------------------------------------------

    def tick(self, symbols) -> list:
        """Speak, merge, pull for every hour due (the module's docstring); returns the
        merged files written here.  Errors are logged and left for the next tick."""
        written, problems = [], []
        try:
            self._start()
            live = self.nodes.live_hosts()
            self.ledger.refresh(self.store, self.hours)
            for symbol in symbols:
                for hour in sorted(self._due(symbol.name)):
                    try:  # one hour's trouble (a holder away) holds up no other hour
                        written += self._hour(symbol, hour, live)
                    except HourPruned:
                        self.hours.settle(symbol.name, hour)
                    except Exception as e:
                        problems.append(f"{symbol.name} {hour_label(hour)}: "
                                        f"{type(e).__name__}: {first_line(e)}")
                        self.store.close()
            self._prune(symbols)
        except Exception as e:  # ZooKeeper or this host's ClickHouse away
            problems.append(f"{type(e).__name__}: {first_line(e)}")
            self.store.close()
        self.hours.save()
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

    def _due(self, name: str) -> set:
        """The symbol's hours to examine now: those its change log named since the cursor
        (every hour when there is none), and those not settled here yet."""
        cursor = self.hours.cursors.get(name)
        cversion, named, newest = self.nodes.changes(name, cursor, self.seen.get(name))
        if named is None:
            named = set(self.nodes.hours(name))
            if named:
                log.info("cluster: examining every hour of %s once (%d hours; %s)", name,
                         len(named), "no cursor yet" if cursor is None
                         else "its change log was pruned past this host's cursor")
        self.hours.unsettle(name, named)
        self.hours.advance(name, newest)
        self.seen[name] = cversion
        return set(self.hours.unsettled.get(name, ()))

    def _hour(self, symbol, hour: int, live: dict) -> list:
        name = symbol.name
        copies = self.nodes.copies(name, hour)
        if not copies:  # no node of the hour (a ledger change only): nothing to say yet
            self.hours.settle(name, hour)
            return []
        own = copies.get(self.host)
        spoken = own is not None
        if own is None and self.boundary is not None and hour + HOUR_MS <= self.boundary:
            self.nodes.register_none(name, hour)
            copies, spoken = self.nodes.copies(name, hour), True
        elif own is not None and not own.get("none"):
            ledger = self.ledger.stamp(name, hour)
            if own.get("ledger") != ledger:  # a gap of the hour recorded since
                self.nodes.register_copy(name, hour, own["sha256"], own["rows"], self.address,
                                         ledger)
                copies = self.nodes.copies(name, hour)
        merged, _version = self.nodes.merged(name, hour)
        written = []
        if self._wants_merge(name, hour, copies, merged, live):
            written += self._merge(symbol, hour)
            merged, _version = self.nodes.merged(name, hour)
        real = {h: c for h, c in copies.items() if not c.get("none")}
        if merged is not None:
            self._hold(symbol, hour, merged)
        if spoken and (not real or merged is not None and not _stale(merged, real)):
            self.hours.settle(name, hour)  # a later copy or merge names the hour again
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

    # --- merging ---------------------------------------------------------------------------

    def _merge(self, symbol, hour: int) -> list:
        name = symbol.name
        lock = self.nodes.lock(name, hour, timeout=0.5)
        if lock is None:  # another host merges it now
            return []
        try:
            copies = self.nodes.copies(name, hour)
            merged, version = self.nodes.merged(name, hour)
            real = {h: c for h, c in copies.items() if not c.get("none")}
            if merged is not None:
                if not _stale(merged, real):
                    return []
                self._hold(symbol, hour, merged, hashed=True)  # the base, read back whole
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
            if os.path.exists(path) and parquet_files.sha256(path) == copy["sha256"]:
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

    # --- holding the merged file -----------------------------------------------------------

    def _holds(self, symbol, hour: int, path: str, sha256: str) -> bool:
        """This host holds the file `sha256` at `path`: its export_log's latest entry for the
        hour names it and the file has the logged size (trusted as on one host, not hashed;
        `mexc verify` hashes)."""
        logged = self.store.logged_file(symbol.symbol, hour)
        try:
            return logged is not None and logged[0] == sha256 \
                and os.path.getsize(path) == logged[1]
        except OSError:
            return False

    # --- the retention ---------------------------------------------------------------------

    def _prune(self, symbols) -> None:
        """Once per hour (of the export clock): each symbol's hour nodes older than
        cluster.retention_hours deleted (a late copy of them is refused from then on), and
        this host's hour_copies rows of those hours."""
        keep = self.cluster["retention_hours"]
        if not keep:
            return
        before = hour_start(self.clock.now_ms()) - keep * HOUR_MS
        if self.pruned_until is not None and before <= self.pruned_until:
            return
        for symbol in symbols:
            old = self.nodes.prune(symbol.name, before)
            self.hours.forget_before(symbol.name, before)
            if old:
                log.info("cluster: pruned %d hour nodes of %s before %s (retention %dh)",
                         len(old), symbol.name, hour_label(before), keep)
        rows = self.store.drop_hour_files(before)
        if rows:
            log.info("cluster: pruned %d hour_copies rows before %s (retention %dh)", rows,
                     hour_label(before), keep)
        self.pruned_until = before

    def _hold(self, symbol, hour: int, merged: dict, hashed: bool = False) -> None:
        """Have the merged file `merged` names in export.dir, logged and in hour_copies
        (`hashed`: the file on disk hashed too, not trusted by export_log)."""
        name, sha = symbol.name, merged["sha256"]
        path = archive.hour_path(self.export["dir"], name, hour)
        held = self._holds(symbol, hour, path, sha) and (
            not hashed or parquet_files.sha256(path) == sha)
        if self.host in merged["holders"] and held:
            return
        if not held:
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


class HourState:
    """Per symbol, the change-log cursor and the hours not settled here, kept in a JSON file
    (None: in memory only) so that a restart examines no settled hour again."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.cursors: Dict[str, int] = {}
        self.unsettled: Dict[str, set] = {}
        self.dirty = False
        if path is None:
            return
        try:
            with open(path) as f:
                saved = json.load(f)
            self.cursors = dict(saved["cursors"])
            self.unsettled = {name: set(hours) for name, hours in saved["unsettled"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("cluster: %s unreadable (%s): every hour is examined once", path,
                        first_line(e))
            self.cursors, self.unsettled = {}, {}

    def unsettle(self, name: str, hours) -> None:
        if hours:
            self.unsettled.setdefault(name, set()).update(hours)
            self.dirty = True

    def settle(self, name: str, hour: int) -> None:
        if hour in self.unsettled.get(name, ()):
            self.unsettled[name].discard(hour)
            self.dirty = True

    def advance(self, name: str, cursor: Optional[int]) -> None:
        if cursor is not None and self.cursors.get(name) != cursor:
            self.cursors[name] = cursor
            self.dirty = True

    def forget_before(self, name: str, before: int) -> None:
        for hour in [h for h in self.unsettled.get(name, ()) if h < before]:
            self.settle(name, hour)

    def save(self) -> None:
        if self.dirty and self.path:
            write_json_atomic(self.path, {
                "cursors": self.cursors,
                "unsettled": {n: sorted(h) for n, h in self.unsettled.items() if h}})
        self.dirty = False


class Ledger:
    """This host's gap ledger as a stamp per symbol-hour (records overlapping the hour, and
    the newest `recorded_ms`), read again only when the whole ledger's count or newest record
    changed: one query a tick."""

    def __init__(self):
        self.total = None
        self.stamps: Dict[tuple, tuple] = {}

    def refresh(self, store_session: store.Store, hours: HourState) -> None:
        """Read the ledger again if it changed; the hours whose stamp changed become
        unsettled in `hours`."""
        total = store_session.ledger_total()
        if total == self.total:
            return
        stamps: Dict[tuple, tuple] = {}
        for gap in store_session.gaps():
            hour = hour_start(gap.start_ms) - HOUR_MS
            while hour < gap.end_ms:  # as Store.gaps(name, hour, hour + HOUR_MS) finds it
                if gap.end_ms > hour and gap.start_ms < hour + HOUR_MS:
                    count, newest = stamps.get((gap.name, hour), (0, 0))
                    stamps[(gap.name, hour)] = (count + 1, max(newest, gap.recorded_ms))
                hour += HOUR_MS
        for name, hour in set(stamps) ^ set(self.stamps) | {
                key for key in stamps if stamps[key] != self.stamps.get(key)}:
            hours.unsettle(name, {hour})
        self.total, self.stamps = total, stamps

    def stamp(self, name: str, hour: int) -> str:
        """What the ledger holds of the hour: a gap recorded after the hour was merged (data
        back after an outage) changes it, and the hour is merged again with the gaps right."""
        count, newest = self.stamps.get((name, hour), (0, 0))
        return f"{count}:{newest}"

"""The exporter: every hour, rotate each symbol's table and write its hourly Parquet files.

One cycle, per symbol:
  1. rotate (collectors hold their rows meanwhile, see bus/rotation.py): {name}_current becomes
     {name}_previous and a fresh empty table takes its place; rows of the hour that is not over
     yet go back into the new current table;
  2. export: one file per hour found in previous (late rows for an hour already exported are
     merged into its file), each read back and verified, recorded in export_log;
  3. only then drop previous.
A small state file per symbol (state_dir/exporter/{name}.json) records the step reached, so a
crash at any point is finished by the next cycle with every row exactly once.
"""
import dataclasses
import enum
import grp
import json
import logging
import os
import signal
import threading
import time
from typing import Dict, Optional

from bus.rotation import Requester, RotationCancelled
from bus.sockets import ChildBus
from core import archive, store
from core.clock import HOUR_MS, EventClock, hour_start, iso
from core.config import Symbol
from core.log import first_line, set_level
from core.process import write_json_atomic
from core.vocabulary import EXPORTER
from exporter import parquet_files
from exporter.cluster_archive import TICK, ClusterArchive, copies_dir

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 131_072  # rows per Parquet row group; the export streams one group at a time
RETRY_AFTER = 60.0  # seconds before a failed cycle (ClickHouse away, disk full) is tried again


class Phase(str, enum.Enum):
    """The step a symbol's cycle reached (its state file says it; a crash resumes there)."""
    SWAPPING = "swapping"  # a swap began: previous may exist, its unfinished hour not moved back
    EXPORTING = "exporting"  # previous holds finished hours only: write them, then drop it


@dataclasses.dataclass
class HourExport:
    """One hour's export, across attempts: what its file held before this cycle (late rows
    are merged into it), and whether the file is written, verified and logged."""
    before_sha: Optional[str]  # None: no file before
    before_rows: int
    done: bool = False


@dataclasses.dataclass
class Progress:
    phase: Phase
    boundary: Optional[int]  # ms: rows from here on are of the hour not over; None: all hours
    hours: Dict[int, HourExport] = dataclasses.field(default_factory=dict)


class SymbolState:
    """How far the current cycle got for one symbol (`progress`, None: no cycle under way),
    on disk as JSON (atomic writes)."""

    def __init__(self, directory: str, name: str):
        self.path = os.path.join(directory, f"{name}.json")
        self.progress = self._load()

    def _load(self) -> Optional[Progress]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        return Progress(Phase(data["phase"]), data["boundary"],
                        {int(hour): HourExport(**entry) for hour, entry in data["hours"].items()})

    def begin(self, phase: Phase, boundary: Optional[int]) -> None:
        self.progress = Progress(phase, boundary)
        self.save()

    def enter(self, phase: Phase) -> None:
        self.progress.phase = phase
        self.save()

    def save(self) -> None:
        progress = self.progress
        write_json_atomic(self.path, {
            "phase": progress.phase.value, "boundary": progress.boundary,
            "hours": {str(hour): dataclasses.asdict(entry)
                      for hour, entry in progress.hours.items()}})

    def clear(self) -> None:
        self.progress = None
        if os.path.exists(self.path):
            os.unlink(self.path)


class KnownSymbols:
    """Every symbol exported so far, on disk: one removed from the config is still rotated
    and exported until its tables are empty, so its last rows reach the archive too."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path) as f:
                self.symbols = {name: Symbol(symbol, name)
                                for name, symbol in json.load(f).items()}
        except FileNotFoundError:
            self.symbols = {}

    def update(self, configured) -> list:
        """The configured symbols, then the removed ones still known."""
        retired = [s for name, s in self.symbols.items()
                   if name not in {c.name for c in configured}]
        for symbol in retired:
            log.info("%s is no longer configured; exporting what its tables still hold",
                     symbol.symbol)
        self.symbols = {**{s.name: s for s in retired}, **{s.name: s for s in configured}}
        self._save()
        return list(configured) + retired

    def forget(self, symbol) -> None:
        log.info("%s: every row exported; no longer exported (it is not configured)",
                 symbol.symbol)
        del self.symbols[symbol.name]
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.path, {name: s.symbol for name, s in self.symbols.items()})


class Exporter:
    """The exporter process: sleeps until the hour (plus export.delay) is over or an export is
    requested, then runs one cycle over every symbol (see the module docstring)."""

    def __init__(self, config, bus=None, clock: Optional[EventClock] = None):
        self.config = config
        self.export = config.export
        self.bus = bus  # bus.sockets.ChildBus under the supervisor
        self.clock = clock or EventClock(self.export["clock_speed"], self.export["clock_anchor_ms"])
        self.state_dir = os.path.join(config.paths["state_dir"], "exporter")
        os.makedirs(self.state_dir, exist_ok=True)
        # "-": no symbol's state file ({name}.json) can have this name
        self.known = KnownSymbols(os.path.join(self.state_dir, "known-symbols.json"))
        self.stopping = False
        self.requests = []  # export_now request ids not served yet
        self.store = store.Store(config.clickhouse, timeout=30.0)
        self.rotation = None if bus is None else Requester(bus, EXPORTER, on_other=self._note)
        self.server = None  # Features.describe() of the server, logged when it changes
        # a cluster: this host's files are its copies, merged into export.dir by ClusterArchive
        self.cluster = ClusterArchive(config, self.store, self._group(), self.state_dir) \
            if config.clustered else None
        self.files_dir = copies_dir(self.export["dir"]) if self.cluster else self.export["dir"]
        self.stats = {"last_export": None, "last_error": None, "errors": 0, "files": 0,
                      "next_rotation": None, "exported_until": {}, "rotation_pause_s": None,
                      "files_by_symbol": {}, "cycle_s": None}

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.bus is not None:
            threading.Thread(target=self._heartbeats, name="heartbeats", daemon=True).start()
        next_cycle = self._next_rotation()
        while not self.stopping:
            request = self._wait(next_cycle)
            if self.stopping:
                break
            ok, files, error = self.cycle()
            if request is not None:
                self.bus.send("export_done", name=EXPORTER, request=request, ok=ok,
                              files=files, error=error)
            next_cycle = self._next_rotation() if ok else time.monotonic() + RETRY_AFTER
        if self.cluster is not None:
            self.cluster.stop()
        log.info("stopped")
        return 0

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True

    def _next_rotation(self) -> float:
        """Monotonic time of the next rotation: the next hour plus export.delay (event time)."""
        due_ms = hour_start(self.clock.now_ms()) + HOUR_MS + int(self.export["delay"] * 1000)
        self.stats["next_rotation"] = iso(due_ms)
        return time.monotonic() + self.clock.wall_seconds_until(due_ms)

    def _heartbeats(self) -> None:
        """Its own thread and socket (ZeroMQ sockets are not shared between threads), so a
        long export never looks like a hang."""
        bus = ChildBus(self.config.paths["runtime_dir"])
        try:
            while not self.stopping:
                bus.send("heartbeat", name=EXPORTER, pid=os.getpid(), stats=self.stats)
                time.sleep(1.0)
        finally:
            bus.close()

    def _wait(self, until: float):
        """Sleep until `until`; return an export request id as soon as one is waiting.
        In a cluster, merge and pull hours meanwhile (ClusterArchive.tick)."""
        next_tick = time.monotonic()
        while not self.stopping and time.monotonic() < until and not self.requests:
            if self.cluster is not None and time.monotonic() >= next_tick:
                self.stats["files"] += len(self.cluster.tick(self.config.symbols))
                next_tick = time.monotonic() + TICK
                until_tick = max(0.0, next_tick - time.monotonic())
            else:
                until_tick = 0.5
            wait = max(0.0, min(0.5, until_tick, until - time.monotonic()))
            if self.bus is None:
                time.sleep(wait)
            else:
                self._note(self.bus.receive(timeout=wait))
        return self.requests.pop(0) if self.requests else None

    def _note(self, event) -> None:
        if event and event["type"] == "export_now":
            self.requests.append(event["request"])
        elif event and event["type"] == "log_level":
            set_level(event["level"])

    # --- one cycle -------------------------------------------------------------------------

    def cycle(self):
        """Rotate and export every symbol; returns (ok, files written, error or None)."""
        files, errors, started = [], [], time.monotonic()
        boundary = hour_start(self.clock.now_ms())  # at most the rotation's (later) boundary
        self._remove_stale_temporaries()
        symbols = self.known.update(self.config.symbols)
        try:
            self._note_server(self.store.setup([s.name for s in self.config.symbols]))
            for symbol in symbols:
                self._recover(symbol.name)
            self._rotate([s.name for s in symbols
                          if not self.store.exists(store.previous_table(s.name))
                          and self.store.exists(store.current_table(s.name))])
        except RotationCancelled:  # SIGTERM while waiting for the supervisor: no failure
            log.info("stopping: no rotation this cycle; the next start rotates and exports")
            return False, files, "stopped before the rotation"
        except Exception as e:
            errors.append(f"rotation: {first_line(e)}")
            self.store.close()
        for symbol in symbols:
            try:
                files += self._export_previous(symbol)
                if symbol not in self.config.symbols and self._emptied(symbol.name):
                    self.known.forget(symbol)
            except Exception as e:
                errors.append(f"{symbol.name}: {first_line(e)}")
                self.store.close()
        if self.cluster is not None:
            if not errors:
                self.cluster.exported_before(boundary)
            files += self.cluster.tick(self.config.symbols)
        self.stats["files"] += len(files)
        self.stats["cycle_s"] = round(time.monotonic() - started, 3)
        if errors:
            self.stats["errors"] += len(errors)
            self.stats["last_error"] = "; ".join(errors)
            log.error("export cycle incomplete, data stays in ClickHouse, retried in %.0fs: %s",
                      RETRY_AFTER, "; ".join(errors))
        else:
            self.stats["last_export"] = iso(int(time.time() * 1000))
            self.stats["last_error"] = None
        return not errors, files, "; ".join(errors) or None

    def _note_server(self, features) -> None:
        if features.describe() != self.server:
            self.server = features.describe()
            log.info("clickhouse: %s", self.server)

    def _emptied(self, name: str) -> bool:
        """Nothing of this symbol left to export (its current table may stay, empty)."""
        current = store.current_table(name)
        return not self.store.exists(store.previous_table(name)) and (
            not self.store.exists(current) or self.store.count(current) == 0)

    def _remove_stale_temporaries(self) -> None:
        stale = []
        for directory in {self.export["dir"], self.files_dir}:
            try:
                stale += parquet_files.remove_stale_temporaries(directory)
            except OSError:  # no export dir yet, or unreadable: _export_previous reports that
                continue
        if stale:
            log.warning("removed %d temporary files left by an exporter that died mid-write: %s",
                        len(stale), ", ".join(stale[:5]))

    def _rotate(self, names) -> None:
        if not names:
            return
        rotation = self.rotation.hold_collectors(lambda: self.stopping) if self.rotation else None
        started = time.monotonic()
        boundary = hour_start(self.clock.now_ms())  # rows from here on: hour not over yet
        swapped = []
        try:  # only the swaps happen while collectors hold their rows: keep this short
            for name in names:
                SymbolState(self.state_dir, name).begin(Phase.SWAPPING, boundary)
                self.store.swap(name)
                swapped.append(name)
        finally:
            if rotation is not None:
                self.rotation.done(rotation)
            pause = time.monotonic() - started
            self.stats["rotation_pause_s"] = round(pause, 3)
            log.info("rotated %s in %.3fs (boundary %s)", ",".join(swapped), pause,
                     iso(boundary))
        for name in swapped:  # the unfinished hour's rows go back; collectors write meanwhile
            self.store.move_back(name, boundary)
            SymbolState(self.state_dir, name).enter(Phase.EXPORTING)

    def _recover(self, name: str) -> None:
        """Finish what a crash interrupted: a swap half done, a move-back not done."""
        rows = self.store.recover_fresh(name)
        if rows is not None:
            log.warning("recovered %d rows of an interrupted swap for %s", rows, name)
        state = SymbolState(self.state_dir, name)
        if state.progress and state.progress.phase is Phase.SWAPPING:
            if not self.store.exists(store.previous_table(name)):
                state.clear()  # the swap never happened
            else:
                if not self.store.moved_back(name, state.progress.boundary):
                    self.store.move_back(name, state.progress.boundary)
                state.enter(Phase.EXPORTING)
                log.warning("finished an interrupted rotation of %s", name)

    # --- export ----------------------------------------------------------------------------

    def _export_previous(self, symbol):
        """Write every hour held by {name}_previous, verify, log; then drop previous."""
        name = symbol.name
        previous = store.previous_table(name)
        if not self.store.exists(previous):
            return []
        state = SymbolState(self.state_dir, name)
        if state.progress is None:  # previous without a state: export all of it
            state.begin(Phase.EXPORTING, None)
        hours = self.store.hours(name, before=state.progress.boundary)
        os.makedirs(self.files_dir, exist_ok=True)
        files = [self._export_hour(symbol, state, hour, rows) for hour, rows in hours]
        self.store.drop(previous)
        state.clear()
        if hours:
            self.stats["exported_until"][symbol.symbol] = iso(hours[-1][0] + HOUR_MS)
            by_symbol = self.stats["files_by_symbol"]
            by_symbol[symbol.symbol] = by_symbol.get(symbol.symbol, 0) + len(files)
        return files

    def _export_hour(self, symbol, state: SymbolState, hour: int, rows: int) -> str:
        path = archive.hour_path(self.files_dir, symbol.name, hour)
        entry = state.progress.hours.get(hour)
        if entry is None:  # first attempt: note what the file held before (late-row merge)
            before = parquet_files.read(path).num_rows if os.path.exists(path) else 0
            entry = HourExport(parquet_files.sha256(path) if before else None, before)
            state.progress.hours[hour] = entry
            state.save()
        elif entry.done:
            return path
        current_sha = parquet_files.sha256(path) if os.path.exists(path) else None
        expected = entry.before_rows + rows
        gaps = self.store.gaps(symbol.name, hour, hour + HOUR_MS)  # as the ledger has them now
        if current_sha == entry.before_sha and entry.before_rows:  # late rows: merge
            table = parquet_files.pa.concat_tables(
                [parquet_files.read(path), *self._hour_row_groups(symbol.name, hour)])
            current_sha = parquet_files.write_hour(path, table, symbol.symbol, hour,
                                                   self.export["file_mode"], self._group(), gaps)
        elif current_sha == entry.before_sha:  # not written yet (or a crash before rename)
            hour_file = parquet_files.HourFile(path, symbol.symbol, hour, expected,
                                               self.export["file_mode"], self._group(), gaps)
            try:
                for table in self._hour_row_groups(symbol.name, hour):
                    hour_file.write(table)
            except BaseException:
                hour_file.discard()
                raise
            current_sha = hour_file.commit()
        else:  # renamed into place by an attempt that died before logging it
            parquet_files.verify(path, expected, hour)
        if self.cluster is not None:  # export_log holds the merged files
            self.cluster.copy_exported(symbol.symbol, symbol.name, hour, path, expected,
                                       current_sha)
        else:
            self.store.log_export(symbol.symbol, hour, int(time.time() * 1000), path, expected,
                                  os.path.getsize(path), current_sha)
        entry.done = True
        state.save()
        log.info("exported %s rows=%d%s sha256=%s", path, expected,
                 f" (merged {rows} late rows)" if entry.before_rows else "", current_sha[:12])
        return path

    def _hour_row_groups(self, name: str, hour: int):
        """The hour's rows from previous in ts order, as Arrow tables of about ROW_GROUP_ROWS
        rows, streamed batch by batch: memory stays bounded however big the hour is."""
        batches, rows = [], 0
        for batch in self.store.hour_batches(name, hour):
            batches.append(batch)
            rows += batch.num_rows
            if rows >= ROW_GROUP_ROWS:
                yield parquet_files.to_table(batches)
                batches, rows = [], 0
        if batches:
            yield parquet_files.to_table(batches)

    def _group(self) -> Optional[int]:
        return grp.getgrnam(self.export["group"]).gr_gid if self.export["group"] else None


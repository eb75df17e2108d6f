"""`mexc run`: the parent process.  It starts every child, restarts what dies or hangs, runs the
bus (status requests, heartbeats, the rotation handshake) and talks to systemd.

One loop, no threads: wait up to TICK for bus messages, then look after every child.
"""
import logging
import os
import shutil
import signal
import time

from urllib.parse import urlsplit

import psutil

from bus import sockets
from mexc import config as configuration, pidlock, schema, __version__
from mexc.clickhouse_server import ClickHouseStartError, ManagedClickHouse
from supervisor import sdnotify
from supervisor.exits import ExitGuard
from supervisor.tor import TorProcess
from supervisor.children import (Child, Forked, Subprocess, collector_main, exporter_main,
                                 prepare_fork)

log = logging.getLogger(__name__)

TICK = 0.2
# Shutdown waits this long per group before SIGKILL; together under the 15 s promised.
# Collectors need up to collector.STOP_GRACE (5 s) to store or spool their rows.
STOP_TIMEOUTS = {"collector": 7.0, "exporter": 3.0, "tor": 2.0, "clickhouse": 3.0}
STOP_TIMEOUT = STOP_TIMEOUTS["collector"]  # a collector removed by a reload
READY_TIMEOUT = 15.0  # READY=1 at the latest this long after start, even if a collector lags
LEFTOVER_WAIT = 20.0  # for the children of a killed `mexc run` to die with it (collectors flush)
REPEAT = 0.5  # rotation events are re-published this often until the rotation is over


class RunError(Exception):
    """mexc run cannot start; the message says why.  `code` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Rotation:
    """One table rotation: collectors hold rows, the exporter swaps tables, collectors write."""

    def __init__(self, rotation_id: str, symbols, requester: str, request: str, now: float):
        self.id, self.symbols, self.requester = rotation_id, list(symbols), requester
        self.request = request
        self.acks = set()
        self.missing = []
        self.phase = "holding"  # -> "swapping" (rotate_ready sent) -> "ending" (rotate_end sent)
        self.started = self.phase_started = now
        self.last_sent = 0.0


class Arbiter:
    def __init__(self, config):
        self.config = config
        self.runtime_dir = config.paths["runtime_dir"]
        self.children = {}  # name -> Child, in start order
        self.started = time.monotonic()
        self.stopping = False
        self.reload_requested = False
        self.ready = False
        self.rotation = None
        self.rotation_count = 0
        self.export_requests = {}  # request id -> None while running, then its export_done
        self.bus = None
        self.lock_file = None
        self.usage = {}  # pid -> psutil.Process, kept so cpu_percent measures between calls
        self.notifier = sdnotify.Notifier.from_environment()  # children must not inherit it
        self.clickhouse_checked = (float("-inf"), False)  # (when, reachable)
        url = urlsplit(config.exchange["url"])
        self.exits = ExitGuard(config.tor, url.port or (443 if url.scheme == "wss" else 80))
        self.tor_ports = {}  # symbol name -> (socks, control), kept across tor restarts
        # symbols re-added by a reload while their old collector or tor is still stopping:
        # started once those are gone (two collectors of one symbol would share its spool)
        self.deferred_adds = []

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        self._check_startable()
        self._take_lock()
        self.bus = sockets.SupervisorBus(self.runtime_dir)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        log.info("mexc %s starting pid=%d config=%s symbols=%s", __version__, os.getpid(),
                 self.config.path, ",".join(s.symbol for s in self.config.symbols))
        try:
            for step in (self._start_clickhouse, self._ensure_schema, self._start_collectors,
                         self._loop):
                if self.stopping:  # SIGTERM during start-up: stop what is running
                    break
                step()
        finally:
            self._shutdown()
        return 0

    def _start_collectors(self) -> None:
        prepare_fork()
        for symbol in self.config.symbols:
            self._add_collector(symbol)
        parent = os.getpid()
        # self.config at fork time: a restarted exporter works with the reloaded config
        exporter = Child("exporter", "exporter",
                         lambda: Forked("exporter", exporter_main, (self.config, parent)),
                         self.config.supervisor)
        self.children[exporter.name] = exporter
        exporter.start(time.monotonic())

    def _check_startable(self) -> None:
        os.makedirs(self.config.paths["state_dir"], exist_ok=True)
        if self.config.tor["enabled"] and shutil.which(self.config.tor["binary"]) is None:
            raise RunError(f"tor.enabled = true but {self.config.tor['binary']!r} is not "
                           "installed: run ./setup (or apt-get install tor)")

    def _take_lock(self) -> None:
        sockets.prepare_runtime_dir(self.runtime_dir)
        path = os.path.join(self.runtime_dir, "mexc.lock")
        # Forked children inherit the lock: it is free once every process of a run is gone.
        try:
            self.lock_file = pidlock.acquire(
                path, LEFTOVER_WAIT, give_up=pidlock.alive, on_wait=lambda holder: log.warning(
                    "the previous mexc run (pid %s) is gone but its children are still "
                    "stopping; waiting up to %.0fs", holder, LEFTOVER_WAIT))
        except pidlock.Held as e:
            if pidlock.alive(e.holder):
                raise RunError(f"another mexc run (pid {e.holder}) is using {self.runtime_dir}; "
                               "stop it first or give this one its own paths.runtime_dir")
            raise RunError(f"processes of an earlier mexc run (pid {e.holder}) still hold "
                           f"{path} after {LEFTOVER_WAIT:.0f}s: see `fuser -v {path}`")

    def _on_stop(self, signum, _frame) -> None:
        self.stopping = True

    def _on_reload(self, signum, _frame) -> None:
        self.reload_requested = True

    def _start_clickhouse(self) -> None:
        ch = self.config.clickhouse
        if not ch["managed"]:
            return
        directory = os.path.join(self.config.paths["state_dir"], "clickhouse")

        def spawn(wait=False):  # restarts do not block the loop; collectors retry meanwhile
            return Subprocess(ManagedClickHouse(directory, port=ch["port"], user=ch["user"],
                                                password=ch["password"], binary=ch["binary"]),
                              wait=wait)

        child = Child("clickhouse", "clickhouse", spawn, self.config.supervisor, heartbeats=False)
        self.children[child.name] = child
        try:
            child.process = spawn(wait=True)  # the first start waits: the schema comes next
        except ClickHouseStartError as e:
            raise RunError(f"managed ClickHouse did not start: {e}") from None
        child.state, child.started_at = "running", time.monotonic()

    def _ensure_schema(self) -> None:
        try:
            features = schema.setup_db(self.config.clickhouse, [s.name for s in self.config.symbols])
            log.info("clickhouse %s at %s:%d, database %s ready", features.version,
                     self.config.clickhouse["host"], self.config.clickhouse["port"],
                     self.config.clickhouse["database"])
        except Exception as e:  # collectors buffer and create their tables once it is back
            log.warning("clickhouse not reachable yet (%s); collectors will buffer",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)

    def _add_collector(self, symbol) -> None:
        parent = os.getpid()
        tor = self._add_tor(symbol) if self.config.tor["enabled"] else None
        socks_port = self.tor_ports[symbol.name][0] if tor else None
        # self.config at fork time: a collector (re)started after a reload gets its settings
        child = Child(f"collector-{symbol.name}", "collector",
                      lambda: Forked(f"collector-{symbol.name}", collector_main,
                                     (self.config, symbol.symbol, parent, socks_port)),
                      self.config.supervisor, symbol=symbol.symbol)
        self.children[child.name] = child
        if tor is None:
            child.start(time.monotonic())
        else:  # started by the ExitGuard once its tor has bootstrapped
            self.exits.add(tor, child)

    def _add_tor(self, symbol) -> Child:
        tor_config, index = self.config.tor, len(self.tor_ports)
        if symbol.name not in self.tor_ports:
            self.tor_ports[symbol.name] = (
                tor_config["socks_port_base"] + index if tor_config["socks_port_base"] else 0,
                tor_config["control_port_base"] + index if tor_config["control_port_base"] else 0)
        socks, control = self.tor_ports[symbol.name]
        directory = os.path.join(self.config.paths["state_dir"], "tor", symbol.name)
        process = TorProcess(directory, symbol.name, socks, control, tor_config["binary"],
                             tor_config["torrc_extra"])
        self.tor_ports[symbol.name] = (process.socks_port, process.control_port)
        child = Child(f"tor-{symbol.name}", "tor", lambda: Subprocess(process, wait=False),
                      self.config.supervisor, symbol=symbol.symbol, heartbeats=False)
        self.children[child.name] = child
        child.start(time.monotonic())
        return child

    def _loop(self) -> None:
        watchdog = self.notifier.watchdog_interval
        next_watchdog = next_status = 0.0
        while not self.stopping:
            for source, message in self.bus.poll(TICK):
                self._dispatch(source, message)
            if self.stopping:
                break
            now = time.monotonic()
            for child in list(self.children.values()):
                child.tick(now)
                if not child.wanted and child.state == "stopped":
                    del self.children[child.name]  # removed by a reload, now gone
            self._start_deferred()
            self._rotation_tick(now)
            self.exits.tick(now)
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            self._notify_ready(now)
            if watchdog and now >= next_watchdog:
                self.notifier.notify("WATCHDOG=1")  # only reached while this loop runs
                next_watchdog = now + watchdog
            if now >= next_status:
                self.notifier.notify("STATUS=" + self._summary())
                next_status = now + 5

    def _shutdown(self) -> None:
        self.stopping = True
        self.notifier.notify("STOPPING=1")
        log.info("stopping: collectors first, then exporter, tor, clickhouse")
        for kind, timeout in STOP_TIMEOUTS.items():
            self._stop_group([c for c in self.children.values() if c.kind == kind], timeout)
        if self.bus is not None:
            self.bus.close()
        log.info("stopped")

    def _stop_group(self, group, timeout: float) -> None:
        now = time.monotonic()
        for child in group:
            child.stop(now, timeout)
        deadline = now + timeout + 1
        while any(c.state == "stopping" for c in group) and time.monotonic() < deadline:
            time.sleep(0.05)
            for child in group:
                child.tick(time.monotonic())

    # --- bus messages ----------------------------------------------------------------------

    def _dispatch(self, source: str, message: dict) -> None:
        kind = message["type"]
        if source == "control":
            self._control(message)
        elif kind == "heartbeat":
            child = self.children.get(message["name"])
            if child is not None and child.state == "running" and child.process.pid == message["pid"]:
                child.heartbeat(message["stats"], time.monotonic())
        elif kind == "rotate_request":
            self._begin_rotation(message["name"], message["request"])
        elif kind == "rotate_ack" and self.rotation and message["rotation"] == self.rotation.id:
            self.rotation.acks.add(message["name"])
        elif kind == "rotate_done" and self.rotation and message["rotation"] == self.rotation.id:
            self._end_rotation("tables swapped")
        elif kind == "export_done":
            self.export_requests[message["request"]] = message
            log.info("export request %s done: ok=%s files=%d", message["request"],
                     message["ok"], len(message["files"]))
        else:
            log.warning("dropped an unexpected %s message from %s", kind, source)

    def _control(self, request: dict) -> None:
        kind = request["type"]
        if kind == "status":
            self.bus.reply(request, ok=True, result=self.status())
        elif kind == "restart":
            child = self.children.get(request["name"])
            if child is None:
                self.bus.reply(request, ok=False, error=f"no child named {request['name']!r}; "
                                                        f"children: {', '.join(self.children)}")
            else:
                log.info("restart of %s requested", child.name)
                child.restart_now(time.monotonic())
                self.bus.reply(request, ok=True, result={"name": child.name})
        elif kind == "export":
            exporter = self.children.get("exporter")
            if exporter is None or exporter.state != "running":
                self.bus.reply(request, ok=False, error="the exporter is not running")
                return
            self.rotation_count += 1
            request_id = f"export-{os.getpid()}-{self.rotation_count}"
            self.export_requests = {k: v for k, v in list(self.export_requests.items())[-50:]}
            self.export_requests[request_id] = None
            self.bus.publish("export_now", request=request_id)
            log.info("export requested (%s)", request_id)
            self.bus.reply(request, ok=True, result={"request": request_id})
        elif kind == "export_result":
            if request["request"] not in self.export_requests:
                self.bus.reply(request, ok=False, error=f"unknown request {request['request']}")
            else:
                self.bus.reply(request, ok=True, result=self.export_requests[request["request"]])
        else:
            self.bus.reply(request, ok=False, error=f"{kind} is not a control request")

    # --- the rotation handshake ------------------------------------------------------------

    def _begin_rotation(self, requester: str, request: str) -> None:
        if self.rotation is not None:
            if self.rotation.request != request:
                log.info("rotation %s still running; %s asked again", self.rotation.id, requester)
            return
        self.rotation_count += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        symbols = [c.symbol for c in self._collectors()]
        self.rotation = Rotation(f"{stamp}-{self.rotation_count}", symbols, requester, request,
                                 time.monotonic())
        log.info("rotation %s begins for %s (asked by %s)", self.rotation.id, ",".join(symbols),
                 requester)

    def _rotation_tick(self, now: float) -> None:
        r = self.rotation
        if r is None:
            return
        live = {c.name for c in self._collectors() if c.state == "running"}
        if r.phase == "holding":
            if live <= r.acks or now - r.phase_started >= self.config.supervisor["rotation_ack_timeout"]:
                missing = sorted(live - r.acks)
                if missing:
                    log.warning("rotation %s: no hold from %s after %.1fs; swapping anyway "
                                "(their late rows go to the new table)", r.id, ",".join(missing),
                                now - r.phase_started)
                r.phase, r.phase_started, r.last_sent, r.missing = "swapping", now, 0.0, missing
        if r.phase == "swapping" and now - r.phase_started > self.config.collector["max_hold"]:
            log.error("rotation %s: no rotate_done from the exporter within %.0fs; collectors "
                      "write again", r.id, self.config.collector["max_hold"])
            self._end_rotation("exporter did not finish")
            r = self.rotation
        if r.phase == "ending" and now - r.phase_started > 3 * REPEAT:
            self.rotation = None
            return
        if now - r.last_sent >= REPEAT:
            r.last_sent = now
            if r.phase == "holding":
                self.bus.publish("rotate_begin", rotation=r.id, symbols=r.symbols)
            elif r.phase == "swapping":
                self.bus.publish("rotate_ready", rotation=r.id, held=sorted(r.acks),
                                 missing=r.missing, request=r.request)
            else:
                self.bus.publish("rotate_end", rotation=r.id, symbols=r.symbols)

    def _end_rotation(self, why: str) -> None:
        r = self.rotation
        log.info("rotation %s ends after %.2fs: %s", r.id, time.monotonic() - r.started, why)
        r.phase, r.phase_started, r.last_sent = "ending", time.monotonic(), 0.0

    # --- reload, readiness, status ---------------------------------------------------------

    def _reload(self) -> None:
        try:
            new = configuration.load(self.config.path)
        except configuration.ConfigError as e:
            log.error("reload rejected, the running config stays in force: %s", e)
            return
        wanted = {f"collector-{s.name}": s for s in new.symbols}
        self.config = new
        for child in self._collectors():
            if child.name not in wanted:
                log.info("reload: %s removed from the config; stopping it", child.symbol)
                child.stop(time.monotonic(), STOP_TIMEOUT)
                tor = self.children.get("tor-" + child.name.split("-", 1)[1])
                if tor is not None:
                    tor.stop(time.monotonic(), STOP_TIMEOUTS["tor"])
                self.exits.remove(child.name)
        running = {c.name for c in self._collectors()}
        added = [symbol for name, symbol in wanted.items() if name not in running]
        self.deferred_adds = [wanted[f"collector-{s.name}"] for s in self.deferred_adds
                              if f"collector-{s.name}" in wanted]
        for symbol in added:
            if self._leftovers(symbol):
                log.info("reload: %s added; its collector starts once the old one has stopped",
                         symbol.symbol)
                if symbol.name not in {s.name for s in self.deferred_adds}:
                    self.deferred_adds.append(symbol)
            else:
                log.info("reload: %s added; starting its collector", symbol.symbol)
                self._add_collector(symbol)
        if added and "exporter" in self.children:
            self.children["exporter"].restart_now(time.monotonic())  # to export them too
        log.info("reload done: symbols=%s", ",".join(s.symbol for s in new.symbols))

    def _leftovers(self, symbol) -> list:
        """The children of a removed symbol that are still stopping."""
        return [c for c in (self.children.get(f"collector-{symbol.name}"),
                            self.children.get(f"tor-{symbol.name}")) if c is not None]

    def _start_deferred(self) -> None:
        for symbol in list(self.deferred_adds):
            if not self._leftovers(symbol):
                self.deferred_adds.remove(symbol)
                log.info("reload: the old %s collector has stopped; starting the new one",
                         symbol.symbol)
                self._add_collector(symbol)

    def _collectors(self):
        return [c for c in self.children.values() if c.kind == "collector" and c.wanted]

    def _notify_ready(self, now: float) -> None:
        if self.ready:
            return
        collectors = self._collectors()
        if all(c.stats for c in collectors) or now - self.started >= READY_TIMEOUT:
            self.ready = True
            self.notifier.notify("READY=1")
            log.info("ready: %s", self._summary())

    def _summary(self) -> str:
        collectors = self._collectors()
        up = sum(1 for c in collectors if c.stats.get("connected"))
        rate = sum(sum(c.rates.values()) for c in collectors)
        return f"{up}/{len(collectors)} collectors connected, {rate:.0f} rows/s"

    def status(self) -> dict:
        now = time.monotonic()
        children = []
        live_pids = {c.process.pid for c in self.children.values() if c.process}
        self.usage = {pid: p for pid, p in self.usage.items() if pid in live_pids}
        for child in self.children.values():
            entry = child.describe(now)
            entry.update(rss_bytes=None, cpu_percent=None)
            slot = self.exits.slots.get(child.name if child.kind == "collector"
                                        else "collector-" + child.name.split("-", 1)[-1])
            if slot is not None and child.kind in ("collector", "tor"):
                entry["exit_ip"] = slot.exit_ip
                entry["tor"] = slot.describe()
            if entry["pid"]:
                try:
                    proc = self.usage.setdefault(entry["pid"], psutil.Process(entry["pid"]))
                    entry["rss_bytes"] = proc.memory_info().rss
                    entry["cpu_percent"] = round(proc.cpu_percent(interval=None), 1)
                except psutil.Error:
                    pass
            children.append(entry)
        return {
            "supervisor": {
                "pid": os.getpid(), "version": __version__, "uptime_s": round(now - self.started, 1),
                "config": self.config.path, "ready": self.ready,
                "clickhouse": self._clickhouse_status(),
                "rotation": None if self.rotation is None else
                {"id": self.rotation.id, "phase": self.rotation.phase},
                "last_export": (self.children["exporter"].stats.get("last_export")
                                if "exporter" in self.children else None),
                "export": self.children["exporter"].stats if "exporter" in self.children else None,
                "rss_bytes": psutil.Process().memory_info().rss,
            },
            "children": children,
        }

    def _clickhouse_status(self) -> dict:
        """Checked at most every few seconds: a status request must not stall the loop."""
        ch, now = self.config.clickhouse, time.monotonic()
        if now - self.clickhouse_checked[0] >= 5.0:
            client = schema.connect(ch, timeout=1.0)
            try:
                reachable = client.execute("SELECT 1") == [(1,)]
            except Exception:
                reachable = False
            finally:
                client.disconnect()
            self.clickhouse_checked = (now, reachable)
        return {"host": ch["host"], "port": ch["port"], "managed": ch["managed"],
                "reachable": self.clickhouse_checked[1]}

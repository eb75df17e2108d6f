"""`mexc run`: the parent process.  It starts every child, restarts what dies or hangs, runs the
bus (status requests, heartbeats, the rotation handshake) and talks to systemd.

One loop: wait up to TICK for bus messages, then look after every child.  Control requests
are answered by supervisor/commands.py, the rotation is run by bus/rotation.Coordinator, Tor
exits are kept apart by supervisor/exits.ExitGuard.  The dashboard, /metrics and alerts run
in threads of their own (supervisor/monitoring/: monitor.py, web.py) and learn the status by asking the
loop over the control socket like `mexc status`, so the loop's state stays its own.
"""
import collections
import dataclasses
import logging
import os
import shutil
import signal
import threading
import time

from urllib.parse import urlsplit

import psutil

from bus import sockets
from bus.rotation import Coordinator, Timeouts
from collector import connection, gaps
from core import __version__, config as configuration, log as logging_setup, pidlock
from core.clock import EventClock
from core.log import RecentProblems, first_line
from core.store import SchemaTooNew, Store
from core.symbols import NameBook, NameClash, resolve
from core.vocabulary import (CLICKHOUSE, COLLECTOR, EXPORTER, GAP_DAEMON_RESTART, GAP_DELISTED,
                             TOR, ChildId)
from supervisor import commands, reload, sdnotify
from supervisor.children import (Child, ChildState, Forked, Subprocess, collector_main,
                                 exporter_main, start_reason)
from supervisor.clickhouse import ClickHouseStartError, ManagedClickHouse
from supervisor.contracts import ContractList
from supervisor.exits import ExitGuard
from supervisor.forkserver import ForkServer, become_subreaper
from supervisor.monitoring.alerts import Alerts
from supervisor.monitoring.monitor import Monitor
from supervisor.monitoring.web import WebServer
from supervisor.tor import TorProcess

log = logging.getLogger(__name__)

TICK = 0.2
EXPORTER_ID = ChildId(EXPORTER)
# Shutdown waits this long per group before SIGKILL; together under the 15 s promised.
# Collectors need up to collector.STOP_GRACE (5 s) to store or spool their rows.
STOP_TIMEOUTS = {COLLECTOR: 7.0, EXPORTER: 3.0, TOR: 2.0, CLICKHOUSE: 3.0}
READY_TIMEOUT = 15.0  # READY=1 at the latest this long after start, even if a collector lags
LEFTOVER_WAIT = 20.0  # for the children of a killed `mexc run` to die with it (collectors flush)
USAGE_EVERY = 10.0  # seconds a child's RSS and CPU % in the status are reused
CLICKHOUSE_CHECK_EVERY = 5.0  # seconds between reachability probes (each in its own thread)
CLUSTER_EVERY = 0.5  # seconds between looks at the cluster's assignment
JOIN_WAIT = 10.0  # longest a clustered start waits for ZooKeeper before collecting everything
FIRST_LIST_WAIT = 15.0  # longest a start with patterns waits for MEXC's contract list
DELISTING_EVERY = 1.0  # seconds between looks at the delisted contracts still collecting


class RunError(Exception):
    """mexc run cannot start; the message says why.  `code` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Arbiter:
    """The supervisor (`mexc run`): owns every child (by name, in start order), the bus,
    the run lock and systemd's notifications; restarts what dies or hangs."""

    def __init__(self, config):
        self.config = config
        self.runtime_dir = config.paths["runtime_dir"]
        self.children = {}  # ChildId -> Child, in start order
        self.started = time.monotonic()
        self.stopping = False
        self.reload_requested = False
        self.ready = False
        self.rotation = Coordinator(self._publish, Timeouts.from_config(config))
        self.export_count = 0
        self.export_requests = {}  # request id -> None while running, then its export_done
        self.bus = None
        self.lock_file = None
        # pid -> (psutil.Process, when read, RSS, CPU %): the Process kept so cpu_percent
        # measures between calls, the figures reused for USAGE_EVERY s (300 children: a status
        # request read /proc twice per child each time, about 20 ms)
        self.usage = {}
        self.notifier = sdnotify.Notifier.from_environment()  # children must not inherit it
        self.clickhouse_checked = (float("-inf"), None)  # (when, Features or None)
        self.clickhouse_probe = threading.Thread()  # the probe in flight, if alive
        url = urlsplit(config.exchange["url"])
        self.exit_guard = ExitGuard(config.tor, url.port or (443 if url.scheme == "wss" else 80),
                                    move_settle=config.exchange["connect_timeout"]
                                    + config.exchange["overlap_max"])
        self.tor_ports = {}  # symbol name -> (socks, control), kept across tor restarts
        # symbols re-added by a reload while their old collector or tor is still stopping:
        # started once those are gone (two collectors of one symbol would share its spool)
        self.deferred_adds = []
        self.deferred_because = {}  # name -> the start reason of a deferred symbol, if given
        # first starts of symbols (a collector, or its tor), at supervisor.start_rate a second:
        # MEXC may limit connects per IP, and 300 tor bootstraps at once swamp the CPU
        self.start_queue = collections.deque()
        self.next_queued_start = 0.0
        self.problems = RecentProblems()  # the last warnings and errors, for the dashboard
        self.monitor = self.web = self.alerts = None
        self.forkserver = None  # forks the collectors (supervisor/forkserver.py)
        # in a cluster (cluster/): this host's membership, its holdings log, what was logged
        self.membership = self.holdings = None
        self.cluster_frozen = None  # whether the last line logged said frozen
        self.next_cluster_look = 0.0
        # patterns in `symbols` (core/symbols.py): the contract list, the names given, and
        # the contracts gone from the list whose collectors stop once silent
        self.book = None  # NameBook, read when there are patterns
        self.contract_list = None
        self.contracts_version = 0  # the list's version the symbols follow
        self.delisting = {}  # name -> (Symbol, why): absent from the list, collector not silent
        self.delisted = set()  # names stopped as delisted in this run (a return says so)
        self.next_delisting_look = 0.0
        self.ledger_stop = threading.Event()  # ends the retries of delisting records

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        self._check_startable()
        self._take_lock()
        self.bus = sockets.SupervisorBus(self.runtime_dir)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        logging.getLogger().addHandler(self.problems)  # forked children set their own handlers
        log.info("mexc %s starting pid=%d config=%s symbols=%s", __version__, os.getpid(),
                 self.config.path, ",".join(s.symbol for s in self.config.symbols))
        try:
            for step in (self._read_contracts, self._start_clickhouse, self._resolve_symbols,
                         self._ensure_schema, self._join_cluster, self._start_collectors,
                         self._start_monitor, self._loop):
                if self.stopping:  # SIGTERM during start-up: stop what is running
                    break
                step()
        finally:
            self._shutdown()
        return 0

    def _start_collectors(self) -> None:
        connection.share_tls(self.config.exchange)
        become_subreaper()  # the fork server's collectors are handed to us
        starting = self._symbols_to_start()
        for symbol in starting:
            self._add_collector(symbol)
        parent = os.getpid()
        # self.config at fork time: a restarted exporter works with the reloaded config
        exporter = Child(EXPORTER_ID,
                         lambda: Forked(exporter_main, (self.config, parent)),
                         self.config.supervisor)
        self.children[exporter.child_id] = exporter
        exporter.start(time.monotonic())
        if self.holdings is not None:  # after the fork: a thread importing then would leave
            # the import lock held in the child for good (the exporter imports on its start)
            threading.Thread(target=self._end_holdings_of_a_crash, name="cluster-crash-holdings",
                             args=({s.name for s in starting}, self.holdings.clock.now_ms()),
                             daemon=True).start()

    # --- patterns: MEXC's contract list (core/symbols.py, supervisor/contracts.py) ----------

    def _read_contracts(self) -> None:
        """With patterns in `symbols`: start reading the contract list (a thread)."""
        if self.config.patterns is None:
            return
        try:
            self._start_contract_list(self.config)
        except ValueError as e:
            raise RunError(f"{e}: the names the archive is under; repair it (a JSON object, "
                           "contract -> name) before mexc can start") from None

    def _start_contract_list(self, config) -> None:
        """The name book and the contract list's thread, unless they run already."""
        if self.book is None:
            self.book = NameBook(config.paths["state_dir"])
        if self.contract_list is None:
            self.contract_list = ContractList(config.exchange, self.book).start()

    def _resolve_symbols(self) -> None:
        """Resolve the patterns at start: against the list MEXC gives within FIRST_LIST_WAIT,
        else the last good one (contracts.json), else only the contracts named outright."""
        if self.contract_list is None:
            return
        if self.config.exchange["contracts_via"] == "direct":
            self.contract_list.done_once.wait(FIRST_LIST_WAIT)
        self.contracts_version, contracts = self.contract_list.latest()
        if contracts is None:
            log.error("contract list: none loaded yet and none saved from an earlier run; "
                      "collecting only the contracts named outright until it loads")
        try:
            resolution = self._resolution(self.config, contracts)
        except NameClash as e:
            raise RunError(f"{self.config.path}: symbols: {e}", code=78) from None
        self.config = dataclasses.replace(self.config, symbols=resolution.symbols)
        log.info("symbols: %d (patterns %s, named outright %d, contract list of %s)",
                 len(resolution.symbols), self.config.patterns, len(self.config.named),
                 "none" if contracts is None else len(contracts))

    def _resolution(self, config, contracts):
        """The symbols `config` means with this contract list (NameClash: an operator's name
        held by another contract); the names given, logged once, go to the name book."""
        resolution = resolve(config.named, config.patterns, contracts,
                             self.book.names)
        for symbol in resolution.unlisted:
            log.warning("contracts: %s is not trading on MEXC (%s); not collected while it "
                        "is not", symbol, _listing(symbol, contracts))
        for symbol in resolution.skipped:
            log.warning("contracts: %s matches %s but gets no name (not a contract like "
                        "BTC_USDT, or every candidate name is taken); name it outright",
                        symbol, config.patterns)
        for symbol, name in resolution.new_names.items():
            log.info("contracts: %s gets the name %s (for good: names.json)", symbol, name)
        self.book.remember(resolution.symbols)
        return resolution

    def _follow_contracts(self, now: float) -> None:
        """A new contract list: start what it lists newly, mark what it no longer lists; and
        stop the delisted once silent."""
        contract_list = self.contract_list
        if contract_list is None:
            return
        contract_list.proxy = (self.exit_guard.any_socks()
                               if self.config.exchange["contracts_via"] == "tor" else None)
        version, contracts = contract_list.latest()
        if version != self.contracts_version and contracts is not None:
            self.contracts_version = version
            self._apply_contracts(contracts)
        if self.delisting and now >= self.next_delisting_look:
            self.next_delisting_look = now + DELISTING_EVERY
            self._stop_silent_delisted(now)

    def _apply_contracts(self, contracts) -> None:
        try:
            resolution = self._resolution(self.config, contracts)
        except NameClash as e:  # the book changed under a running config: keep what runs
            log.error("contracts: %s; the symbols stay as they are", e)
            return
        wanted = {s.name: s for s in resolution.symbols}
        held = self._held_names()
        for name in [n for n in self.delisting if n in wanted]:
            log.info("contracts: %s listed again before it fell silent; collecting on",
                     wanted[name].symbol)
            del self.delisting[name]
        for symbol in self.config.symbols:
            if (symbol.name in held and symbol.name not in wanted
                    and symbol.name not in self.delisting):
                why = _listing(symbol.symbol, contracts)
                self.delisting[symbol.name] = (symbol, why)
                log.info("contracts: %s %s; its collector stops once it has had no data for "
                         "%.0fs (exchange.silent_alarm)", symbol.symbol, why,
                         self.config.exchange["silent_alarm"])
        staying = [symbol for symbol, _why in self.delisting.values()]
        self.config = dataclasses.replace(
            self.config, symbols=sorted(resolution.symbols + staying, key=lambda s: s.symbol))
        added = [s for name, s in wanted.items() if name not in held]
        if self.membership is not None:  # the cluster decides which of them run here
            self.membership.set_names({s.name: s for s in self.config.symbols})
            added = []
        for symbol in added:
            again = symbol.name in self.delisted
            self.delisted.discard(symbol.name)
            self._start_symbol(symbol, f"contracts: {symbol.symbol} "
                               f"{'listed again' if again else 'listed'}",
                               because=(GAP_DELISTED, "listed again") if again else None)
        if added and EXPORTER_ID in self.children:
            self.children[EXPORTER_ID].restart_now(time.monotonic())  # to export them too

    def _stop_silent_delisted(self, now: float) -> None:
        silent_after = self.config.exchange["silent_alarm"]
        for name, (symbol, why) in list(self.delisting.items()):
            child = self.children.get(ChildId(COLLECTOR, name))
            age = None
            if child is not None and child.wanted and child.state is ChildState.RUNNING:
                age = child.stats.get("last_data_age_s")
                if age is None:  # no data since it started (or no heartbeat yet)
                    age = now - child.started_at
                if age < silent_after:
                    continue
            del self.delisting[name]
            self.delisted.add(name)
            self.config = dataclasses.replace(
                self.config, symbols=[s for s in self.config.symbols if s.name != name])
            if self.membership is not None:
                self.membership.set_names({s.name: s for s in self.config.symbols})
            silent = f"no data for {age:.0f}s" if age is not None else "not running"
            if not self._drop_symbol(name, f"contracts: {symbol.symbol} {why}, {silent}: its "
                                           f"data ends here (gap ledger: {GAP_DELISTED}); "
                                           "stopping its collector, its archive stays"):
                continue  # not collected here (a start still waiting, another host's)
            threading.Thread(target=gaps.record_end, name=f"delisted-{name}", daemon=True,
                             args=(self.config.clickhouse, self.config.export["dir"], symbol,
                                   GAP_DELISTED, f"{why}; collection stopped",
                                   self.ledger_stop)).start()

    # --- several hosts (cluster/, docs/cluster.md) -------------------------------------------

    def _join_cluster(self) -> None:
        """In a cluster: register in ZooKeeper and wait (briefly) for the first view."""
        if not self.config.clustered:
            return
        from cluster.holdings import HoldingsLog  # kazoo only where it is used
        from cluster.membership import Membership
        cluster = self.config.cluster
        self.holdings = HoldingsLog(self.config.clickhouse, cluster["host"], EventClock(
            self.config.export["clock_speed"], self.config.export["clock_anchor_ms"]))
        self.membership = Membership(cluster, [s.name for s in self.config.symbols]).start()
        if self.membership.wait_ready(min(JOIN_WAIT, 2 * cluster["session_timeout"])):
            self.cluster_frozen = False
            log.info("cluster: joined as %s; hosts %s", cluster["host"],
                     ", ".join(self.membership.describe()["hosts"]))
        else:
            self.cluster_frozen = True
            log.warning("cluster: ZooKeeper %s not reachable; collecting every symbol until it "
                        "is", cluster["zookeeper"])

    def _symbols_to_start(self) -> list:
        """At start: every symbol, or in a cluster those assigned to this host (every one
        while ZooKeeper does not answer: extra copies are harmless, missing ones are not)."""
        plan = self.membership.plan(set()) if self.membership is not None else None
        if plan is None:
            return list(self.config.symbols)
        for name, why in plan.take.items():
            log.info("cluster: %s taken (%s)", name, why)
        return [s for s in self.config.symbols if s.name in plan.take]

    def _end_holdings_of_a_crash(self, taken: set, started_ms: int) -> None:
        """Symbols this host held when it went down (its last holding record a take, as a
        SIGKILL leaves it) that it does not take again now: their data here ended with what
        it stored last, so a gap to the start and a release at the start.  Else the merge
        would count this host as covering them all the time it was down."""
        try:
            with Store(self.config.clickhouse, timeout=10.0) as store:
                held = store.held_before(self.config.cluster["host"], started_ms)
        except Exception as e:
            log.warning("cluster: cannot read what this host held before it started (%s); "
                        "the hours it was down may count it as covering", first_line(e))
            return
        by_name = {s.name: s for s in self.config.symbols}
        for name in sorted(set(held) - taken):
            if name in by_name:
                gaps.record_end(self.config.clickhouse, self.config.export["dir"],
                                by_name[name], GAP_DAEMON_RESTART,
                                "host down; collected by other hosts since", self.ledger_stop,
                                end_ms=started_ms, covered=False)
            self.holdings.record(name, held=False, ts_ms=started_ms)
            log.info("cluster: %s was held here when the host went down and is not taken "
                     "again: its data here ends with what was stored last", name)

    def _follow_cluster(self) -> None:
        """Tell the membership which copies are live here; start and stop what it says,
        through the same steps as a reload's symbol change.  Frozen: nothing changes."""
        membership = self.membership
        membership.set_live({c.child_id.name for c in self._collectors() if _live(c)})
        self._record_takes()
        held = self._held_names()
        frozen = not membership.ready()
        if frozen != self.cluster_frozen:  # once per outage, however its states follow
            self.cluster_frozen = frozen
            if frozen:
                log.warning("cluster: ZooKeeper session %s; assignment frozen (running %s)",
                            membership.state, ", ".join(sorted(held)) or "nothing")
            else:
                log.info("cluster: ZooKeeper session connected; assignment follows the "
                         "cluster again")
        plan = membership.plan(held)
        if plan is None:
            return
        by_name = {s.name: s for s in self.config.symbols}
        for name, why in plan.release.items():
            if self._drop_symbol(name, f"cluster: {name} released ({why})"):
                self.holdings.record(name, held=False)
        for name, why in plan.take.items():
            self._start_symbol(by_name[name], f"cluster: {name} taken ({why})")

    def _record_takes(self) -> None:
        """A symbol taken here is held from its collector's first data (cluster/holdings.py)."""
        for c in self.children.values():
            if c.kind == COLLECTOR:  # stopping ones too: before their release
                self.holdings.delivering(c.child_id.name, c.first_data_ms)

    def _held_names(self) -> set:
        """Symbols with a collector running or waiting to start here."""
        return ({c.child_id.name for c in self._collectors()}
                | {s.name for s in self.deferred_adds})

    def _start_monitor(self) -> None:
        """The dashboard, /metrics and alerts as self.config says, at start and after each
        reload: what did not change keeps running (the dashboard's history, the alerts that
        fire).  A port already taken costs the dashboard (an error line), not the run."""
        http, alerts = self.config.http, self.config.alerts
        wants_alerts = bool(alerts["command"] or alerts["webhook"])
        if self.alerts is not None and not wants_alerts:
            self.alerts.stop()
            self.alerts = None
        elif self.alerts is not None:
            self.alerts.config = self.config  # its rules and receivers read it at each use
        elif wants_alerts:
            self.alerts = Alerts(self.config)
        if self.monitor is None and (http["listen"] or wants_alerts):
            self.monitor = Monitor(self.config, lambda: commands.ask(self.runtime_dir, "status",
                                                                     timeout=5.0))
            self.monitor.start()
        if self.monitor is not None:
            self.monitor.config = self.config
            self.monitor.on_sample = self.alerts.on_sample if self.alerts else None
        self._serve(http)

    def _serve(self, http: dict) -> None:
        if self.web is not None and self.web.listen == http["listen"]:
            self.web.token = http["token"]  # read at each request
            return
        if self.web is not None:
            self.web.stop()
            self.web = None
        if not http["listen"]:
            return
        try:
            self.web = WebServer(http["listen"], http["token"], self.monitor).start()
        except OSError as e:
            log.error("no dashboard: cannot listen on %s: %s (http.listen)", http["listen"],
                      e.strerror or e)

    def _stop_monitor(self) -> None:
        """First thing at shutdown: children stopping on purpose are no news (nor alerts);
        alerts already queued are still sent."""
        for part in (self.web, self.monitor, self.alerts):
            if part is not None:
                part.stop()

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
        if not self.config.clickhouse["managed"]:
            return
        directory = os.path.join(self.config.paths["state_dir"], "clickhouse")

        def spawn(wait=False):  # restarts do not block the loop; collectors retry meanwhile
            return Subprocess(ManagedClickHouse.from_config(self.config, directory), wait=wait)

        child = Child(ChildId(CLICKHOUSE), spawn, self.config.supervisor, heartbeats=False)
        self.children[child.child_id] = child
        try:
            child.process = spawn(wait=True)  # the first start waits: the schema comes next
        except ClickHouseStartError as e:
            raise RunError(f"managed ClickHouse did not start: {e}") from None
        child.running(time.monotonic(), f"started pid={child.process.pid}")

    def _ensure_schema(self) -> None:
        try:
            with Store(self.config.clickhouse) as session:
                # before any collector runs: the one place an older schema is migrated
                features = session.setup([s.name for s in self.config.symbols], migrate=True,
                                         clustered=self.config.clustered)
            self.clickhouse_checked = (time.monotonic(), features)
            log.info("clickhouse %s at %s:%d, database %s ready", features.version,
                     self.config.clickhouse["host"], self.config.clickhouse["port"],
                     self.config.clickhouse["database"])
        except SchemaTooNew as e:
            raise RunError(f"refusing to start: {e}") from None
        except Exception as e:  # collectors buffer and create their tables once it is back
            log.warning("clickhouse not reachable yet (%s); collectors will buffer",
                        first_line(e))

    def _add_collector(self, symbol, because=None) -> None:
        """Fork its collector (with Tor: once its tor has bootstrapped).  because: the
        (reason, detail) its first start's gap gets instead of a daemon restart."""
        tor = self._add_tor(symbol) if self.config.tor["enabled"] else None
        socks_port = self.tor_ports[symbol.name][0] if tor else None
        child_id = ChildId(COLLECTOR, symbol.name)
        child = Child(child_id, lambda: self._forkserver().start(
            symbol.symbol, socks_port, start_reason(child, because)),
                      self.config.supervisor, symbol=symbol.symbol)
        self.children[child.child_id] = child
        if self.holdings is not None:
            self.holdings.taking(symbol.name)
        if tor is None:
            self.start_queue.append(child)
        else:  # started by the ExitGuard once its tor has bootstrapped
            self.exit_guard.add(tor, child)

    def _forkserver(self) -> ForkServer:
        """The fork server of self.config (a collector (re)started after a reload gets its
        settings): made at the first collector's start (the supervisor warmer by its loop's
        first round than before it: 0.1 MiB less per collector), again after a reload or if
        it exited."""
        server = self.forkserver
        if server is None or server.fixed[0] is not self.config or not server.process.alive():
            if server is not None:
                server.stop()
            self.forkserver = ForkServer(collector_main, (self.config, os.getpid()))
        return self.forkserver

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
        child = Child(ChildId(TOR, symbol.name), lambda: Subprocess(process, wait=False),
                      self.config.supervisor, symbol=symbol.symbol, heartbeats=False)
        # the collector's gap (its socket through this tor broke) is a tor restart
        child.on_exit = lambda why: self._publish("tor_restarted", name=symbol.name,
                                                  detail=f"tor {why}")
        self.children[child.child_id] = child
        self.start_queue.append(child)
        return child

    def _loop(self) -> None:
        """Bus messages as they come; the look after every child once a TICK.  (With one
        look per poll, 300 collectors' heartbeats, 300 a second, each woke a walk over all 300
        children: the supervisor's cost grew with the square of the symbols.)"""
        watchdog = self.notifier.watchdog_interval
        next_watchdog = next_status = next_look = 0.0
        while not self.stopping:
            due = min(next_look, self.next_queued_start) if self.start_queue else next_look
            for source, message in self.bus.poll(max(0.0, due - time.monotonic())):
                self._dispatch(source, message)
            if self.stopping:
                break
            now = time.monotonic()
            self._start_queued(now)
            if now < next_look:
                continue
            next_look = now + TICK
            self._look_after_children(now)
            if watchdog and now >= next_watchdog:
                self.notifier.notify("WATCHDOG=1")  # only reached while this loop runs
                next_watchdog = now + watchdog
            if now >= next_status:
                self.notifier.notify("STATUS=" + self._summary())
                next_status = now + 5

    def _look_after_children(self, now: float) -> None:
        for child in list(self.children.values()):
            child.tick(now)
            if not child.wanted and child.state is ChildState.STOPPED:
                del self.children[child.child_id]  # removed by a reload, now gone
        self._start_deferred()
        self._follow_contracts(now)
        if self.membership is not None and now >= self.next_cluster_look:
            self._follow_cluster()
            self.next_cluster_look = now + CLUSTER_EVERY
        self.rotation.tick(now, {c.name for c in self._collectors()
                                 if c.state is ChildState.RUNNING})
        self.exit_guard.tick(now)
        if self.reload_requested:
            self.reload_requested = False
            self._reload()
        self._notify_ready(now)

    def _shutdown(self) -> None:
        self.stopping = True
        self.notifier.notify("STOPPING=1")
        self._stop_monitor()
        self.ledger_stop.set()
        if self.contract_list is not None:
            self.contract_list.stop()
        log.info("stopping: collectors first, then exporter, tor, clickhouse")
        for kind, timeout in STOP_TIMEOUTS.items():
            self._stop_group([c for c in self.children.values() if c.kind == kind], timeout)
            if kind == COLLECTOR:
                self._leave_cluster()
        if self.forkserver is not None:
            self.forkserver.stop()
        if self.bus is not None:
            self.bus.close()
        log.info("stopped")

    def _leave_cluster(self) -> None:
        """After the collectors stopped: the session closes, the others take over now."""
        if self.membership is not None:
            self.membership.stop()
            log.info("cluster: left")
        if self.holdings is not None:
            self._record_takes()  # of collectors stopped before the next look at the cluster
            # every collector stopped above (not wanted any more): its data here ends now
            for name in sorted({c.child_id.name for c in self.children.values()
                                if c.kind == COLLECTOR}):
                self.holdings.record(name, held=False)
            self.holdings.stop()

    def _stop_group(self, group, timeout: float) -> None:
        now = time.monotonic()
        for child in group:
            child.stop(now, timeout)
        deadline = now + timeout + 1
        while any(c.state is ChildState.STOPPING for c in group) and time.monotonic() < deadline:
            time.sleep(0.05)
            for child in group:
                child.tick(time.monotonic())

    # --- bus messages ----------------------------------------------------------------------

    def _publish(self, kind: str, **fields) -> None:
        self.bus.publish(kind, **fields)

    def _dispatch(self, source: str, message: dict) -> None:
        kind, now = message["type"], time.monotonic()
        if source == "control":
            self.bus.reply(message, **commands.answer(self, message))
        elif kind == "heartbeat":
            child = self._child(message["name"])
            if (child is not None and child.state is ChildState.RUNNING
                    and child.process.pid == message["pid"]):
                child.heartbeat(message["stats"], now)
        elif kind == "rotate_request":
            self.rotation.request(message["name"], message["request"],
                                  [c.symbol for c in self._collectors()], now)
        elif kind == "rotate_ack":
            self.rotation.ack(message["name"], message["rotation"])
        elif kind == "rotate_done":
            self.rotation.done(message["rotation"], now)
        elif kind == "export_done":
            self.export_requests[message["request"]] = message
            log.info("export request %s done: ok=%s files=%d", message["request"],
                     message["ok"], len(message["files"]))
        else:
            log.warning("dropped an unexpected %s message from %s", kind, source)

    # --- what control commands ask (supervisor/commands.py) --------------------------------

    def restart(self, name: str) -> str:
        """Restart one child at once; returns its name."""
        child = self._child(name)
        if child is None:
            raise commands.CommandError(f"no child named {name!r}; children: "
                                        f"{', '.join(map(str, self.children))}")
        log.info("restart of %s requested", child.name)
        child.restart_now(time.monotonic())
        return child.name

    def _child(self, name: str):
        """The child a message or an operator names (`collector-btc`), or None."""
        try:
            return self.children.get(ChildId.parse(name))
        except ValueError:
            return None

    def request_export(self) -> str:
        """Ask the exporter for a cycle now; returns the request id export_result takes."""
        exporter = self.children.get(EXPORTER_ID)
        if exporter is None or exporter.state is not ChildState.RUNNING:
            raise commands.CommandError("the exporter is not running")
        self.export_count += 1
        request_id = f"export-{os.getpid()}-{self.export_count}"
        self.export_requests = {k: v for k, v in list(self.export_requests.items())[-50:]}
        self.export_requests[request_id] = None
        self.bus.publish("export_now", request=request_id)
        log.info("export requested (%s)", request_id)
        return request_id

    # --- reload, readiness, status ---------------------------------------------------------

    def _reload(self) -> None:
        try:
            new = configuration.load(self.config.path)
        except configuration.ConfigError as e:
            log.error("reload rejected, the running config stays in force: %s", e)
            return
        for warning in new.warnings:
            log.warning("reload: config: %s", warning)
        try:
            new = self._resolved(new)
        except ValueError as e:  # NameClash, or names.json unreadable
            log.error("reload rejected, the running config stays in force: %s: symbols: %s",
                      new.path, e)
            return
        changed = reload.changes(self.config, new)
        self.config = new = reload.adopted(self.config, new)
        self._apply_settings(changed)
        wanted = {s.name: s for s in new.symbols}
        for child in self._collectors():
            if child.child_id.name not in wanted:
                self._drop_symbol(child.child_id.name,
                                  f"reload: {child.symbol} removed from the config; stopping it")
        self.deferred_adds = [wanted[s.name] for s in self.deferred_adds if s.name in wanted]
        added = [s for name, s in wanted.items() if name not in self._held_names()]
        if self.membership is not None:  # the cluster decides which of them run here
            self.membership.set_names(wanted)
            added = []
        for symbol in added:
            self._start_symbol(symbol, f"reload: {symbol.symbol} added")
        if ((added or reload.touches(changed, "export", reload.EXPORTER))
                and EXPORTER_ID in self.children):
            self.children[EXPORTER_ID].restart_now(time.monotonic())  # to export them too
        log.info("reload done: symbols=%s", ",".join(s.symbol for s in new.symbols))

    def _resolved(self, new):
        """A reloaded config with its patterns resolved (the contract list started or stopped
        as they come and go); the delisted still collecting stay while it still covers them."""
        if new.patterns is None:
            if self.contract_list is not None:
                self.contract_list.stop()
                self.contract_list = None
            self.delisting = {}
            return new
        self._start_contract_list(new)  # ValueError: names.json unreadable
        self.contract_list.exchange = new.exchange
        _version, contracts = self.contract_list.latest()
        resolution = self._resolution(new, contracts)
        explicit = {s.symbol for s in new.named}
        self.delisting = {name: entry for name, entry in self.delisting.items()
                          if entry[0].symbol in explicit or new.patterns.matches(entry[0].symbol)}
        staying = [symbol for symbol, _why in self.delisting.values()]
        return dataclasses.replace(new, symbols=sorted(resolution.symbols + staying,
                                                       key=lambda s: s.symbol))

    def _apply_settings(self, changed) -> None:
        """What a reload applies at once (supervisor/reload.py), and one line per section."""
        level = self.config.log["level"]
        new_level = reload.touches(changed, "log", reload.NOW)
        # the lines show under the old log.level or the new one, whichever says more
        if new_level and logging.getLevelName(level.upper()) < logging.getLogger().level:
            logging_setup.set_level(level)
        for line in reload.lines(changed):
            log.info("%s", line)
        self.rotation.timeouts = Timeouts.from_config(self.config)
        for child in self.children.values():
            child.sup = self.config.supervisor
        if reload.touches(changed, "http", reload.NOW) or reload.touches(changed, "alerts",
                                                                          reload.NOW):
            self._start_monitor()
        if new_level:
            logging_setup.set_level(level)
            self._publish("log_level", level=level)  # to the children

    def _drop_symbol(self, name: str, line: str) -> bool:
        """Stop a symbol's collector and tor (a reload removed it, or the cluster moved it);
        False if it had none running, only a start waiting."""
        if any(s.name == name for s in self.deferred_adds):
            self.deferred_adds = [s for s in self.deferred_adds if s.name != name]
            log.info("%s (its start was still waiting)", line)
            return False
        child = self.children.get(ChildId(COLLECTOR, name))
        if child is None or not child.wanted:
            return False
        log.info("%s", line)
        child.stop(time.monotonic(), STOP_TIMEOUTS[COLLECTOR])
        tor = self.children.get(child.child_id.sibling(TOR))
        if tor is not None:
            tor.stop(time.monotonic(), STOP_TIMEOUTS[TOR])
        self.exit_guard.remove(child.name)
        return True

    def _start_symbol(self, symbol, line: str, because=None) -> None:
        """Start a symbol's collector (and tor) now, or once its old ones have stopped.
        because: what its start's gap was (start_reason), if not a daemon restart."""
        if self._leftovers(symbol):
            log.info("%s; its collector starts once the old one has stopped", line)
            if symbol.name not in {s.name for s in self.deferred_adds}:
                self.deferred_adds.append(symbol)
                if because is not None:
                    self.deferred_because[symbol.name] = because
        else:
            log.info("%s; starting its collector", line)
            self._add_collector(symbol, because)

    def _leftovers(self, symbol) -> list:
        """The children of a removed symbol that are still stopping."""
        return [c for c in (self.children.get(ChildId(COLLECTOR, symbol.name)),
                            self.children.get(ChildId(TOR, symbol.name))) if c is not None]

    def _start_deferred(self) -> None:
        for symbol in list(self.deferred_adds):
            if not self._leftovers(symbol):
                self.deferred_adds.remove(symbol)
                log.info("the old %s collector has stopped; starting the new one",
                         symbol.symbol)
                self._add_collector(symbol, self.deferred_because.pop(symbol.name, None))

    def _start_queued(self, now: float) -> None:
        """First starts, one every 1/supervisor.start_rate seconds (so never more than the
        rate in any second); a child stopped while it waited is skipped."""
        while self.start_queue and now >= self.next_queued_start:
            child = self.start_queue.popleft()
            if child.wanted and child.state is ChildState.WAITING:
                child.start(now)  # from its end: a slow fork does not bunch the next ones
                self.next_queued_start = (time.monotonic()
                                          + 1.0 / self.config.supervisor["start_rate"])

    def _collectors(self):
        return [c for c in self.children.values() if c.kind == COLLECTOR and c.wanted]

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
            slot = self.exit_guard.slots.get(str(child.child_id.sibling(COLLECTOR)))
            if slot is not None and child.kind in (COLLECTOR, TOR):
                entry["exit_ip"] = slot.exit_ip
                entry["tor"] = slot.describe()
            if entry["pid"]:
                entry["rss_bytes"], entry["cpu_percent"] = self._usage(entry["pid"], now)
            children.append(entry)
        cluster = {}
        if self.membership is not None:  # with the monitor's last receive lag (cluster/lag.py)
            lag = self.monitor.cluster_lag if self.monitor is not None else None
            cluster = {"cluster": {**self.membership.describe(), "lag": lag}}
        contracts = ({"contracts": {**self.contract_list.describe(),
                                    "symbols": len(self.config.symbols),
                                    "delisting": sorted(s.symbol for s, _ in
                                                        self.delisting.values())}}
                     if self.contract_list is not None else {})
        return {
            **cluster,
            **contracts,
            "supervisor": {
                "pid": os.getpid(), "version": __version__, "uptime_s": round(now - self.started, 1),
                "config": self.config.path, "ready": self.ready,
                "clickhouse": self._clickhouse_status(),
                "rotation": self.rotation.describe(),
                "last_export": (self.children[EXPORTER_ID].stats.get("last_export")
                                if EXPORTER_ID in self.children else None),
                "export": (self.children[EXPORTER_ID].stats if EXPORTER_ID in self.children
                           else None),
                "rss_bytes": psutil.Process().memory_info().rss,
                "dashboard": self.web.url if self.web else None,
                "problems": self.problems.lines(),
            },
            "children": children,
        }

    def _usage(self, pid: int, now: float) -> tuple:
        """(RSS bytes, CPU % since the last reading) of a child, read at most every
        USAGE_EVERY s; (None, None) when it cannot be read."""
        proc, when, rss, cpu = self.usage.get(pid) or (None, float("-inf"), None, None)
        if now - when >= USAGE_EVERY:
            try:
                proc = proc or psutil.Process(pid)
                rss, cpu = proc.memory_info().rss, round(proc.cpu_percent(interval=None), 1)
            except psutil.Error:
                return None, None
            self.usage[pid] = (proc, now, rss, cpu)
        return rss, cpu

    def _clickhouse_status(self) -> dict:
        """The last probe's answer.  A due probe runs in a thread of its own: a slow or absent
        server (up to its 1 s timeout) must never stall the loop that status and the
        dashboard's monitor ask every few seconds."""
        ch, now = self.config.clickhouse, time.monotonic()
        if (now - self.clickhouse_checked[0] >= CLICKHOUSE_CHECK_EVERY
                and not self.clickhouse_probe.is_alive()):
            self.clickhouse_probe = threading.Thread(target=self._probe_clickhouse, daemon=True,
                                                     name="clickhouse-probe")
            self.clickhouse_probe.start()
        features = self.clickhouse_checked[1]
        return {"host": ch["host"], "port": ch["port"], "managed": ch["managed"],
                "reachable": features is not None,
                "server": features.describe() if features else None}

    def _probe_clickhouse(self) -> None:
        with Store(self.config.clickhouse, timeout=1.0) as session:
            self.clickhouse_checked = (time.monotonic(), session.probe())


def _listing(symbol: str, contracts) -> str:
    """What the contract list says of a contract that is not trading."""
    contract = next((c for c in contracts or () if c.symbol == symbol), None)
    if contract is None:
        return "is no longer in MEXC's contract list"
    return f"is {contract.describe_state()} on MEXC (state {contract.state})"


def _live(collector) -> bool:
    """A copy the cluster may count: running, subscribed, and delivering: a data frame since
    it started.  Any frame is not enough: a connection's first moment counts as one, so a
    host whose collector connected during a market stall was live at once, and another
    released the symbol on it (cluster soak, seed 18: 63 xrp and 147 ltc trades of the stall
    lost, with no record, the releasing host counted as covering them)."""
    return (collector.state is ChildState.RUNNING and bool(collector.stats.get("connected"))
            and collector.stats.get("last_data_age_s") is not None)

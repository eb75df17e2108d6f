"""The control commands: what `mexc status`, `mexc restart` and `mexc export` ask the daemon.

One class per command: its name (the bus message type, declared in bus/messages.py too; a test
holds the two together), its manual (the docstring), the fields a request carries, what the
daemon does (run) and what the client prints (show).  The supervisor dispatches a request by
looking its type up in COMMANDS; the command line asks with ask().
"""
import fnmatch
import json

from bus import sockets
from core import __version__
from core.vocabulary import COLLECTOR, MESSAGE_TYPES, TOR
from supervisor.children import ChildState


class CommandError(Exception):
    """The daemon cannot do what was asked; the message is the reply's error."""


class Command:
    name = ""
    fields = ()  # what a request carries besides its id

    def run(self, arbiter, request: dict):
        """In the daemon: do it; return the reply's result (JSON), or raise CommandError."""
        raise NotImplementedError

    def show(self, result) -> str:
        """In the client: the text to print for a result."""
        return json.dumps(result, indent=2, sort_keys=True)


class Status(Command):
    """Everything the daemon knows: the supervisor, ClickHouse, the rotation under way, the
    last export, and each child's state, rates, rows, buffers, exit IP, memory and CPU."""
    name = "status"

    def run(self, arbiter, request):
        return arbiter.status()

    def show(self, result, symbol: str = "", state: str = "") -> str:
        """The status table (`mexc status`; --json prints the result itself): the header, a
        summary of every child, then the children `symbol` (a contract or short name, or a
        glob of either) and `state` (running, waiting, ..., or `problem`) select, those
        with a problem first."""
        cluster = [_cluster(result["cluster"])] if result.get("cluster") else []
        contracts = [_contracts(result["contracts"])] if result.get("contracts") else []
        children = [c for c in result["children"] if _selected(c, symbol, state)]
        children.sort(key=lambda c: not _problem(c))  # stable: start order within each
        shown = ([] if len(children) == len(result["children"]) else
                 [f"showing {len(children)} of {len(result['children'])} children"])
        return "\n".join([_header(result["supervisor"])] + cluster + contracts
                         + [_summary(result["children"])] + shown
                         + [_row([h for h, _w, _f in COLUMNS])]
                         + [_row([show(child) for _h, _w, show in COLUMNS])
                            for child in children]
                         + _notes(children))


class Restart(Command):
    """Stop one child (e.g. collector-btc, tor-btc, exporter); it starts again at once,
    without the crash backoff."""
    name = "restart"
    fields = ("name",)

    def run(self, arbiter, request):
        return {"name": arbiter.restart(request["name"])}

    def show(self, result) -> str:
        return f"restarting {result['name']}"


class Export(Command):
    """Rotate every table and export every finished hour now.  Answers at once with a
    request id; export_result tells how it ended."""
    name = "export"

    def run(self, arbiter, request):
        return {"request": arbiter.request_export()}

    def show(self, result) -> str:
        return f"export requested: {result['request']}"


class ExportResult(Command):
    """How an export request ended: None while it runs, then the exporter's export_done
    (ok, files, error)."""
    name = "export_result"
    fields = ("request",)

    def run(self, arbiter, request):
        if request["request"] not in arbiter.export_requests:
            raise CommandError(f"unknown request {request['request']}")
        return arbiter.export_requests[request["request"]]

    def show(self, result) -> str:
        if result is None:
            return "export running"
        return "\n".join(result["files"] + [f"export {'done' if result['ok'] else 'incomplete'}"
                                             f": {len(result['files'])} files"
                                             + (f"; {result['error']}" if result["error"] else "")])


COMMANDS = {command.name: command for command in (Status(), Restart(), Export(), ExportResult())}


def answer(arbiter, request: dict) -> dict:
    """The daemon's side: run the request's command -> the reply's fields (ok, result|error)."""
    command = COMMANDS.get(request["type"])
    if command is None:
        return {"ok": False, "error": f"{request['type']} is not a control request"}
    try:
        return {"ok": True, "result": command.run(arbiter, request)}
    except CommandError as e:
        return {"ok": False, "error": str(e)}


def ask(runtime_dir: str, name: str, timeout: float = 3.0, **fields):
    """The client's side: one request -> its result.  Raises sockets.NotRunning when nobody
    answers, CommandError when the daemon refuses."""
    reply = sockets.request(runtime_dir, name, timeout=timeout, **fields)
    if not reply["ok"]:
        raise CommandError(reply["error"])
    return reply["result"]


# --- the status table ------------------------------------------------------------------------

COLUMNS = [  # header, width, how to show a child entry
    ("NAME", 16, lambda c: c["name"]),
    ("PID", 8, lambda c: c["pid"] or "-"),
    ("STATE", 10, lambda c: _state(c)),
    ("UPTIME", 8, lambda c: _duration(c["uptime_s"])),
    ("RESTARTS", 8, lambda c: c["restarts"]),
    ("MSGS/S " + "/".join(MESSAGE_TYPES), 20, lambda c: _rates(c["msgs_per_s"])),  # as _rates
    ("WRITTEN", 10, lambda c: _number(c["rows_written"])),
    ("HELD/SPOOL", 12, lambda c: f"{_number(c['buffered_rows'])}/{_number(c['spooled_rows'])}"),
    ("LAST MSG", 8, lambda c: _age(c["last_message_age_s"])),
    ("EXIT IP", 15, lambda c: c["exit_ip"] or "-"),
    ("RSS", 7, lambda c: _mib(c["rss_bytes"])),
    ("CPU%", 5, lambda c: "-" if c["cpu_percent"] is None else c["cpu_percent"]),
]


def _header(sup: dict) -> str:
    ch = sup["clickhouse"]
    clickhouse = (f"clickhouse {ch['host']}:{ch['port']} "
                  f"{'reachable' if ch['reachable'] else 'NOT REACHABLE'}"
                  f"{' (managed)' if ch['managed'] else ''}"
                  f"{' (' + ch['server'] + ')' if ch.get('server') else ''}")
    rotation = f", rotation {sup['rotation']['id']} {sup['rotation']['phase']}" \
        if sup.get("rotation") else ""
    export = sup.get("export") or {}
    last_export = sup.get("last_export") or "never"
    next_rotation = f" (next {export['next_rotation']})" if export.get("next_rotation") else ""
    failing = f", EXPORT FAILING: {export['last_error']}" if export.get("last_error") else ""
    dashboard = f"  dashboard {sup['dashboard']}" if sup.get("dashboard") else ""
    # the daemon runs the code it started with: after an upgrade, until it is restarted
    installed = (f" (installed {__version__}: restart to run it)"
                 if sup["version"] != __version__ else "")
    return (f"mexc {sup['version']}{installed}  supervisor pid {sup['pid']}  up {_duration(sup['uptime_s'])}"
            f"  {clickhouse}{dashboard}  last export: {last_export}{next_rotation}{rotation}"
            f"{failing}")


def _cluster(cluster: dict) -> str:
    """`cluster: host h1, zookeeper connected; h1: btc, sol  h2: btc, eth  h3: -`"""
    state = cluster["zookeeper"] + (", ASSIGNMENT FROZEN" if cluster["frozen"] else "")
    hosts = "  ".join(f"{h}: {', '.join(names) or '-'}" for h, names in cluster["hosts"].items())
    return (f"cluster: host {cluster['host']}, zookeeper {state}, {len(cluster['hosts'])} hosts "
            f"alive, {cluster['replicas']} copies wanted; live {hosts or '-'}\n"
            + _receive_lag(cluster.get("lag")))


def _receive_lag(lag) -> str:
    """`receive lag behind the earliest host (median of the last 60 s of trades): h1 0.000 s,
    h2 0.012 s` (--json has it per symbol)."""
    from cluster.lag import per_host  # a single host never loads cluster/
    if not lag:
        return "receive lag: not measured (yet: every 10 s while the dashboard or alerts run)"
    figures = ", ".join(f"{h} {s:.3f} s" for h, s in per_host(lag).items()) or "no trade " \
        "received by two hosts"
    away = "".join(f"; {h} unreachable" for h in sorted(lag.get("unreachable", {})))
    return (f"receive lag behind the earliest host (median of the last {lag['window_s']:.0f} s "
            f"of trades): {figures}{away}")


PROBLEM = "problem"  # the --state that selects every child with a problem


def _problem(child: dict) -> bool:
    """Worth an operator's look: not running, flapping, a collector not connected or
    silent for long, a tor warning."""
    return (child["state"] != ChildState.RUNNING or bool(child.get("flapping"))
            or (child["kind"] == COLLECTOR and (child.get("connected") is False
                                                or (child.get("last_message_age_s") or 0) >= 30))
            or bool((child.get("tor") or {}).get("warning")))


def _selected(child: dict, symbol: str, state: str) -> bool:
    if state and not (_problem(child) if state == PROBLEM else child["state"] == state):
        return False
    if not symbol:
        return True
    names = [child["name"], child.get("symbol") or "",
             child["name"].partition("-")[2]]  # collector-btc -> btc
    pattern = symbol if any(c in symbol for c in "*?[") else None
    return any(fnmatch.fnmatchcase(n.lower(), (pattern or symbol).lower()) for n in names if n)


def _summary(children) -> str:
    """`300 collectors: 296 connected, 2 waiting, 2 backoff; 4 with a problem; 812 rows/s`"""
    collectors = [c for c in children if c["kind"] == COLLECTOR]
    states = {}
    for c in collectors:
        states[c["state"]] = states.get(c["state"], 0) + 1
    connected = sum(1 for c in collectors if c.get("connected"))
    others = ", ".join(f"{n} {state}" for state, n in sorted(states.items())
                       if state != ChildState.RUNNING)
    problems = sum(1 for c in children if _problem(c))
    rate = sum(sum((c["msgs_per_s"] or {}).values()) for c in collectors)
    return (f"{len(collectors)} collectors: {connected} connected"
            + (f", {others}" if others else "")
            + f"; {len(children) - len(collectors)} other children; "
            + (f"{problems} with a problem (--state problem)" if problems else "no problem")
            + f"; {rate:,.0f} rows/s")


def _contracts(contracts: dict) -> str:
    """`contracts: 412 listed, 388 trading, 291 symbols followed (refresh ok); delisting X`"""
    state = ("ok" if contracts["ok"] else
             f"FAILING {contracts['failures']}x: {contracts['error']}" if contracts["failures"]
             else contracts["error"] or "not loaded yet")
    listed = ("no list" if contracts["contracts"] is None
              else f"{contracts['contracts']} listed, {contracts['trading']} trading")
    delisting = (f"; stopping once silent: {', '.join(contracts['delisting'])}"
                 if contracts["delisting"] else "")
    return (f"contracts: {listed}, {contracts['symbols']} symbols followed (list {state}, "
            f"via {contracts['via']}){delisting}")


def _notes(children) -> list:
    notes = []
    for child in children:
        if child["state"] == ChildState.BACKOFF:
            notes.append(f"  {child['name']}: {child['last_exit']}; next start in "
                         f"{child['next_start_in_s']}s")
        elif child.get("connected") is False and child["kind"] == COLLECTOR:
            notes.append(f"  {child['name']}: not connected to the exchange")
        if child.get("flapping"):
            notes.append(f"  {child['name']}: flapping (5 exits within a minute): restarts "
                         "wait supervisor.restart_max until it runs stably for a minute")
        if child.get("held"):
            notes.append(f"  {child['name']}: * holding rows for rotation {child['held']}")
        if (child.get("tor") or {}).get("warning") and child["kind"] == COLLECTOR:
            notes.append(f"  {child['name']}: * {child['tor']['warning']}")
    return notes


def _row(cells) -> str:
    return " ".join(str(cell).ljust(width)[:width] if i < len(COLUMNS) - 1 else str(cell)
                    for i, (cell, (_h, width, _f)) in enumerate(zip(cells, COLUMNS))).rstrip()


def _state(child: dict) -> str:
    tor = child.get("tor") or {}
    if child["kind"] == TOR and child["state"] == ChildState.RUNNING and not tor.get("bootstrapped"):
        return f"boot {tor.get('bootstrap_progress', 0)}%"
    return child["state"] + ("*" if child.get("held") or tor.get("warning") else "")


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds < 86400 else \
        f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _rates(rates: dict) -> str:
    if not rates:
        return "-"
    return "/".join(f"{rates.get(mt, 0):.0f}" for mt in MESSAGE_TYPES)


def _number(value) -> str:
    return "-" if value is None else f"{value:,}"


def _age(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 1048576:.0f}M"


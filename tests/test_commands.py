"""The control commands (supervisor/commands.py) without a daemon: their agreement with the bus
messages, answer()'s dispatch over a fake arbiter, and what each command shows."""
import json

import pytest

from bus import messages
from core import __version__
from supervisor import commands
from supervisor.commands import COMMANDS, CommandError, answer


# --- commands and bus messages agree ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_is_a_control_message_with_its_fields(name):
    command = COMMANDS[name]
    assert command.name == name
    assert name in messages.MESSAGES, f"{name} is not declared in bus/messages.py"
    assert messages.MESSAGES[name] == ("id",) + tuple(command.fields)
    assert (command.__doc__ or "").strip(), f"{name} has no manual (docstring)"
    request = messages.decode(messages.encode(name, id="1", **{f: "x" for f in command.fields}))
    assert request["type"] == name


def test_every_control_request_message_has_a_command():
    control = {kind for kind, fields in messages.MESSAGES.items() if fields[:1] == ("id",)}
    assert control - {"reply"} == set(COMMANDS)


def test_command_classes_are_all_registered():
    classes = {cls for cls in vars(commands).values()
               if isinstance(cls, type) and issubclass(cls, commands.Command)
               and cls is not commands.Command}
    assert classes == {type(c) for c in COMMANDS.values()}


# --- answer() --------------------------------------------------------------------------------

class FakeArbiter:
    def __init__(self):
        self.export_requests = {"export-1": None,
                                "export-2": {"ok": True, "files": ["a.parquet"], "error": ""}}
        self.restarted = []

    def status(self):
        return {"supervisor": {"pid": 1}, "children": []}

    def restart(self, name):
        if name != "collector-btc":
            raise CommandError(f"no child named {name!r}")
        self.restarted.append(name)
        return name

    def request_export(self):
        return "export-3"


def test_unknown_type_is_refused():
    reply = answer(FakeArbiter(), {"type": "heartbeat", "id": "1"})
    assert reply["ok"] is False and "heartbeat" in reply["error"]
    assert answer(FakeArbiter(), {"type": "reboot", "id": "1"})["ok"] is False


def test_status_answers_the_arbiter_status():
    assert answer(FakeArbiter(), {"type": "status", "id": "1"}) == {
        "ok": True, "result": {"supervisor": {"pid": 1}, "children": []}}


def test_restart_answers_the_name_or_the_error():
    arbiter = FakeArbiter()
    assert answer(arbiter, {"type": "restart", "id": "1", "name": "collector-btc"}) == {
        "ok": True, "result": {"name": "collector-btc"}}
    assert arbiter.restarted == ["collector-btc"]
    reply = answer(arbiter, {"type": "restart", "id": "2", "name": "collector-xyz"})
    assert reply == {"ok": False, "error": "no child named 'collector-xyz'"}


def test_export_and_export_result():
    arbiter = FakeArbiter()
    assert answer(arbiter, {"type": "export", "id": "1"}) == {"ok": True,
                                                              "result": {"request": "export-3"}}
    assert answer(arbiter, {"type": "export_result", "id": "2", "request": "export-1"}) == {
        "ok": True, "result": None}
    assert answer(arbiter, {"type": "export_result", "id": "3", "request": "export-2"})[
        "result"]["files"] == ["a.parquet"]
    reply = answer(arbiter, {"type": "export_result", "id": "4", "request": "export-9"})
    assert reply["ok"] is False and "unknown request export-9" in reply["error"]


def test_a_command_error_from_run_becomes_the_replys_error():
    class Refusing(FakeArbiter):
        def request_export(self):
            raise CommandError("the exporter is not running")

    assert answer(Refusing(), {"type": "export", "id": "1"}) == {
        "ok": False, "error": "the exporter is not running"}


def test_every_answer_is_a_valid_reply():
    arbiter = FakeArbiter()
    for request in ({"type": "status", "id": "1"}, {"type": "nope", "id": "2"},
                    {"type": "restart", "id": "3", "name": "x"}):
        fields = answer(arbiter, request)
        assert messages.decode(messages.encode("reply", id=request["id"], **fields))


# --- what the client shows -------------------------------------------------------------------

def test_restart_export_and_export_result_show():
    assert COMMANDS["restart"].show({"name": "tor-btc"}) == "restarting tor-btc"
    assert COMMANDS["export"].show({"request": "export-7"}) == "export requested: export-7"
    show = COMMANDS["export_result"].show
    assert show(None) == "export running"
    assert show({"ok": True, "files": ["x/1.parquet", "x/2.parquet"], "error": ""}) == \
        "x/1.parquet\nx/2.parquet\nexport done: 2 files"
    assert show({"ok": False, "files": [], "error": "disk full"}) == \
        "export incomplete: 0 files; disk full"


def test_the_default_show_is_json():
    class Plain(commands.Command):
        name = "plain"

    assert json.loads(Plain().show({"b": 1, "a": [2]})) == {"b": 1, "a": [2]}


def child(name, kind, **fields):
    entry = {"name": name, "kind": kind, "symbol": None, "pid": 100, "state": "running",
             "restarts": 0, "uptime_s": 65, "msgs_per_s": {}, "rows_written": None,
             "buffered_rows": 0, "spooled_rows": 0, "last_message_age_s": None,
             "exit_ip": None, "rss_bytes": 50 * 1048576, "cpu_percent": 1.5, "held": None,
             "connected": None, "last_exit": None, "next_start_in_s": None}
    entry.update(fields)
    return entry


def status(children, **supervisor):
    sup = {"pid": 42, "version": __version__, "uptime_s": 90061, "rotation": None,
           "last_export": "2024-01-01T10", "export": None,
           "clickhouse": {"host": "127.0.0.1", "port": 9000, "managed": False,
                          "reachable": True,
                          "server": "ClickHouse 26.9.2.1, time columns DateTime64(3, 'UTC'), "
                                    "export over ArrowStream"}}
    sup.update(supervisor)
    return {"supervisor": sup, "children": children}


def test_status_names_the_installed_version_while_the_daemon_runs_an_older_one():
    header = COMMANDS["status"].show(status([], version="0.0.9")).splitlines()[0]
    assert header.startswith(f"mexc 0.0.9 (installed {__version__}: restart to run it)  "
                             "supervisor pid 42")


def test_status_shows_the_cluster_under_its_header_and_says_when_it_is_frozen():
    cluster = {"host": "h1", "zookeeper": "connected", "frozen": False, "replicas": 2,
               "hosts": {"h1": ["btc", "sol"], "h2": ["btc"], "h3": []}}
    lines = COMMANDS["status"].show({**status([]), "cluster": cluster}).splitlines()
    assert lines[1] == ("cluster: host h1, zookeeper connected, 3 hosts alive, 2 copies "
                        "wanted; live h1: btc, sol  h2: btc  h3: -")
    frozen = dict(cluster, zookeeper="suspended", frozen=True)
    assert "zookeeper suspended, ASSIGNMENT FROZEN" in COMMANDS["status"].show(
        {**status([]), "cluster": frozen})
    assert "cluster" not in COMMANDS["status"].show(status([]))


def test_status_table_of_a_busy_daemon():
    text = COMMANDS["status"].show(status(
        [child("collector-btc", "collector", msgs_per_s={"t": 10.2, "d": 55, "dp": 99.6},
               rows_written=1234567, buffered_rows=1500, spooled_rows=0,
               last_message_age_s=0.04, exit_ip="10.0.0.7", held="r1"),
         child("tor-btc", "tor", tor={"bootstrapped": False, "bootstrap_progress": 45}),
         child("collector-eth", "collector", connected=False, uptime_s=3 * 3600 + 120,
               tor={"warning": "exit IP shared with collector-btc"}),
         child("exporter", "exporter", pid=None, rss_bytes=None, cpu_percent=None,
               uptime_s=None)],
        rotation={"id": "r1", "phase": "holding"},
        export={"next_rotation": "11:00", "last_error": "disk full"}))
    header, summary, columns, *rows = text.splitlines()
    assert summary == ("2 collectors: 0 connected; 2 other children; 1 with a problem "
                       "(--state problem); 165 rows/s")
    assert header.startswith(f"mexc {__version__}  supervisor pid 42  up 1d01h")
    assert "clickhouse 127.0.0.1:9000 reachable (ClickHouse 26.9.2.1, time columns " \
           "DateTime64(3, 'UTC'), export over ArrowStream)" in header and "(managed)" not in header
    assert "last export: 2024-01-01T10 (next 11:00), rotation r1 holding" in header
    assert header.endswith("EXPORT FAILING: disk full")
    assert columns.split()[:3] == ["NAME", "PID", "STATE"] and columns.endswith("CPU%")
    eth, btc, tor, exporter = rows[:4]  # a problem first
    assert btc.split()[:5] == ["collector-btc", "100", "running*", "1m05s", "0"]
    assert "10/55/100/0" in btc and "1,234,567" in btc and "1,500/0" in btc
    assert "0.0s" in btc and "10.0.0.7" in btc and "50M" in btc and btc.endswith("1.5")
    assert tor.split()[2:4] == ["boot", "45%"]
    assert eth.split()[2:4] == ["running*", "3h02m"]
    assert exporter.split()[:4] == ["exporter", "-", "running", "-"]
    assert exporter.endswith("-")
    assert rows[4:] == ["  collector-eth: not connected to the exchange",
                        "  collector-eth: * exit IP shared with collector-btc",
                        "  collector-btc: * holding rows for rotation r1"]


def test_status_of_many_symbols_filters_by_symbol_and_state_and_says_what_it_shows():
    children = [child(f"collector-s{i:03d}", "collector", symbol=f"S{i:03d}_USDT", connected=True)
                for i in range(1, 301)]
    children[150] = child("collector-s151", "collector", symbol="S151_USDT", pid=None,
                          state="waiting", connected=False)
    result = {**status(children + [child("exporter", "exporter")]),
              "contracts": {"ok": False, "failures": 2, "error": "HTTP 429", "contracts": 412,
                            "trading": 388, "symbols": 300, "via": "direct",
                            "delisting": ["S007_USDT"]}}
    lines = COMMANDS["status"].show(result).splitlines()
    assert lines[1] == ("contracts: 412 listed, 388 trading, 300 symbols followed (list "
                        "FAILING 2x: HTTP 429, via direct); stopping once silent: S007_USDT")
    assert lines[2].startswith("300 collectors: 299 connected, 1 waiting; 1 other children; "
                               "1 with a problem")
    assert lines[4].startswith("collector-s151 ")  # the problem first
    problems = COMMANDS["status"].show(result, state="problem").splitlines()
    assert problems[3] == "showing 1 of 301 children"
    assert problems[5:] == [problems[5], "  collector-s151: not connected to the exchange"]
    assert problems[5].split()[:3] == ["collector-s151", "-", "waiting"]
    for symbol in ("S042_USDT", "s042", "collector-s042", "S04[2]_*"):
        shown = COMMANDS["status"].show(result, symbol=symbol).splitlines()
        assert [line.split()[0] for line in shown[5:]] == ["collector-s042"], symbol
    assert len(COMMANDS["status"].show(result, symbol="s0*").splitlines()) == 5 + 99


def test_status_table_columns_line_up():
    text = COMMANDS["status"].show(status([child("collector-a-very-long-name-indeed", "collector"),
                                           child("exporter", "exporter")]))
    _header, _summary, columns, a, b = text.splitlines()
    assert a.startswith("collector-a-very") and a[16] == " "  # cut to the column's width
    for line in (a, b):
        assert line.index("100") == columns.index("PID")


def test_status_table_of_a_backoff_child_and_a_managed_clickhouse():
    text = COMMANDS["status"].show(status(
        [child("collector-btc", "collector", pid=None, state="backoff", restarts=5,
               last_exit="pid 7 exit code 1", next_start_in_s=42.0, flapping=True)],
        clickhouse={"host": "h", "port": 1, "managed": True, "reachable": False},
        last_export=None, dashboard="http://127.0.0.1:8470/"))
    assert "clickhouse h:1 NOT REACHABLE (managed)  dashboard http://127.0.0.1:8470/  " in text
    assert "collector-btc: flapping (5 exits within a minute)" in text
    assert "last export: never" in text
    assert "collector-btc: pid 7 exit code 1; next start in 42.0s" in text


@pytest.mark.parametrize("seconds, shown", [(None, "-"), (0, "0m00s"), (59.9, "0m59s"),
                                             (3599, "59m59s"), (3600, "1h00m"),
                                             (86399, "23h59m"), (86400, "1d00h"),
                                             (10 * 86400 + 7200, "10d02h")])
def test_durations(seconds, shown):
    header = COMMANDS["status"].show(status([], uptime_s=seconds)).splitlines()[0]
    assert f"  up {shown}  " in header

"""Alerts from a real `mexc run` to real receivers: a program writing what it gets on stdin to
a file ([alerts] command) and a local HTTP server ([alerts] webhook)."""
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mexc.simulator import MexcSimulator
from tests.conftest import wait_for
from tests.test_supervisor import Daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.one_clickhouse]  # the supervisor's parts, not SQL


@pytest.fixture
def sim():
    with MexcSimulator(rate=40.0) as simulator:
        yield simulator


class Receivers:
    """The command (a shell script appending stdin to a file) and the webhook (a local HTTP
    server keeping every body POSTed)."""

    def __init__(self, tmp):
        self.file = tmp / "alerts.jsonl"
        self.command = tmp / "alert-command"
        self.command.write_text(f"#!/bin/sh\ncat >> '{self.file}'\necho >> '{self.file}'\n")
        os.chmod(self.command, 0o755)
        self.posted = []
        posted = self.posted

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def config(self) -> dict:
        return {"command": str(self.command),
                "webhook": f"http://127.0.0.1:{self.server.server_address[1]}/hook"}

    def by_command(self) -> list:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line]

    def both(self) -> list:
        """The notifications, once the command and the webhook got the same ones."""
        command, webhook = self.by_command(), list(self.posted)
        key = lambda n: (n["alert"], n["state"], n.get("symbol"), n.get("child"))  # noqa: E731
        return sorted(command, key=key) if sorted(map(key, command)) == sorted(
            map(key, webhook)) else None

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receivers(tmp_path):
    r = Receivers(tmp_path)
    yield r
    r.close()


def seen(receivers, alert, state, **subject):
    both = receivers.both() or []
    return [n for n in both if n["alert"] == alert and n["state"] == state
            and all(n.get(k) == v for k, v in subject.items())]


def test_a_stall_fires_symbol_silent_and_its_end_resolves_it(env, sim, receivers):
    daemon = Daemon(env, sim, alerts=receivers.config(),
                    exchange={"silent_alarm": 2.0, "dead_after": 60.0})
    daemon.wait_flowing(["collector-btc", "collector-eth"])
    # a clean start fires nothing: several samples (2 s apart) past the silent alarm
    wait_for(lambda: daemon.status()["supervisor"]["uptime_s"] > 8, 30, "8 s of running")
    assert receivers.by_command() == [] and receivers.posted == []
    sim.stall(8.0)
    for symbol in ("BTC_USDT", "ETH_USDT"):
        wait_for(lambda: seen(receivers, "symbol_silent", "firing", symbol=symbol), 20,
                 f"symbol_silent firing for {symbol}")
        wait_for(lambda: seen(receivers, "symbol_silent", "resolved", symbol=symbol), 30,
                 f"symbol_silent resolved for {symbol}")
    firing = seen(receivers, "symbol_silent", "firing", symbol="BTC_USDT")[0]
    assert set(firing) == {"alert", "state", "symbol", "since_ms", "summary"}
    assert "no data" in firing["summary"]
    assert daemon.proc.stop(20) == 0
    # a clean stop fires nothing: only the stall's firing and resolved, once each
    assert sorted((n["alert"], n["state"], n["symbol"]) for n in receivers.both()) == sorted(
        ("symbol_silent", state, symbol) for symbol in ("BTC_USDT", "ETH_USDT")
        for state in ("firing", "resolved"))
    assert "ERROR" not in daemon.proc.log()


def test_a_flapping_collector_fires_collector_flapping(env, sim, receivers):
    daemon = Daemon(env, sim, alerts=receivers.config(),
                    supervisor={"restart_min": 0.1, "restart_max": 1.0})
    daemon.wait_flowing(["collector-btc"])
    for _ in range(5):  # five exits within a minute: flapping
        pid = wait_for(lambda: daemon.collectors()["collector-btc"]["pid"], 20,
                       "collector-btc running")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: daemon.collectors()["collector-btc"]["pid"] != pid, 20,
                 "collector-btc noticed dead")
    wait_for(lambda: seen(receivers, "collector_flapping", "firing", child="collector-btc"), 20,
             "collector_flapping firing for collector-btc")
    assert daemon.proc.stop(20) == 0
    assert {n["alert"] for n in receivers.both()} == {"collector_flapping"}


def test_a_receiver_that_fails_is_logged_and_blocks_nothing(env, sim, tmp_path):
    failing = tmp_path / "failing-command"
    failing.write_text("#!/bin/sh\necho 'pager service down' >&2\nexit 3\n")
    os.chmod(failing, 0o755)
    daemon = Daemon(env, sim, alerts={"command": str(failing), "webhook": "http://127.0.0.1:9/"},
                    exchange={"silent_alarm": 2.0, "dead_after": 60.0})
    daemon.wait_flowing(["collector-btc"])
    sim.stall(5.0)
    wait_for(lambda: "pager service down" in daemon.proc.log(), 30, "the command's failure")
    wait_for(lambda: "alert webhook failed" in daemon.proc.log(), 30, "the webhook's failure")
    daemon.wait_flowing(["collector-btc", "collector-eth"])  # the loop kept answering
    assert daemon.proc.stop(20) == 0

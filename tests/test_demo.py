"""`mexc demo`, the README's quick-start command, as a user runs it: the whole pipeline
against a local simulator, no config, no network; it stops by itself with --duration, and on
Ctrl-C, SIGTERM or its terminal closing it stops everything it started and says what it
stored where.  Killed, it leaves nothing behind either."""
import re
import shutil
import signal
import subprocess

import psutil
import pytest

from bus.sockets import NotRunning
from supervisor.commands import ask
from tests.conftest import MEXC, Terminal, kill_left, wait_for, wait_gone

pytestmark = pytest.mark.slow
# The demo's processes: its daemon (`python -m mexc.cli run`) and what the daemon starts.
DEMO_PROCESSES = ["clickhouse-server", "mexc-collector[", "mexc-collector[", "mexc-collector[",
                  "mexc-exporter", "mexc-forkserver", "python"]
STOPPED_WITHIN = 30  # the daemon stops its children in order in 15 s at most


def stored(out: str) -> dict:
    """The rows per table of the demo's last words."""
    return dict((table, int(n.replace(",", ""))) for table, n in
                re.findall(r"(\w+_current) ([\d,]+)", out.split("Rows stored:")[1]))


def directory(out: str) -> str:
    return re.search(r"daemon log (/\S+)/mexc\.log", out).group(1)


@pytest.mark.timeout(180)
def test_demo_stores_rows_for_every_symbol_and_stops_cleanly():
    result = subprocess.run([MEXC, "demo", "--duration", "12"], capture_output=True, text=True,
                            timeout=170)
    out = result.stdout
    try:
        assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
        assert "collector-btc" in out and "running" in out  # the status table was shown
        assert out.count("\033[H\033[J") >= 2  # redrawn in place, not scrolled
        assert re.search(r"dashboard http://127\.0\.0\.1:\d+/", out)
        rows = stored(out)
        assert set(rows) == {"btc_current", "eth_current", "sol_current"}
        assert all(n > 100 for n in rows.values()), rows
        assert "daemon exit code 0" in out and "Traceback" not in out + result.stderr
    finally:
        if "daemon log" in out:
            shutil.rmtree(directory(out), ignore_errors=True)


def demo_running(terminal: Terminal) -> list:
    """Wait until the demo's collectors have stored rows; its processes, itself first."""
    def flowing():
        out = terminal.read()
        if "daemon log" not in out:
            return False
        try:
            children = ask(directory(out) + "/run", "status", timeout=2.0)["children"]
        except NotRunning:
            return False
        return sum(1 for c in children if c["kind"] == "collector" and c["rows_written"]) == 3
    wait_for(flowing, 60, "rows from the demo's three collectors")
    processes = psutil.Process(terminal.pid).children(recursive=True)
    assert sorted(p.name() for p in processes) == sorted(DEMO_PROCESSES)
    return [terminal.pid] + [p.pid for p in processes]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["ctrl-c", "SIGTERM", "terminal-closed", "SIGKILL"])
def test_demo_leaves_no_process_behind(how):
    """Each way a demo ends stops every process it started (checked by pid, zombies waiting
    for init to reap them count as gone); all but SIGKILL end with what was stored where, on
    the terminal, and at the end of the demo's log, where it survives a closed terminal."""
    terminal = Terminal([MEXC, "demo", "--rate", "5"])
    tree = []
    try:
        tree = demo_running(terminal)
        if how == "ctrl-c":
            terminal.type(Terminal.CTRL_C)
        elif how == "terminal-closed":
            terminal.hang_up()
        else:
            terminal.popen.send_signal(getattr(signal, how))
        code = terminal.wait(STOPPED_WITHIN)
        wait_gone(tree, STOPPED_WITHIN, f"the demo ({how})")
        out = terminal.read()
        with open(directory(out) + "/mexc.log", errors="replace") as f:
            log = f.read()
        assert "supervisor stopped" in log  # the daemon stopped its children in order
        if how == "SIGKILL":
            assert code == -signal.SIGKILL
            return
        assert code == 0, out[-3000:]
        last_words = log[log.index("mexc demo: stopped"):]
        assert "daemon exit code 0" in last_words and f"{directory(out)}/export" in last_words
        assert set(stored(last_words)) == {"btc_current", "eth_current", "sol_current"}
        assert all(stored(last_words).values()), last_words
        if how != "terminal-closed":
            assert last_words.replace("\n", "\r\n") in out
        assert "Traceback" not in out + log
    finally:
        terminal.close()
        kill_left(tree)
        if "daemon log" in terminal.read():
            shutil.rmtree(directory(terminal.read()), ignore_errors=True)

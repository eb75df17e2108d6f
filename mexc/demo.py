"""`mexc demo`: the whole pipeline on this machine with no network at all.

A local MEXC simulator, a managed ClickHouse in a temporary directory, and the real daemon
(`mexc run`) with three collectors and the exporter; the status table redrawn in place every
few seconds (`mexc status --watch`) and the dashboard's URL.  Event time runs 60 times faster
than the wall clock (an hour a minute), so hourly Parquet files appear within a minute or two.

Ctrl-C, SIGTERM and SIGHUP (its terminal closed) all stop the daemon in order and end with what
was stored where, on the terminal and at the end of the demo's log.  The daemon dies with the
demo even when the demo is SIGKILLed (PR_SET_PDEATHSIG: it gets SIGTERM and stops in order), as
the daemon's own children die with it.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

from core import log as logging_setup
from core.clock import EventClock
from core.process import dies_with_this_process, free_port, ignore_stop_signals, stop_like_ctrl_c
from core.store import Store, current_table
from mexc.simulator import MexcSimulator
from mexc.watch import watch

CLOCK_SPEED = 60.0  # an event hour per wall minute
STOP_WAIT = 30.0  # the daemon stops in 15 s; one that takes longer is killed (its children too)
SYMBOLS = ["BTC_USDT", "ETH_USDT", "SOL_USDT"]
CONFIG = """\
symbols = {symbols}

[exchange]
url = "{url}"

[clickhouse]
port = {port}
managed = true

[tor]
enabled = false

[export]
dir = "{dir}/export"
clock_speed = {speed}
clock_anchor_ms = {anchor}

[paths]
state_dir = "{dir}/state"
runtime_dir = "{dir}/run"

[http]
listen = "127.0.0.1:{http_port}"
"""


def run(refresh: float = 3.0, rate: float = 20.0, duration: float = 0.0) -> int:
    """Run until Ctrl-C, SIGTERM or SIGHUP (or `duration` seconds when > 0); 0 when it worked."""
    stop_like_ctrl_c()
    logging_setup.setup("demo", "warning")  # no clickhouse-driver traceback when it is gone
    directory = tempfile.mkdtemp(prefix="mexc-demo-")
    anchor = int(time.time() * 1000)
    clock = EventClock(CLOCK_SPEED, anchor)
    simulator = MexcSimulator(rate=rate, event_clock=clock.now_ms).start()
    port, http_port = free_port(), free_port()
    config_path = os.path.join(directory, "mexc.toml")
    with open(config_path, "w") as f:
        f.write(CONFIG.format(symbols=SYMBOLS, url=simulator.url, port=port, dir=directory,
                              speed=CLOCK_SPEED, anchor=anchor, http_port=http_port)
                .replace("'", '"'))
    log_path = os.path.join(directory, "mexc.log")
    print(f"mexc demo: simulator at {simulator.url}; daemon log {log_path}")
    daemon = _start_daemon(config_path, log_path)
    started = time.monotonic()
    dashboard = f"http://127.0.0.1:{http_port}/"
    print(f"mexc demo: dashboard {dashboard} (open it in a browser)")
    try:
        watch(os.path.join(directory, "run"), refresh,
              title=f"mexc demo: dashboard {dashboard}  log {log_path}\n",
              keep_going=lambda: daemon.poll() is None and (
                  duration <= 0 or time.monotonic() - started < duration))
    except KeyboardInterrupt:
        pass
    finally:
        ignore_stop_signals()  # a second Ctrl-C must not cut the stop short
        _say(["", "mexc demo: stopping the daemon (collectors, exporter, ClickHouse; "
                  "15 s at most)"])
        counts = _counts(port)
        code = _stop(daemon)
        simulator.stop()
    stored = ", ".join(f"{table} {n:,}" for table, n in counts) or "ClickHouse not reachable"
    exports = sorted(os.listdir(os.path.join(directory, "export"))) \
        if os.path.isdir(os.path.join(directory, "export")) else []
    _say([f"mexc demo: stopped (daemon exit code {code}). Rows stored: {stored}",
          f"  {len(exports)} hourly Parquet files in {directory}/export"
          + (f", e.g. {exports[-1]}" if exports else " (the first appears after a minute)"),
          f"  everything is in {directory}: config mexc.toml, log mexc.log, ClickHouse data "
          f"in state/clickhouse. To query it again:",
          f"    clickhouse-server --config-file={directory}/state/clickhouse/config.xml &",
          f"    clickhouse-client --port {port} -q 'SELECT mt, count() FROM mexc.btc_current "
          f"GROUP BY mt'"], log_path)
    return 0 if code == 0 and counts and all(n for _table, n in counts) else 1


def _start_daemon(config_path: str, log_path: str) -> subprocess.Popen:
    """`mexc run` in a session of its own (Ctrl-C and the terminal's SIGHUP reach only the
    demo, which stops it in order) that gets SIGTERM when the demo dies, even by SIGKILL."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([sys.executable, "-m", "mexc.cli", "run", "--config",
                                 config_path], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=dies_with_this_process())


def _stop(daemon: subprocess.Popen) -> int:
    """SIGTERM, then the daemon's exit code once it has stopped its children in order."""
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        daemon.kill()  # its collectors, exporter and ClickHouse die with it
        return daemon.wait()


def _say(lines: list, log_path: str = "") -> None:
    """Print `lines`, and append them to the log: after a SIGHUP there is no terminal left."""
    text = "\n".join(lines) + "\n"
    if log_path:
        with open(log_path, "a") as log_file:
            log_file.write(text)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:  # the terminal is gone (EIO)
        pass


def _counts(port: int):
    tables = [current_table(s.split("_")[0].lower()) for s in SYMBOLS]
    try:
        with Store({"host": "127.0.0.1", "port": port, "user": "default", "password": "",
                    "database": "mexc"}, timeout=2.0) as store:
            return [(table, store.count(table)) for table in tables]
    except Exception:
        return []

"""The simulator as several processes on one port (python -m mexc.simulator --processes K,
for the scaling bench): every connection of a symbol, whichever process accepted it, and its
REST requests meet the one market of that symbol."""
import json
import signal
import subprocess
import sys
import urllib.request

import pytest
import websocket

from tests.test_simulator import REPO, recv_json, subscribe

pytestmark = pytest.mark.timeout(60)
SYMBOLS = [f"S{i:03d}_USDT" for i in range(1, 9)]


def first_push(ws, channel: str) -> dict:
    """The first push of the channel (the ack and others skipped)."""
    while True:
        frame = recv_json(ws)
        if frame.get("channel") == f"push.{channel}":
            return frame


def test_every_connection_and_request_of_a_symbol_meets_its_one_market():
    proc = subprocess.Popen([sys.executable, "-m", "mexc.simulator", "--port", "0",
                             "--rate", "5", "--processes", "3"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LISTENING ws://127.0.0.1:")
        url, rest = line.split()[1], line.split()[3]
        for symbol in SYMBOLS:
            versions = []
            for _ in range(3):  # connections accepted by any of the processes
                ws = websocket.create_connection(url, skip_utf8_validation=True, timeout=5)
                subscribe(ws, "depth.full", symbol, limit=5)
                versions.append(first_push(ws, "depth.full")["data"]["version"])
                ws.close()
            assert versions == sorted(set(versions)), (symbol, versions)  # one book, rising
            ws = websocket.create_connection(url, skip_utf8_validation=True, timeout=5)
            subscribe(ws, "deal", symbol, compress=False)
            data = first_push(ws, "deal")["data"]
            seen = {int(t["t"]) for t in (data if isinstance(data, list) else [data])}
            ws.close()
            with urllib.request.urlopen(f"{rest}/api/v1/contract/deals/{symbol}?limit=100",
                                        timeout=5) as answer:
                listed = {t["t"] for t in json.loads(answer.read())["data"]}
            assert seen <= listed, symbol  # the REST answer comes from the same market
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    counts = json.loads(out.strip().splitlines()[-1])
    assert all(counts[s]["dp"] >= 3 and counts[s]["d"] >= 1 for s in SYMBOLS), counts

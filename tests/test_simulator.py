"""Self-tests of the MEXC simulator, with websocket-client as an independent client."""
import gzip
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time

import pytest
import websocket

from mexc.simulator import MexcSimulator

pytestmark = pytest.mark.timeout(30)

BTC, ETH = "BTC_USDT", "ETH_USDT"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKER_FIELDS = ("lastPrice", "fairPrice", "indexPrice", "holdVol", "fundingRate")


# --- helpers --------------------------------------------------------------------------------

def poll(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def connect(sim, **options):
    return websocket.create_connection(sim.url, skip_utf8_validation=True, timeout=5, **options)


def subscribe(ws, channel, symbol, action="sub", **param):
    ws.send(json.dumps({"method": f"{action}.{channel}", "param": {"symbol": symbol, **param}}))


def ping(ws):
    ws.send('{"method":"ping"}')


def recv_frame(ws):
    """(opcode, payload) of the next frame, control frames included."""
    opcode, frame = ws.recv_data_frame(control_frame=True)
    return opcode, frame.data


def recv_json(ws):
    opcode, payload = recv_frame(ws)
    assert opcode == websocket.ABNF.OPCODE_TEXT, opcode
    return exact_json(payload)


def recv_until_pong(ws):
    """Every text frame before the next pong; pong replies follow everything sent before them."""
    frames = []
    while True:
        opcode, payload = recv_frame(ws)
        if opcode == websocket.ABNF.OPCODE_TEXT and exact_json(payload).get("channel") == "pong":
            return frames
        frames.append((opcode, payload))


def recv_until_closed(ws, timeout=5.0):
    """Frames received until the server goes away; fails if it stays past the timeout."""
    deadline = time.monotonic() + timeout
    ws.settimeout(0.2)
    frames = []
    while time.monotonic() < deadline:
        try:
            frames.append(recv_frame(ws))
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return frames
    raise AssertionError("server did not close the connection")


def exact_json(payload):
    """Decode keeping every number's exact text, as the collector does."""
    return json.loads(payload, parse_float=str, parse_int=str)


def rows_of(frame):
    """The rows the collector stores for one data frame, derived from the format spec alone."""
    channel, data = frame.get("channel"), frame.get("data")
    if channel == "push.deal":
        trades = data if isinstance(data, list) else [data]
        return [(int(t["t"]), "d", f'{t["p"]}|{t["v"]}|{t["T"]}|{t["i"]}') for t in trades]
    if channel == "push.ticker":
        return [(int(data["timestamp"]), "t", "|".join(data[k] for k in TICKER_FIELDS))]
    if channel == "push.depth.full":
        def side(levels):
            return ",".join(f"[{price},{size}]" for price, size, *_ in levels[:20])
        return [(int(frame["ts"]), "dp", side(data["bids"]) + "|" + side(data["asks"]))]
    return []


def data_rows(sim, symbol):
    return [row for row in sim.expected_rows(symbol) if row[1] != "dl"]


@pytest.fixture
def sim():
    with MexcSimulator(rate=0) as simulator:
        yield simulator


# --- protocol -------------------------------------------------------------------------------

@pytest.mark.parametrize("channel", ["deal", "depth.full", "ticker"])
def test_sub_gets_ack_then_data(channel):
    with MexcSimulator(rate=100) as sim:
        ws = connect(sim)
        subscribe(ws, channel, BTC, limit=20)
        ack = recv_json(ws)
        assert ack["channel"] == f"rs.sub.{channel}" and ack["data"] == "success"
        frame = recv_json(ws)
        assert frame["channel"] == f"push.{channel}" and frame["symbol"] == BTC
        assert rows_of(frame)
        assert sim.subscriptions == [(BTC, channel)]
        ws.close()


def test_depth_limit_is_honoured_and_versions_rise():
    with MexcSimulator(rate=200) as sim:
        ws = connect(sim)
        subscribe(ws, "depth.full", BTC, limit=5)
        assert recv_json(ws)["channel"] == "rs.sub.depth.full"
        frames = [recv_json(ws) for _ in range(20)]
        assert sim.depth_limits == {BTC: 5}
        for frame in frames:
            assert len(frame["data"]["bids"]) == len(frame["data"]["asks"]) == 5
        versions = [int(frame["data"]["version"]) for frame in frames]
        assert versions == sorted(set(versions))
        ws.close()


def test_ping_gets_pong(sim):
    ws = connect(sim)
    ping(ws)
    pong = recv_json(ws)
    assert pong["channel"] == "pong" and int(pong["data"]) > 0 and int(pong["ts"]) > 0
    poll(lambda: sim.pings_received == 1, what="ping count")
    ws.ping(b"hi")  # a WebSocket-level ping gets a control pong
    assert recv_frame(ws) == (websocket.ABNF.OPCODE_PONG, b"hi")
    ws.close()


def test_unknown_method_gets_no_reply(sim):
    ws = connect(sim)
    ws.send('{"method":"sub.kline","param":{"symbol":"BTC_USDT"}}')
    ws.send('{"method":"nonsense"}')
    ping(ws)
    assert recv_until_pong(ws) == []
    ws.close()


def test_fragmented_request_is_assembled(sim):
    ws = connect(sim)
    request = json.dumps({"method": "sub.deal", "param": {"symbol": BTC}})
    ws.send_frame(websocket.ABNF.create_frame(request[:10], websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame(request[10:], websocket.ABNF.OPCODE_CONT, fin=1))
    assert recv_json(ws)["channel"] == "rs.sub.deal"
    ws.close()


def test_unknown_contract_gets_rs_error_and_no_data():
    with MexcSimulator(rate=500, known_symbols={BTC}) as sim:
        ws = connect(sim)
        subscribe(ws, "deal", "NOPE_USDT")
        error_text = recv_frame(ws)[1].decode()
        error = exact_json(error_text)
        assert error["channel"] == "rs.error"
        assert error["data"] == "Contract [NOPE_USDT] not exists"
        time.sleep(0.3)  # long enough for a 500/s stream to have shown up
        ping(ws)
        assert recv_until_pong(ws) == []
        assert sim.expected_rows("NOPE_USDT") == [(None, "dl", error_text)]
        ws.close()
    with MexcSimulator(rate=0) as sim:  # by default any BASE_USDT exists, nothing else
        ws = connect(sim)
        subscribe(ws, "deal", "btc-usd")
        assert recv_json(ws)["data"] == "Contract [btc-usd] not exists"
        ws.close()


@pytest.fixture
def tls_context(tmp_path):
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_tls(tls_context):
    with MexcSimulator(ssl_context=tls_context, rate=100) as sim:
        assert sim.url.startswith("wss://127.0.0.1:")
        ws = connect(sim, sslopt={"cert_reqs": ssl.CERT_NONE})
        subscribe(ws, "deal", BTC)
        assert recv_json(ws)["channel"] == "rs.sub.deal"
        assert recv_json(ws)["channel"] == "push.deal"
        ws.close()


# --- what was sent is what is expected --------------------------------------------------------

def test_expected_rows_match_what_the_client_received():
    # A frozen event clock forces the unique-ts bumping on every row.
    with MexcSimulator(rate=200, event_clock=lambda: 1_755_487_578_000) as sim:
        ws = connect(sim)
        for symbol in (BTC, ETH):
            for channel in ("deal", "depth.full", "ticker"):
                subscribe(ws, channel, symbol, limit=20)
        received = {BTC: [], ETH: []}
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            frame = recv_json(ws)
            if frame["channel"].startswith("push."):
                received[frame["symbol"]] += rows_of(frame)
        for symbol in (BTC, ETH):
            for channel in ("deal", "depth.full", "ticker"):
                subscribe(ws, channel, symbol, action="unsub")
        ping(ws)  # the pong comes after every frame sent before the unsubscriptions took hold
        for _, payload in recv_until_pong(ws):
            frame = exact_json(payload)
            if frame["channel"].startswith("push."):
                received[frame["symbol"]] += rows_of(frame)

        for symbol, rows in received.items():
            assert rows == data_rows(sim, symbol)
            timestamps = [ts for ts, _, _ in rows]
            assert len(set(timestamps)) == len(timestamps), "ts not unique per symbol"
            assert {mt for _, mt, _ in rows} == {"d", "dp", "t"}
        counts = sim.sent_counts(BTC)
        assert counts["d"] > counts["dp"] > counts["t"]
        everything = " ".join(m for _, _, m in sim.expected_rows())
        assert "E+" in everything and "00|" in everything  # exponent and trailing-zero spellings

        ws.settimeout(0.3)  # unsub really stopped the streams
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv()
        ws.close()


def test_send_frames_and_burst_are_recorded_exactly(sim):
    ws = connect(sim)
    # only to a connection subscribed to the symbol: another's would store them as dead letters
    assert sim.send_frames(BTC, 10) == 0 and sim.burst(10, BTC) == 0
    subscribe(ws, "deal", BTC)
    assert recv_json(ws)["channel"] == "rs.sub.deal"
    assert sim.send_frames(BTC, 1500) == 1500
    assert sim.burst(700, BTC) == 700
    rows = []
    for _ in range(2200):
        rows += rows_of(recv_json(ws))
    assert rows == data_rows(sim, BTC)
    ws.close()


def test_gzip_deal_decodes_to_a_deal(sim):
    ws = connect(sim)
    subscribe(ws, "deal", BTC)
    assert recv_json(ws)["channel"] == "rs.sub.deal"
    assert sim.send_gzip_deal(BTC)
    opcode, payload = recv_frame(ws)
    assert opcode == websocket.ABNF.OPCODE_BINARY
    frame = exact_json(gzip.decompress(payload))
    assert frame["channel"] == "push.deal"
    assert rows_of(frame) == sim.expected_rows(BTC)
    ws.close()


def test_dead_letters_are_recorded_as_sent(sim):
    ws = connect(sim)
    subscribe(ws, "deal", BTC)
    assert recv_json(ws)["channel"] == "rs.sub.deal"
    assert sim.send_junk(BTC)
    assert sim.send_unknown_channel(BTC)
    assert sim.send_wrong_types(BTC) and sim.send_wrong_types(BTC)
    assert sim.send_huge(BTC, 3_000_000)
    assert sim.send_rs_error("boom")
    assert sim.send_bad_binary(BTC)
    frames = [recv_frame(ws) for _ in range(7)]
    texts = [payload.decode() for opcode, payload in frames if opcode == websocket.ABNF.OPCODE_TEXT]
    assert texts[0].startswith("not json")
    assert 2_900_000 < len(texts[4]) <= 3_000_000
    assert json.loads(texts[5]) == {"channel": "rs.error", "data": "boom",
                                    "ts": json.loads(texts[5])["ts"]}
    for text in texts[1:]:
        json.loads(text)  # all valid JSON except the junk
    assert frames[6][0] == websocket.ABNF.OPCODE_BINARY
    expected = [(None, "dl", text[:500]) for text in texts] + [(None, "dl", None)]
    assert sim.expected_rows(BTC) == expected
    assert sim.sent_counts(BTC) == {"dl": 7}
    ws.close()


def test_nothing_is_recorded_without_a_client(sim):
    assert not sim.send_junk(BTC)
    assert sim.send_frames(BTC, 10) == 0
    assert sim.expected_rows() == [] and sim.sent_counts() == {}


# --- faults and lifecycle -------------------------------------------------------------------

def test_idle_connection_is_closed_after_rs_error():
    with MexcSimulator(rate=50, idle_timeout=1.0) as sim:
        ws = connect(sim)
        subscribe(ws, "deal", BTC)
        frames = recv_until_closed(ws, timeout=5.0)
        texts = [exact_json(p) for op, p in frames if op == websocket.ABNF.OPCODE_TEXT]
        assert texts[-1]["channel"] == "rs.error"
        assert texts[-1]["data"] == "more than 60 seconds no response, close the channel"
        poll(lambda: sim.connections == 0, what="connection to be dropped")


@pytest.mark.slow
def test_pings_keep_a_connection_open():
    with MexcSimulator(rate=0, idle_timeout=1.0) as sim:
        ws = connect(sim)
        for _ in range(8):  # 2 s, twice the idle timeout
            ping(ws)
            assert recv_json(ws)["channel"] == "pong"
            time.sleep(0.25)
        assert sim.connections == 1 and sim.pings_received == 8
        ws.close()


def test_force_disconnect_drops_without_close_frame_and_allows_reconnect():
    with MexcSimulator(rate=200) as sim:
        ws = connect(sim)
        subscribe(ws, "deal", BTC)
        recv_json(ws)
        assert sim.peer_addresses[0][0] == "127.0.0.1"
        sim.force_disconnect()
        frames = recv_until_closed(ws)
        assert websocket.ABNF.OPCODE_CLOSE not in [opcode for opcode, _ in frames]
        poll(lambda: sim.connections == 0, what="connection to be dropped")
        ws = connect(sim)
        subscribe(ws, "deal", BTC)
        assert recv_json(ws)["channel"] == "rs.sub.deal"
        assert sim.total_connections == 2 and sim.connections == 1
        ws.close()


def test_stall_holds_replies_back(sim):
    ws = connect(sim)
    sim.stall(0.6)
    started = time.monotonic()
    ping(ws)
    assert recv_json(ws)["channel"] == "pong"
    assert time.monotonic() - started > 0.5
    ws.close()


def test_stop_is_prompt_with_clients_connected():
    sim = MexcSimulator(rate=100).start()
    clients = [connect(sim) for _ in range(3)]
    for ws in clients:
        subscribe(ws, "deal", BTC)
    poll(lambda: sim.expected_rows(BTC), what="data")
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 2.0
    assert sim.connections == 0
    for ws in clients:
        ws.close()


def test_cli_reports_counts_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "mexc.simulator", "--port", "0",
                             "--rate", "1000"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LISTENING ws://127.0.0.1:")
        assert line.split()[2:] == ["REST", line.split()[1].replace("ws://", "http://")[:-5]]
        ws = websocket.create_connection(line.split()[1], skip_utf8_validation=True, timeout=5)
        subscribe(ws, "deal", BTC)
        deals = sum(len(rows_of(recv_json(ws))) for _ in range(20))  # the ack counts as no rows
        ws.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])[BTC]["d"] >= deals > 0

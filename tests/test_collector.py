"""The collector as a user runs it (`mexc collect`), against the MEXC simulator and a real
ClickHouse: every row the simulator sent is stored exactly once, whatever goes wrong."""
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import ssl
import time

import pytest

from collector.spool import Spool
from core.process import free_port
from tests.conftest import wait_for
from mexc.simulator import MexcSimulator

pytestmark = pytest.mark.timeout(180)
OUTAGE_SECONDS = 30


def stored(env, table="btc_current"):
    return collections.Counter(env.rows(table))


def assert_stored_exactly_once(env, sim, symbol="BTC_USDT", table="btc_current"):
    """Stop the simulator's data, wait until the table holds every row sent, compare them."""
    sim.stop_data()
    expected = sim.expected_rows(symbol)
    wait_for(lambda: env.count(table) >= len(expected), 30,
             f"{len(expected)} rows in {table} (have {env.count(table)})")
    expected_data = collections.Counter((ts, mt, m) for ts, mt, m in expected if mt != "dl")
    wait_for(lambda: backfill_settled(env, expected_data, table), 30,
             "the ledger's backfilled count to match the rows no frame carried")
    rows = stored(env, table)
    duplicates = {row: n for row, n in rows.items() if n > 1}
    assert not duplicates, f"duplicated rows: {list(duplicates.items())[:5]}"
    data_rows = collections.Counter(r for r in rows if r[1] != "dl")
    backfilled = data_rows - expected_data  # trades made while no subscription was live
    in_gaps = {trade.rest_row for gap in ledger(env) for trade in
               sim.trades(symbol, gap.start_ms, gap.end_ms)
               if trade.row not in expected_data}
    assert set(backfilled) <= in_gaps, "a stored trade that was neither sent nor in a gap"
    assert data_rows - backfilled == expected_data
    dead = sorted(m for _ts, mt, m in rows if mt == "dl")
    expected_dead = [m for _ts, mt, m in expected if mt == "dl"]
    assert len(dead) == len(expected_dead)
    for m in expected_dead:
        if m is not None:
            assert m in dead
    return expected


def ledger(env):
    with env.store() as session:
        return session.gaps() if session.exists("gaps") else []


def backfill_settled(env, expected_data, table):
    """Every gap recorded, and the rows beyond those sent are exactly what the ledger says
    backfill stored."""
    extra = collections.Counter(r for r in stored(env, table) if r[1] != "dl") - expected_data
    return sum(gap.backfilled for gap in ledger(env)) == sum(extra.values())


def start_collector(env, sim, symbol="BTC_USDT", **sections):
    config = env.write_config(sim.url, symbols=[symbol], **sections)
    proc = env.mexc("collect", "--config", config, "--symbol", symbol, name="collector")
    wait_for(lambda: "confirmed" in proc.log(), 20, "a confirmed subscription")
    return proc


@pytest.fixture
def sim():
    with MexcSimulator(rate=150.0) as simulator:
        yield simulator


def test_every_row_and_dead_letter_stored_once(env, sim):
    proc = start_collector(env, sim)
    wait_for(lambda: len(sim.expected_rows("BTC_USDT")) >= 300, 30, "300 rows sent")
    sim.send_junk("BTC_USDT")
    sim.send_unknown_channel("BTC_USDT")
    sim.send_gzip_deal("BTC_USDT")
    sim.send_bad_binary("BTC_USDT")
    sim.send_wrong_types("BTC_USDT")
    sim.send_huge("BTC_USDT", 3_000_000)
    sim.send_rs_error("Contract [NOPE_USDT] not exists")
    expected = assert_stored_exactly_once(env, sim)
    counts = collections.Counter(mt for _ts, mt, _m in expected)
    assert counts["t"] > 0 and counts["d"] > 0 and counts["dp"] > 0 and counts["dl"] == 6
    assert proc.stop() == 0
    log = proc.log()
    for channel in ("ticker", "deal", "depth.full"):
        assert f"subscribed channel={channel} confirmed" in log
    assert "collector[btc]" in log and "dead letter stored" in log
    assert "Traceback" not in log
    # every trade, unmerged: MEXC merges deals unless sub.deal says compress false
    assert ("BTC_USDT", "deal", {"symbol": "BTC_USDT", "compress": False}) in sim.subscription_params


@pytest.mark.slow  # the quick loop reconnects in test_gaps' forced disconnect
@pytest.mark.one_clickhouse
def test_reconnects_after_forced_disconnect(env, sim):
    proc = start_collector(env, sim)
    wait_for(lambda: env.count() > 50, 20, "rows flowing")
    sim.force_disconnect()
    wait_for(lambda: sim.total_connections >= 2 and sim.connections == 1, 20, "a reconnect")
    before = env.count()
    wait_for(lambda: env.count() > before + 50, 20, "rows flowing after the reconnect")
    assert_stored_exactly_once(env, sim)
    assert "reconnecting in" in proc.log()
    assert proc.stop() == 0


@pytest.mark.one_clickhouse
def test_sighup_stores_every_row_held_and_exits_0(env, sim):
    """`mexc collect` whose terminal closes stops as on SIGTERM.  Nothing is due for a minute,
    so every row is still in memory when SIGHUP comes: all must be stored before it exits."""
    proc = start_collector(env, sim, collector={"latency_target": 60.0, "batch_rows": 100_000})
    wait_for(lambda: len(sim.expected_rows("BTC_USDT")) >= 200, 20, "200 rows sent")
    assert env.count() == 0
    proc.signal(signal.SIGHUP)
    assert proc.wait(30) == 0, proc.log()[-3000:]
    written = int(re.search(r"stopped rows_written=(\d+) spooled=0", proc.log()).group(1))
    assert written >= 200 and env.count() == written


@pytest.mark.one_clickhouse
@pytest.mark.slow
def test_pings_keep_an_idle_connection_open(env):
    with MexcSimulator(rate=0, idle_timeout=1.5) as sim:
        proc = start_collector_without_confirmation(env, sim, exchange={"ping_interval": 0.4,
                                                                        "dead_after": 5.0})
        wait_for(lambda: sim.pings_received >= 8, 20, "eight pings")
        assert sim.total_connections == 1, "the idle connection was dropped despite pings"
        assert proc.stop() == 0


@pytest.mark.one_clickhouse
@pytest.mark.slow
def test_stalled_socket_is_declared_dead_and_replaced(env, sim):
    proc = start_collector(env, sim, exchange={"ping_interval": 0.5, "dead_after": 2.0})
    sim.stall(4.0)
    wait_for(lambda: "no frame or pong for" in proc.log(), 20, "dead-socket detection")
    wait_for(lambda: sim.total_connections >= 2, 20, "a new connection")
    assert_stored_exactly_once(env, sim)
    assert proc.stop() == 0


@pytest.mark.slow  # waits out the silent-channel alarm: the quick loop stays under a minute (issue 27)
@pytest.mark.one_clickhouse
def test_silent_channel_alarm_and_rs_error_for_unknown_contract(env):
    with MexcSimulator(rate=50, known_symbols={"BTC_USDT"}) as sim:
        config = env.write_config(sim.url, symbols=["NOPE_USDT"], exchange={"silent_alarm": 1.0})
        proc = env.mexc("collect", "--config", config, "--symbol", "NOPE_USDT")
        wait_for(lambda: "no data since subscribing" in proc.log(), 20, "a silence alarm")
        wait_for(lambda: env.count("nope_current") >= 3, 20, "three rs.error dead letters")
        assert {mt for _ts, mt, _m in env.rows("nope_current")} == {"dl"}
        assert "Contract [NOPE_USDT] not exists" in proc.log()
        assert proc.stop() == 0


def start_collector_without_confirmation(env, sim, **sections):
    config = env.write_config(sim.url, **sections)
    proc = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT")
    wait_for(lambda: "connected url=" in proc.log(), 20, "a connection")
    return proc


# One release is enough: the writer's outage path is the same on both; the soak stops 18.16
# under a running daemon, and test_exporter stops each release's server during a rotation.
@pytest.mark.one_clickhouse
@pytest.mark.slow
def test_clickhouse_outage_of_30s_loses_nothing(env, sim, own_clickhouse):
    env.clickhouse = own_clickhouse
    proc = start_collector(env, sim)
    wait_for(lambda: env.count() > 100, 20, "rows flowing")
    own_clickhouse.stop()
    stopped = time.monotonic()
    outage_start = len(sim.expected_rows("BTC_USDT"))
    wait_for(lambda: "insert failed" in proc.log(), 20, "the collector noticing the outage")
    wait_for(lambda: len(sim.expected_rows("BTC_USDT")) > outage_start + 2000, 60,
             "2000 rows sent during the outage")
    # a deliberate outage length from the stop, not a wait for state
    time.sleep(max(0.0, stopped + OUTAGE_SECONDS - time.monotonic()))
    own_clickhouse.start()
    assert_stored_exactly_once(env, sim)
    assert proc.stop() == 0


@pytest.mark.slow
@pytest.mark.one_clickhouse  # it runs its own
def test_sigkill_with_rows_in_spool_then_restart(env, sim, own_clickhouse):
    env.clickhouse = own_clickhouse
    # max_buffered_rows = 0: every batch that cannot be stored goes to the spool file at once
    proc = start_collector(env, sim, collector={"max_buffered_rows": 0})
    wait_for(lambda: env.count() > 50, 20, "rows flowing")
    own_clickhouse.stop()
    spool_dir = os.path.join(env.tmp, "state", "spool")
    wait_for(lambda: os.path.exists(os.path.join(spool_dir, "btc.spool"))
             and Spool(spool_dir, "btc", readonly=True).rows > 500, 60, "500 rows in the spool")
    proc.signal(signal.SIGKILL)
    proc.wait()
    killed_at_ms = time.time() * 1000
    spooled_rows = read_spool(spool_dir, "btc")
    assert len(spooled_rows) > 500

    own_clickhouse.start()
    proc = start_collector(env, sim, collector={"max_buffered_rows": 0})
    assert "replaying them first" in proc.log()
    wait_for(lambda: not os.path.exists(os.path.join(spool_dir, "btc.spool")), 30,
             "the spool drained")
    sim.stop_data()
    sent = collections.Counter((ts, mt, m) for ts, mt, m in sim.expected_rows("BTC_USDT"))
    wait_for(lambda: env.query(f"SELECT max({env.ms()}) FROM {env.database}.btc_current")[0][0]
             >= max(r[0] for r in sent if r[0] is not None), 30, "the last sent row stored")
    rows = stored(env)
    assert not [r for r, n in rows.items() if n > 1], "duplicated rows"
    assert all(row in rows for row in spooled_rows), "a spooled row was not stored"
    in_gaps = {trade.rest_row for gap in ledger(env) for trade in
               sim.trades("BTC_USDT", gap.start_ms, gap.end_ms)}
    assert not [r for r in rows if r not in sent and r not in in_gaps], \
        "stored rows the simulator never sent, outside every gap (backfill's)"
    # Only what the killed process held in memory or had not read yet may be missing.
    lost = [r for r in sent if r not in rows]
    assert all(ts > killed_at_ms - 2000 for ts, _mt, _m in lost), "lost rows older than 2 s"
    assert proc.stop() == 0


def read_spool(directory, name):
    spool = Spool(directory, name)
    rows = []
    while spool:
        spool.offset, batch = spool.peek()
        rows += [(ts, mt, m) for ts, mt, m, _rts in batch]
    return rows


def self_signed_tls(tmp_path):
    """A server TLS context for `localhost` and the path of its certificate (the CA file)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl missing: run ./setup --test", pytrace=False)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context, str(cert)


@contextlib.contextmanager
def microsocks():
    """A real SOCKS5 proxy on loopback: yields its port, then its output once stopped."""
    if shutil.which("microsocks") is None:
        pytest.fail("microsocks missing: run ./setup --test", pytrace=False)
    socks_port = free_port()
    proxy = subprocess.Popen(["microsocks", "-i", "127.0.0.1", "-p", str(socks_port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        wait_for(lambda: _port_open(socks_port), 10, "microsocks listening")
        yield socks_port, output
    finally:
        proxy.terminate()
        output.append(proxy.communicate(timeout=10)[0])


@pytest.mark.slow  # seconds of sockets or a daemon: full suite only, the quick loop stays under a minute (issue 27)
@pytest.mark.one_clickhouse
def test_wss_through_a_real_socks5_proxy(env, tmp_path):
    context, cert = self_signed_tls(tmp_path)
    with microsocks() as (socks_port, output):
        with MexcSimulator(rate=150, ssl_context=context) as sim:
            url = f"wss://localhost:{sim.port}/edge"  # a host name: the proxy resolves it
            config = env.write_config(url, exchange={"ca_file": cert})
            proc = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT",
                            "--socks", f"127.0.0.1:{socks_port}")
            wait_for(lambda: env.count() > 100, 30, "rows through the proxy")
            assert f"via socks5 127.0.0.1:{socks_port}" in proc.log()
            assert_stored_exactly_once(env, sim)
            assert proc.stop() == 0
    assert "localhost" in output[0] or "connected" in output[0], output


@pytest.mark.slow  # seconds of sockets or a daemon: full suite only, the quick loop stays under a minute (issue 27)
@pytest.mark.one_clickhouse
def test_wss_directly_trusts_exchange_ca_file(env, tmp_path):
    """Without a proxy too, the WebSocket and the REST request check the server against
    exchange.ca_file (websocket-client used to be handed the context under a key it does not
    read, and checked against the system's CAs alone)."""
    context, cert = self_signed_tls(tmp_path)
    with MexcSimulator(rate=150, ssl_context=context) as sim:
        config = env.write_config(f"wss://localhost:{sim.port}/edge",
                                  exchange={"ca_file": cert})
        proc = env.mexc("collect", "--config", config, "--symbol", "BTC_USDT")
        wait_for(lambda: env.count() > 100, 30, "rows over wss")
        assert_stored_exactly_once(env, sim)
        assert proc.stop() == 0
    assert "backfill request failed" not in proc.log()


def _port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0

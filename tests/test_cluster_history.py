"""The whole cluster from any host (issue 22 item 4) on the cluster bed: two real daemons
(`mexc run` in h1's and h2's namespaces, ClickHouse 18.16 each, one simulator as the market,
the event clock at SPEED as in tests/test_cluster_export.py).  h1 is cut off for a while (it
receives nothing then; h2 does), comes back; then from h1:
  - `mexc trades` returns every trade the cluster received exactly once, across merged hours
    and the live hour, those only h2 received included, each row saying whose copy it is;
  - /metrics, `mexc status` and the dashboard (a real headless Chromium) show both hosts and
    each one's receive lag behind the earliest host: h2 reaches the market through a relay
    that holds what the market sends for DELAY seconds (a farther region), h1 directly;
  - with h2's ClickHouse down, `mexc trades` and the Python API still answer, and say h2 is
    unreachable.
The tests share the daemons and run in file order."""
import calendar
import collections
import csv
import hashlib
import io
import json
import queue
import signal
import socket
import threading
import time
import tomllib
import urllib.request

import pyarrow as pa
import pyarrow.parquet  # noqa: F401 (pa.parquet)
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.lag import lags_behind_first, per_host, receive_lag
from core import store
from core.clock import HOUR_MS, EventClock, hour_start
from supervisor.commands import COMMANDS
from tests.conftest import MEXC, toml_dump, wait_for
from tests.test_cluster_export import HostDaemon
from tests.test_dashboard import chromium

HTTP_PORT = 8470
TOKEN = "cluster-bed-dashboard-token"
SPEED = 120.0  # an hour in 30 s: hours get merged while the test runs
DELAY = 0.3  # seconds h2's relay holds the market's bytes


class DelayRelay:
    """A TCP relay on the bed's bridge to (host, port): what comes back from there reaches
    the client DELAY seconds later, in order; what the client sends goes at once."""

    def __init__(self, listen_host: str, upstream):
        self.upstream = upstream
        self.server = socket.create_server((listen_host, 0))
        self.address = self.server.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._delayed, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    @staticmethod
    def _delayed(source, sink):
        chunks = queue.Queue()

        def send():
            try:
                while (item := chunks.get()) is not None:
                    due, data = item
                    time.sleep(max(0.0, due - time.monotonic()))  # the relay's own delay
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                sink.close()
        threading.Thread(target=send, daemon=True).start()
        try:
            while data := source.recv(65536):
                chunks.put((time.monotonic() + DELAY, data))
        except OSError:
            pass
        chunks.put(None)

    def stop(self):
        self.server.close()


class Cluster:
    def __init__(self, bed, sim, clock, daemons):
        self.bed, self.sim, self.clock, self.daemons = bed, sim, clock, daemons
        self.cut_wall = self.restored_wall = None  # h1's time off the network (wall ms)

    def history(self, host: str, kind: str, start_ms: int, end_ms: int, exit_code: int = 0):
        """`mexc KIND btc` run on a host: (rows as dicts, stderr); it must exit exit_code (3:
        a host did not answer, the rows are the others')."""
        daemon, began = self.daemons[host], time.monotonic()
        done = self.bed.exec(host, [MEXC, kind, "btc", "--from", str(start_ms), "--to",
                                    str(end_ms), "--format", "csv", "--config", daemon.config],
                             timeout=120)
        assert done.returncode == exit_code, done.stderr
        print(f"mexc {kind} on {host}: {time.monotonic() - began:.1f} s")
        return list(csv.DictReader(io.StringIO(done.stdout))), done.stderr

    def trades(self, host: str, start_ms: int, end_ms: int, exit_code: int = 0):
        return self.history(host, "trades", start_ms, end_ms, exit_code)

    def wait_collecting(self) -> None:
        wait_for(lambda: all(d.rows() > 50 for d in self.daemons.values()), 60,
                 "both hosts collect")

    def stored_until(self, end_ms: int) -> bool:
        """Has every host stored a row of exchange time end_ms or later?"""
        return all((d.host.query("SELECT max(ts) FROM mexc.btc_current")[0][0] or 0) >= end_ms
                   for d in self.daemons.values())


def configure(daemon, exchange_url=None) -> None:
    """The daemon's dashboard and /metrics on its host's address (token required there);
    its market at exchange_url when given."""
    with open(daemon.config, "rb") as f:
        config = tomllib.load(f)
    config["http"] = {"listen": f"{daemon.host.address}:{HTTP_PORT}", "token": TOKEN}
    if exchange_url:
        config["exchange"]["url"] = exchange_url
    with open(daemon.config, "w") as f:
        f.write(toml_dump(config))


@pytest.fixture(scope="module")
def cluster(cluster_bed, tmp_path_factory):
    bed = cluster_bed
    tmp = tmp_path_factory.mktemp("cluster-history")
    clock = EventClock(SPEED, int(time.time() * 1000))
    sim = bed.start_simulator(rate=20, event_clock=clock.now_ms)
    relay = DelayRelay(bed.gateway, (bed.gateway, sim.port))
    daemons = {h: HostDaemon(bed, h, tmp, sim, clock) for h in ("h1", "h2")}
    configure(daemons["h1"])
    configure(daemons["h2"], f"ws://{bed.gateway}:{relay.address[1]}/edge")
    for daemon in daemons.values():
        daemon.start()
    try:
        yield Cluster(bed, sim, clock, daemons)
    finally:
        for daemon in daemons.values():
            if daemon.proc and daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
                daemon.proc.wait(30)
        relay.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_trades_from_any_host_are_every_trade_the_cluster_received_once(cluster):
    h1, h2 = cluster.daemons["h1"], cluster.daemons["h2"]
    cluster.wait_collecting()
    start_ms = h2.host.query("SELECT min(ts) FROM mexc.btc_current WHERE mt = 'd'")[0][0]
    wait_for(lambda: h1.files() and h2.files(), 90, "a merged hour on both hosts")
    cluster.bed.cut("h1")  # h1 reaches neither the market nor ZooKeeper nor h2
    cluster.cut_wall = int(time.time() * 1000)
    cut_event = cluster.clock.now_ms()
    wait_for(lambda: h2.received_since(cluster.cut_wall + 3000), 30, "h2 collects alone")
    cluster.bed.restore("h1")
    cluster.restored_wall = int(time.time() * 1000)
    restored_event = cluster.clock.now_ms()
    wait_for(lambda: h1.received_since(cluster.restored_wall), 60, "h1 collects again")
    end_ms = cluster.clock.now_ms()
    wait_for(lambda: cluster.stored_until(end_ms), 30, "both hosts stored up to the end")

    rows, stderr = cluster.trades("h1", start_ms, end_ms)
    truth = {t.t for t in cluster.sim.trades("BTC_USDT", start_ms, end_ms - 1)}
    answered = collections.Counter(_ms(row["ts"]) for row in rows)
    assert max(answered.values()) == 1, "a trade twice"
    assert set(answered) == truth, (len(truth - set(answered)), len(set(answered) - truth))
    # the trades of h1's time off the network: h2's copies only
    alone = [row for row in rows if cut_event + 60_000 < _ms(row["ts"]) < restored_event]
    assert len(alone) > 50 and {row["host"] for row in alone} == {"h2"}
    assert {row["host"] for row in rows} == {"h1", "h2"}
    merged = {hour for hour in range(hour_start(start_ms), end_ms, HOUR_MS)
              if any(name.endswith(time.strftime("%Y%m%d_%H00.parquet",
                                                 time.gmtime(hour // 1000)))
                     for name in h1.files())}
    assert merged and hour_start(end_ms) not in merged, "merged hours and the live hour"
    assert "unreachable" not in stderr and f"{len(rows):,} trades rows" in stderr
    print(f"{len(rows)} trades from h1, {len(alone)} of h1's cut received by h2 only, "
          f"{len(merged)} merged hours")
    same, _stderr = cluster.trades("h2", start_ms, end_ms)
    assert sorted(_ms(row["ts"]) for row in same) == sorted(answered)
    # tickers (no id: matched by time and text) each once too; bars count every trade
    tickers, _stderr = cluster.history("h1", "ticker", start_ms, end_ms)
    sent = {(ts, m) for ts, mt, m in cluster.sim.expected_rows("BTC_USDT")
            if mt == "t" and start_ms <= ts < end_ms}
    assert sorted(_ms(row["ts"]) for row in tickers) == sorted(ts for ts, _m in sent)
    bars, _stderr = cluster.history("h1", "bars", start_ms, end_ms)
    assert sum(int(row["trades"]) for row in bars) == len(rows)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_metrics_status_and_dashboard_show_each_hosts_receive_lag(cluster):
    h1 = cluster.daemons["h1"]
    cluster.wait_collecting()
    seen = []  # every figure scraped, for the failure message

    def lag():
        samples = _scrape(h1.host.address)
        found = {labels["host"]: value for name, labels, value in samples
                 if name == "mexc_receive_lag_seconds" and labels["symbol"] == "BTC_USDT"}
        if set(found) != {"h1", "h2"}:
            return None
        if not seen or seen[-1] != found:
            seen.append(found)
        return (found, samples) if found["h1"] < 0.1 and \
            DELAY - 0.05 < found["h2"] < DELAY + 0.5 else None

    # A figure is a median over the last minute, refreshed every LAG_EVERY s: one taken while
    # the previous test's cut of h1 was in its window may say anything, so wait for one that
    # shows h2's relay (a wrong figure never turns right)
    try:
        found, samples = wait_for(lag, 120, "h2's relay delay in the receive lag on /metrics")
    except AssertionError as e:
        raise AssertionError(f"{e}; figures seen: {seen}") from None
    assert {labels["host"] for name, labels, value in samples
            if name == "mexc_cluster_host_up" and value == 1} == {"h1", "h2"}
    assert ("mexc_cluster_this_host", {"host": "h1"}, 1) in samples
    print(f"receive lag behind the earliest host: {found}")

    status = cluster.bed.exec("h1", [MEXC, "status", "--config", h1.config]).stdout
    assert "receive lag behind the earliest host" in status and " h2 " in status, status

    browser = chromium()
    try:  # the token as a header on every request of the page, as a proxy would add it
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                {"headers": {"Authorization": f"Bearer {TOKEN}"}})
        browser.get(f"http://{h1.host.address}:{HTTP_PORT}/")

        def rows():
            return {row.get_attribute("data-host"): row.text for row in
                    browser.find_elements("css selector", "#cluster tbody tr[data-host]")}
        shown = wait_for(lambda: (lambda r: r if set(r) == {"h1", "h2"} and all(
            " s" in text for text in r.values()) else None)(rows()), 30,
            "a cluster row per host with its lag")
        assert "this host" in shown["h1"] and "btc" in shown["h2"], shown
    finally:
        browser.quit()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_host_down_leaves_the_others_answering_and_is_named(cluster):
    h1, h2 = cluster.daemons["h1"], cluster.daemons["h2"]
    cluster.wait_collecting()
    end_ms = cluster.clock.now_ms()
    wait_for(lambda: cluster.stored_until(end_ms), 30, "both hosts stored up to the end")
    start_ms = end_ms - 20 * 60_000
    both, _stderr = cluster.trades("h1", start_ms, end_ms)
    own = h1.host.query(f"SELECT count() FROM mexc.btc_current WHERE mt = 'd' "
                        f"AND ts >= {start_ms} AND ts < {end_ms}")[0][0]
    h2.host.clickhouse.stop()
    try:
        began = time.monotonic()
        rows, stderr = cluster.trades("h1", start_ms, end_ms, exit_code=3)
        print(f"h2's ClickHouse down: {len(rows)} of {len(both)} trades from h1 in "
              f"{time.monotonic() - began:.1f} s; {stderr.splitlines()[-1][:160]}")
        assert "warning: host h2 unreachable" in stderr, stderr
        assert own <= len(rows) and len(rows) > 0
        # what is missing is what only h2 received and no merged file here holds yet
        answered = {row["ts"] for row in rows}
        assert answered <= {row["ts"] for row in both}
        assert {row["host"] for row in both if row["ts"] not in answered} <= {"h2"}
        api = cluster.bed.python("h1", ARCHIVE_API, h1.config, str(start_ms), str(end_ms),
                                 timeout=60)
        assert api.returncode == 0, api.stderr
        answer = json.loads(api.stdout)
        assert list(answer["unreachable"]) == ["h2"] and answer["rows"] == len(rows)
        for command in ("gaps", "verify"):  # h1's answers, h2 named, exit 3 (as trades)
            done = cluster.bed.exec("h1", [MEXC, command, "--config", h1.config], timeout=60)
            assert done.returncode == 3 and done.stderr.startswith(
                "mexc: warning: host h2 unreachable ("), done.stdout + done.stderr
    finally:
        h2.host.clickhouse.start()
    cluster.bed.cut("h2")  # packets to h2 dropped: remote() waits for its connect timeout
    try:
        began = time.monotonic()
        cut_rows, stderr = cluster.trades("h1", start_ms, end_ms, exit_code=3)
        print(f"h2 cut off: {len(cut_rows)} trades from h1 in {time.monotonic() - began:.1f} s")
        assert "warning: host h2 unreachable" in stderr, stderr
        assert own <= len(cut_rows) <= len(both)
    finally:
        cluster.bed.restore("h2")


ARCHIVE_API = """
import json, sys
from mexc import history
archive = history.Archive.from_config(sys.argv[1])
trades = archive.trades("BTC_USDT", int(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({"rows": trades.num_rows, "unreachable": archive.unreachable}))
"""


@pytest.mark.quick_on_one_clickhouse
def test_a_hosts_rows_read_alike_here_and_through_remote(env):
    """The statements a cluster's answers send for each host (core/store.py) on each
    ClickHouse release: this server's tables, and the same through remote() to itself."""
    hour, now_ms = 1_796_000_400_000, int(time.time() * 1000)
    with env.store() as store:
        store.setup(["btc"], clustered=True)
        store.insert_rows("btc_current", [(hour + 1, "d", "1|2|1|7", hour + 2),
                                          (hour + 3, "t", "1|2|3|4|5", hour + 4)])
        store.swap("btc")
        store.insert_rows("btc_current", [(hour + 5, "d", "1|2|2|8", now_ms),
                                          (hour + 6, "d", "1|2|2", now_ms)])
        store.log_export("BTC_USDT", hour - HOUR_MS, 1, "/x", 3, 4, "a" * 64, table="copy_log")
        seen = []
        for source in (None, f"127.0.0.1:{env.clickhouse.port}"):
            tables = store.rows_tables("btc", source)
            seen.append((tables, [list(c) for c in store.host_live_rows(
                "btc", "d", hour, hour + HOUR_MS, tables, source)],
                         store.logged_copies("BTC_USDT", hour - 1, hour + 10, source),
                         store.recent_trade_receipts("btc", now_ms - 1, source)))
    assert seen[0] == seen[1]
    assert seen[0] == (["btc_current", "btc_previous"],
                       [[hour + 1, hour + 5, hour + 6], ["1|2|1|7", "1|2|2|8", "1|2|2"],
                        [hour + 2, now_ms, now_ms], [1, 0, 0]],
                       {hour - HOUR_MS: "a" * 64}, [("8", now_ms)])


@pytest.mark.one_clickhouse
def test_without_zookeeper_a_cluster_host_answers_with_its_own_rows_and_says_so(
        env, tmp_path, monkeypatch):
    """No ZooKeeper answering: the other hosts are unknown; this host's live rows and its
    copy of an hour not merged yet (hour_copies) answer, each trade once."""
    from core.store import COPY
    from exporter import parquet_files
    from cluster import exports
    from mexc import history
    monkeypatch.setattr(exports, "ZOOKEEPER_WAIT", 0.5)
    hour = 1_796_000_400_000
    copy = pa.table({"ts": [hour + 1, hour + 2], "mt": ["d", "d"],
                     "m": ["1|2|1|7", "1|2|1|8"], "rts": [hour + 3, hour + 4]})
    copy = pa.table([copy.column(n).cast(f.type) for n, f in zip(
        copy.column_names, parquet_files.SCHEMA)], schema=parquet_files.SCHEMA)
    data = io.BytesIO()
    pa.parquet.write_table(copy, data)
    sha = hashlib.sha256(data.getvalue()).hexdigest()
    with env.store() as store:
        store.setup(["btc"], clustered=True)
        store.log_export("BTC_USDT", hour, 1, "/copy", 2, 1, sha, table="copy_log")
        store.put_hour_file("btc", hour, COPY, "h1", sha, 2, data.getvalue())
        store.insert_rows("btc_current", [(hour + 2, "d", "1|2|1|8", hour + 5),
                                          (hour + HOUR_MS + 1, "d", "1|2|2|9", hour + 6)])
    archive = history.Archive(str(tmp_path), env.ch_section(), cluster={
        "host": "h1", "zookeeper": "127.0.0.1:9", "root": "/mexc", "session_timeout": 4.0})
    trades = archive.trades("BTC_USDT", hour, hour + 2 * HOUR_MS)
    assert trades.column("ts").cast(pa.int64()).to_pylist() == [hour + 1, hour + 2,
                                                                hour + HOUR_MS + 1]
    assert trades.column("host").cast(pa.string()).to_pylist() == ["h1"] * 3
    assert list(archive.unreachable) == [history.OTHERS]
    assert "the other hosts are unknown (ZooKeeper 127.0.0.1:9" in history.summary(trades,
                                                                                   "trades")


def test_lag_is_the_median_behind_the_earliest_receipt_of_each_trade():
    lags = lags_behind_first({"h1": {"1": 100, "2": 200, "3": 300, "9": 5},
                              "h2": {"1": 130, "2": 190, "3": 340}})
    assert lags == {"h1": 0.0, "h2": 0.03}  # trade 9: one host only, not compared
    assert per_host({"symbols": {"btc": {"h1": 0.0, "h2": 0.03},
                                 "eth": {"h2": 0.01, "h3": 0.0}}}) == {
        "h1": 0.0, "h2": 0.02, "h3": 0.0}


def test_lag_measures_a_round_of_symbols_in_turn_and_keeps_the_others():
    class Store:  # each host received each trade 5 ms later than the one before it
        asked = []

        def recent_trade_receipts(self, name, since_ms, source):
            self.asked.append(name)
            return [("1", 1000 + 5 * int(source[1]))]

        def close(self):
            pass
        asking = store.Store.asking
    holders = {f"s{i:02d}": ["h1", "h2"] for i in range(30)} | {"one": ["h1"]}
    sources = {"h1": "h1", "h2": "h2"}
    first = receive_lag(Store(), sources, holders)
    assert sorted(first["symbols"]) == [f"s{i:02d}" for i in range(20)]
    assert first["symbols"]["s00"] == {"h1": 0.0, "h2": 0.005}
    second = receive_lag(Store(), sources, holders, first)
    assert len(second["symbols"]) == 30 and second["last"] == "s09"  # 20..29, then 0..9
    assert len(Store.asked) == 2 * 2 * 20


def test_status_says_each_hosts_receive_lag_under_the_cluster_line():
    from tests.test_commands import status
    cluster = {"host": "h1", "zookeeper": "connected", "frozen": False, "replicas": 2,
               "hosts": {"h1": ["btc"], "h2": ["btc"]},
               "lag": {"ts_ms": 0, "window_s": 60.0, "symbols": {"btc": {"h1": 0.0, "h2": 0.012}},
                       "unreachable": {}}}
    lines = COMMANDS["status"].show({**status([]), "cluster": cluster}).splitlines()
    assert lines[2] == ("receive lag behind the earliest host (median of the last 60 s of "
                        "trades): h1 0.000 s, h2 0.012 s")
    lines = COMMANDS["status"].show({**status([]), "cluster": dict(cluster, lag=None)})
    assert "receive lag: not measured" in lines


def _ms(iso_text: str) -> int:
    """`2026-12-06T20:01:02.345Z` (mexc's csv) -> ms."""
    seconds, _, ms = iso_text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S")) * 1000 + int(ms or 0)


def _scrape(address: str) -> list:
    request = urllib.request.Request(f"http://{address}:{HTTP_PORT}/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(body) for s in family.samples]

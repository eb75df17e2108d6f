"""The supervisor's HTTP side on a real `mexc run`: /metrics against ClickHouse's own counts,
/api/status against `mexc status --json`, the token, and the dashboard in a real headless
browser (Debian's chromium driven by selenium through chromium-driver)."""
import base64
import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.process import free_port
from mexc.simulator import MexcSimulator
from tests.conftest import MEXC, World, wait_for
from tests.test_supervisor import Daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.one_clickhouse]  # the supervisor's parts, not SQL
SYMBOLS = ("BTC_USDT", "ETH_USDT", "SOL_USDT")


@pytest.fixture
def sim():
    with MexcSimulator(rate=40.0) as simulator:
        yield simulator


def get(port: int, path: str, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers.get("Content-Type"), response.read()


def scrape(port: int) -> dict:
    """{(sample name, frozenset of labels): value}"""
    _status, _type, body = get(port, "/metrics")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def sample(metrics: dict, name: str, **labels):
    return metrics.get((name, frozenset(labels.items())))


def start(env, sim, **http):
    port = free_port()
    daemon = Daemon(env, sim, symbols=SYMBOLS, http={"listen": f"127.0.0.1:{port}", **http})
    daemon.wait_flowing([f"collector-{s.split('_')[0].lower()}" for s in SYMBOLS])
    return daemon, port


@pytest.fixture(scope="module")
def looked_at(clickhouse, tmp_path_factory):
    """One running daemon for the tests that only look at it (its API, page and status):
    (Daemon, dashboard port); it must then stop with exit 0."""
    env = World(tmp_path_factory.mktemp("dashboard"), clickhouse)
    try:
        with MexcSimulator(rate=40.0) as sim:
            daemon, port = start(env, sim)
            yield daemon, port
            assert daemon.proc.stop(20) == 0
    finally:
        env.cleanup()


def test_metrics_match_what_clickhouse_stores(env, sim):
    daemon, port = start(env, sim)
    sim.stop_data()  # from here on the counts only settle

    def settled():
        metrics = scrape(port)
        for symbol in SYMBOLS:
            table = f"{env.database}.{symbol.split('_')[0].lower()}_current"
            by_type = dict(env.query(f"SELECT toString(mt), count() FROM {table} GROUP BY mt"))
            if sample(metrics, "mexc_rows_written_total", symbol=symbol) != sum(by_type.values()):
                return None
            for mt, n in by_type.items():
                if sample(metrics, "mexc_rows_received_total", symbol=symbol, type=mt) != n:
                    return None
        return metrics

    metrics = wait_for(settled, 30, "/metrics rows written and received = ClickHouse counts")
    for symbol in SYMBOLS:
        assert sample(metrics, "mexc_rows_written_total", symbol=symbol) > 0
        assert sample(metrics, "mexc_connected", symbol=symbol) == 1
        assert sample(metrics, "mexc_rows_spooled", symbol=symbol) == 0
        assert sample(metrics, "mexc_last_message_age_seconds", symbol=symbol) is not None
        name = f"collector-{symbol.split('_')[0].lower()}"
        assert sample(metrics, "mexc_child_up", child=name) == 1
        assert sample(metrics, "mexc_child_restarts_total", child=name) == 0
        assert sample(metrics, "mexc_child_resident_memory_bytes", child=name) > 1_000_000
    assert sample(metrics, "mexc_child_up", child="exporter") == 1
    assert sample(metrics, "mexc_clickhouse_up") == 1
    version = env.query("SELECT version()")[0][0]
    wait_for(lambda: sample(scrape(port), "mexc_clickhouse_info", version=version), 40,
             "the ClickHouse version in /metrics")
    assert any(name == "mexc_build_info" for name, _labels in metrics)
    # every name follows the conventions: mexc_ prefix, no secret anywhere
    assert all(name.startswith("mexc_") for name, _labels in metrics)
    assert daemon.proc.stop(20) == 0


def test_api_status_is_what_mexc_status_json_prints(looked_at):
    daemon, port = looked_at
    status, content_type, body = get(port, "/api/status")
    assert status == 200 and content_type == "application/json"
    served = json.loads(body)
    printed = json.loads(subprocess.run([MEXC, "status", "--json", "--config", daemon.config],
                                        capture_output=True, text=True, timeout=20).stdout)
    assert served.keys() == printed.keys()
    assert served["supervisor"].keys() == printed["supervisor"].keys()
    assert {c["name"] for c in served["children"]} == {c["name"] for c in printed["children"]}
    assert served["supervisor"]["pid"] == printed["supervisor"]["pid"] == daemon.proc.pid
    assert served["supervisor"]["dashboard"] == f"http://127.0.0.1:{port}/"
    calendar = json.loads(get(port, "/api/dashboard")[2])["calendar"]
    assert set(calendar["symbols"]) == set(SYMBOLS) and len(calendar["hours"]) == 24


def test_off_loopback_needs_a_token_and_never_shows_it(env, sim):
    config = env.write_config(sim.url, http={"listen": "0.0.0.0:8470"})
    result = subprocess.run([MEXC, "run", "--config", config], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 78 and "http.listen" in result.stderr
    token = "s3cret-Token-4711"
    daemon, port = start(env, sim, token=token)
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(port, "/metrics")
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        get(port, "/api/status", {"Authorization": "Bearer wrong"})
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    for headers in ({"Authorization": f"Bearer {token}"}, {"Authorization": f"Basic {basic}"}):
        for path in ("/", "/api/status", "/api/dashboard", "/metrics"):
            status, _type, body = get(port, path, headers)
            assert status == 200 and token.encode() not in body, path
    assert token not in daemon.proc.log()
    assert daemon.proc.stop(20) == 0


def chromium():
    """A headless chromium driven by selenium; skips when ./setup --test did not install them."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("chromium and chromium-driver are not installed: run ./setup --test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                     "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_dashboard_in_a_real_browser(looked_at, tmp_path):
    _daemon, port = looked_at
    _status, _type, page = get(port, "/")
    assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, re.I), \
        "the page must load nothing from elsewhere"
    browser = chromium()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        loaded_at = browser.execute_script("return window.mexcLoadedAt")

        def rows():
            return {row.get_attribute("data-symbol"): row.text for row in
                    browser.find_elements("css selector", "#children tbody tr[data-symbol]")}

        wait_for(lambda: {s for s, text in rows().items() if "collector" in text}
                 >= set(SYMBOLS), 20, "a table row for every symbol")
        first = browser.find_element("id", "updated").text
        wait_for(lambda: browser.find_element("id", "updated").text not in ("", first), 20,
                 "the page to refresh itself")
        assert browser.execute_script("return window.mexcLoadedAt") == loaded_at, "reloaded"
        calendar = browser.find_elements("css selector", "#calendar tr[data-symbol]")
        assert {row.get_attribute("data-symbol") for row in calendar} == set(SYMBOLS)
        assert "ClickHouse" in browser.find_element("id", "header").text
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith(f"http://127.0.0.1:{port}/") for name in resources)
        screenshot = tmp_path / "dashboard.png"  # the test's own output directory
        browser.save_screenshot(str(screenshot))
        print(f"dashboard screenshot: {screenshot}")
        assert screenshot.stat().st_size > 10_000
    finally:
        browser.quit()


def test_status_watch_redraws_in_place_until_ctrl_c(looked_at):
    daemon, _port = looked_at
    watcher = subprocess.Popen([MEXC, "status", "--watch", "--interval", "0.3", "--config",
                                daemon.config], stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in watcher.stdout:  # until the fourth screen begins
            lines.append(line)
            if sum("\033[H\033[J" in seen for seen in lines) == 4:
                break
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
    finally:
        watcher.kill()
    screens = "".join(lines).split("\033[H\033[J")[1:-1]
    assert len(screens) == 3 and all("collector-btc" in screen for screen in screens)


class ManySymbols:
    """A monitor's answers for 120 collectors, one of them backing off: the page's paging and
    ordering are what is tested here (a daemon of 120 collectors is bench/scaling_bench.py's)."""

    def __init__(self, n=120):
        from tests.test_commands import child, status

        self.symbols = [f"S{i:03d}_USDT" for i in range(1, n + 1)]
        children = [child(f"collector-s{i:03d}", "collector", symbol=s, connected=True)
                    for i, s in enumerate(self.symbols, 1)]
        children[99] = child("collector-s100", "collector", symbol="S100_USDT", pid=None,
                             state="backoff", restarts=3)
        self.status = status(children + [child("exporter", "exporter")],
                             problems=[], dashboard=None)

    def snapshot(self):
        return self.status

    def dashboard(self):
        hours = [1_700_000_000_000 + h * 3_600_000 for h in range(24)]
        return {"rates": {"ts_ms": [], "symbols": {}}, "events": [], "gaps": [],
                "calendar": {"hours": hours, "symbols": {s: ["none"] * 24 for s in self.symbols}},
                "clickhouse_version": None, "store_error": None}


def test_dashboard_pages_many_symbols_problems_first_and_filters():
    from supervisor.monitoring.web import WebServer

    web = WebServer(f"127.0.0.1:{free_port()}", "", ManySymbols()).start()
    browser = chromium()
    try:
        browser.get(web.url)

        def names():  # read in one script: the page redraws the table every 2 s
            return browser.execute_script("return [...document.querySelectorAll("
                                          "'#children tbody tr')].map(r => r.dataset.name)")

        wait_for(lambda: len(names()) == 50, 20, "the first page")
        assert names()[0] == "collector-s100"  # backing off: first
        assert browser.find_element("id", "page").text == "page 1 of 3"
        assert browser.execute_script(
            "return document.querySelectorAll('#calendar tr[data-symbol]').length") == 50
        browser.find_element("id", "next").click()
        browser.find_element("id", "next").click()
        wait_for(lambda: browser.find_element("id", "page").text == "page 3 of 3", 5, "page 3")
        assert names()[-1] == "exporter" and len(names()) == 21
        browser.find_element("id", "filter").send_keys("s04")
        wait_for(lambda: len(names()) == 10, 5, "the filter applied")
        assert names() == [f"collector-s{i:03d}" for i in range(40, 50)]
        assert browser.find_element("id", "summary").text == (
            "120 collectors, 119 connected, 1 with a problem; 10 shown")
    finally:
        browser.quit()
        web.stop()

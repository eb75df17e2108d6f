"""Configuration: defaults, names, and bad configs (one clear line, exit code 78)."""
import os
import subprocess

import pytest

from core import config
from tests.conftest import MEXC


def test_defaults_and_names():
    cfg = config.parse({"symbols": ["BTC_USDT", "1000PEPE_USDT",
                                    {"symbol": "SOL_USDT", "name": "sol2"}]})
    assert [(s.symbol, s.name) for s in cfg.symbols] == [
        ("BTC_USDT", "btc"), ("1000PEPE_USDT", "1000pepe"), ("SOL_USDT", "sol2")]
    assert cfg.exchange["url"] == "wss://contract.mexc.com/edge"
    assert cfg.exchange["rest_url"] == "https://contract.mexc.com"  # the WebSocket's host
    assert cfg.exchange["backfill"] is True
    assert config.parse({"exchange": {"url": "ws://127.0.0.1:8/edge"}}).exchange["rest_url"] \
        == "http://127.0.0.1:8"
    assert cfg.clickhouse["managed"] is True
    assert cfg.collector["latency_target"] == 1.0
    assert cfg.symbol("btc").symbol == "BTC_USDT"
    assert cfg.symbol("SOL_USDT").name == "sol2"


def test_shipped_config_is_valid_and_matches_defaults():
    shipped = config.load(os.path.join(os.path.dirname(__file__), "..", "etc", "mexc.toml"))
    defaults = config.parse({})
    for section in config.SCHEMA:
        assert getattr(shipped, section) == getattr(defaults, section), section
    assert shipped.symbols == defaults.symbols


CLUSTER = {"host": "tokyo", "zookeeper": "zk1:2181, zk2:2181", "clickhouse": "10.0.0.1:9100"}


def test_a_cluster_section_makes_a_cluster_and_its_absence_one_host():
    assert not config.parse({}).clustered
    cfg = config.parse({"cluster": CLUSTER})
    assert cfg.clustered
    assert (cfg.cluster["replicas"], cfg.cluster["root"]) == (2, "/mexc")
    assert any("clickhouse.password is empty" in w for w in cfg.warnings)
    assert not config.parse({"cluster": CLUSTER, "clickhouse": {"password": "x"}}).warnings


def test_int_accepted_for_float():
    assert config.parse({"collector": {"latency_target": 2}}).collector["latency_target"] == 2.0


def test_renamed_key_is_read_under_its_new_name_with_a_warning():
    cfg = config.parse({"collector": {"flush_interval": 0.25}}, "/x/mexc.toml")
    assert cfg.collector["latency_target"] == 0.25
    assert cfg.warnings == ["/x/mexc.toml: collector.flush_interval: renamed "
                            "collector.latency_target; read as collector.latency_target = 0.25"
                            ": rename it (CHANGELOG.md says what changed)"]
    both = config.parse({"collector": {"flush_interval": 0.25, "latency_target": 2.0}})
    assert both.collector["latency_target"] == 2.0
    assert "is ignored: remove it" in both.warnings[0]
    assert config.parse({}).warnings == []
    with pytest.raises(config.ConfigError, match="collector.latency_target: expected float"):
        config.parse({"collector": {"flush_interval": "fast"}})  # checked as the new key


def test_config_of_the_previous_release_loads_with_a_warning_not_exit_78(tmp_path):
    """A config written for 0.1.0 (flush_interval) still runs a command."""
    path = tmp_path / "mexc.toml"
    path.write_text(RELEASE_0_1_0_CONFIG)
    result = subprocess.run([MEXC, "gaps", "--config", str(path)], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "JOURNAL_STREAM": "8:1"})
    assert result.returncode == 1, result.stderr  # no ClickHouse on port 1: not a config error
    warning, *_rest = result.stderr.splitlines()
    assert warning.startswith(f"<4>mexc: config: {path}: collector.flush_interval: renamed "
                              "collector.latency_target; read as")


# Keys of etc/mexc.toml in 0.1.0 that later releases renamed or removed.
RELEASE_0_1_0_CONFIG = """
[clickhouse]
port = 1
[collector]
batch_rows = 1000
flush_interval = 0.1
"""


@pytest.mark.parametrize("data, message", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"exchange": {"uri": "ws://x"}}, "exchange.uri: unknown key"),
    ({"clickhouse": {"port": "9000"}}, "clickhouse.port: expected int, got str"),
    ({"clickhouse": {"port": True}}, "clickhouse.port: expected int, got bool"),
    ({"tor": {"enabled": "yes"}}, "tor.enabled: expected bool"),
    ({"symbols": ["btc_usdt"]}, "'btc_usdt' is not a contract"),
    ({"symbols": ["BTC_USDT; DROP TABLE x"]}, "is not a contract"),
    ({"symbols": []}, "symbols: expected a non-empty list"),
    ({"symbols": ["BTC_USDT", "BTC_USDC"]}, "both have the name 'btc'"),
    ({"symbols": ["BTC_USDT", "BTC_USDT"]}, "BTC_USDT is listed twice"),
    ({"symbols": [{"symbol": "BTC_USDT", "name": "b`; x"}]}, "must be 1-40 of a-z 0-9 _"),
    ({"symbols": [{"symbol": "BTC_USDT", "nme": "b"}]}, "expected {symbol"),
    ({"exchange": {"url": "http://x"}}, "exchange.url: must start with ws:// or wss://"),
    ({"exchange": {"depth_limit": 50}}, "exchange.depth_limit: must be one of"),
    ({"exchange": {"book": "all"}}, "exchange.book: must be one of ('top', 'full', 'both')"),
    ({"exchange": {"book_snapshot_interval": -1}}, "exchange.book_snapshot_interval: must be"),
    ({"symbols": [{"symbol": "BTC_USDT", "book": "deep"}]}, "BTC_USDT: book must be one of"),
    ({"exchange": {"rest_url": "ftp://x"}}, "exchange.rest_url: must start with http:// or https://"),
    ({"clickhouse": {"database": "a-b"}}, "clickhouse.database: must be a plain identifier"),
    ({"exchange": {"stale_factor": 0.5}}, "exchange.stale_factor: must be 0 (off) or at least 1"),
    ({"exchange": {"rhythm_window": 0}}, "exchange.rhythm_window: must be > 0"),
    ({"exchange": {"overlap_max": 0}}, "exchange.overlap_max: must be > 0"),
    ({"collector": {"batch_rows": 0}}, "collector.batch_rows: must be at least 1"),
    ({"collector": {"latency_target": 0}}, "collector.latency_target: must be > 0"),
    ({"log": {"level": "loud"}}, "log.level: must be one of"),
    ({"paths": 3}, "[paths]: must be a table"),
    ({"http": {"listen": "8470"}}, "http.listen: '8470' is not HOST:PORT"),
    ({"http": {"listen": "0.0.0.0:8470"}}, "http.listen: 0.0.0.0 is not loopback: set http.token"),
    ({"http": {"listen": "[2001:db8::1]:8470"}}, "is not loopback"),
    ({"alerts": {"webhook": "ftp://x"}}, "alerts.webhook: must be an http:// or https:// URL"),
    ({"cluster": {"host": "Tokyo"}}, "cluster.host: must be 1-40 of a-z 0-9 _"),
    ({"cluster": {"host": "tokyo"}}, "cluster.zookeeper: must list the ensemble"),
    ({"cluster": {"host": "tokyo", "zookeeper": "zk1"}}, "cluster.zookeeper: 'zk1' is not HOST:PORT"),
    ({"cluster": {"host": "tokyo", "zookeeper": "zk1:2181"}}, "cluster.clickhouse: must be this host's"),
    ({"cluster": dict(CLUSTER, replicas=0)}, "cluster.replicas: must be at least 1"),
    ({"cluster": dict(CLUSTER, root="mexc")}, "cluster.root: must be a ZooKeeper path"),
    ({"cluster": dict(CLUSTER, session_timeout=60)}, "cluster.session_timeout: must be 2-20"),
    ({"cluster": dict(CLUSTER, clickhouse="10.0.0.1:9000")},
     "cluster.clickhouse: must end in :9100 (clickhouse.port)"),
])
def test_bad_values(data, message):
    with pytest.raises(config.ConfigError) as err:
        config.parse(data, "/x/mexc.toml")
    assert str(err.value).startswith("/x/mexc.toml: ")
    assert message in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("symbols = [", "not valid TOML"),
    ("[clickhouse]\nport = 'x'\n", "clickhouse.port: expected int, got str"),
    (None, "cannot read"),
])
def test_bad_config_exits_78_with_one_line(tmp_path, content, message):
    path = tmp_path / "mexc.toml"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([MEXC, "setup-db", "--config", str(path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 78
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and message in lines[0]
    assert "Traceback" not in result.stderr


def test_config_search_order(tmp_path, monkeypatch):
    env_file = tmp_path / "env.toml"
    env_file.write_text("")
    monkeypatch.setenv("MEXC_CONFIG", str(env_file))
    assert config.find_config("/explicit.toml") == "/explicit.toml"
    assert config.find_config() == str(env_file)
    monkeypatch.delenv("MEXC_CONFIG")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mexc.toml").write_text("")
    expected = "/etc/mexc/mexc.toml" if os.path.exists("/etc/mexc/mexc.toml") else "etc/mexc.toml"
    assert config.find_config() == expected


def test_log_lines_under_journald_and_on_a_terminal(monkeypatch, capsys):
    import logging

    from core import log as logging_setup

    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    logging_setup.setup("collector[btc]")
    logging.getLogger("x").warning("channel=deal silent\nfor 30s")
    monkeypatch.delenv("JOURNAL_STREAM")
    logging_setup.setup("collector[btc]")
    logging.getLogger("x").info("connected")
    first, second = capsys.readouterr().err.splitlines()
    assert first == "<4>collector[btc] channel=deal silent | for 30s"
    assert second.endswith("Z INFO    collector[btc] connected") and second[:4].isdigit()


@pytest.mark.parametrize("http", [{"listen": ""}, {"listen": "127.0.0.1:1"},
                                  {"listen": "[::1]:8470"}, {"listen": "localhost:8470"},
                                  {"listen": "0.0.0.0:8470", "token": "t"}])
def test_http_listen_loopback_or_with_a_token(http):
    assert config.parse({"http": http}).http["listen"] == http["listen"]


def test_the_book_is_top_by_default_and_settable_per_symbol():
    default = config.parse({}, "/x/mexc.toml")
    assert {default.book(s) for s in default.symbols} == {"top"}  # today's behaviour
    assert (default.exchange["book_merge"], default.exchange["book_snapshot_interval"]) == \
        (False, 300.0)
    mixed = config.parse({"symbols": [{"symbol": "BTC_USDT", "book": "full"}, "ETH_USDT"],
                          "exchange": {"book": "both"}}, "/x/mexc.toml")
    assert [mixed.book(s) for s in mixed.symbols] == ["full", "both"]

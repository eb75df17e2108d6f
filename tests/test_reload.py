"""supervisor/reload: what a reload applies at once and what waits for a restart (pure logic;
test_supervisor runs a daemon through a reload)."""
from core import config
from supervisor import reload


def test_each_changed_section_is_one_line_saying_what_was_applied_and_what_waits():
    old = config.parse({"http": {"listen": "127.0.0.1:8470"}})
    new = config.parse({"http": {"listen": "127.0.0.1:8471", "token": "s3cret"},
                        "alerts": {"webhook": "http://127.0.0.1:9/hook"},
                        "log": {"level": "debug"},
                        "collector": {"batch_rows": 500},
                        "export": {"delay": 30.0, "clock_speed": 60.0},
                        "clickhouse": {"port": 9200, "password": "pw"}})
    assert reload.lines(reload.changes(old, new)) == [
        "reload [clickhouse]: port=9200, password changed: needs `systemctl restart mexc`",
        "reload [collector]: batch_rows=500: applies to each collector at its next start "
        "(`mexc restart collector-NAME`: a gap of about a second)",
        "reload [export]: delay=30.0: applied by restarting the exporter; clock_speed=60.0: "
        "needs `systemctl restart mexc`",
        "reload [log]: level='debug': applied",
        "reload [http]: listen='127.0.0.1:8471', token changed: applied",
        "reload [alerts]: webhook='http://127.0.0.1:9/hook': applied",
    ]


def test_an_unchanged_config_says_nothing():
    assert reload.changes(config.parse({}), config.parse({})) == []


def test_the_daemon_keeps_what_needs_a_restart_and_takes_the_rest():
    old = config.parse({"clickhouse": {"port": 9100}})
    new = config.parse({"clickhouse": {"port": 9200}, "tor": {"enabled": False},
                        "alerts": {"spool_rows": 5}, "exchange": {"silent_alarm": 10.0},
                        "symbols": ["SOL_USDT"]})
    running = reload.adopted(old, new)
    assert running.clickhouse["port"] == 9100 and running.tor["enabled"] is True
    assert running.alerts["spool_rows"] == 5 and running.exchange["silent_alarm"] == 10.0
    assert [s.symbol for s in running.symbols] == ["SOL_USDT"]
    assert reload.changes(running, new)[0].section == "clickhouse"  # still to be applied


def test_every_section_has_an_effect():
    assert set(reload.SECTIONS) == set(config.SCHEMA)
    assert all(key.split(".")[1] in config.SCHEMA[key.split(".")[0]] for key in reload.KEYS)

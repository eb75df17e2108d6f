"""Bad and hostile input: fuzzed bus messages and exchange frames, hostile config values,
secrets kept out of logs and status.  Nothing may crash a process or leak the password."""
import json
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from bus import messages
from collector import wire
from core import config, store
from core.vocabulary import MESSAGE_TYPES
from tests.conftest import MEXC

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10),
                                                                      children, max_size=5),
    max_leaves=30)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_bus_decoder_never_fails_but_with_bad_message(data):
    try:
        message = messages.decode(data)
    except messages.BadMessage:
        return
    assert message["type"] in messages.MESSAGES
    assert all(field in message for field in messages.MESSAGES[message["type"]])


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(messages.MESSAGES)), st.dictionaries(st.text(max_size=8), json_values,
                                                                  max_size=4))
@pytest.mark.slow
def test_every_message_round_trips(kind, extra):
    fields = {field: extra.get(field, 1) for field in messages.MESSAGES[kind]}
    assert messages.decode(messages.encode(kind, **fields))["type"] == kind


MEXC_LIKE = st.fixed_dictionaries({
    "channel": st.sampled_from(["push.deal", "push.ticker", "push.depth.full", "pong", "rs.error",
                                "rs.sub.deal", "push.other"]) | st.text(max_size=10),
    "symbol": st.sampled_from(["BTC_USDT", "ETH_USDT"]) | json_values,
    "data": json_values,
    "ts": json_values,
})


@settings(max_examples=3000, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=200)
       | MEXC_LIKE.map(json.dumps) | json_values.map(json.dumps))
@pytest.mark.slow
def test_frame_parser_never_raises_and_rows_fit_the_table(payload):
    kind, rows = wire.parse(payload, 1_700_000_000_000, "BTC_USDT")
    assert isinstance(kind, str)
    for ts, mt, m, rts in rows:
        assert type(ts) is int and ts >= 0 and rts == 1_700_000_000_000
        assert mt in MESSAGE_TYPES and isinstance(m, str)
        if mt == "dl":
            assert len(m) <= wire.DEAD_LETTER_CHARS
        else:
            assert set(m) <= set("0123456789.eE+-[],|"), m


def test_hostile_names_never_reach_sql_or_paths():
    hostile = ["BTC_USDT`; DROP TABLE x; --", "../../etc_USDT", "BTC_USDT\nX", "btc_usdt",
               "BTC USDT", "$(reboot)_USDT"]
    for symbol in hostile:
        try:
            config.parse({"symbols": [symbol]}, "x")
        except config.ConfigError as e:
            assert "is not a contract" in str(e)
        else:
            raise AssertionError(f"{symbol!r} was accepted")
    for name in ["a`b", "../x", "a b", "A", "x" * 41, ""]:
        try:
            config.parse({"symbols": [{"symbol": "BTC_USDT", "name": name}]}, "x")
        except config.ConfigError:
            continue
        raise AssertionError(f"name {name!r} was accepted")
    for database in ["mexc; DROP DATABASE default", "a`b", "1abc"]:
        try:
            config.parse({"clickhouse": {"database": database}}, "x")
        except config.ConfigError:
            continue
        raise AssertionError(f"database {database!r} was accepted")
    assert store.quote("x`; DROP TABLE y") == "`x\\`; DROP TABLE y`"


@pytest.mark.one_clickhouse
def test_password_never_in_logs_errors_or_status(env):
    secret = "s3cr3t-Pa55-XYZ"
    path = env.write_config("ws://127.0.0.1:1/edge",
                            clickhouse={**env.ch_section(), "user": "default", "password": secret})
    result = subprocess.run([MEXC, "setup-db", "--config", path], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, "the wrong password was accepted"
    assert secret not in result.stdout + result.stderr
    status = subprocess.run([MEXC, "status", "--json", "--config", path], capture_output=True,
                            text=True, timeout=30)
    assert secret not in status.stdout + status.stderr
    bad = env.tmp / "bad.toml"
    bad.write_text(f'[clickhouse]\npassword = "{secret}"\nport = "x"\n')
    result = subprocess.run([MEXC, "setup-db", "--config", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 78 and secret not in result.stderr

"""Patterns in `symbols` and the names they give (core/symbols.py, pure logic), the contract
list as MEXC answers it (collector/wire.py) and as the simulator serves it."""
import json

import pytest

from collector import wire
from collector.connection import http_get
from core import config
from core.symbols import Contract, NameBook, NameClash, Symbol, resolve, resolved_symbols
from mexc.simulator import MexcSimulator


def contracts(*symbols, state=0):
    return [Contract(s, state) for s in symbols]


def parse(symbols, **sections):
    return config.parse({"symbols": symbols, **sections}, "/x/mexc.toml")


def test_patterns_exclusions_and_all_resolve_against_the_list_sorted():
    cfg = parse(["*_USDT", "!*STOCK*_USDT"])
    listed = contracts("SOL_USDT", "BTC_USDT", "AAPLSTOCK_USDT", "BTC_USDC") \
        + contracts("DEAD_USDT", state=3)
    result = resolve(cfg.named, cfg.patterns, listed, {})
    assert result.symbols == [Symbol("BTC_USDT", "btc"), Symbol("SOL_USDT", "sol")]
    assert result.new_names == {"BTC_USDT": "btc", "SOL_USDT": "sol"}
    everything = parse("all")
    assert [s.symbol for s in resolve(everything.named, everything.patterns, listed,
                                      {}).symbols] == ["AAPLSTOCK_USDT", "BTC_USDC", "BTC_USDT",
                                                       "SOL_USDT"]


def test_names_usdt_base_else_whole_contract_and_an_operators_name_wins():
    cfg = parse(["*", {"symbol": "1000PEPE_USDT", "name": "pepe"}])
    listed = contracts("PEPE_USDT", "1000PEPE_USDT", "BTC_USDC", "BTC_USDT")
    names = {s.symbol: s.name for s in resolve(cfg.named, cfg.patterns, listed, {}).symbols}
    assert names == {"1000PEPE_USDT": "pepe", "PEPE_USDT": "pepe_usdt", "BTC_USDC": "btc_usdc",
                     "BTC_USDT": "btc"}


def test_a_name_once_given_never_changes_and_an_operator_cannot_take_it(tmp_path):
    cfg = parse(["*_USDT"])
    book = NameBook(str(tmp_path))
    first = resolve(cfg.named, cfg.patterns, contracts("PEPE_USDT"), book.names)
    book.remember(first.symbols)
    again = NameBook(str(tmp_path))  # as after a restart
    assert again.names == {"PEPE_USDT": "pepe"}
    # an operator later names another contract pepe: refused (the archive would change hands)
    clash = parse(["*_USDT", {"symbol": "1000PEPE_USDT", "name": "pepe"}])
    with pytest.raises(NameClash, match="'pepe' for 1000PEPE_USDT is held by PEPE_USDT"):
        resolve(clash.named, clash.patterns, contracts("PEPE_USDT", "1000PEPE_USDT"),
                again.names)
    # listed elsewhere in the order, or renamed by hand: the book's name stays
    renamed = parse(["*_USDT", {"symbol": "PEPE_USDT", "name": "frog"}])
    book.remember(resolve(renamed.named, renamed.patterns, contracts("PEPE_USDT"),
                          book.names).symbols)
    assert NameBook(str(tmp_path)).names == {"PEPE_USDT": "pepe"}
    later = resolve(cfg.named, cfg.patterns, contracts("AAA_USDT", "PEPE_USDT"), book.names)
    assert {s.symbol: s.name for s in later.symbols} == {"AAA_USDT": "aaa", "PEPE_USDT": "pepe"}


def test_the_same_list_gives_the_same_names_in_any_order():
    cfg = parse(["*"])
    listed = contracts("ETH_USDT", "ETH_USDC", "ETH_BTC", "BTC_USDT")
    one = resolve(cfg.named, cfg.patterns, listed, {})
    other = resolve(cfg.named, cfg.patterns, list(reversed(listed)), {})
    assert one == other


def test_named_contracts_follow_the_list_and_without_a_list_only_they_run():
    cfg = parse(["BTC_USDT", "ETH_USDT", "*_USDC"])
    result = resolve(cfg.named, cfg.patterns, contracts("BTC_USDT", "X_USDC"), {})
    assert [s.symbol for s in result.symbols] == ["BTC_USDT", "X_USDC"]
    assert result.unlisted == ["ETH_USDT"]
    assert [s.symbol for s in resolve(cfg.named, cfg.patterns, None, {}).symbols] == [
        "BTC_USDT", "ETH_USDT"]


def test_commands_find_pattern_names_in_the_book(tmp_path):
    cfg = parse(["*_USDT", "!ETH_USDT"], paths={"state_dir": str(tmp_path)})
    NameBook(str(tmp_path)).remember([Symbol("XRP_USDT", "xrp"), Symbol("ETH_USDT", "eth")])
    assert resolved_symbols(cfg) == [Symbol("XRP_USDT", "xrp")]


@pytest.mark.parametrize("symbols, problem", [
    (["!ETH_USDT"], "excludes from nothing"),
    (["*_usdt"], "is not a pattern like"),
    ([], "expected a non-empty list"),
    ("some", "expected a non-empty list"),
])
def test_bad_patterns_are_exit_78_errors(symbols, problem):
    with pytest.raises(config.ConfigError, match=problem):
        parse(symbols)


def test_reading_the_list_through_tor_needs_tor_and_a_named_contract():
    with pytest.raises(config.ConfigError, match="needs tor.enabled"):
        parse(["*_USDT"], tor={"enabled": False}, exchange={"contracts_via": "tor"})
    with pytest.raises(config.ConfigError, match="name at least one contract outright"):
        parse(["*_USDT"], exchange={"contracts_via": "tor"})
    assert parse(["BTC_USDT", "*_USDT"], exchange={"contracts_via": "tor"}).patterns


def test_the_contract_list_answer_parses_and_refusals_raise():
    body = json.dumps({"success": True, "code": 0, "data": [
        {"symbol": "ETH_USDT", "state": 0, "baseCoin": "ETH", "quoteCoin": "USDT",
         "settleCoin": "USDT", "futureType": 1, "extra": [1]},
        {"symbol": "BTC_USDT", "state": 4, "baseCoin": "BTC", "quoteCoin": "USDT"},
        {"state": 0}, "junk"]}).encode()
    assert wire.contract_list(body) == [Contract("BTC_USDT", 4, "BTC", "USDT", "", 1),
                                        Contract("ETH_USDT", 0, "ETH", "USDT", "USDT", 1)]
    for refusal in (b'{"success":false,"code":510,"message":"Requests are too frequent!"}',
                    b'{"success":true,"code":0,"data":[]}', b"<html>"):
        with pytest.raises(wire.BadFrame):
            wire.contract_list(refusal)


def test_the_simulator_lists_delists_and_refuses_on_command():
    url_path = wire.CONTRACTS_PATH
    with MexcSimulator(rate=0, contracts=["BTC_USDT", "ETH_USDT"]) as sim:
        def listed():
            status, body = http_get(sim.rest_url + url_path, 5)
            assert status == 200
            return {c.symbol: c.state for c in wire.contract_list(body)}
        assert listed() == {"BTC_USDT": 0, "ETH_USDT": 0}
        sim.list_contract("XRP_USDT")
        sim.delist_contract("ETH_USDT", 3)
        sim.delist_contract("BTC_USDT")
        assert listed() == {"ETH_USDT": 3, "XRP_USDT": 0}
        for mode, status in (("limit", 429), ("error", 500)):
            sim.fail_rest(30, mode)
            assert http_get(sim.rest_url + url_path, 5)[0] == status
        assert sim.contract_list_requests() == 4


def test_the_contract_list_through_a_socks5_proxy_keeps_the_last_good_list(tmp_path):
    """contracts_via = "tor": nothing is read until a tor (here a real SOCKS5 proxy) is given;
    then through it, with our TLS and SNI; a rate-limited read keeps the last good list."""
    from supervisor.contracts import ContractList
    from tests.conftest import wait_for
    from tests.test_collector import microsocks, self_signed_tls

    context, cert = self_signed_tls(tmp_path)
    with microsocks() as (socks_port, output), \
            MexcSimulator(rate=0, ssl_context=context, contracts=["BTC_USDT"]) as sim:
        exchange = config.parse({"exchange": {
            "url": f"wss://localhost:{sim.port}/edge", "ca_file": cert,
            "contracts_via": "tor"}, "symbols": ["BTC_USDT", "*_USDT"]}).exchange
        contract_list = ContractList(exchange, NameBook(str(tmp_path))).start()
        try:
            wait_for(contract_list.done_once.is_set, 10, "the first try")
            assert contract_list.latest() == (0, None) and sim.contract_list_requests() == 0
            assert "waiting for a collector's tor" in contract_list.describe()["error"]
            contract_list.proxy = ("127.0.0.1", socks_port)
            contract_list.refresh_now()
            wait_for(lambda: contract_list.latest()[0] == 1, 10, "the list through the proxy")
            assert [c.symbol for c in contract_list.latest()[1]] == ["BTC_USDT"]
            sim.fail_rest(60, "limit")
            sim.list_contract("XRP_USDT")
            contract_list.refresh_now()
            wait_for(lambda: contract_list.describe()["failures"] == 1, 10, "a refused read")
            assert contract_list.latest()[0] == 1 and not contract_list.describe()["ok"]
            assert "HTTP 429" in contract_list.describe()["error"]
        finally:
            contract_list.stop()
        # the next start reads the saved list while MEXC refuses
        assert NameBook(str(tmp_path)).last_contracts()[1] == [Contract("BTC_USDT", 0, "BTC",
                                                                        "USDT", "USDT", 1)]
    assert "localhost" in output[0] or "connected" in output[0], output


@pytest.mark.one_clickhouse
def test_a_daemon_refuses_a_name_the_book_gives_another_contract_and_an_unreadable_book(env):
    state = env.tmp / "state"
    state.mkdir()
    with MexcSimulator(rate=0, contracts=["PEPE_USDT", "1000PEPE_USDT"]) as sim:
        (state / "names.json").write_text('{"PEPE_USDT": "pepe"}')
        config = env.write_config(sim.url, symbols=[
            "*_USDT", {"symbol": "1000PEPE_USDT", "name": "pepe"}])
        clash = env.mexc("run", "--config", config)
        assert clash.wait(30) == 78
        assert "name 'pepe' for 1000PEPE_USDT is held by PEPE_USDT" in clash.log()
        (state / "names.json").write_text('{"PEPE_USDT": ')
        broken = env.mexc("run", "--config", config)
        assert broken.wait(30) == 1
        assert "names.json: unreadable" in broken.log() and "repair it" in broken.log()

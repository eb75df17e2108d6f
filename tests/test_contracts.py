"""Patterns in `symbols` followed by the real daemon against the simulator's contract list as it
changes at run time: a listing collected within one refresh, a delisting stopped and recorded
in the gap ledger, a failing list that keeps every symbol and raises an alert, a contract that
comes back under its old name, names kept across a restart (the list failing at that start),
and a pattern config changed under SIGHUP."""
import json
import signal
import time

import pytest

from bus import sockets
from core.vocabulary import GAP_DELISTED
from mexc.simulator import MexcSimulator
from tests.conftest import wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.one_clickhouse]

REFRESH = 2.0  # exchange.contracts_refresh
SILENT = 3.0  # exchange.silent_alarm: a delisted contract this long without data is stopped
PATTERNS = ["*_USDT", "!*STOCK*_USDT"]


def collectors(runtime_dir) -> dict:
    try:
        status = sockets.request(runtime_dir, "status", timeout=5)["result"]
    except sockets.NotRunning:
        return {}
    return {c["symbol"]: c for c in status["children"] if c["kind"] == "collector"}


def contracts_status(runtime_dir) -> dict:
    return sockets.request(runtime_dir, "status", timeout=5)["result"]["contracts"]


def start(env, sim, tmp_path, symbols=PATTERNS):
    received = tmp_path / "alerts.jsonl"
    command = tmp_path / "alert"
    command.write_text(f"#!/bin/sh\ncat >> {received}\necho >> {received}\n")
    command.chmod(0o755)
    config = env.write_config(sim.url, symbols=symbols,
                              exchange={"contracts_refresh": REFRESH, "silent_alarm": SILENT},
                              alerts={"command": str(command)})
    return env.mexc("run", "--config", config, name="daemon"), config, received


def alerts(received) -> list:
    if not received.exists():
        return []
    return [json.loads(line) for line in received.read_text().splitlines() if line.strip()]


def flowing(runtime_dir, symbols) -> bool:
    found = collectors(runtime_dir)
    return all((found.get(s) or {}).get("rows_written") for s in symbols)


def test_listings_delistings_and_a_failing_list_are_followed(env, tmp_path):
    run = str(tmp_path / "run")
    with MexcSimulator(rate=20.0, contracts=["BTC_USDT", "ETH_USDT", "SOL_USDT",
                                             "AAPLSTOCK_USDT", "BTC_USDC"]) as sim:
        daemon, config, received = start(env, sim, tmp_path)
        wait_for(lambda: flowing(run, ["BTC_USDT", "ETH_USDT", "SOL_USDT"]), 40,
                 "the pattern's contracts collected")
        assert set(collectors(run)) == {"BTC_USDT", "ETH_USDT", "SOL_USDT"}
        assert {c["name"] for c in collectors(run).values()} == {
            "collector-btc", "collector-eth", "collector-sol"}

        # a listing: its collector within one refresh, then its rows
        sim.list_contract("XRP_USDT")
        listed = time.monotonic()
        wait_for(lambda: "XRP_USDT" in collectors(run), REFRESH + 2, "the listing followed")
        print(f"listing to collector: {time.monotonic() - listed:.1f}s (refresh {REFRESH}s)")
        wait_for(lambda: flowing(run, ["XRP_USDT"]), 20, "the listed contract's rows")
        assert "contracts: XRP_USDT listed; starting its collector" in daemon.log()

        # a delisting: stopped once silent, its end in the ledger and the log
        sim.delist_contract("SOL_USDT", 3)
        delisted_ms = time.time() * 1000
        wait_for(lambda: "SOL_USDT" not in collectors(run), REFRESH + SILENT + 10,
                 "the delisted contract stopped")
        assert "contracts: SOL_USDT is offline on MEXC (state 3)" in daemon.log()
        assert "its data ends here (gap ledger: delisted)" in daemon.log()
        wait_for(lambda: env.gaps("sol"), 10, "the delisting's record")
        record = env.gaps("sol")[-1]
        assert record.reason == GAP_DELISTED and "offline" in record.detail
        assert record.start_ms <= delisted_ms <= record.end_ms
        stored_sol = env.count("sol_current")
        assert stored_sol > 0  # its archive stays

        # the list fails (rate-limited): every symbol keeps running, an alert fires, resolves
        sim.fail_rest(3 * REFRESH, "limit")
        wait_for(lambda: contracts_status(run)["failures"] >= 1, REFRESH + 3, "a failed read")
        before = {s: c["pid"] for s, c in collectors(run).items()}
        wait_for(lambda: any(a["alert"] == "contract_list_failing" and a["state"] == "firing"
                             for a in alerts(received)), 15, "the alert")
        assert before == {s: c["pid"] for s, c in collectors(run).items()}
        assert set(before) == {"BTC_USDT", "ETH_USDT", "XRP_USDT"}
        wait_for(lambda: any(a["alert"] == "contract_list_failing" and a["state"] == "resolved"
                             for a in alerts(received)), 60, "the alert resolved")
        assert "contract list not loaded (failure 1 in a row)" in daemon.log()

        # it comes back: the same name, and the ledger says why its data paused
        sim.list_contract("SOL_USDT")
        wait_for(lambda: flowing(run, ["SOL_USDT"]), REFRESH + 20, "sol collected again")
        assert collectors(run)["SOL_USDT"]["name"] == "collector-sol"
        wait_for(lambda: env.count("sol_current") > stored_sol, 10, "sol rows again")
        wait_for(lambda: len(env.gaps("sol")) == 2, 15, "the return's record")
        back = max(env.gaps("sol"), key=lambda g: g.end_ms)  # from the same last row
        assert (back.reason, back.detail) == (GAP_DELISTED, "listed again")
        names = (tmp_path / "state" / "names.json").read_text()
        assert json.loads(names) == {"BTC_USDT": "btc", "ETH_USDT": "eth", "SOL_USDT": "sol",
                                     "XRP_USDT": "xrp"}
        assert daemon.stop(20) == 0

        # a restart while the list fails: the last good list, the same names
        sim.fail_rest(600, "error")
        again = env.mexc("run", "--config", config, name="again")
        wait_for(lambda: flowing(run, ["BTC_USDT", "ETH_USDT", "SOL_USDT", "XRP_USDT"]), 40,
                 "every contract collected from the saved list")
        assert {c["name"] for c in collectors(run).values()} == {
            "collector-btc", "collector-eth", "collector-sol", "collector-xrp"}
        assert (tmp_path / "state" / "names.json").read_text() == names
        assert "contract list not loaded" in again.log()

        # SIGHUP with changed patterns: eth excluded, the rest untouched
        env.write_config(sim.url, symbols=[*PATTERNS, "!ETH_USDT"],
                         exchange={"contracts_refresh": REFRESH, "silent_alarm": SILENT})
        pids = {s: c["pid"] for s, c in collectors(run).items()}
        again.signal(signal.SIGHUP)
        wait_for(lambda: "ETH_USDT" not in collectors(run), 15, "eth removed by the reload")
        assert "reload: ETH_USDT removed from the config" in again.log()
        left = {s: c["pid"] for s, c in collectors(run).items()}
        assert left == {s: p for s, p in pids.items() if s != "ETH_USDT"}
        assert again.stop(20) == 0


def test_start_up_is_staggered_at_the_configured_rate(env, tmp_path):
    """12 collectors at supervisor.start_rate = 4: never more than 4 starts in a second."""
    run = str(tmp_path / "run")
    symbols = [f"S{i:03d}_USDT" for i in range(1, 13)]
    with MexcSimulator(rate=5.0, contracts=symbols) as sim:
        config = env.write_config(sim.url, symbols=["S0*_USDT"],
                                  supervisor={"start_rate": 4.0})
        daemon = env.mexc("run", "--config", config, name="daemon")
        wait_for(lambda: flowing(run, symbols), 40, "every collector storing rows")
        starts = sorted(
            time.mktime(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S")) + float(line[19:23])
            for line in daemon.log().splitlines()
            if " collector-s0" in line and " started pid=" in line)
        assert len(starts) == 12
        most = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
        print(f"12 starts over {starts[-1] - starts[0]:.2f}s, at most {most} in a second")
        assert most <= 4 and starts[-1] - starts[0] >= 2.0
        assert daemon.stop(20) == 0


def test_patterns_added_by_a_reload_start_following_the_list(env, tmp_path):
    run = str(tmp_path / "run")
    with MexcSimulator(rate=10.0, contracts=["BTC_USDT", "ETH_USDC", "X_USDC"]) as sim:
        config = env.write_config(sim.url, symbols=["BTC_USDT"])
        daemon = env.mexc("run", "--config", config, name="daemon")
        wait_for(lambda: flowing(run, ["BTC_USDT"]), 30, "btc collected")
        assert sim.contract_list_requests() == 0  # no patterns: no list read
        env.write_config(sim.url, symbols=["BTC_USDT", "*_USDC"],
                         exchange={"contracts_refresh": REFRESH})
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: flowing(run, ["BTC_USDT", "ETH_USDC", "X_USDC"]), 30,
                 "the pattern's contracts collected after the reload")
        assert {c["name"] for c in collectors(run).values()} == {
            "collector-btc", "collector-eth_usdc", "collector-x_usdc"}
        assert daemon.stop(20) == 0

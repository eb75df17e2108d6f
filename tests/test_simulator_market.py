"""The simulator as an exchange: a market that trades whether or not anyone listens, the truth
of every trade it made, deal merging (compress) and the REST API of recent trades."""
import collections
import decimal
import http.client
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import pytest

from mexc.simulator import MexcSimulator, Trade, merged_prints
from tests.test_simulator import (  # noqa: F401 (sim and tls_context are fixtures)
    BTC, ETH, connect, exact_json, ping, poll, recv_json, recv_until_pong, rows_of, sim,
    subscribe, tls_context)

pytestmark = pytest.mark.timeout(30)

UNMERGED = {"compress": False}


def deal_rows(ws):
    """The 'd' rows of every push.deal received up to the pong of a ping sent now."""
    ping(ws)
    return [row for _, payload in recv_until_pong(ws) for row in rows_of(exact_json(payload))
            if row[1] == "d"]


def subscribed(sim, symbol=BTC, **param):
    ws = connect(sim)
    subscribe(ws, "deal", symbol, **param)
    assert recv_json(ws)["channel"] == "rs.sub.deal"
    return ws


def get(url, context=None):
    """(HTTP status, decoded JSON body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, exact_json(response.read())
    except urllib.error.HTTPError as e:
        return e.code, exact_json(e.read())


def deals_url(sim, symbol=BTC, limit=None):
    query = "" if limit is None else f"?limit={limit}"
    return f"{sim.rest_url}/api/v1/contract/deals/{symbol}{query}"


# --- the market ------------------------------------------------------------------------------

def test_market_trades_while_nobody_is_connected():
    with MexcSimulator(rate=100) as sim:
        ws = subscribed(sim, **UNMERGED)
        poll(lambda: len(sim.trades(BTC)) > 20, what="trades")
        ws.close()
        poll(lambda: sim.connections == 0, what="the client to leave")
        sent_before = len(sim.expected_rows(BTC))
        made_before = len(sim.trades(BTC))
        poll(lambda: len(sim.trades(BTC)) > made_before + 50, what="trades while disconnected")
        assert len(sim.expected_rows(BTC)) == sent_before, "sent to nobody, recorded as sent"
        ws = subscribed(sim, **UNMERGED)
        received = [recv_json(ws) for _ in range(5)]
        assert any(frame["channel"] == "push.deal" for frame in received)
        ws.close()
    assert sim.trades(ETH) == []  # a market opens with its first subscription


def test_a_client_that_reads_nothing_holds_up_only_its_own_connection():
    with MexcSimulator(rate=100) as sim:
        stuck = subscribed(sim, BTC)  # reads nothing from here on
        sender = threading.Thread(target=sim.send_frames, args=(BTC, 100_000), daemon=True)
        sender.start()  # tens of MB: blocks once the socket buffers are full
        other = subscribed(sim, ETH, **UNMERGED)
        made = len(sim.trades(ETH))
        poll(lambda: len(sim.trades(ETH)) > made + 50, what="the market to go on trading")
        assert recv_json(other)["channel"] == "push.deal"
        assert sender.is_alive(), "the stuck client took everything: no test of blocking"
        stuck.close()  # the blocked sendall fails and send_frames returns
        sender.join(10)
        assert not sender.is_alive()
        other.close()


def test_truth_holds_every_trade_and_unmerged_pushes_carry_them_all():
    with MexcSimulator(rate=200) as sim:
        ws = subscribed(sim, **UNMERGED)
        poll(lambda: len(sim.expected_rows(BTC)) > 100, what="trades sent")
        sim.stop_data()
        rows = deal_rows(ws)
        ws.close()
    truth = sim.trades(BTC)
    # stop_data drops the pushes not sent yet: what arrived is every trade up to a point
    assert len(rows) == len(sim.expected_rows(BTC)) > 100
    assert sorted(rows) == [trade.row for trade in truth][:len(rows)]
    assert len({trade.id for trade in truth}) == len(truth)
    times = [trade.t for trade in truth]
    assert times == sorted(set(times))
    middle = truth[len(truth) // 3: 2 * len(truth) // 3]
    assert sim.trades(BTC, middle[0].t, middle[-1].t) == middle  # both bounds inclusive
    assert sim.trades(BTC, since_ms=middle[-1].t + 1) == truth[2 * len(truth) // 3:]
    assert sim.trades(BTC, until_ms=middle[0].t - 1) == truth[:len(truth) // 3]


def test_deals_are_merged_unless_compress_is_false(sim):
    merged_ws = subscribed(sim)  # MEXC's default: merged
    unmerged_ws = subscribed(sim, **UNMERGED)
    truth = [trade for _ in range(200) for trade in sim.trade(BTC, 3)]
    merged, unmerged = deal_rows(merged_ws), deal_rows(unmerged_ws)
    merged_ws.close()
    unmerged_ws.close()
    assert sorted(unmerged) == [trade.row for trade in truth]
    assert sim.trades(BTC) == truth  # the truth stays per trade
    assert len(merged) < len(unmerged), "no two prints merged in 200 pushes of three"

    def volume_by_side(rows):
        volume = collections.Counter()
        for _ts, _mt, m in rows:
            price, size, side, _trade_id = m.split("|")
            volume[decimal.Decimal(price), side] += decimal.Decimal(size)
        return volume
    assert volume_by_side(merged) == volume_by_side(unmerged)
    assert (BTC, "deal", {"symbol": BTC, "compress": False}) in sim.subscription_params


def test_merged_prints_join_consecutive_same_side_same_price_only():
    def trade(i, p, v, side):
        return Trade(BTC, i, p, v, side, 1, 2, 1000 + i)
    trades = [trade(1, "1.5", "2", 1), trade(2, "1.50", "3", 1), trade(3, "1.5", "1", 2),
              trade(4, "1.6", "1", 2), trade(5, "1.6", "4.00", 2), trade(6, "1.5", "7", 1)]
    assert merged_prints(trades) == [trade(1, "1.5", "5", 1), trade(3, "1.5", "1", 2),
                                     trade(4, "1.6", "5", 2), trade(6, "1.5", "7", 1)]


# --- REST --------------------------------------------------------------------------------------

def test_rest_deals_newest_first_as_mexc_answers(sim):
    assert get(deals_url(sim)) == (200, {"success": True, "code": "0", "data": []})
    trades = [trade for _ in range(60) for trade in sim.trade(BTC, 3)]  # 180 trades
    status, answer = get(deals_url(sim))
    assert status == 200 and answer["success"] is True and answer["code"] == "0"
    newest = trades[::-1][:100]  # limit defaults to 100, its maximum
    assert [(d["p"], d["v"], int(d["T"]), int(d["O"]), int(d["M"]), int(d["t"]))
            for d in answer["data"]] == [(t.p, t.v, t.T, t.O, t.M, t.t) for t in newest]
    assert all(set(d) == {"p", "v", "T", "O", "M", "t"} for d in answer["data"])
    assert len(get(deals_url(sim, limit=7))[1]["data"]) == 7
    assert len(get(deals_url(sim, limit=500))[1]["data"]) == 100
    status, answer = get(deals_url(sim, "btc-usd"))
    assert status == 200 and answer["success"] is False and answer["code"] == "1001"
    assert sim.connections == 0 and sim.total_connections == 0, "REST counted as WebSocket"
    assert sim.rest_requests == {"127.0.0.1": 5}
    answers = sim.rest_answers(BTC)
    assert [(a.limit, a.count) for a in answers] == [(100, 0), (100, 100), (7, 7), (100, 100)]
    assert (answers[1].oldest_t, answers[1].newest_t) == (newest[-1].t, newest[0].t)
    assert answers[1].latest_ms == newest[0].t and answers[0].latest_ms is None


def test_rest_over_tls(tls_context):
    with MexcSimulator(ssl_context=tls_context, rate=0) as sim:
        assert sim.rest_url.startswith("https://127.0.0.1:")
        trades = sim.trade(BTC, 2)
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        status, answer = get(deals_url(sim), insecure)
        assert status == 200
        assert [int(d["t"]) for d in answer["data"]] == [t.t for t in reversed(trades)]


def test_rest_rate_limit_is_20_requests_per_2_seconds_per_ip(sim):
    started = time.monotonic()
    statuses = [get(deals_url(sim, limit=1))[0] for _ in range(20)]
    status, answer = get(deals_url(sim, limit=1))
    if time.monotonic() - started < 2.0:  # under heavy load the window may have moved on
        assert statuses == [200] * 20
        assert status == 429
        assert answer["success"] is False and answer["code"] == "510"
    assert sim.rest_requests == {"127.0.0.1": 21}
    poll(lambda: get(deals_url(sim, limit=1))[0] == 200, timeout=5, what="the window to pass")


def test_rest_faults_answer_500_or_drop(sim):
    sim.fail_rest(30, "error")
    status, answer = get(deals_url(sim))
    assert status == 500 and answer["success"] is False
    sim.fail_rest(30, "drop")
    with pytest.raises((http.client.RemoteDisconnected, urllib.error.URLError,
                        ConnectionError)):
        get(deals_url(sim))
    sim.fail_rest(0)
    assert get(deals_url(sim))[0] == 200


def test_rest_unknown_path_is_404(sim):
    status, answer = get(f"{sim.rest_url}/api/v1/contract/kline/{BTC}")
    assert status == 404 and answer["success"] is False and answer["code"] == "404"


def subscribed_from(sim, address: str):
    """A deal subscriber whose connection comes from `address` (another host of a cluster)."""
    sock = socket.create_connection(("127.0.0.1", sim.port), timeout=5,
                                    source_address=(address, 0))
    ws = connect(sim, socket=sock)
    subscribe(ws, "deal", BTC)
    assert recv_json(ws)["channel"] == "rs.sub.deal"
    return ws


def test_rows_are_recorded_per_client_address_and_one_address_can_be_dropped():
    """A cluster's hosts share one market: each host's rows are what reached its own
    connections (a push to both is in both lists, and once in expected_rows), and the exchange
    can drop one host's connections alone."""
    with MexcSimulator(rate=0) as sim:
        first, second = subscribed_from(sim, "127.0.0.1"), subscribed_from(sim, "127.0.0.2")
        both = sim.trade(BTC, 3)
        for ws in (first, second):
            assert len(deal_rows(ws)) == 3  # the pong follows the trades made before it
        sim.force_disconnect("127.0.0.2")
        poll(lambda: sim.connections == 1, what="the second host's connection dropped")
        only_first = sim.trade(BTC, 2)
        assert len(deal_rows(first)) == 2
        first.close()
        second.close()
    assert [row[0] for row in sim.expected_rows_to("127.0.0.1", BTC)] == \
        [t.t for t in both + only_first]
    assert [row[0] for row in sim.expected_rows_to("127.0.0.2", BTC)] == [t.t for t in both]
    assert len(sim.expected_rows(BTC)) == 5
    assert sim.expected_rows_to("127.0.0.3") == []

"""The simulator's whole book (sub.depth and the REST depth snapshot) read by an independent
client: websocket-client and urllib, the book rebuilt here from the format spec alone."""
import json
import time
import urllib.request

import pytest
import websocket

from mexc.simulator import MexcSimulator

pytestmark = pytest.mark.timeout(30)

BTC = "BTC_USDT"


def connect_depth(sim, merged: bool):
    ws = websocket.create_connection(sim.url, timeout=5)
    param = {"symbol": BTC} if merged else {"symbol": BTC, "compress": False}
    ws.send(json.dumps({"method": "sub.depth", "param": param}))
    assert json.loads(ws.recv())["channel"] == "rs.sub.depth"
    return ws


def frames_until_pong(ws) -> list:
    ws.send('{"method":"ping"}')
    frames = []
    while (frame := json.loads(ws.recv(), parse_float=str))["channel"] != "pong":
        frames.append(frame)
    return frames


def snapshot(sim):
    with urllib.request.urlopen(f"{sim.rest_url}/api/v1/contract/depth/{BTC}", timeout=10) as r:
        answer = json.loads(r.read(), parse_float=str)
    assert answer["success"] is True
    return answer["data"]


def apply(book: dict, data: dict) -> None:
    for key, side in (("bids", 0), ("asks", 1)):
        for price, size, *_ in data[key]:
            if float(size) == 0:
                book[side].pop(float(price), None)
            else:
                book[side][float(price)] = int(float(size))


def as_truth(book: dict, version: int) -> tuple:
    return (version, sorted(book[0].items(), reverse=True), sorted(book[1].items()))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_increments_from_a_snapshot_rebuild_the_true_book(merged):
    with MexcSimulator(rate=0) as sim:
        ws = connect_depth(sim, merged)
        sim.book_events(BTC, 5)
        start = snapshot(sim)
        book, version = ({}, {}), int(start["version"])
        apply(book, start)
        assert len(book[0]) > 80 and len(book[1]) > 80  # the whole book, not a top 20
        assert as_truth(book, version) == sim.true_books(BTC, [int(start["timestamp"])])[0]
        sim.book_events(BTC, 30)
        frames = frames_until_pong(ws)
        assert frames and all(f["channel"] == "push.depth" for f in frames)
        instants, rebuilt = [], []
        for frame in frames:
            data = frame["data"]
            begin, end = int(data.get("begin", data["version"])), int(data["version"])
            assert ("begin" in data) == merged and int(data.get("end", end)) == end
            if end <= version:
                continue  # in the snapshot already
            assert begin <= version + 1 <= end, "versions follow"
            apply(book, data)
            version = end
            instants.append(int(frame["ts"]))
            rebuilt.append(as_truth(book, version))
        # frames of one event share its ms: compare after each event's last frame
        last_of_ms = {ts: i for i, ts in enumerate(instants)}
        truth = sim.true_books(BTC, list(last_of_ms))
        assert [rebuilt[i] for i in last_of_ms.values()] == truth
        assert len(truth) >= 25
        ws.close()


def versions(frames) -> list:
    return [(int(f["data"].get("begin", f["data"]["version"])), int(f["data"]["version"]))
            for f in frames]


def test_faults_break_the_version_chain_as_asked():
    with MexcSimulator(rate=0) as sim:
        ws = connect_depth(sim, merged=True)
        sim.book_events(BTC, 2)
        sim.book_fault(BTC, "drop")
        sim.book_events(BTC, 2)  # the first of these is not sent
        sim.book_fault(BTC, "jump", 7)
        sim.book_events(BTC, 1)
        sim.book_fault(BTC, "reorder")
        sim.book_events(BTC, 3)
        got = versions(frames_until_pong(ws))
        assert len(got) == 7
        breaks = [(a, b) for a, b in zip(got, got[1:]) if b[0] != a[1] + 1]
        # the drop, the jump (8 versions on), the reorder (ahead, then behind)
        assert [b[0] - a[1] - 1 > 0 for a, b in breaks] == [True, True, True, False, True]
        assert breaks[1][1][0] - breaks[1][0][1] - 1 == 7
        ws.close()


def test_a_delayed_snapshot_is_taken_when_asked_and_sent_later():
    with MexcSimulator(rate=0) as sim:
        sim.book_events(BTC, 3)
        sim.book_fault(BTC, "delay_snapshot", 1)
        started = time.monotonic()
        data = snapshot(sim)
        assert time.monotonic() - started >= 1.0
        assert int(data["version"]) == sim.true_books(BTC, [int(data["timestamp"])])[0][0]
        assert sim.depth_snapshots_served(BTC) == 1


def test_a_market_with_a_rate_makes_book_events_on_its_own():
    with MexcSimulator(rate=100) as sim:
        ws = connect_depth(sim, merged=False)
        frames = [json.loads(ws.recv()) for _ in range(50)]
        got = versions(frames)
        assert all(b[0] == a[1] + 1 for a, b in zip(got, got[1:]))
        ws.close()

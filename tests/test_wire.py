"""The MEXC wire format: every frame shape becomes the right row, exactly."""
import gzip
import json
import zlib

import pytest

from collector import wire
from core.channels import CHANNELS
from core.vocabulary import MESSAGE_TYPES

RTS = 1_755_487_600_000
SYM = "BTC_USDT"


def parse(text):
    return wire.parse(text, RTS, SYM)


def test_deal_list_keeps_exact_number_text():
    frame = ('{"symbol":"BTC_USDT","data":[{"p":115309.80,"v":55,"T":2,"O":3,"M":1,'
             '"t":1755487578276,"i":13064218826},{"p":7.548E+4,"v":0.0100,"T":1,"O":3,"M":1,'
             '"t":1755487578275,"i":"13064218827"}],"channel":"push.deal","ts":1755487578276}')
    kind, rows = parse(frame)
    assert kind == "deal"
    assert rows == [(1755487578276, "d", "115309.80|55|2|13064218826", RTS),
                    (1755487578275, "d", "7.548E+4|0.0100|1|13064218827", RTS)]


def test_a_trade_id_that_is_not_digits_is_no_id():
    for i in ('"x1"', "-3", "1.5", "null", '"١٢"'):  # the last: Arabic-Indic digits
        frame = ('{"symbol":"BTC_USDT","channel":"push.deal","data":[{"p":1.5,"v":2,"T":1,'
                 f'"t":9,"i":{i}}}]}}')
        assert parse(frame) == ("deal", [(9, "d", "1.5|2|1", RTS)]), i


def test_deal_single_object_and_key_order():
    frame = ('{"channel":"push.deal","ts":5,"data":{"t":1755487578276,"T":1,"v":3,"p":0.080100},'
             '"symbol":"BTC_USDT","cts":"123"}')
    assert parse(frame) == ("deal", [(1755487578276, "d", "0.080100|3|1", RTS)])


def test_ticker_row():
    frame = ('{"channel":"push.ticker","symbol":"BTC_USDT","ts":1,"data":{"lastPrice":122122.3,'
             '"fairPrice":122122.3,"indexPrice":122133.7,"holdVol":102648627,'
             '"fundingRate":0.00010000,"bid1":1,"ask1":2,"timestamp":1755487578000}}')
    assert parse(frame) == ("ticker", [(1755487578000, "t",
                                        "122122.3|122122.3|122133.7|102648627|0.00010000", RTS)])


def test_depth_top20_drops_order_count():
    bids = [(f"{122125.8 - i / 10:.2f}", 100 + i, 1) for i in range(25)]  # 122125.80: zeros kept
    asks = [(f"{122125.9 + i / 10:.1f}", f"{i + 1}E+2", 2) for i in range(25)]

    def side(levels):
        return "[" + ",".join(f"[{p},{a},{n}]" for p, a, n in levels) + "]"

    text = (f'{{"channel":"push.depth.full","symbol":"BTC_USDT","ts":1755487578111,'
            f'"data":{{"asks":{side(asks)},"bids":{side(bids)},"version":7}}}}')
    kind, rows = parse(text)
    assert kind == "depth.full"
    expected = "|".join(",".join(f"[{p},{a}]" for p, a, _ in levels[:20]) for levels in (bids, asks))
    assert rows == [(1755487578111, "dp", expected, RTS)]


def test_gzip_and_zlib_binary_frames_are_handled_normally():
    frame = b'{"channel":"push.deal","symbol":"BTC_USDT","data":[{"p":1.50,"v":2,"T":1,"t":9}]}'
    expected = ("deal", [(9, "d", "1.50|2|1", RTS)])
    assert parse(gzip.compress(frame)) == expected
    assert parse(zlib.compress(frame)) == expected


@pytest.mark.parametrize("frame, reason", [
    ("not json {", "not JSON"),
    ("[1,2]", "no channel"),
    ('{"channel":"push.mystery","symbol":"BTC_USDT","data":{}}', "unknown channel"),
    ('{"channel":"push.deal","symbol":"BTC_USDT","data":42}', "not a trade"),
    ('{"channel":"push.deal","symbol":"BTC_USDT","data":[]}', "not a trade"),
    ('{"channel":"push.deal","symbol":"BTC_USDT","data":[{"v":1,"T":1,"t":1}]}', "missing field 'p'"),
    ('{"channel":"push.deal","symbol":"BTC_USDT","data":[{"p":[1],"v":1,"T":1,"t":1}]}', "not numbers"),
    ('{"channel":"push.deal","symbol":"BTC_USDT","data":[{"p":"abc","v":1,"T":1,"t":1}]}', "not numbers"),
    ('{"channel":"push.deal","symbol":"BTC_USDT","data":[{"p":1,"v":1,"T":1,"t":1.5}]}', "integer milliseconds"),
    ('{"channel":"push.deal","symbol":"ETH_USDT","data":[{"p":1,"v":1,"T":1,"t":1}]}', "is not BTC_USDT"),
    ('{"channel":"push.depth.full","symbol":"BTC_USDT","ts":1,"data":{"bids":[[1,null]],"asks":[]}}', "not [price"),
    ('{"channel":"push.depth.full","symbol":"BTC_USDT","ts":1,"data":{"bids":{},"asks":[]}}', "not a list"),
    ('{"channel":"push.ticker","symbol":"BTC_USDT","data":{"lastPrice":1}}', "missing field"),
])
def test_frames_that_do_not_fit_become_dead_letters(frame, reason):
    kind, rows = parse(frame)
    assert kind.startswith("dead:") and reason in kind, kind
    assert rows == [(rows[0][0], "dl", frame[:500], RTS)]


def test_dead_letter_is_cut_to_500_chars_and_keeps_frame_ts():
    frame = '{"channel":"push.huge","ts":1755487578276,"data":"' + "x" * 5_000_000 + '"}'
    kind, rows = parse(frame)
    assert kind.startswith("dead:")
    assert rows == [(1755487578276, "dl", frame[:500], RTS)]


def test_undecodable_binary_and_zip_bomb():
    kind, rows = parse(b"\x00\x01\x02junk")
    assert kind.startswith("dead:binary frame") and rows[0][2] == "binary:" + b"\x00\x01\x02junk".hex()
    bomb = gzip.compress(b"0" * (wire.MAX_INFLATED_BYTES + 10))
    kind, rows = parse(bomb)
    assert "inflates past" in kind and rows[0][1] == "dl"


def test_control_frames():
    assert parse('{"channel":"pong","data":1755487578276,"ts":1}') == (wire.PONG, ())
    assert parse('{"channel":"rs.sub.deal","data":"success","ts":"1755487578276"}') == (wire.ACK, ())
    assert parse('{"ping":1755487578276}') == (wire.IGNORED, ())
    error = '{"channel":"rs.error","data":"Contract [NOPE_USDT] not exists","ts":"1755487578276"}'
    assert parse(error) == (wire.ERROR, [(1755487578276, "dl", error, RTS)])


def test_subscribe_requests_ask_for_every_trade_unmerged():
    requests = [json.loads(r) for r in wire.subscribe_requests("SOL_USDT", 20)]
    assert requests == [
        {"method": "sub.ticker", "param": {"symbol": "SOL_USDT"}},
        {"method": "sub.deal", "param": {"symbol": "SOL_USDT", "compress": False}},
        {"method": "sub.depth.full", "param": {"symbol": "SOL_USDT", "limit": 20}},
    ]
    merged = [json.loads(r) for r in wire.subscribe_requests("SOL_USDT", 5, merge_deals=True)]
    assert merged[1] == {"method": "sub.deal", "param": {"symbol": "SOL_USDT"}}
    assert merged[2]["param"]["limit"] == 5


def test_every_channel_of_the_table_is_subscribed_and_parsed():
    assert [json.loads(r)["method"] for r in wire.subscribe_requests(SYM)] == \
        [f"sub.{channel.name}" for channel in CHANNELS]
    for channel in CHANNELS:
        assert channel.mt in MESSAGE_TYPES  # a type ClickHouse's mt column knows
        kind, rows = parse(json.dumps({"channel": channel.push, "symbol": SYM, "data": {},
                                       "ts": 1}))
        assert kind.startswith(f"dead:{channel.push}: missing field")  # its parser said why
        assert rows == [(1, "dl", rows[0][2], RTS)]


def test_stale_depth_snapshot_becomes_a_dead_letter():
    def depth(version, ts):
        return ('{"channel":"push.depth.full","symbol":"BTC_USDT","ts":%d,"data":{"asks":'
                '[[2,1]],"bids":[[1,1]],"version":%d}}' % (ts, version))
    versions = {}
    assert wire.parse(depth(10, 1000), 5, "BTC_USDT", versions)[0] == "depth.full"
    kind, rows = wire.parse(depth(10, 1001), 5, "BTC_USDT", versions)  # not newer: stale
    assert kind == "dead:push.depth.full: stale version 10, not newer than 10"
    assert rows == [(1001, "dl", depth(10, 1001), 5)]
    assert wire.parse(depth(9, 1002), 5, "BTC_USDT", versions)[0].startswith("dead:")
    assert wire.parse(depth(11, 1003), 5, "BTC_USDT", versions)[0] == "depth.full"
    assert versions == {"BTC_USDT": 11}
    assert wire.parse(depth(1, 1004), 5, "BTC_USDT")[0] == "depth.full"  # nobody keeps count


def test_the_whole_book_subscription_increments_and_snapshot():
    full = [json.loads(r) for r in wire.subscribe_requests(SYM, 20, book="full")]
    assert [r["method"] for r in full] == ["sub.ticker", "sub.deal", "sub.depth"]
    assert full[2]["param"] == {"symbol": SYM, "compress": False}  # every change
    both = [json.loads(r) for r in wire.subscribe_requests(SYM, 20, book="both",
                                                           book_merge=True)]
    assert [r["method"] for r in both][2:] == ["sub.depth.full", "sub.depth"]
    assert both[3]["param"] == {"symbol": SYM}  # MEXC's merged frames
    merged = ('{"symbol":"%s","data":{"cts":1,"asks":[[0.080100,2868,1],[0.080140,7405,4]],'
              '"bids":[[0.07969,0,0]],"end":8752808003,"begin":8752807948,'
              '"version":8752808003},"channel":"push.depth","ts":17}' % SYM)
    assert parse(merged) == ("depth", [(17, "bu", "8752807948|8752808003|[0.07969,0]|"
                                              "[0.080100,2868],[0.080140,7405]", RTS)])
    unmerged = ('{"symbol":"%s","data":{"asks":[[2384.59,42,1]],"bids":[],"version":37},'
                '"channel":"push.depth","ts":18}' % SYM)
    assert parse(unmerged) == ("depth", [(18, "bu", "37|37||[2384.59,42]", RTS)])
    assert wire.book_versions("37|37||[2384.59,42]") == (37, 37)
    backwards = unmerged.replace('"version":37', '"begin":38,"end":37,"version":37')
    assert parse(backwards)[0].startswith("dead:push.depth: versions")
    body = (b'{"success":true,"code":0,"data":{"asks":[[1.50,3,1]],"bids":[[1.4,7E+1,2]],'
            b'"version":9,"timestamp":12}}')
    assert wire.depth_snapshot_row(body, RTS) == ((12, "bs", "9|[1.4,7E+1]|[1.50,3]", RTS), 9)
    with pytest.raises(wire.BadFrame):
        wire.depth_snapshot_row(b'{"success":false,"code":510,"message":"too frequent"}', RTS)

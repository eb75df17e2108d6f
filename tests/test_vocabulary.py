"""The shared words (core/vocabulary.py, core/channels.py): ChildId names, the row vocabulary,
the channels and their `m` layouts."""
import pytest

from core.channels import (DEAL_LAYOUT, DEPTH_LAYOUT, FIELD_SEPARATOR, TICKER_LAYOUT, deal_text,
                           deal_without_id, depth_text, ticker_text)
from core.vocabulary import (CHILD_KINDS, CLICKHOUSE, COLLECTOR, EXPORTER, MESSAGE_TYPES, ROW_COLUMNS,
                             TOR, ChildId, Row)


@pytest.mark.parametrize("text, child", [
    ("collector-btc", ChildId(COLLECTOR, "btc")),
    ("tor-btc", ChildId(TOR, "btc")),
    ("collector-1000pepe", ChildId(COLLECTOR, "1000pepe")),
    ("tor-btc-usdt", ChildId(TOR, "btc-usdt")),  # the name is everything after the first dash
    ("exporter", ChildId(EXPORTER)),
    ("clickhouse", ChildId(CLICKHOUSE)),
])
def test_child_ids_round_trip(text, child):
    assert ChildId.parse(text) == child
    assert str(child) == text
    assert ChildId.parse(str(child)) == child


def test_a_child_id_is_a_name_usable_as_a_key():
    assert ChildId(EXPORTER).name is None
    assert {ChildId.parse("collector-btc"): 1}[ChildId(COLLECTOR, "btc")] == 1
    assert f"{ChildId(COLLECTOR, 'eth')}" == "collector-eth"


def test_sibling():
    collector = ChildId.parse("collector-btc")
    assert collector.sibling(TOR) == ChildId(TOR, "btc")
    assert str(collector.sibling(TOR)) == "tor-btc"
    assert collector.sibling(TOR).sibling(COLLECTOR) == collector


@pytest.mark.parametrize("text", [
    "", "-", "collector", "collector-", "tor", "tor-", "exporter-btc", "clickhouse-x",
    "worker-btc", "Collector-btc", "collectors-btc", " collector-btc", "-btc",
])
def test_bad_names_raise_value_error(text):
    with pytest.raises(ValueError):
        ChildId.parse(text)


def test_every_kind_parses():
    for kind in CHILD_KINDS:
        name = "btc" if kind in (COLLECTOR, TOR) else None
        assert ChildId.parse(str(ChildId(kind, name))).kind == kind


def test_row_vocabulary():
    assert ROW_COLUMNS == ("ts", "mt", "m", "rts")
    assert MESSAGE_TYPES == ("t", "d", "dp", "dl", "bu", "bs")  # appended: ClickHouse's Enum8
    assert Row(1, "t", "{}", 2) == (1, "t", "{}", 2)


def test_layouts_spell_the_readme_examples_and_refuse_what_is_not_number_text():
    deal = deal_text("122115.1", 12, 2)
    assert deal == "122115.1|12|2" and DEAL_LAYOUT.fits(deal)
    assert len(deal.split(FIELD_SEPARATOR)) == len(DEAL_LAYOUT.fields)
    with_id = deal_text("122115.1", 12, 2, "13064218826")  # MEXC's trade id, when sent
    assert with_id == "122115.1|12|2|13064218826" and DEAL_LAYOUT.fits(with_id)
    assert deal_without_id(with_id) == deal_without_id(deal) == deal
    assert not DEAL_LAYOUT.fits("122115.1|12|2|") and not DEAL_LAYOUT.fits(deal + "|1x")
    ticker = ticker_text("122122.3", "122122.3", "122133.7", 102648627, "0.00010000")
    assert ticker == "122122.3|122122.3|122133.7|102648627|0.00010000"
    assert TICKER_LAYOUT.fits(ticker)
    assert len(ticker.split(FIELD_SEPARATOR)) == len(TICKER_LAYOUT.fields)
    bids = [["122125.8", 103673, 3], ["122125.7", 100518, 1]]
    depth = depth_text(bids, [["122125.9", 110108, 2]])
    assert depth == "[122125.8,103673],[122125.7,100518]|[122125.9,110108]"
    assert DEPTH_LAYOUT.fits(depth) and DEPTH_LAYOUT.fits(depth_text([], []))
    assert depth_text([[str(p), 1] for p in range(30)], []).count("[") == 20  # the top 20
    assert not DEAL_LAYOUT.fits(deal_text("[1]", 12, 2))
    assert not DEAL_LAYOUT.fits(deal_text("1", 12, 3))  # side is 1 (buy) or 2 (sell)
    assert not TICKER_LAYOUT.fits(ticker_text("1", "2", "3", "4", None))

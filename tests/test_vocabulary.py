"""The shared words (core/vocabulary.py): ChildId names and the row vocabulary."""
import pytest

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
    assert MESSAGE_TYPES == ("t", "d", "dp", "dl")
    assert Row(1, "t", "{}", 2) == (1, "t", "{}", 2)

"""The channels a collector subscribes to, and how a row's `m` spells each one's data.

This is the one place a channel is defined: its MEXC name, the message type of its rows and
its `m` layout (README "Row format").  collector/wire.py writes `m` through the `*_text`
functions below and checks each against its layout; mexc/history.py reads `m` back through
the layouts' fields and separators.  The simulator (mexc/simulator/) spells rows on its own,
on purpose: it is the oracle the collector is tested against.

Adding a channel: an entry in CHANNELS (and its message type in core/vocabulary.py
MESSAGE_TYPES, appended: the order is ClickHouse's Enum8), its parser and subscription in
collector/wire.py, and its test.  `mexc status` counts rows per message type.
"""
import re
from typing import Callable, NamedTuple, Optional, Tuple

from core.vocabulary import BOOK_UPDATE, DEAL, DEPTH, TICKER

FIELD_SEPARATOR = "|"  # between the fields of every layout
# a depth side: up to DEPTH_LEVELS levels, best first, each "[price,size]", joined by ","
DEPTH_LEVELS = 20
LEVEL_OPEN, LEVEL_FIELDS, LEVEL_CLOSE, LEVEL_SEPARATOR = "[", ",", "]", ","
DEAL_SIDES = ("buy", "sell")  # a deal's side field: 1 buy, 2 sell

# A field is number text exactly as the exchange sent it (trailing zeros, exponent forms).
_NUM = r"[-+]?[0-9][0-9.eE+\-]*"
_LEVELS = rf"(?:\[{_NUM},{_NUM}\](?:,\[{_NUM},{_NUM}\])*)?"


class Layout(NamedTuple):
    """How `m` spells a channel's data: named fields joined by FIELD_SEPARATOR."""
    fields: Tuple[str, ...]
    fits: Callable[[str], Optional[re.Match]]  # a well-formed m matches whole


TICKER_LAYOUT = Layout(("last_price", "fair_price", "index_price", "hold_vol", "funding_rate"),
                       re.compile(rf"{_NUM}(?:\|{_NUM}){{4}}").fullmatch)
# A deal's 4th field is MEXC's trade id `i` (digits), there when the frame had one: absent from
# REST backfill rows (the REST answer has no id) and from rows of mexc before 0.3 (issue 22).
# Readers take the first three fields; exporter/merge.py matches copies of a trade by its id.
DEAL_LAYOUT = Layout(("price", "volume", "side"),
                     re.compile(rf"{_NUM}\|{_NUM}\|[12](?:\|[0-9]+)?").fullmatch)
DEAL_ID_FIELD = len(DEAL_LAYOUT.fields)  # the id's index among a deal's fields
# A deal's m that carries a trade id, split in two: `core` (price|volume|side, as a REST row of
# the trade spells it) and `id` (exporter/merge.py matches the copies of a trade by it)
DEAL_WITH_ID = (r"^(?P<core>" + r"\|".join([r"[^|]*"] * DEAL_ID_FIELD)
                + r")\|(?P<id>[0-9]+)$")
DEPTH_LAYOUT = Layout(("bids", "asks"), re.compile(rf"{_LEVELS}\|{_LEVELS}").fullmatch)
# The whole book.  An increment: the versions it takes the book from begin to end (equal when
# unmerged), then the levels it sets, each side in the frame's order (not sorted), size 0
# deleting the level.  A snapshot: its version, then every level, best first.
BOOK_UPDATE_LAYOUT = Layout(("begin", "end", "bids", "asks"),
                            re.compile(rf"[0-9]+\|[0-9]+\|{_LEVELS}\|{_LEVELS}").fullmatch)
BOOK_SNAPSHOT_LAYOUT = Layout(("version", "bids", "asks"),
                              re.compile(rf"[0-9]+\|{_LEVELS}\|{_LEVELS}").fullmatch)


# The writers.  f-strings, not format templates: they run once per row on the collector's hot
# path, where str.format costs several times as much.

def ticker_text(last_price, fair_price, index_price, hold_vol, funding_rate) -> str:
    return f"{last_price}|{fair_price}|{index_price}|{hold_vol}|{funding_rate}"


def deal_text(price, volume, side, trade_id: str = "") -> str:
    """trade_id: MEXC's `i` as digits, "" when the frame had none (then no 4th field)."""
    if trade_id:
        return f"{price}|{volume}|{side}|{trade_id}"
    return f"{price}|{volume}|{side}"


def deal_without_id(m: str) -> str:
    """A deal's m without its trade id: what a REST row of the same trade spells."""
    price_volume_side = m.split(FIELD_SEPARATOR, DEAL_ID_FIELD)[:DEAL_ID_FIELD]
    return FIELD_SEPARATOR.join(price_volume_side)


def depth_text(bids: list, asks: list) -> str:
    """Levels are [price, size, ...] lists; the first DEPTH_LEVELS of each side are kept."""
    return _side_text(bids) + "|" + _side_text(asks)


def _side_text(levels: list) -> str:
    return ",".join([f"[{level[0]},{level[1]}]" for level in levels[:DEPTH_LEVELS]])


def book_update_text(begin: int, end: int, bids: list, asks: list) -> str:
    """An increment's versions and every level it sets ([price, size, ...] lists)."""
    return f"{begin}|{end}|{_all_levels(bids)}|{_all_levels(asks)}"


def book_snapshot_text(version: int, bids: list, asks: list) -> str:
    return f"{version}|{_all_levels(bids)}|{_all_levels(asks)}"


def _all_levels(levels: list) -> str:
    return ",".join([f"[{level[0]},{level[1]}]" for level in levels])


class Channel(NamedTuple):
    """A MEXC channel: `sub.{name}` subscribes to it, `push.{name}` frames carry its data."""
    name: str
    mt: str  # the message type of its rows, also its column in `mexc status`
    layout: Layout

    @property
    def push(self) -> str:
        return f"push.{self.name}"


TICKER_CHANNEL = Channel("ticker", TICKER, TICKER_LAYOUT)
DEAL_CHANNEL = Channel("deal", DEAL, DEAL_LAYOUT)
DEPTH_CHANNEL = Channel("depth.full", DEPTH, DEPTH_LAYOUT)
CHANNELS = (TICKER_CHANNEL, DEAL_CHANNEL, DEPTH_CHANNEL)  # in the order subscribed
BOOK_CHANNEL = Channel("depth", BOOK_UPDATE, BOOK_UPDATE_LAYOUT)  # the whole book's increments
BY_NAME = {channel.name: channel for channel in (*CHANNELS, BOOK_CHANNEL)}


def channels_for(book: str) -> tuple:
    """The channels of a symbol collecting exchange.book = book: "top" the top-N snapshots
    (CHANNELS, as before the whole book existed), "full" the increments instead, "both"."""
    if book == "top":
        return CHANNELS
    full = (TICKER_CHANNEL, DEAL_CHANNEL, BOOK_CHANNEL)
    return full if book == "full" else (*CHANNELS, BOOK_CHANNEL)

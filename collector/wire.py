"""MEXC futures WebSocket wire format: the requests we send and the rows a frame becomes.

This is the only module that knows MEXC's JSON.  `parse()` turns one received frame into
`(kind, rows)`; each row is a tuple `(ts, mt, m, rts)`: a core.vocabulary.Row.

Numbers keep the exchange's exact text: the JSON decoder hands float literals over as their
source text (`0.080100`, `7.548E+4`) instead of converting them through float.
"""
import json
import zlib
from typing import Optional

from core.channels import (BOOK_CHANNEL, BOOK_SNAPSHOT_LAYOUT, BOOK_UPDATE_LAYOUT, CHANNELS,
                           DEAL_CHANNEL, DEAL_LAYOUT, DEPTH_CHANNEL, DEPTH_LAYOUT,
                           TICKER_CHANNEL, TICKER_LAYOUT, book_snapshot_text, book_update_text,
                           channels_for, deal_text, depth_text, ticker_text)
from core.symbols import Contract
from core.vocabulary import BOOK_SNAPSHOT, DEAD_LETTER

DEAD_LETTER_CHARS = 500
MAX_INFLATED_BYTES = 16 * 1024 * 1024  # a compressed frame may not inflate beyond this

PING = '{"method":"ping"}'

# kinds returned by parse()
PONG, ACK, IGNORED, ERROR, DEAD = "pong", "ack", "ignored", "error", "dead"

_decode = json.JSONDecoder(parse_float=str).decode


class BadFrame(Exception):
    """The frame cannot become a data row; its message says why."""


def subscribe_requests(symbol: str, depth_limit: int = 20, merge_deals: bool = False,
                       book: str = "top", book_merge: bool = False):
    """The subscription frames, one per channel of core/channels.py that `book` (exchange.book)
    collects.  MEXC merges the prints of the deal stream, and the whole book's increments,
    unless the request says "compress": false; merge_deals and book_merge keep its default."""
    deal = {"symbol": symbol} if merge_deals else {"symbol": symbol, "compress": False}
    params = {TICKER_CHANNEL: {"symbol": symbol}, DEAL_CHANNEL: deal,
              DEPTH_CHANNEL: {"symbol": symbol, "limit": depth_limit},
              BOOK_CHANNEL: {"symbol": symbol} if book_merge else {"symbol": symbol,
                                                                   "compress": False}}
    return [json.dumps({"method": f"sub.{channel.name}", "param": params[channel]})
            for channel in channels_for(book)]


def parse(payload, rts: int, symbol: str, depth_versions: Optional[dict] = None):
    """One frame (str, or bytes for binary frames) -> (kind, rows).

    kind is a channel's name (core/channels.py) for data, or PONG, ACK, IGNORED, ERROR, DEAD
    (DEAD and ERROR come with one dead-letter row; for DEAD, `kind:reason` says why).
    depth_versions ({symbol: last version}, kept by the caller): a depth.full snapshot whose
    `version` is not newer than the last one is stale, and becomes a dead letter, so the dp
    rows never take the book back in time (README, "Stale depth snapshots").
    """
    if not isinstance(payload, str):
        try:
            payload = inflate(payload).decode()
        except (ValueError, zlib.error, UnicodeDecodeError) as e:
            return _dead(f"binary:{bytes(payload[:240]).hex()}", rts, rts, f"binary frame: {e}")
    try:
        frame = _decode(payload)
    except ValueError:
        return _dead(payload, rts, rts, "not JSON")
    channel = frame.get("channel") if type(frame) is dict else None
    if channel is None:
        if type(frame) is dict and "ping" in frame:
            return IGNORED, ()  # the legacy endpoint's {"ping": ms}
        return _dead(payload, rts, rts, "not a MEXC frame (no channel)")
    data_channel = _PUSHES.get(channel) if type(channel) is str else None
    if data_channel is not None:
        try:
            rows = _ROWS[data_channel](frame, rts, symbol)
            stale = data_channel is DEPTH_CHANNEL and _stale_version(frame, depth_versions, symbol)
        except (BadFrame, KeyError, IndexError, TypeError, AttributeError) as e:
            return _dead(payload, _frame_ts(frame, rts), rts, f"{channel}: {_reason(e)}")
        if stale:
            return _dead(payload, rows[0][0], rts, f"{channel}: {stale}")
        return data_channel.name, rows
    if channel == "pong":
        return PONG, ()
    if channel == "rs.error":
        return ERROR, [_dead_row(payload, _frame_ts(frame, rts), rts)]
    if isinstance(channel, str) and channel.startswith(("rs.sub.", "rs.unsub.")):
        return ACK, ()
    return _dead(payload, _frame_ts(frame, rts), rts, f"unknown channel {str(channel)[:60]!r}")


def inflate(data: bytes) -> bytes:
    """gzip or zlib -> bytes, refusing anything that inflates past MAX_INFLATED_BYTES."""
    for wbits in (31, 15):  # 31: gzip header, 15: zlib header
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, MAX_INFLATED_BYTES)
        except zlib.error:
            continue
        if inflater.unconsumed_tail:
            raise ValueError(f"inflates past {MAX_INFLATED_BYTES} bytes")
        if not inflater.eof:
            raise ValueError("truncated compressed data")
        return out
    raise ValueError("neither gzip nor zlib")


def _deal_rows(frame: dict, rts: int, symbol: str):
    _check_symbol(frame, symbol)
    data = frame["data"]
    trades = [data] if type(data) is dict else data
    if type(trades) is not list or not trades:
        raise BadFrame("data is not a trade or a list of trades")
    return [_trade_row(trade, rts) for trade in trades]


def _trade_row(trade: dict, rts: int):
    # A row must be number text in its layout; anything else (a nested list, a dict, null,
    # true, a JSON string of letters) means the frame's fields did not fit.
    m = deal_text(trade["p"], trade["v"], trade["T"], _trade_id(trade.get("i")))
    if not DEAL_LAYOUT.fits(m):
        raise BadFrame(f"trade fields are not numbers: {m[:80]!r}")
    return (_ms(trade["t"]), DEAL_CHANNEL.mt, m, rts)


def _trade_id(value) -> str:
    """MEXC's trade id as digits ("" when there is none): an int in its docs, a string of
    digits live.  Anything else is no id (the trade itself is still good)."""
    if type(value) is int and value >= 0:
        return str(value)
    if type(value) is str and value.isascii() and value.isdigit():
        return value
    return ""


def recent_deals_path(symbol: str, limit: int) -> str:
    """The REST request for a symbol's latest trades (newest first, limit at most 100)."""
    return f"/api/v1/contract/deals/{symbol}?limit={limit}"


def _rest_answer(body: bytes, data_type: type) -> dict:
    """A REST answer's JSON, when it says success and its `data` is a data_type; else
    BadFrame."""
    try:
        answer = _decode(body.decode())
    except (ValueError, UnicodeDecodeError):
        raise BadFrame(f"not JSON: {body[:120]!r}") from None
    if type(answer) is not dict or answer.get("success") is not True \
            or type(answer.get("data")) is not data_type:
        raise BadFrame(f"not a successful answer: {body[:200]!r}")
    return answer


def recent_deal_rows(body: bytes, rts: int):
    """The answer to recent_deals_path() -> deal rows, exactly as the WebSocket's trades
    become rows, in the answer's order.  Raises BadFrame for a failure answer or bad fields."""
    answer = _rest_answer(body, list)
    try:
        return [_trade_row(trade, rts) for trade in answer["data"]]
    except (KeyError, TypeError) as e:
        raise BadFrame(f"a trade does not fit: {_reason(e)}") from None


CONTRACTS_PATH = "/api/v1/contract/detail"  # every contract, with its state


def contract_list(body: bytes):
    """The answer to CONTRACTS_PATH -> [Contract] sorted by symbol.  Raises BadFrame for a
    failure answer (`{"success":false,"code":510,...}`: rate-limited) or an empty list; an
    entry without a symbol or state is left out (MEXC adds and drops fields)."""
    try:
        answer = json.loads(body.decode())
    except (ValueError, UnicodeDecodeError):
        raise BadFrame(f"not JSON: {body[:120]!r}") from None
    if type(answer) is not dict or answer.get("success") is not True \
            or type(answer.get("data")) is not list:
        raise BadFrame(f"not a successful answer: {body[:200]!r}")
    contracts = {}
    for entry in answer["data"]:
        if type(entry) is not dict or type(entry.get("symbol")) is not str \
                or type(entry.get("state")) is not int:
            continue
        contracts[entry["symbol"]] = Contract(
            entry["symbol"], entry["state"], str(entry.get("baseCoin", "")),
            str(entry.get("quoteCoin", "")), str(entry.get("settleCoin", "")),
            entry["futureType"] if type(entry.get("futureType")) is int else 1)
    if not contracts:
        raise BadFrame(f"no contract in the answer: {body[:200]!r}")
    return [contracts[symbol] for symbol in sorted(contracts)]


def _depth_rows(frame: dict, rts: int, symbol: str):
    _check_symbol(frame, symbol)
    data = frame["data"]
    m = depth_text(_side(data, "bids"), _side(data, "asks"))
    if not DEPTH_LAYOUT.fits(m):
        raise BadFrame(f"depth levels are not [price, size, ...] numbers: {m[:80]!r}")
    return [(_ms(frame["ts"]), DEPTH_CHANNEL.mt, m, rts)]


def _book_rows(frame: dict, rts: int, symbol: str):
    """An increment of the whole book: one row, its versions first (begin = end = version
    when unmerged)."""
    _check_symbol(frame, symbol)
    data = frame["data"]
    version = data["version"]
    begin, end = data.get("begin", version), data.get("end", version)
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
        raise BadFrame(f"versions begin={begin!r:.30} end={end!r:.30} are not rising integers")
    m = book_update_text(begin, end, _side(data, "bids"), _side(data, "asks"))
    if not BOOK_UPDATE_LAYOUT.fits(m):
        raise BadFrame(f"depth levels are not [price, size, ...] numbers: {m[:80]!r}")
    return [(_ms(frame["ts"]), BOOK_CHANNEL.mt, m, rts)]


def book_versions(m: str):
    """(begin, end) of an increment row's m."""
    begin, end, _rest = m.split("|", 2)
    return int(begin), int(end)


def depth_snapshot_path(symbol: str) -> str:
    """The REST request for the whole book with its version."""
    return f"/api/v1/contract/depth/{symbol}"


def depth_snapshot_row(body: bytes, rts: int):
    """The answer to depth_snapshot_path() -> (a BOOK_SNAPSHOT row, its version).  The row's ts
    is the answer's `timestamp` (the exchange's ms of the book), else rts.  Raises BadFrame
    for a failure answer or bad fields."""
    answer = _rest_answer(body, dict)
    data = answer["data"]
    try:
        version, stamp = data["version"], data.get("timestamp", rts)
        if type(version) is not int or version < 0:
            raise BadFrame(f"version {version!r:.30} is not an integer")
        m = book_snapshot_text(version, _side(data, "bids"), _side(data, "asks"))
    except (KeyError, TypeError, IndexError) as e:
        raise BadFrame(f"the snapshot does not fit: {_reason(e)}") from None
    if not BOOK_SNAPSHOT_LAYOUT.fits(m):
        raise BadFrame(f"depth levels are not [price, size, ...] numbers: {m[:80]!r}")
    return (_ms(stamp), BOOK_SNAPSHOT, m, rts), version


def _stale_version(frame: dict, depth_versions: Optional[dict], symbol: str) -> str:
    """Why the snapshot is stale ("" when it is not); remembers a newer version."""
    version = frame["data"].get("version")
    if depth_versions is None or type(version) is not int:
        return ""
    last = depth_versions.get(symbol)
    if last is not None and version <= last:
        return f"stale version {version}, not newer than {last}"
    depth_versions[symbol] = version
    return ""


def _side(data: dict, key: str) -> list:
    side = data[key]
    if type(side) is not list:
        raise BadFrame("depth side is not a list")
    return side


def _ticker_rows(frame: dict, rts: int, symbol: str):
    _check_symbol(frame, symbol)
    d = frame["data"]
    m = ticker_text(d["lastPrice"], d["fairPrice"], d["indexPrice"], d["holdVol"],
                    d["fundingRate"])
    if not TICKER_LAYOUT.fits(m):
        raise BadFrame(f"ticker fields are not numbers: {m[:80]!r}")
    return [(_ms(d["timestamp"]), TICKER_CHANNEL.mt, m, rts)]


def _check_symbol(frame: dict, symbol: str) -> None:
    if frame.get("symbol") != symbol:
        raise BadFrame(f"symbol {str(frame.get('symbol'))[:30]!r} is not {symbol}")


def _ms(value) -> int:
    """An exchange timestamp in ms; ints only (a float or string timestamp does not fit)."""
    if type(value) is not int or value < 0:
        raise BadFrame(f"timestamp {str(value)[:30]!r} is not integer milliseconds")
    return value


def _frame_ts(frame, rts: int) -> int:
    ts = frame.get("ts") if isinstance(frame, dict) else None
    if type(ts) is int and ts >= 0:
        return ts
    if type(ts) is str and ts.isdigit():
        return int(ts)
    return rts


def _dead_row(text: str, ts: int, rts: int):
    return (ts, DEAD_LETTER, text[:DEAD_LETTER_CHARS], rts)


def _dead(text: str, ts: int, rts: int, reason: str):
    return f"{DEAD}:{reason}", [_dead_row(text, ts, rts)]


def _reason(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"missing field {e.args[0]!r}"
    return str(e) or type(e).__name__


# each channel's parser: push frame -> its rows
_ROWS = {TICKER_CHANNEL: _ticker_rows, DEAL_CHANNEL: _deal_rows, DEPTH_CHANNEL: _depth_rows,
         BOOK_CHANNEL: _book_rows}
_PUSHES = {channel.push: channel for channel in (*CHANNELS, BOOK_CHANNEL)}

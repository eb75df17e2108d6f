"""Backfill's logic: the REST answer as rows, the multiset match (with the tables and the files of
exported hours), coverage, the budget; the HTTP answer read off a real socket."""
import socket
import time

import pytest

from collector import wire
from collector.backfill import REST_LIMIT, Backfill, RateBudget
from collector.connection import ProtocolError, read_response
from core.archive import file_name
from core.clock import HOUR_MS
from core.config import Symbol
from core.store import rows_batch
from exporter import parquet_files

ANSWER = (b'{"success":true,"code":0,"data":['
          b'{"p":101.50,"v":3,"T":1,"O":1,"M":2,"t":1005},'
          b'{"p":101.50,"v":3,"T":1,"O":1,"M":2,"t":1005},'
          b'{"p":7.548E+4,"v":1,"T":2,"O":3,"M":1,"t":1003},'
          b'{"p":101.4,"v":2,"T":2,"O":3,"M":1,"t":1001}]}')


class Stored:
    """What ClickHouse holds: deals_between as Store answers it."""

    def __init__(self, deals, exported_until=0):
        self.deals, self.until = deals, exported_until

    def deals_between(self, _name, start_ms, end_ms):
        return [(t, m) for t, m in self.deals if start_ms <= t <= end_ms]

    def exported_until(self, _symbol):
        return self.until


class Submitted:
    def __init__(self):
        self.rows = []

    def submit(self, rows):
        self.rows += rows


def backfill(writer, export_dir="/nonexistent"):
    ex = {"rest_url": "http://127.0.0.1:1/", "connect_timeout": 1.0, "ca_file": ""}
    return Backfill(ex, Symbol("BTC_USDT", "btc"), None, writer, export_dir)


def test_answer_becomes_deal_rows_with_the_exchange_text():
    rows = wire.recent_deal_rows(ANSWER, 77)
    assert rows[0] == (1005, "d", "101.50|3|1", 77)
    assert rows[2] == (1003, "d", "7.548E+4|1|2", 77)
    assert len(rows) == 4


@pytest.mark.parametrize("body", [b"not json", b'{"success":false,"code":1001,"message":"x"}',
                                  b'{"success":true,"data":[{"p":1,"v":1,"T":1}]}',
                                  b'{"success":true,"data":[{"p":"x","v":1,"T":1,"t":5}]}'])
def test_failure_answers_are_refused(body):
    with pytest.raises(wire.BadFrame):
        wire.recent_deal_rows(body, 1)


def answer(raw: bytes, pieces: int = 3):
    """read_response of `raw` sent in `pieces` parts, then the server's end of the connection."""
    ours, server = socket.socketpair()
    with ours:
        with server:
            step = len(raw) // pieces + 1
            for i in range(0, len(raw), step):
                server.sendall(raw[i:i + step])
        return read_response(ours.recv)


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nhel\r\n2\r\nlo\r\n"
    b"0\r\nX-Trailer: 1\r\n\r\n",
    b"HTTP/1.0 200 OK\nServer: old\n\nhello",  # bare LF, the body up to the connection's end
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"])
def test_the_rest_answer_is_framed_as_its_headers_say(raw):
    assert answer(raw) == (200, b"hello")


@pytest.mark.parametrize("raw, error", [
    (b"SSH-2.0-OpenSSH\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello!\r\n0\r\n\r\n",
     ProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello", ConnectionResetError)])
def test_a_broken_rest_answer_raises(raw, error):
    with pytest.raises(error):
        answer(raw)


def test_two_identical_prints_in_one_ms_are_neither_merged_nor_doubled():
    writer = Submitted()
    fetched = wire.recent_deal_rows(ANSWER, 77)
    # one of the two identical prints at 1005 came over the WebSocket (the gap's end frame)
    stored = Stored([(1001, "101.4|2|2"), (1005, "101.50|3|1")])
    count, covered = backfill(writer).fill(fetched, 1001, 1005, stored)
    assert [r[:3] for r in writer.rows] == [(1003, "d", "7.548E+4|1|2"), (1005, "d", "101.50|3|1")]
    assert count == 2
    assert covered  # fewer trades than asked for: all there is


def test_trades_outside_the_gap_are_left_alone_and_a_full_page_must_reach_back():
    writer = Submitted()
    fetched = [(2000 - i, "d", "1|1|1", 5) for i in range(REST_LIMIT)]  # 1901..2000
    count, covered = backfill(writer).fill(fetched, 1950, 1960, Stored([]))
    assert count == 11 and all(1950 <= r[0] <= 1960 for r in writer.rows)
    assert covered
    count, covered = backfill(Submitted()).fill(fetched, 1800, 1960, Stored([]))
    assert count == 60 and not covered  # the page ends at 1901: 1800..1900 are out of reach


def exported_hour(directory, hour_ms, deals):
    """An hour's file as the exporter writes it, holding these (ts, m) deal rows."""
    rows = [(ts, "d", m, ts + 5) for ts, m in deals] + [(hour_ms + 7, "t", "ticker", hour_ms + 9)]
    parquet_files.write_hour(str(directory / file_name("btc", hour_ms)),
                             parquet_files.to_table([rows_batch(rows)]), "BTC_USDT", hour_ms)


def test_an_exported_hours_file_counts_as_stored(tmp_path):
    """The gap reaches into an hour exported before it closed: the trades in its file are not
    written again (the exporter would merge them into the file twice), the others are, and
    the exporter merges those like any late row."""
    edge = HOUR_MS - 2  # the last trade of hour 0, delivered by the WebSocket, in the file
    exported_hour(tmp_path, 0, [(edge, "5|1|1"), (edge - 10, "5|1|1")])
    fetched = [(HOUR_MS + 3, "d", "6|1|1", 9), (HOUR_MS - 1, "d", "5|2|2", 9),
               (edge, "d", "5|1|1", 9), (edge, "d", "5|1|1", 9)]
    writer = Submitted()
    count, covered = backfill(writer, tmp_path).fill(
        fetched, edge, HOUR_MS + 3, Stored([(HOUR_MS + 3, "6|1|1")], exported_until=HOUR_MS))
    # one of the two identical prints at `edge` is in the file, the other is not
    assert [r[:3] for r in writer.rows] == [(edge, "d", "5|1|1"), (HOUR_MS - 1, "d", "5|2|2")]
    assert count == 2 and covered


def test_no_trade_is_written_into_an_exported_hour_without_its_file(tmp_path):
    """The file was moved away: whether a trade is in it is unknown, so none is written there,
    and the gap is not covered."""
    fetched = [(HOUR_MS + 3, "d", "6|1|1", 9), (HOUR_MS - 1, "d", "5|2|2", 9)]
    writer = Submitted()
    count, covered = backfill(writer, tmp_path).fill(
        fetched, HOUR_MS - 5, HOUR_MS + 3, Stored([], exported_until=HOUR_MS))
    assert [r[0] for r in writer.rows] == [HOUR_MS + 3] and count == 1
    assert not covered


def test_no_file_is_read_when_no_trade_fetched_lies_in_an_exported_hour():
    """A collector reads an hour's file only when the REST answer has trades of that hour
    (rare: the gap closed within a page's reach of the hour's end, after its export)."""
    fetched = [(HOUR_MS + 3, "d", "6|1|1", 9), (HOUR_MS + 1, "d", "5|2|2", 9)]
    writer = Submitted()
    count, covered = backfill(writer, "/nonexistent").fill(
        fetched, HOUR_MS - 5, HOUR_MS + 3, Stored([], exported_until=HOUR_MS))
    assert count == 2 and covered  # fewer than a page: all there is, none in hour 0


def test_rate_budget_waits_for_a_slot():
    budget = RateBudget(requests=3, window=0.3)
    started = time.monotonic()
    for _ in range(4):
        budget.take()
    assert time.monotonic() - started >= 0.25

"""The soak's accounting (bench/soaklib): rows a real simulator sent, checked against what a
collector would have stored, and the gap ledger and the trades checked against the outage
windows and the simulator's truth.  Fast: WebSocket and REST clients, no daemon."""
import os
import sys
import time
import types
import urllib.request

import pytest

from core.vocabulary import GAP_DISCONNECT, GAP_STALL, Gap
from mexc.simulator import MexcSimulator, RestAnswer, Trade
from tests.test_simulator import (connect, exact_json, ping, poll, recv_json, recv_until_pong,
                                  rows_of, subscribe)
from tests.test_simulator_market import subscribed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from soaklib import accounting, common, ledger, windows  # noqa: E402
from soaklib.report import Report, SymbolReport  # noqa: E402

CHANNELS = ("deal", "depth.full", "ticker")


def read_rows(ws, seconds):
    """The rows of every push frame that arrives on ws for `seconds`."""
    rows, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        frame = recv_json(ws)
        if frame["channel"].startswith("push."):
            rows += rows_of(frame)
    return rows


@pytest.mark.slow  # seconds of sockets or a daemon: full suite only, the quick loop stays under a minute (issue 27)
@pytest.mark.timeout(60)
def test_rows_sent_on_a_superseded_connection_are_not_lost_outside_windows():
    """Issue 16: after kill_tor the collector is connected again through the new tor (its
    outage window closes) while the killed tor's exit stream is still open at the exit relay
    and the simulator's sendall() keeps completing on it.  Rows only that connection carried
    reach nobody: they are 'lost on a superseded connection', not 'lost outside outage
    windows'.  A row the live connection delivered and the collector did not store is still
    lost outside windows."""
    name = "sol"
    symbol = common.SYMBOLS[name]
    with MexcSimulator(rate=50) as sim:
        old = connect(sim)
        for channel in CHANNELS:
            subscribe(old, channel, symbol)
        received = read_rows(old, 0.5)
        # The collector loses the old connection without closing it (its tor died; the exit
        # relay keeps the stream), so the old connection stays open and unread from here on.
        window_start = time.time()
        new = connect(sim)
        for channel in CHANNELS:
            subscribe(new, channel, symbol)
        received += read_rows(new, 0.3)
        window_end = time.time()  # the status sampler sees the collector connected again
        after = read_rows(new, 2.0)  # beyond the window and its slack
        sim.stop_data()
        ping(new)  # the pong comes after every frame sent before it: read them all
        after += [row for _, payload in recv_until_pong(new)
                  for row in rows_of(exact_json(payload))]
        orphaned = sim.orphaned_rows(symbol)
        both_open = sim.connections == 2
        old.close()
        new.close()
    assert both_open, "the old connection must outlive the window, as an exit stream does"
    # The market pushes to both connections: what the live one read is not orphaned, and the
    # rows on the old one are recorded once.  Orphaned are only pushes the live connection
    # missed (e.g. ticker frames before its sub.ticker).
    assert len(after) > 50
    assert not orphaned & set(received + after), "a row that was read is orphaned"
    sent = [row for row in sim.expected_rows(symbol) if row[0] is not None]
    assert len(sent) == len(set(sent)), "a push sent on both connections was recorded twice"
    # A correct collector stores everything it received, except one row we drop on purpose:
    # a row that the live connection delivered must still count as lost outside windows.
    dropped = after[len(after) // 2]
    stored = accounting.Stored()
    for ts, mt, m in received + after:
        if ts != dropped[0]:
            stored.add(ts, mt, m)
    soak = types.SimpleNamespace(
        sim=sim, speed=1.0, anchor=0, injections=[], events=[], ledger={},  # event ms = wall ms
        windows=[windows.Window(name, start=window_start, end=window_end, causes=["kill_tor"])])
    report = accounting.account_symbol(soak, name, stored)
    assert report.lost_outside == 1, report
    assert report.lost_orphaned + report.lost_in_windows + report.lost_outside \
        == report.sent - report.stored


# --- the gap ledger against the windows, the trades against the truth ---------------------------

def gap(start_ms, end_ms, covered=False, backfilled=0, reason=GAP_DISCONNECT, symbol="BTC_USDT"):
    return Gap(symbol, "btc", start_ms, end_ms, reason, "", backfilled, covered, 0)


def answer(oldest_t, newest_t, count=100, limit=100, symbol="BTC_USDT", latest_ms=None):
    latest_ms = newest_t if latest_ms is None else latest_ms
    return RestAnswer("127.0.0.1", symbol, limit, count, oldest_t, newest_t, latest_ms)


def test_every_window_after_the_first_data_needs_an_overlapping_record():
    windows_ = [(0, 40), (100, 200), (300, 400), (500, 600)]
    gaps = [gap(150, 250), gap(590, 700)]
    # (0, 40) comes before anything was stored: the symbol's startup, nothing to record
    assert ledger.without_record(windows_, gaps, first_stored_ms=50) == [(300, 400)]
    assert ledger.without_record(windows_, [], first_stored_ms=None) == []
    assert ledger.without_record(windows_, gaps + [gap(400, 410)], 50) == []


def test_a_gap_is_reachable_when_an_answer_after_it_reached_back_to_its_start():
    g = gap(100, 200)
    assert not ledger.reachable(g, [answer(50, 150)])  # served before the gap ended
    assert not ledger.reachable(g, [answer(120, 260)])  # a full page not reaching back
    assert ledger.reachable(g, [answer(120, 260), answer(90, 300)])
    assert ledger.reachable(g, [answer(120, 260, count=40)])  # every trade there was
    assert not ledger.reachable(g, [answer(90, 300, symbol="ETH_USDT")])
    assert not ledger.reachable(g, [answer(None, None, count=0)])  # before any frame
    assert ledger.reachable(g, [answer(None, None, count=0, latest_ms=200)])  # no trade at all
    # the gap ended with a depth frame; no trade since: the answer still holds the whole gap
    assert ledger.reachable(g, [answer(90, 190, latest_ms=205)])


def test_trades_missing_before_and_after_backfill():
    trades = [Trade("BTC_USDT", t, "1", "1", 1, 1, 1, t) for t in range(100)]
    windows_ = [(20, 39), (60, 79)]
    in_windows = {t for a, b in windows_ for t in range(a, b + 1)}
    sent = set(range(100)) - in_windows  # the stream missed every trade in the windows
    backfilled = set(range(20, 40)) | set(range(60, 70))  # the second page fell short
    gaps = [gap(19, 40, covered=True, backfilled=20), gap(59, 80, backfilled=10)]
    answers = [answer(10, 50), answer(70, 99, count=30, limit=30)]  # only the first reached

    def figures(gaps, stored):
        f = ledger.ledger_figures(windows_, gaps, answers, first_stored_ms=0)
        ledger.count_trades(f, windows_, gaps, answers, trades, sent.__contains__,
                            lambda trade: trade.t in stored)
        return f
    f = figures(gaps, sent | backfilled)
    assert (f.gaps, f.covered, f.reachable, f.backfilled) == (2, 1, 1, 30)
    assert f.reasons == {GAP_DISCONNECT: 2}
    assert (f.windows_needing_record, f.windows_without_record) == (2, 0)
    # the gaps reach one ms beyond each window: holes are windows and gaps
    assert (f.trades, f.in_holes, f.never_sent) == (100, 44, 40)
    assert (f.missing_before_backfill, f.missing_after_backfill) == (40, 10)
    assert (f.missing_in_reachable_gaps, f.missing_in_covered_gaps) == (0, 0)
    assert f.missing_elsewhere == 0
    [by_reason] = f.by_reason.values()  # the soak's report: per reason, lengths and trades
    assert (by_reason.gaps, by_reason.seconds) == (2, [0.021, 0.021])
    assert (by_reason.missing_before_backfill, by_reason.missing_after_backfill) == (40, 10)
    # a ledger that claims coverage it does not have, a backfill that skipped a reachable
    # trade, a trade lost where no window or gap says so
    f = figures([gap(19, 40, covered=True), gap(59, 80, covered=True, reason=GAP_STALL)],
                (sent | backfilled) - {25, 5})
    assert (f.missing_in_covered_gaps, f.missing_in_reachable_gaps) == (11, 1)
    assert (f.missing_after_backfill, f.missing_elsewhere) == (11, 1)
    missing = {reason: (r.missing_before_backfill, r.missing_after_backfill)
               for reason, r in f.by_reason.items()}
    assert missing == {GAP_DISCONNECT: (20, 1), GAP_STALL: (20, 10)}
    report = Report(1, 1.0, 5.0, 20.0, False, "ch18", symbols=[SymbolReport("btc", ledger=f)])
    assert "  stall: 1 gaps, median 0.0 s, p95 0.0 s; trades missing 20 -> 10" in \
        report.reason_lines()
    # the same per fault kind: the kinds that explain each gap (accounting.fault_kinds)
    kinds = ["kill_collector", "stall"]
    f = ledger.ledger_figures(windows_, gaps, answers, 0, kinds=kinds)
    ledger.count_trades(f, windows_, gaps, answers, trades, sent.__contains__,
                        lambda trade: trade.t in (sent | backfilled) - {25})
    missing = {kind: (r.gaps, r.missing_before_backfill, r.missing_after_backfill)
               for kind, r in f.by_kind.items()}
    assert missing == {"kill_collector": (1, 20, 1), "stall": (1, 20, 10)}
    lines = Report(1, 1.0, 5.0, 20.0, False, "ch18",
                   symbols=[SymbolReport("btc", ledger=f)]).reason_lines()
    assert lines[lines.index("gaps by fault kind (wall seconds; trades missing inside, before "
                             "-> after backfill):") + 2] == \
        "  stall: 1 gaps, median 0.0 s, p95 0.0 s; trades missing 20 -> 10"
    # trades after the stream's last row sent (the run's end) are left out
    sent -= {99}
    assert figures(gaps, sent | backfilled).trades == 99


def test_a_gap_is_put_down_to_the_faults_injected_while_it_was_open():
    """Per fault kind: a connection fault aimed at the symbol or at every symbol, within
    FAULT_SLACK of the gap; one aimed at another symbol, or long over, or one that opens no
    gap (a ClickHouse outage) explains nothing."""
    anchor = 1_000_000_000  # ms: the wall second 1_000_000
    soak = types.SimpleNamespace(anchor=anchor, speed=10.0, events=[
        windows.Event(1_000_010.0, "kill_collector", "btc", 0.0),
        windows.Event(1_000_011.0, "kill_collector", "eth", 0.0),  # another symbol's
        windows.Event(1_000_030.0, "stall", "", 3.0),  # every symbol's
        windows.Event(1_000_031.0, "clickhouse_outage", "", 5.0),
        windows.Event(1_000_100.0, "stop_collector", "btc", 2.0)])  # a hang: +heartbeat
    ms = lambda wall: accounting.event_ms(soak, wall)  # noqa: E731
    gaps = [gap(ms(1_000_009.5), ms(1_000_012.0)), gap(ms(1_000_033.0), ms(1_000_034.0)),
            gap(ms(1_000_060.0), ms(1_000_061.0)), gap(ms(1_000_109.0), ms(1_000_110.0))]
    assert accounting.fault_kinds(soak, "btc", gaps) == [
        "kill_collector", "stall", ledger.NO_FAULT, "stop_collector"]
    soak.events.append(windows.Event(1_000_032.0, "disconnect", "", 0.0))
    assert accounting.fault_kinds(soak, "btc", gaps)[1] == "disconnect+stall"


def test_a_reconnect_long_after_a_kill_is_no_victim_of_it():
    """A window names the fault that signalled its process by pid (also one that came after
    the window opened), but only a window that ended with a new process: after a restart the
    status keeps naming the killed pid as last_exit while the new process runs, and a later
    reconnect of it is no victim of that kill (cluster soak seed 7: a reconnect's window was
    pulled back 14 minutes to a kill, and the host taken for absent all that time)."""
    kill = windows.Event(1_000.0, "kill_collector", "eth", 0.0, "pid 42")
    restart = windows.Window("eth", start=999.0, end=1_002.0, detected=1_001.0, restarted=True,
                             last_exit="pid 42 killed by SIGKILL")
    windows.name_causes(restart, [kill], {"kill_collector": False}, 6.0)
    assert restart.causes == ["kill_collector"] and restart.start == 999.0
    later = windows.Window("eth", start=1_840.0, end=1_845.0, detected=1_841.0,
                           restarted=False, last_exit="pid 42 killed by SIGKILL")
    windows.name_causes(later, [kill], {"kill_collector": False}, 6.0)
    assert later.causes == [] and later.start == 1_840.0


def test_a_process_that_outlived_a_fault_is_the_victim_of_its_last_one_only():
    """Two SIGSTOPs of one collector: it outlived the first (3 s) and was killed as hung in
    the second; its restart's window starts at the second, not two minutes earlier at the
    first (cluster soak seed 11: that stretch of data counted as an outage)."""
    first = windows.Event(1_000.0, "stop_collector", "sol", 2.9, "pid 42")
    second = windows.Event(1_131.0, "stop_collector", "sol", 7.3, "pid 42")
    window = windows.Window("sol", start=1_136.0, end=1_141.0, detected=1_137.5,
                            restarted=True, last_exit="pid 42 killed by SIGKILL")
    windows.name_causes(window, [first, second], {"stop_collector": False}, 6.0)
    assert window.causes == ["stop_collector"] and window.start == 1_130.5


def deal_rows(ws):
    """Rows of every push received up to the pong of a ping sent now."""
    ping(ws)
    return [row for _, payload in recv_until_pong(ws) for row in rows_of(exact_json(payload))]


class Clock:
    """The simulator's event clock, set by the test (ms)."""
    now_ms = 1_000_000

    def __call__(self):
        return self.now_ms


def test_a_window_backfilled_over_rest_is_recorded_and_complete():
    """A client that, like a correct collector, stores what it received, misses a stretch
    while disconnected, and fills it from the simulator's REST API: the accounting finds the
    record, nothing missing after backfill, and the backfilled rows as such (not 'never
    sent')."""
    name, clock = "btc", Clock()
    symbol = common.SYMBOLS[name]
    with MexcSimulator(rate=0, event_clock=clock) as sim:
        ws = subscribed(sim, symbol, compress=False)
        sim.trade(symbol, 5)
        before = deal_rows(ws)
        ws.close()
        # the simulator sees the close on its own thread; until then it still sends (CI,
        # loaded: the outage's 30 trades all counted as sent, none as backfilled)
        poll(lambda: not sim.streaming_to(symbol), what="the simulator to see the close")
        clock.now_ms = 2_000_000  # the outage: the market trades, nobody listens
        missed = [trade for _ in range(10) for trade in sim.trade(symbol, 3)]
        clock.now_ms = 3_000_000  # connected again: one trade arrives, then the backfill
        ws = subscribed(sim, symbol, compress=False)
        sim.trade(symbol, 1)
        after = deal_rows(ws)
        ws.close()
        url = f"{sim.rest_url}/api/v1/contract/deals/{symbol}?limit=100"
        with urllib.request.urlopen(url, timeout=5) as response:
            fetched = [(int(d["t"]), "d", f'{d["p"]}|{d["v"]}|{d["T"]}')
                       for d in exact_json(response.read())["data"]]
        start, end = max(before)[0], min(after)[0]  # the last row before, the first after
        backfill = [row for row in fetched if start < row[0] < end]
        stored = accounting.Stored()
        for row in before + after + backfill:
            stored.add(*row)
        window = windows.Window(name, start=1_500.0, end=2_500.0, causes=["disconnect"])
        soak = types.SimpleNamespace(sim=sim, speed=1.0, anchor=0, injections=[], events=[],
                                     windows=[window], ledger={name: []})
        assert accounting.account_symbol(soak, name, stored).ledger.windows_without_record == 1
        soak.ledger[name] = [gap(start, end, covered=True, backfilled=len(backfill))]
        report = accounting.account_symbol(soak, name, stored)
    f = report.ledger
    assert len(backfill) == len(missed) == 30
    assert report.backfilled == 30 and report.unrecorded_in_windows == 0
    assert (f.windows_without_record, f.reachable, f.covered) == (0, 1, 1)
    # the gap holds its two edge trades, which the stream delivered
    assert (f.trades, f.in_holes, f.never_sent, f.missing_before_backfill) == (36, 32, 30, 30)
    assert (f.missing_after_backfill, f.missing_in_reachable_gaps, f.missing_elsewhere) \
        == (0, 0, 0)
    assert report.duplicates == report.lost_outside == report.corrupt == 0


class SentRecord:
    """What the accounting asks of the simulator, for rows made up by a test."""

    def __init__(self, rows):
        self.rows = rows

    def expected_rows(self, _symbol=None):
        return self.rows

    def trades(self, _symbol):
        return []

    def orphaned_rows(self, _symbol):
        return set()

    def rest_answers(self, _symbol):
        return []


@pytest.mark.parametrize("reason, lost_outside", [
    ("dead_socket", 0),  # the whole recorded silence before the window is explained
    ("collector_crash", 8),  # deals are stepped over for a SIGKILL's allowance (2.5 s) only
    (None, 18),  # no record: the first backfilled deal ends the run of lost rows
])
def test_a_recorded_silence_before_a_window_explains_its_lost_rows_and_no_more(reason, lost_outside):
    """Seed 23's eth: a socket went silent at 6.0 s (no fault aimed at it; a stalled circuit),
    was found dead 4 s later, and the soak's window opened at 10.0 s.  The rows lost from 6.0 s
    are in the ledger's dead_socket gap, and deals inside it were stored by backfill, which cut
    the walk back from the window (soak: 104 rows lost outside windows).  A ledger gap explains
    a dead socket's silence, bounded by dead_after; backfilled deals are stepped over only for
    a SIGKILL's allowance, so seconds of rows lost before a kill (issue 28) still count."""
    name = "eth"
    rows = [(ts, "d" if ts % 300 == 0 else "dp", f"{ts}") for ts in range(0, 20_000, 100)]
    stored = accounting.Stored()
    for ts, mt, m in rows:  # silent from 6.0 s to 12.0 s; only backfilled deals there
        if not 6_000 <= ts < 12_000 or (mt == "d" and ts < 9_000):
            stored.add(ts, mt, m)
    ledger = [gap(5_900, 12_000, reason=reason, symbol="ETH_USDT")] if reason else []
    soak = types.SimpleNamespace(
        sim=SentRecord(rows), speed=1.0, anchor=0, injections=[], events=[], ledger={name: ledger},
        windows=[windows.Window(name, start=10.5, end=12.5, causes=[])])  # wall s = event s
    report = accounting.account_symbol(soak, name, stored)
    assert report.lost_outside == lost_outside
    assert report.lost_in_windows + report.lost_outside == report.sent - report.stored == 50


@pytest.mark.parametrize("reason, lost_outside", [("stall", 0), ("collector_crash", 30)])
def test_a_silence_recorded_while_make_before_break_kept_the_collector_connected(reason,
                                                                                 lost_outside):
    """Seed 47: a 7-s stall, the socket judged and replaced without a break, so the status
    never showed it disconnected and no window opened; the ledger's stall (or dead_socket)
    record holds the lost rows.  Any other record does not explain rows outside windows."""
    name = "sol"
    rows = [(ts, "dp", f"{ts}") for ts in range(0, 10_000, 100)]
    stored = accounting.Stored()
    for ts, mt, m in rows:
        if not 4_000 <= ts < 7_000:
            stored.add(ts, mt, m)
    soak = types.SimpleNamespace(
        sim=SentRecord(rows), speed=1.0, anchor=0, injections=[], windows=[], events=[],
        ledger={name: [gap(3_900, 7_000, reason=reason, symbol="SOL_USDT")]})
    report = accounting.account_symbol(soak, name, stored)
    assert report.lost_outside == lost_outside
    assert report.lost_in_recorded_silences == 30 - lost_outside


def test_a_merged_file_holds_each_event_once_under_the_host_that_stored_it(tmp_path):
    """The cluster soak's check of one merged file (soaklib/cluster_archive.py): a trade twice
    (its row with the trade id and a REST row without it), a depth snapshot twice, a row
    under a host that did not store it, a dead letter no host's copy has, and rows inside a
    gap that says no host covered them are each counted."""
    import pyarrow as pa
    from soaklib import cluster_archive

    hosts = {h: types.SimpleNamespace(name=h, export_dir=str(tmp_path / h)) for h in
             ("h1", "h2", "h3")}
    soak = types.SimpleNamespace(hosts=hosts, speed=1.0)
    stored = {h: {"btc": accounting.Stored()} for h in hosts}
    stored["h1"]["btc"].add(1000, "d", "1.5|2|1|77")
    stored["h1"]["btc"].add(1001, "dp", "1|1|2|1")
    stored["h2"]["btc"].add(1000, "d", "1.5|2|1")
    rows = [(1000, "d", "1.5|2|1|77", "h1"), (1000, "d", "1.5|2|1", "h2"),
            (1001, "dp", "1|1|2|1", "h1"), (1001, "dp", "1|1|2|1", "h1"),
            (1002, "t", "1.5|9", "h3"), (1003, "dl", "junk", "h1"), (1004, "d", "1.6|1|2|78", "h1")]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("ts", "mt", "m", "host"))})
    a, seen = cluster_archive.ArchiveFigures(), set()
    gap = Gap("BTC_USDT", "btc", 1000, 1005, "daemon_restart", "no host covered it", 0, False, 0)
    cluster_archive.account_file(soak, a, "btc", 0, "btc_19700101_0000.parquet", table, stored,
                                 seen, [gap])
    assert a.rows == 7 and seen == {1000, 1001, 1002, 1004}
    assert a.doubled == 2  # trade 77 with and without its id; the depth snapshot
    assert a.misattributed == 2  # h3 stored no ticker at 1002, h1 no trade at 1004
    assert (a.dead_letters, a.dead_letters_extra, a.dead_letters_missing) == (1, 1, 0)
    assert a.rows_in_gaps == 3 and "inside its gap" in a.gap_examples[0]
    assert a.outside_hour == 0


def test_only_the_settled_version_under_a_version_merged_during_the_stop_is_excused():
    """A host holding the version settled before the stop, while ZooKeeper names one merged
    after the first SIGTERM, is counted apart; a host with any other bytes, or a newer version
    written before the stop, is not (soaklib/cluster_archive.py late_holders)."""
    from soaklib import cluster_archive

    def soak_with(mtime_ms):
        zk = types.SimpleNamespace(exists=lambda path: types.SimpleNamespace(mtime=mtime_ms))
        return (types.SimpleNamespace(zk_root="/mexc", stop_sent={"h1": 100.0, "h2": 103.0},
                                      settled_versions={("btc", 0): "old"}),
                types.SimpleNamespace(zk=zk))
    sums = {"h1": "old", "h2": "other", "h3": "new"}
    soak, nodes = soak_with(101_000)  # merged 1 s after the first SIGTERM
    assert cluster_archive.late_holders(soak, nodes, "btc", 0, {"sha256": "new"}, sums) == ["h1"]
    soak, nodes = soak_with(99_000)  # before the stop: every difference counts
    assert cluster_archive.late_holders(soak, nodes, "btc", 0, {"sha256": "new"}, sums) == []

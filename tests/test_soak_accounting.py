"""The soak's accounting (bench/soaklib): rows a real simulator sent, checked against what a
collector would have stored.  Fast: two WebSocket clients, no daemon."""
import os
import sys
import time
import types

import pytest

from mexc.simulator import MexcSimulator
from tests.test_simulator import (connect, exact_json, ping, recv_json, recv_until_pong, rows_of,
                                  subscribe)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from soaklib import accounting, common, windows  # noqa: E402

CHANNELS = ("deal", "depth.full", "ticker")


def read_rows(ws, seconds):
    """The rows of every push frame that arrives on ws for `seconds`."""
    rows, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        frame = recv_json(ws)
        if frame["channel"].startswith("push."):
            rows += rows_of(frame)
    return rows


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
        sim=sim, speed=1.0, anchor=0, injections=[],  # the event clock is wall ms
        windows=[windows.Window(name, start=window_start, end=window_end, causes=["kill_tor"])])
    report = accounting.account_symbol(soak, name, stored)
    assert report.lost_outside == 1, report
    assert report.lost_orphaned + report.lost_in_windows + report.lost_outside \
        == report.sent - report.stored

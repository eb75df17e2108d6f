"""The whole order book end to end: the simulator's full book through a real daemon (its
collector, exporter and ClickHouse), rebuilt by mexc.history at random instants and compared
with the simulator's true book, through every kind of break (a dropped increment, a version
jump, two frames reordered, a reconnect with a delayed snapshot, a collector SIGKILL, a daemon
restart, hour boundaries); and the logic of the replay and of the collector's check."""
import os
import random
import signal
import subprocess
import time

import pytest

from bus import sockets
from core.clock import HOUR_MS, EventClock
from core.vocabulary import GAP_BOOK_RESYNC
from mexc import fullbook, history
from mexc.simulator import MexcSimulator
from tests.conftest import MEXC, wait_for

pytestmark = pytest.mark.timeout(180)
BTC = "BTC_USDT"
SPEED = 600.0  # an hour of event time in 6 s


def resyncs(env) -> list:
    return [g for g in env.gaps("btc") if g.reason == GAP_BOOK_RESYNC]


def collector_pid(runtime_dir: str):
    try:
        children = sockets.request(runtime_dir, "status", timeout=5)["result"]["children"]
    except sockets.NotRunning:
        return None
    return next((c["pid"] for c in children if c["name"] == "collector-btc"), None)


def exported_hours(env) -> int:
    with env.store() as session:
        return len(session.logged_exports(BTC)) if session.exists("export_log") else 0


def instants_outside(rng, start_ms: int, end_ms: int, windows, n: int) -> list:
    """n random ms in [start_ms, end_ms] outside every window [a, b]."""
    found = []
    while len(found) < n:
        t = rng.randint(start_ms, end_ms)
        if not any(a <= t <= b for a, b in windows):
            found.append(t)
    return found


# The book's merging is the exchange's and the daemon's, not the server's: each mode runs on one
# release (unmerged on 18.16, merged on 26.x), and so every release stores, exports and reads
# back a whole book through every break.
@pytest.mark.slow
@pytest.mark.one_clickhouse_per("merged", [False, True], ids=["unmerged", "merged"])
def test_the_rebuilt_book_is_the_true_book_through_every_break(env, merged):
    anchor = int(time.time() * 1000)
    clock = EventClock(speed=SPEED, anchor_ms=anchor)
    with MexcSimulator(rate=60, event_clock=clock.now_ms) as sim:
        config = env.write_config(
            sim.url, symbols=[{"symbol": BTC, "book": "full"}],
            exchange={"book_merge": merged, "book_snapshot_interval": 1.5},
            export={"clock_speed": SPEED, "clock_anchor_ms": anchor, "delay": 5.0},
            supervisor={"heartbeat_timeout": 10.0})
        daemon = env.mexc("run", "--config", config, name="daemon")
        runtime_dir = str(env.tmp / "run")
        wait_for(lambda: any(mt == "bs" for _ts, mt, _m in env.rows()), 30, "a first snapshot")
        daemons = [daemon]

        def restart_daemon():
            assert daemons[-1].stop(20) == 0
            daemons.append(env.mexc("run", "--config", config, name="daemon"))

        breaks = [lambda: sim.book_fault(BTC, "drop"),
                  lambda: sim.book_fault(BTC, "jump", 5),
                  lambda: sim.book_fault(BTC, "reorder"),
                  lambda: (sim.book_fault(BTC, "delay_snapshot", 1), sim.force_disconnect()),
                  lambda: os.kill(collector_pid(runtime_dir), signal.SIGKILL),
                  restart_daemon]
        for done, make_break in enumerate(breaks, 1):
            make_break()
            wait_for(lambda: len(resyncs(env)) >= done, 30, f"book resync {done} recorded")
            sim.book_fault(BTC, "delay_snapshot", 0)
        daemon = daemons[-1]
        wait_for(lambda: exported_hours(env) >= 2, 60, "two hours exported")
        # the last events' frames go out: dropped, they were versions the truth holds and the
        # collector never saw, with no increment after them to show the hole (CI, loaded: the
        # last 3 versions, 6 of 100 instants)
        sim.stop_data(send_queued=True)
        last_event = sim.true_books(BTC, [clock.now_ms()])[0]
        archive = history.Archive.from_config(config)
        wait_for(lambda: stored_version(archive, clock.now_ms()) == last_event[0], 30,
                 "the last increment stored")

        records = resyncs(env)
        assert len(records) == len(breaks)  # one record per resync, no more
        assert all("snapshot" in g.detail and "->" in g.detail for g in records)
        windows = [(g.start_ms, g.end_ms) for g in env.gaps("btc")]
        instants = instants_outside(random.Random(24), first_snapshot_ms(archive, anchor,
                                                                       clock.now_ms()),
                                    clock.now_ms(), windows, 100)
        rebuilt = archive.books_at(BTC, instants)
        truth = sim.true_books(BTC, instants)
        unknown = [(t, b) for t, b in zip(instants, rebuilt) if isinstance(b, Exception)]
        assert not unknown, unknown[:3]
        differ = [t for t, b, (version, bids, asks) in zip(instants, rebuilt, truth)
                  if (b.version, b.bids, b.asks) != (version, bids, asks)]
        assert not differ, (f"{len(differ)} of 100 instants differ, first {differ[:3]}: "
                            + "; ".join(_differ_detail(t, instants, rebuilt, truth, windows)
                                        for t in differ[:3]))
        hours = {t // HOUR_MS for t in instants}
        assert len(hours) >= 2, "the instants span an hour boundary"
        at = instants[0]
        answer = subprocess.run([MEXC, "book", BTC, "--at", str(at), "--levels", "3",
                                 "--format", "csv", "--config", config], capture_output=True,
                                text=True, timeout=60)
        assert answer.returncode == 0, answer.stderr
        lines = answer.stdout.splitlines()
        assert lines[0] == "ts,side,level,price,size,rts"
        _version, bids, asks = truth[0]
        assert [tuple(map(float, line.split(",")[3:5])) for line in lines[1:]] == \
            bids[:3] + asks[:3]
        verify = subprocess.run([MEXC, "verify", "--config", config], capture_output=True,
                                text=True, timeout=60)
        assert "book:" in verify.stdout and " 0 differ" in verify.stdout, verify.stdout
        assert daemon.stop(20) == 0
        assert not any("Traceback" in d.log() for d in daemons)


def _differ_detail(at: int, instants, rebuilt, truth, windows) -> str:
    """What a failure needs: the versions rebuilt and true at an instant, and the nearest
    ledger windows on each side."""
    book, (version, _bids, _asks) = rebuilt[instants.index(at)], truth[instants.index(at)]
    before = max((w for w in windows if w[1] < at), default=None, key=lambda w: w[1])
    after = min((w for w in windows if w[0] > at), default=None, key=lambda w: w[0])
    return (f"at {at} rebuilt v{book.version} (its last change at {book.ts}), true v{version}; "
            f"windows before {before} after {after}")


def first_snapshot_ms(archive, since_ms: int, until_ms: int) -> int:
    """The exchange ms of the first whole-book snapshot in the archive in the range."""
    table = archive._rows("btc", "bs", since_ms, until_ms, history._identity)
    return min(table.column("ts").cast("int64").to_pylist())


def stored_version(archive, at_ms: int):
    """The version of the whole book rebuilt at at_ms (None: unknown there)."""
    book = archive.books_at(BTC, [at_ms])[0]
    return None if isinstance(book, Exception) else book.version


@pytest.mark.slow  # a collector process: the quick loop stays under a minute
@pytest.mark.one_clickhouse
def test_both_books_agree_the_rebuilt_top_20_is_every_depth_full_snapshot(env):
    """exchange.book = "both": at each top-20 snapshot's ms, the book rebuilt from the whole
    book's rows has the same 20 levels a side."""
    with MexcSimulator(rate=40) as sim:
        config = env.write_config(sim.url, symbols=[{"symbol": BTC, "book": "both"}])
        proc = env.mexc("collect", "--config", config, "--symbol", BTC, name="collector")
        wait_for(lambda: sum(1 for _ts, mt, _m in env.rows() if mt == "dp") >= 40, 30,
                 "40 top-20 snapshots stored")
        sim.stop_data()
        sent = [row for row in sim.expected_rows(BTC) if row[1] in ("dp", "bu")]
        wait_for(lambda: set(sent) <= set(env.rows()), 30, "every frame's row stored")
        assert proc.stop() == 0
    snapshots = [(ts, m) for ts, mt, m in env.rows() if mt == "dp"]
    archive = history.Archive.from_config(config)
    rebuilt = archive.books_at(BTC, [ts for ts, _m in snapshots])
    checked = 0
    for (ts, m), book in zip(snapshots, rebuilt):
        if isinstance(book, fullbook.BookUnknown):
            continue  # before the first whole-book snapshot
        bids, asks = m.split("|")
        top = [[(float(p), float(s)) for p, s in fullbook.levels(side)] for side in (bids, asks)]
        assert [book.bids[:20], book.asks[:20]] == top, ts
        checked += 1
    assert checked >= len(snapshots) - 3 and checked >= 30


# --- the replay's logic --------------------------------------------------------------------

def snap(ts, version, bids, asks):
    return fullbook.Snapshot(ts, version, bids, asks)


def up(ts, begin, end, bids="", asks=""):
    return fullbook.Update(ts, begin, end, bids, asks)


def test_replay_applies_what_follows_skips_what_the_snapshot_holds_and_stops_at_a_hole():
    snaps = [snap(100, 10, "[5,1],[4,2]", "[6,3]")]
    ups = [up(90, 9, 10, "[5,9]"),  # in the snapshot already (its clock ran behind)
           up(110, 11, 11, "[4,0]"),  # deletes
           up(120, 12, 13, "", "[7,1]"),  # merged
           up(130, 15, 15, "[3,1]")]  # 14 missing
    at_105, at_125, at_135, at_50 = fullbook.books_at([105, 125, 135, 50], snaps, ups)
    assert (at_105.version, at_105.bids, at_105.asks) == (10, [(5.0, 1.0), (4.0, 2.0)],
                                                         [(6.0, 3.0)])
    assert (at_125.version, at_125.bids, at_125.asks) == (13, [(5.0, 1.0)],
                                                         [(6.0, 3.0), (7.0, 1.0)])
    assert isinstance(at_135, fullbook.BookUnknown) and "14..14 missing" in str(at_135)
    assert isinstance(at_50, fullbook.BookUnknown)


def test_check_hour_compares_every_later_snapshot_and_rebases_after_a_hole():
    snaps = [snap(100, 10, "[5,1]", ""), snap(200, 12, "[5,2]", "[6,1]"),
             snap(300, 13, "[5,3]", ""),  # the replay says [5,2]: differs
             snap(400, 20, "[5,4]", "")]  # after the hole 14..19: a re-base
    ups = [up(150, 11, 11, "[5,2]"), up(160, 12, 12, "", "[6,1]"), up(250, 13, 13, "", "[6,0]"),
           up(350, 20, 20, "[5,4]")]
    assert fullbook.check_hour(snaps, ups) == fullbook.HourCheck(4, 2, 1, 1)


# --- the collector's continuity check (its logic, without a network) ---------------------------

class Ledger:
    """Takes what BookKeeper records, as GapLedger.book_resync would."""

    def __init__(self):
        self.records = []

    def book_resync(self, start_ms, end_ms, detail):
        self.records.append((start_ms, end_ms, detail))


def keeper():
    from collector.book import BookKeeper
    from core.config import Symbol
    ex = {"rest_url": "http://127.0.0.1:1", "book_snapshot_interval": 0.0}
    return BookKeeper(ex, Symbol(BTC, "btc"), None, None, Ledger(), {}, "/nonexistent")


def bu(ts, begin, end):
    return (ts, "bu", f"{begin}|{end}||[1,1]", ts)


def test_a_restart_breaks_the_book_where_the_earlier_run_stopped_not_at_its_own_rows(env):
    """After a restart the first resync looks up the newest increment stored.  By then this
    run's writer may have stored its own first ones (a loaded CI machine): the break is where
    the earlier run stopped, or its record leaves the stretch before them uncovered, where
    the book is not known (2 of 100 instants differed from the true book once)."""
    from collector.book import BookKeeper
    from core.config import Symbol
    with env.store() as store:
        store.setup(["btc"])
        book = BookKeeper({"rest_url": "http://127.0.0.1:1", "book_snapshot_interval": 0.0},
                          Symbol(BTC, "btc"), None, None, Ledger(), env.ch_section(),
                          str(env.tmp))
        earlier = book.started_ms - 5_000
        store.insert_rows("btc_current", [(1_000, "bu", "7|7||[1,1]", earlier),
                                          (2_000, "bu", "9|9||[1,1]", book.started_ms + 1)])
    book._where_an_earlier_run_stopped()
    assert book.broke == (7, 1_000, "collector start")


def test_a_break_holds_increments_until_a_snapshot_drops_those_it_holds_and_applies_the_rest():
    book = keeper()
    book.restarted = False  # a first start: nothing broke before it
    for ts, version in ((10, 100), (11, 101)):
        book.on_increment(bu(ts, version, version))
    assert book.state != "synced" and book.asked  # no snapshot yet: held, asked for one
    book.answers.append(((12, "bs", "100||", 12), 100))
    assert book.poll(0.0) == [(12, "bs", "100||", 12)]
    assert (book.state, book.last_end, book.ledger.records) == ("synced", 101, [])
    book.on_increment(bu(13, 102, 104))  # merged, in sequence
    book.on_increment(bu(14, 106, 106))  # 105 missed: a break
    book.on_increment(bu(15, 105, 105))  # out of order: held too
    book.on_increment(bu(16, 107, 107))
    book.answers.append(((17, "bs", "103||", 17), 103))  # older than what is held: ask again
    book.poll(0.0)
    assert book.state != "synced" and book.retry_at > 0
    book.answers.append(((18, "bs", "106||", 18), 106))
    book.poll(0.0)
    assert (book.state, book.last_end) == ("synced", 107)
    assert book.ledger.records == [(13, 18, "version 106..106 after 104: versions 104 -> "
                                            "snapshot 106, in sequence again from 107")]
    book.on_increment(bu(19, 106, 106))  # in flight when the snapshot was taken: in it
    book.on_increment(bu(20, 108, 108))
    assert (book.state, book.last_end) == ("synced", 108)
    book.reconnected()
    book.on_increment(bu(30, 200, 200))
    book.answers.append(((31, "bs", "199||", 31), 199))
    book.poll(0.0)
    assert (book.state, book.last_end) == ("synced", 200)
    assert book.ledger.records[-1][2].startswith("reconnect: versions 108 -> snapshot 199")

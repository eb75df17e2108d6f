"""The writer's exactly-once rule for an insert that failed after sending (it may have landed),
against a real ClickHouse: the batch is stored once whether or not it had landed, also when
someone else (the exporter moving rows back) changed the table meanwhile."""
import collections
import math
import signal
import socket
import subprocess
import sys

import pyarrow as pa
import pytest

from collector.spool import Spool, SpoolBusy
from collector.writer import LATENCY_MARGIN, SPOOL_AFTER, RowWriter, WriterState
from core import archive
from core.clock import HOUR_MS
from core.store import Store
from exporter import parquet_files
from tests.conftest import wait_for


def rows(tag, n=50):
    return [(1_700_000_000_000 + i, "d", f"{tag}|{i}|1", 1_700_000_000_500 + i) for i in range(n)]


@pytest.fixture
def writer(env, tmp_path):
    ch = env.ch_section()
    Store(ch).create_database()
    # a short latency target: the first batch is inserted at once, not 0.8 s later
    w = RowWriter(ch, "btc", Spool(str(tmp_path / "spool"), "btc"), max_buffered_rows=1000,
                  latency_target=LATENCY_MARGIN + 0.05)
    yield w
    w.stop(grace=2.0)


def insert_directly(env, batch):
    with env.store() as store:
        store.insert_rows("btc_current", batch)


def stored(env):
    return collections.Counter(env.rows(rts=True))


@pytest.mark.parametrize("landed", [True, False])
@pytest.mark.parametrize("someone_else_wrote", [False, True])
def test_unsure_insert_is_stored_exactly_once(env, writer, landed, someone_else_wrote):
    writer.start()
    first = rows("first")
    writer.submit(first)
    wait_for(lambda: writer.rows_written == len(first), 20, "the first batch stored")
    batch = rows("unsure")
    # The state after an insert that broke after sending: pending, unsure, count known before.
    with writer.storing:
        writer.pending, writer.unsure = batch, True
        if landed:
            insert_directly(env, batch)
        if someone_else_wrote:
            insert_directly(env, rows("moved-back", 7))
    with writer.wakeup:
        writer.wakeup.notify()
    wait_for(lambda: writer.pending is None, 20, "the unsure batch resolved")
    counts = stored(env)
    assert all(counts[row] == 1 for row in batch), "the unsure batch is not stored exactly once"
    assert sum(counts.values()) == len(first) + len(batch) + (7 if someone_else_wrote else 0)


def test_a_spool_has_one_user_at_a_time(tmp_path):
    """Sizes and offsets live in memory: a second user would delete the first one's batches."""
    directory = str(tmp_path / "spool")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from collector.spool import Spool; "
         f"s = Spool({directory!r}, 'btc'); s.append([(1, 'd', 'x', 2)]); print('ok', flush=True);"
         " sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ok\n"
        with pytest.raises(SpoolBusy, match=f"locked by pid {holder.pid}"):
            Spool(directory, "btc", lock_wait=0.3)
        assert Spool(directory, "btc", readonly=True).rows == 1  # looking is allowed
        holder.send_signal(signal.SIGKILL)  # a dead process holds no lock
        holder.wait()
        assert Spool(directory, "btc", lock_wait=5).rows == 1
    finally:
        holder.kill()
        holder.wait()


def test_an_insert_is_due_at_batch_rows_or_before_the_latency_target(tmp_path):
    """Few rows wait (one insert per latency target instead of one per read); batch_rows rows,
    spooled rows and a batch being retried are due at once."""
    w = RowWriter({"database": "mexc"}, "btc", Spool(str(tmp_path / "spool"), "btc"),
                  max_buffered_rows=1000, batch_rows=10, latency_target=1.0)
    assert w._until_due() is None
    w.submit(rows("few", 3))
    assert 0.5 < w._until_due() <= 1.0 - LATENCY_MARGIN
    w.submit(rows("enough", 7))
    assert w._until_due() == 0.0
    w.queue.clear()
    w.queued_rows = 0
    w.pending = rows("retried", 1)
    assert w._until_due() == 0.0
    w.pending = None
    w.spool.append(rows("spooled", 1))
    assert w._until_due() == 0.0
    w.spool.close()


def test_a_stop_during_a_hold_spools_the_held_rows_after_its_grace_and_ends_stopped(tmp_path):
    """No ClickHouse needed: nothing is inserted while a rotation holds the table."""
    w = RowWriter({"database": "mexc"}, "btc", Spool(str(tmp_path / "spool"), "btc"),
                  max_buffered_rows=1000, latency_target=60.0)
    assert (w.state, w.stop_deadline, w.held) == (WriterState.RUNNING, math.inf, None)
    w.start()
    w.hold("r1")
    wait_for(w.holding, 5, "the hold on")
    w.submit(rows("held", 5))  # not due for a minute: stays in memory during the hold
    w.stop(grace=0.3)
    assert w.state is WriterState.STOPPED and not w.failed
    assert w.spool.rows == 5 and w.held.rotation == "r1"


@pytest.mark.slow
def test_an_insert_that_hung_before_it_failed_spools_the_queue_at_once(tmp_path):
    """A server that accepts and does not answer (one shutting down) keeps the first insert
    hanging; when it fails, the failing time counts from its start, so every waiting row goes
    to the spool at once (a SIGKILL now costs nothing already received), not SPOOL_AFTER later."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    ch = {"host": "127.0.0.1", "port": listener.getsockname()[1], "user": "default",
          "password": "", "database": "mexc"}
    w = RowWriter(ch, "btc", Spool(str(tmp_path / "spool"), "btc"), max_buffered_rows=1000,
                  latency_target=0.3)
    w.store.timeout = SPOOL_AFTER + 1.0  # the hang's length: longer than SPOOL_AFTER
    w.start()
    try:
        w.submit(rows("first", 5))
        wait_for(lambda: w.pending, 5, "the first insert under way")
        w.submit(rows("waiting", 7))  # queued behind the hanging insert
        wait_for(lambda: w.insert_errors >= 1, 30, "the hanging insert failed")
        wait_for(lambda: w.spool.rows == 12, 1.0, "all 12 rows spooled at the first failure")
        assert w.insert_errors == 1
    finally:
        w.stop(grace=0.5)
        listener.close()


@pytest.mark.parametrize("landed", [True, False, "exported"])
def test_an_earlier_runs_unsure_insert_swapped_away_by_a_rotation_is_not_inserted_again(
        env, tmp_path, landed):
    """The 30-minute soak (seed 47): a collector died inserting its first spooled batch, a
    rotation swapped its table before the next run started, and the new table happened to hold
    as many rows as the marker had counted: 'had not landed', inserted again, 6 rows doubled.
    An earlier run's batch is looked for by its rows, in current and in previous, and in the
    hour's file when the exporter wrote it and dropped previous before the next run started."""
    ch = env.ch_section()
    directory = str(tmp_path / "spool")
    batch, moved_back = rows("unsure", 6), rows("moved-back", 7)
    with env.store() as session:
        session.setup(["btc"])
        session.insert_rows("btc_current", rows("before", 7))
        # the earlier run: its first spooled batch marked in flight at 7 rows, then it dies
        subprocess.run([sys.executable, "-c", "from collector.spool import Spool; "
                        f"s = Spool({directory!r}, 'btc'); s.append({batch!r}); "
                        f"s.mark_inflight({session.count('btc_current')}, {len(batch)}); "
                        "s.close()"], check=True, timeout=30)
        if landed:
            session.insert_rows("btc_current", batch)
        session.swap("btc")  # the rotation: current -> previous, a new empty current
        session.insert_rows("btc_current", moved_back)  # 7 again, as the marker counted
        if landed == "exported":  # previous written to its hour's file, then dropped
            hour = batch[0][0] // HOUR_MS * HOUR_MS
            exported = list(session.rows("btc_previous"))
            parquet_files.write_hour(archive.hour_path(str(tmp_path), "btc", hour),
                                     parquet_files.to_table([pa.RecordBatch.from_pylist(
                                         [dict(zip(("ts", "mt", "m", "rts"), row))
                                          for row in exported])]), "BTC_USDT", hour)
            session.client.execute(f"DROP TABLE {env.database}.btc_previous")
    writer = RowWriter(ch, "btc", Spool(directory, "btc"), max_buffered_rows=1000,
                       latency_target=LATENCY_MARGIN + 0.05, files_dir=str(tmp_path))
    writer.start()
    try:
        wait_for(lambda: not writer.spool, 20, "the spooled batch resolved")
    finally:
        writer.stop(grace=2.0)
    with env.store() as session:
        stored_rows = [row for table in ("btc_current", "btc_previous")
                       if session.exists(table) for row in list(session.rows(table))]
    counts = collections.Counter(stored_rows)
    if landed == "exported":  # in the file, and not in a table again
        assert archive.holds_rows(str(tmp_path), "btc", batch)
        assert all(counts[row] == 0 for row in batch), "the exported batch was inserted again"
    else:
        assert all(counts[row] == 1 for row in batch), "the unsure batch is not stored exactly once"

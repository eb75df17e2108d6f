"""One symbol's collector: socket -> parse -> batch -> store.

The receive loop (this thread) reads frames, turns them into rows (wire.parse), and hands the
rows of each read to the RowWriter, which decides when to insert (`batch_rows`,
`latency_target`).  Between frames it keeps the connection honest: a ping every
`ping_interval` seconds whatever arrives, a dead socket after `dead_after` seconds without a
frame, a stale one once no data came for far longer than its busy channels' rhythm (see
_ChannelWatch), an alarm for a subscribed channel that stays silent, a stats line every
`stats_interval` seconds.  A socket we drop because it stopped delivering is replaced at once,
in the next dial slot of the host (collector/pacing.py DialPacer); a silence is judged without
the time this process could not run (Starvation: it pinged no one then).

Make before break: a suspect socket, or one we replace on purpose (SIGUSR1: the supervisor
moving us to a new exit), is replaced by opening and subscribing the new connection first;
both are read until the new one delivers everything the old one would (collector/overlap.py
stores each event once), then the old one is closed (`exchange.make_before_break`).

With the whole book (exchange.book "full" or "both"), each increment's versions are checked
as it is stored (collector/book.py, after a handover's overlap has dropped the doubles), and
the REST snapshots it fetches are stored with the frames' rows.

At live rates a collector has almost nothing to do, and every wake-up of a thread costs about
as much as parsing a frame: so the loop blocks on the socket until the next of those deadlines
is due (or a frame arrives), never on a fixed tick, and the bus thread sleeps until its next
heartbeat or event.
"""
import collections
import logging
import os
import random
import select
import signal
import threading
import time
from typing import Optional, Tuple

import websocket

from bus.rotation import Holder
from collector import wire
from collector.backfill import Backfill, RateBudget
from collector.book import BookKeeper
from collector.connection import OP_CLOSE, OP_TEXT, FrameReader, open_websocket
from collector.gaps import GapLedger
from collector.overlap import NEW, OLD, Overlap
from collector.pacing import DialPacer, Starvation
from collector.spool import Spool
from collector.writer import RowWriter
from core import archive
from core.channels import BOOK_CHANNEL, Channel, channels_for
from core.clock import EventClock
from core.log import set_level
from core.process import STOP_SIGNALS
from core.store import COPY_LOG
from core.vocabulary import (BOOK_SNAPSHOT, COLLECTOR, DEAD_LETTER, GAP_COLLECTOR_RESTART,
                             GAP_DEAD_SOCKET, GAP_DISCONNECT, GAP_EXCHANGE_ERROR, GAP_STALL,
                             GAP_TOR_RESTART, MESSAGE_TYPES, ChildId)

log = logging.getLogger(__name__)

MAX_WAIT = 1.0  # longest the loop blocks: bounds how late it sees SIGTERM or a failed writer
HEALTHY_AFTER = 60.0  # a connection that lived this long resets the reconnect backoff
STOP_GRACE = 5.0  # seconds SIGTERM waits for ClickHouse before spooling the rest
# A heartbeat every HEARTBEAT_INTERVAL s, or more often when supervisor.heartbeat_timeout
# allows fewer than HEARTBEATS_PER_TIMEOUT of them: the supervisor decodes every one (300
# collectors at 1 s: a third of its CPU), and status shows figures up to one interval old.
HEARTBEAT_INTERVAL = 2.0
HEARTBEATS_PER_TIMEOUT = 4
READY_TIMEOUT = 0.05  # s a read of a socket select() found readable may wait (a TLS record)
PACED_NOTE = 0.1  # s; a dial slot at least this far off is logged
# A channel's rhythm is learnt from exchange.rhythm_window seconds of its traffic, in
# RHYTHM_BUCKETS buckets; it counts as busy when every one of them brought BUSY_RATE frames a
# second (depth.full and deals of a liquid symbol do; a quiet symbol, a ticker do not, and
# are never judged).
RHYTHM_BUCKETS = 6
BUSY_RATE = 2.0


class DeadSocket(Exception):
    """Nothing arrived for too long."""


class ServerClosed(DeadSocket):
    """The server sent a close frame."""


class StaleSocket(DeadSocket):
    """Pongs still come, data does not: far beyond the busy channels' rhythm."""


class Replaced(DeadSocket):
    """We dropped a live socket to dial its replacement (make_before_break off)."""


class Stats:
    """Counters for the periodic stats line; `rows` by message type."""

    def __init__(self):
        self.rows = dict.fromkeys(MESSAGE_TYPES, 0)
        self.frames = 0
        self.errors = 0
        self.reconnects = 0
        self.last_frames = 0
        self.last_time = time.monotonic()


class Collector:
    """One symbol's collector process: connects (directly or through its tor's SOCKS port),
    subscribes, turns frames into rows and hands them to its RowWriter; reconnects with
    backoff; under the supervisor, sends heartbeats and holds rows during rotations.
    `started_because` is the (reason, detail) of the gap this start ends (core.vocabulary
    GAP_*): the supervisor knows whether it restarted a crashed collector."""

    def __init__(self, config, symbol: str, socks_proxy: Optional[Tuple[str, int]] = None,
                 bus=None, started_because=(GAP_COLLECTOR_RESTART, "collector started")):
        self.config = config
        self.sym = config.symbol(symbol)
        self.ex = config.exchange
        self.co = config.collector
        self.socks_proxy = socks_proxy
        self.bus = bus  # a bus.sockets.ChildBus under the supervisor, None when run alone
        self.stopping = False
        self.exit_code = 0
        self.connected = False
        self.last_frame = None  # any connection's last frame (mexc status)
        self.link: Optional[_Link] = None  # the connection we read
        self.handover: Optional[_Handover] = None  # its replacement, while both are read
        # after a handover, until the new connection is past what the old one brought
        self.tail: Optional[_Handover] = None
        self.replace_asked: Optional[str] = None  # why a replacement was asked for (SIGUSR1)
        # a replacement waiting for its dial slot (DialPacer): (slot, why, verdict)
        self.pending_dial: Optional[tuple] = None
        self.starved = Starvation()  # time the receive loop could not run: not the socket's
        # every dial of the host's collectors at supervisor.start_rate, like their starts
        self.pacer = DialPacer(os.path.join(config.paths["runtime_dir"], "dials.pace"),
                               config.supervisor["start_rate"])
        now = time.monotonic()
        # kept across connections: a channel's rhythm is the symbol's, not the socket's
        self.book_kind = config.book(self.sym)  # exchange.book: "top", "full" or "both"
        self.channels = {channel.name: _ChannelWatch(channel, now)
                         for channel in channels_for(self.book_kind)}
        self.stale_after = None  # s of silence on every channel that make a socket stale
        # silences judged since a connection last delivered a whole bucket: each one more
        # doubles the limit (a market gone quiet after a burst costs few replacements)
        self.judged = 0
        self.rhythm_bucket = self.ex["rhythm_window"] / RHYTHM_BUCKETS
        self.next_roll = now + self.rhythm_bucket
        self.stats = Stats()
        # Rows go in over the native protocol; only the export reads over HTTP, so our sessions
        # skip probing the HTTP port (urllib requests: 0.3 MiB of private memory).
        ch = dict(config.clickhouse, http_port=0)
        # this host's own files: in a cluster its copies, not the merged files (other hosts'
        # rows would hide its own gaps and trades)
        files_dir = archive.own_files_dir(config.export["dir"], config.clustered)
        self.writer = RowWriter(ch, self.sym.name,
                                Spool(config.spool_dir(), self.sym.name),
                                max_buffered_rows=self.co["max_buffered_rows"],
                                max_hold=self.co["max_hold"], batch_rows=self.co["batch_rows"],
                                latency_target=self.co["latency_target"], files_dir=files_dir)
        budget = RateBudget()  # MEXC's REST limit, shared by backfill and book snapshots
        self.backfill = (Backfill(self.ex, self.sym, socks_proxy, self.writer, files_dir, budget)
                         if self.ex["backfill"] else None)
        self.paths = 0  # sockets replaced for silence: each goes through a fresh circuit
        self.gaps = GapLedger(self.sym, ch, self.writer, self.ex["silent_alarm"],
                              *started_because, backfill=self.backfill,
                              journal_path=os.path.join(config.spool_dir(),
                                                        f"{self.sym.name}.gaps"),
                              export_dir=files_dir,
                              files_log=COPY_LOG if config.clustered else "export_log",
                              clock=EventClock(config.export["clock_speed"],
                                               config.export["clock_anchor_ms"]))
        self.depth_versions = {}  # symbol -> the last depth.full version stored (wire.parse)
        self.handovers = 0  # connections replaced without a break
        self.book = (BookKeeper(self.ex, self.sym, socks_proxy, budget, self.gaps, ch, files_dir)
                     if BOOK_CHANNEL.name in self.channels else None)
        self.batch = []  # the rows of the current read
        self.child_id = ChildId(COLLECTOR, self.sym.name)

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        for signum in STOP_SIGNALS:  # SIGHUP too: `mexc collect` whose terminal closed
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_replace_signal)
        if self.writer.spool:
            log.info("spool has %d rows from an earlier run; replaying them first",
                     self.writer.spool.rows)
        self.writer.start()
        self.gaps.start()
        if self.book is not None:
            self.book.start()
        bus_thread = None
        if self.bus is not None:
            bus_thread = threading.Thread(target=self._bus_loop, name="bus", daemon=True)
            bus_thread.start()
        delay = self.ex["reconnect_min"]
        while not self.stopping:
            started = time.monotonic()
            replace_now = False
            try:
                self._session()
            except (OSError, websocket.WebSocketException, DeadSocket) as e:
                replace_now = self._on_disconnected(e)
            self._flush()
            if self.stopping:
                break
            if time.monotonic() - started >= HEALTHY_AFTER:
                delay = self.ex["reconnect_min"]
            if replace_now:  # it delivered, then went silent: the next path may well work
                self.stats.reconnects += 1
                self._fresh_path()
                continue
            wait = delay * random.uniform(0.8, 1.2)
            self.stats.reconnects += 1
            log.info("reconnecting in %.1fs", wait)
            self._sleep(wait)
            delay = min(delay * 2, self.ex["reconnect_max"])
        if bus_thread is not None:
            bus_thread.join()  # it sees self.stopping within MAX_WAIT
        return self._shutdown()

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True

    def _on_replace_signal(self, signum, _frame) -> None:
        """A new connection through a fresh circuit, asked for by the supervisor (its exit
        guard) or an operator."""
        self.replace_asked = signal.Signals(signum).name

    def _sleep(self, seconds: float) -> None:
        """Wait between connections, still flushing and logging stats when they are due."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (now := time.monotonic()) < deadline:
            time.sleep(max(0.0, min(deadline, self._housekeeping_due(now)) - now))
            self._housekeeping(time.monotonic())

    def _shutdown(self) -> int:
        log.info("stopping: storing %d buffered rows", self.writer.buffered_rows() + len(self.batch))
        self._flush()
        if self.book is not None:
            self.book.stop()
        self.gaps.stop()
        self.writer.stop(STOP_GRACE)
        self._log_stats(time.monotonic())
        log.info("stopped rows_written=%d spooled=%d", self.writer.rows_written,
                 self.writer.spool.rows)
        return self.exit_code

    # --- one connection --------------------------------------------------------------------

    def _session(self) -> None:
        slot = self._dial_slot("dial paced: in")
        if slot > time.monotonic():
            self._sleep(slot - time.monotonic())
            if self.stopping:
                return
        self._use(self._dial())
        self.replace_asked, self.tail = None, None  # a new connection already
        if self.book is not None:  # a break: the increments must be synced again
            self.book.reconnected()
        try:
            self._receive()
        finally:
            self.connected = False
            self.pending_dial = None
            if self.handover is not None:
                self.handover.link.close()
                self.handover = None
            self.link.close()

    def _use(self, link: "_Link") -> None:
        """Read `link` from now on; its depth versions are the ones a next connection
        starts from."""
        self.link, self.depth_versions = link, link.depth_versions

    def _dial(self) -> "_Link":
        """A new connection, subscribed."""
        ws = open_websocket(self.ex["url"], self.ex["connect_timeout"], self.ex["ca_file"],
                            self.socks_proxy)
        try:
            self._on_connected()
            for request in wire.subscribe_requests(self.sym.symbol, self.ex["depth_limit"],
                                                   self.ex["merge_deals"], self.book_kind,
                                                   self.ex["book_merge"]):
                ws.send(request)
        except BaseException:
            ws.close(timeout=0.5)
            raise
        return _Link(ws, time.monotonic(), self.depth_versions)

    def _fresh_path(self, what: str = "silent") -> None:
        """The next connection, and the backfill of the gap it closes, through a new circuit
        (a new SOCKS name): tor would otherwise send them along the old one."""
        if self.socks_proxy is None:
            log.info("replacing the %s socket now", what)
            return
        self.paths += 1
        self.socks_proxy = (*self.socks_proxy[:2], f"{self.sym.name}-{os.getpid()}-{self.paths}")
        for fetcher in (self.backfill, self.book):
            if fetcher is not None:
                fetcher.socks_proxy = self.socks_proxy
        log.info("replacing the %s socket now, through a fresh circuit", what)

    def _on_connected(self) -> None:
        self.connected = True
        log.info("connected url=%s%s", self.ex["url"],
                 f" via socks5 {self.socks_proxy[0]}:{self.socks_proxy[1]}"
                 if self.socks_proxy else "")

    def _on_disconnected(self, error: Exception) -> bool:
        """The connection ended with `error` (a DeadSocket for a close frame or silence).
        True: we dropped it for silence after it had delivered data, or to replace it
        (Replaced); dial the next one at once."""
        if self.stopping:
            return False
        log.warning("disconnected: %s: %s", type(error).__name__, str(error)[:200] or "-")
        reason = {DeadSocket: GAP_DEAD_SOCKET, StaleSocket: GAP_STALL}.get(type(error),
                                                                          GAP_DISCONNECT)
        self.gaps.lost(reason, f"{type(error).__name__}: {str(error)[:200]}")
        if type(error) is Replaced:
            return True
        if reason == GAP_DISCONNECT:
            return False
        self._silence_judged()
        return self._last_data() is not None

    def _silence_judged(self) -> None:
        """After a silence judged the rhythm stays the yardstick (a socket muted soon after
        a replacement is judged as fast), but the silence is no part of it, the next
        connection is judged only once it delivered on every busy channel (a market gone
        quiet, a trading halt, replaces it no more: its buckets end the busy rhythm), and a
        further silence judged before a connection delivered a whole bucket doubles the
        limit."""
        for watch in self.channels.values():
            watch.rejoin = True
        self.judged += 1

    def _stale_limit(self) -> Optional[float]:
        """The silence (s) on every channel after which the connection we read is stale;
        None: no busy channel, or it has not yet delivered on each of them."""
        if self.stale_after is None or not self._delivered_on_busy_channels(self.link):
            return None
        return self.stale_after * 2 ** max(0, self.judged - 1)

    def _delivered_on_busy_channels(self, link: Optional["_Link"]) -> bool:
        return link is not None and all(watch.name in link.delivered for watch in
                                        self.channels.values() if watch.limit is not None)

    def _receive(self) -> None:
        """Frames until the connection dies or we stop; between them, sleep until the next
        deadline (_due) instead of waking on a tick.  During a handover both connections are
        read."""
        now = time.monotonic()
        self.last_frame = now
        for watch in self.channels.values():
            watch.subscribed(now)
        due = now
        self.starved.begin()
        while not self.stopping:
            if now >= due:
                self._housekeeping(now)
                self._keepalive(now)
                due = self._due(now)
            if (self.replace_asked is not None and self.handover is None and self.tail is None
                    and self.pending_dial is None):
                self._replace(f"asked by {self.replace_asked}")
                self.replace_asked, now = None, time.monotonic()
                due = now
                continue
            if self.pending_dial is not None and now >= self.pending_dial[0]:
                self._dial_replacement(*self.pending_dial[1:3])
                now = due = time.monotonic()
                continue
            # the wait, timed: a late wake-up (this process starved) is not the socket's fault
            started = time.monotonic()
            self.starved.before_wait(started)
            wait = max(0.001, due - started)
            if self.handover is None:  # one connection: block on its socket alone
                self.link.reader.sock.settimeout(wait)
                self._read(self.link)
            else:
                for link in _ready((self.link, self.handover.link), wait):
                    if link is self.link or self.handover is not None:  # else left behind
                        link.reader.sock.settimeout(READY_TIMEOUT)
                        self._read(link)
                if self.handover is not None:  # a read may have lost one of the two
                    self._maybe_hand_over(time.monotonic())
            now = time.monotonic()
            self.starved.after_wait(started + wait, now)
            if self.book is not None and self._book_snapshots(now):
                self._flush()

    def _read(self, link: "_Link") -> None:
        """What one recv() brought on `link`.  During a handover a connection that fails is
        left behind, and the other one read on; else the failure ends the session."""
        try:
            messages = link.reader.read()
            if messages is None:
                return
            now = link.last_frame = self.last_frame = time.monotonic()
            rts = int(time.time() * 1000)  # one receive time for all that one read brought
            for opcode, payload in messages:
                self._handle(link, opcode, payload, rts, now)
        except (OSError, websocket.WebSocketException, DeadSocket) as e:
            if self.handover is None:
                raise
            self._flush()
            self._lose_one(link, e)
        self._flush()

    def _due(self, now: float) -> float:
        """When the receive loop must next act without a frame: the earliest of the next
        ping, the dead-socket limit, the stale-socket limit, a channel's silent alarm,
        the handover's end, housekeeping, MAX_WAIT."""
        ex, link = self.ex, self.link
        alarms = [watch.alarm_due(ex["silent_alarm"]) for watch in self.channels.values()
                  if not watch.alarmed]
        last_data, limit = self._last_data(), self._stale_limit()
        if last_data is not None and limit is not None:
            alarms.append(self._deadline(last_data, limit))
        if self.handover is not None:
            new = self.handover.link
            alarms += [self.handover.started + ex["overlap_max"],
                       new.last_ping + ex["ping_interval"],
                       self._deadline(new.last_frame, ex["dead_after"])]
        if self.pending_dial is not None:
            alarms.append(self.pending_dial[0])
        return max(now + 0.001, min(link.last_ping + ex["ping_interval"],
                                     self._deadline(link.last_frame, ex["dead_after"]),
                                     self._housekeeping_due(now), *alarms))

    def _silence(self, since: float, now: float) -> float:
        """Seconds of silence since `since` that count against a socket: without the time
        this process could not run (it sent no ping then, and read nothing)."""
        return now - since - self.starved.since(since)

    def _deadline(self, since: float, limit: float) -> float:
        """When a silence since `since` reaches `limit` (_silence), unless the loop starves."""
        return since + limit + self.starved.since(since)

    def _last_data(self) -> Optional[float]:
        """When this connection last brought a data frame (None: not yet)."""
        times = [w.last_data for w in self.channels.values() if w.last_data is not None]
        return max(times) if times else None

    def _handle(self, link: "_Link", opcode: int, payload: bytes, rts: int,
                now: float) -> None:
        if opcode == OP_TEXT:
            try:
                payload = payload.decode()
            except UnicodeDecodeError:
                pass  # stays bytes: parse() dead-letters what it cannot inflate
        elif opcode == OP_CLOSE:
            raise ServerClosed(f"server closed the connection {_close_reason(payload)}")
        self.stats.frames += 1
        kind, rows = wire.parse(payload, rts, self.sym.symbol, link.depth_versions)
        watch = self.channels.get(kind)
        if watch is not None:
            link.data_at = now
            link.delivered.add(kind)
            if link.first_data is None:
                link.first_data = now
            if rows:
                self.gaps.seen(rows, now)
            if self.handover is not None:
                rows = self.handover.overlap.admit(NEW if link is self.handover.link else OLD,
                                                   kind, rows)
            elif self.tail is not None:
                rows = self._after_handover(kind, rows, now)
            if rows and self.book is not None and kind == BOOK_CHANNEL.name:
                self.book.on_increment(rows[0])
            self.batch.extend(rows)
            self.stats.rows[watch.mt] += len(rows)
            last = watch.last_data
            if last is None or watch.alarmed:
                watch.data_again(now)
            # the rhythm: the longest silence of this bucket (not a silence judged)
            elif now - last > watch.peak and not watch.rejoin:
                watch.peak = now - last
            watch.rejoin = False
            watch.frames += 1
            watch.last_data = now
        elif kind == wire.PONG:
            link.last_pong = now
        elif rows:
            self.batch.extend(rows)
            self.stats.rows[DEAD_LETTER] += 1
            self.stats.errors += 1
            if kind == wire.ERROR:
                log.warning("exchange error: %s", rows[0][2][:200])
                self.gaps.hint(GAP_EXCHANGE_ERROR, rows[0][2][:200])
            else:
                log.warning("dead letter stored: %s", kind[len(wire.DEAD) + 1:][:200])

    def _book_snapshots(self, now: float) -> int:
        """The whole book's REST snapshots that came in, stored like the frames' rows."""
        rows = self.book.poll(now)
        if rows:
            self.batch.extend(rows)
            self.stats.rows[BOOK_SNAPSHOT] += len(rows)
        return len(rows)

    def _keepalive(self, now: float) -> None:
        """The pings when due, the dead- and stale-socket checks, the silent-channel alarms."""
        links = [self.link] + ([self.handover.link] if self.handover is not None else [])
        for link in links:
            if now - link.last_ping >= self.ex["ping_interval"]:
                try:
                    link.ws.send(wire.PING)
                except (OSError, websocket.WebSocketException) as e:
                    if self.handover is None:
                        raise
                    self._lose_one(link, e)
                    break
                link.last_ping = now
        if self.tail is not None and now - self.tail.started >= self.ex["overlap_max"]:
            self.tail = None
        if self.handover is not None:
            self._maybe_hand_over(now)
        elif self.pending_dial is not None:
            if self.pending_dial[2] is not None and self._verdict(now) is None:
                log.info("the suspect socket delivers again: its replacement is not dialled")
                self.pending_dial = None
        else:
            verdict = self._verdict(now)
            # Frames waiting unread (this process was stopped, or busy) say the socket lives.
            if verdict is not None and not _readable(self.link.reader.sock):
                self._replace(str(verdict), verdict)
        for watch in self.channels.values():
            watch.check(now, self.ex["silent_alarm"])

    def _verdict(self, now: float) -> Optional[DeadSocket]:
        """Why the socket counts as dead now, or None: no frame (data or pong) for
        `dead_after`; or no data on any channel for `stale_after` (learnt from the busy
        channels' rhythm), with pongs (stale) or without (dead)."""
        link = self.link
        if self._silence(link.last_frame, now) >= self.ex["dead_after"]:
            return DeadSocket(f"no frame or pong for {self._silence(link.last_frame, now):.1f}s"
                              + self._starved_note(link.last_frame))
        last_data, limit = self._last_data(), self._stale_limit()
        if last_data is None or limit is None or self._silence(last_data, now) < limit:
            return None
        silent = (f"no data for {self._silence(last_data, now):.1f}s, beyond the channels' "
                  f"rhythm ({limit:.1f}s){self._starved_note(last_data)}")
        # Pongs still come when one came after the data was overdue (later than the longest
        # silence of the busy window): a pong right behind the last data frame, before a
        # path froze, says nothing (it made a frozen tor exit look like a live socket).
        if link.last_pong > last_data + limit / max(1.0, self.ex["stale_factor"]):
            return StaleSocket(f"{silent}; pongs still come")
        return DeadSocket(f"{silent}; no pong either")

    def _starved_note(self, since: float) -> str:
        starved = self.starved.since(since)
        return f" (and {starved:.1f}s this process could not run)" if starved else ""

    # --- make before break -----------------------------------------------------------------

    def _replace(self, why: str, verdict: Optional[DeadSocket] = None) -> None:
        """Replace the connection: a suspect one (verdict), or a live one on purpose.  With
        make_before_break the new one is dialled (through a fresh circuit) and subscribed
        first, and both are read until it covers the old one (_maybe_hand_over); else the
        old one goes first, as a drop (the caller reconnects at once)."""
        if not self.ex["make_before_break"]:
            raise verdict or Replaced(why)
        if verdict is not None:  # the stretch it did not deliver is a gap until data comes
            log.warning("suspect socket: %s", why)
            self.gaps.lost(GAP_STALL if type(verdict) is StaleSocket else GAP_DEAD_SOCKET,
                           f"{type(verdict).__name__}: {why[:200]}")
            self._silence_judged()
        self.tail = None
        slot = self._dial_slot("replacement paced: dialled in")
        if slot > time.monotonic():
            self.pending_dial = (slot, why, verdict)
            return
        self._dial_replacement(why, verdict)

    def _dial_slot(self, what: str) -> float:
        """The host's next free dial slot (DialPacer), logged as `what` when it is far off."""
        slot = self.pacer.reserve()
        if slot - time.monotonic() >= PACED_NOTE:
            log.info("%s %.1fs (supervisor.start_rate across the host's collectors)", what,
                     slot - time.monotonic())
        return slot

    def _dial_replacement(self, why: str, verdict: Optional[DeadSocket]) -> None:
        """_replace's dial, in its slot; the old connection is read until the new one
        covers it."""
        self.pending_dial = None
        self._fresh_path("silent" if verdict is not None else "live")
        try:
            link = self._dial()
        except (OSError, websocket.WebSocketException) as e:
            if verdict is not None:
                raise verdict from e
            log.warning("replacement not opened (%s: %s); keeping the connection",
                        type(e).__name__, str(e)[:200])
            return
        log.info("replacing the connection (%s): both read until the new one covers the "
                 "old one", why)
        self.handover = _Handover(link, time.monotonic(), verdict is not None)

    def _maybe_hand_over(self, now: float) -> None:
        """Drop the old connection once the new one covers it; after `overlap_max` seconds,
        keep whichever delivers (a suspect old one goes once the new one delivers at all; on
        a quiet market, where neither delivers, the live new one)."""
        h = self.handover
        if h.overlap.covered():
            self._hand_over(now, "it covers every channel")
        elif h.suspect and h.link.data_at is not None and (self.link.data_at or 0) < h.started:
            self._hand_over(now, "it delivers, the suspect one does not")
        elif now - h.started >= self.ex["overlap_max"]:
            if h.link.data_at is not None or h.suspect:
                self._hand_over(now, f"overlap_max {self.ex['overlap_max']:g}s")
            elif ((self.link.data_at or 0) < h.started
                  and self._silence(h.link.last_frame, now) < self.ex["dead_after"]):
                # A quiet market: neither brought data, so nothing is lost by the switch, and
                # a move asked for (a new exit) must not wait for a trade that may not come.
                self._hand_over(now, "a quiet market: neither brought data, the new one "
                                     "answers pings")
            else:
                self._lose_one(h.link, DeadSocket(
                    f"no data within overlap_max {self.ex['overlap_max']:g}s"))
        elif self._silence(h.link.last_frame, now) >= self.ex["dead_after"]:
            self._lose_one(h.link, DeadSocket(
                f"no frame for {self._silence(h.link.last_frame, now):.1f}s"))

    def _hand_over(self, now: float, why: str) -> None:
        h, old = self.handover, self.link
        self._use(h.link)
        self.handover = None
        self.handovers += 1
        log.info("handover done after %.2fs (%s): %d duplicate rows dropped; the old "
                 "connection closed", now - h.started, why, h.overlap.duplicates)
        old.close()
        h.overlap.close(OLD)
        h.started, self.tail = now, h

    def _after_handover(self, kind: str, rows: list, now: float) -> list:
        """The rows of the connection that stayed while it may still bring what the closed
        one brought (it was behind); for `overlap_max` seconds at most."""
        t = self.tail
        rows = t.overlap.admit(t.overlap.survivor, kind, rows)
        if t.overlap.finished() or now - t.started >= self.ex["overlap_max"]:
            self.tail = None
        return rows

    def _lose_one(self, link: "_Link", error: Exception) -> None:
        """One of the two connections of a handover failed: read on with the other, whose
        rows still pass the overlap a while (it may bring again what the lost one brought).
        The old one failing before the new one brought data is a gap (from the old one's last
        data to the new one's first)."""
        h = self.handover
        self.handover = None
        log.warning("%s connection lost during the handover: %s: %s",
                    "new" if link is h.link else "old", type(error).__name__,
                    str(error)[:200] or "-")
        link.close()
        h.overlap.close(NEW if link is h.link else OLD)
        h.started, self.tail = time.monotonic(), h
        if link is h.link:
            return
        self._use(h.link)
        if h.link.data_at is None:
            self.gaps.lost(GAP_DEAD_SOCKET if isinstance(error, DeadSocket) else
                           GAP_DISCONNECT, f"{type(error).__name__}: {str(error)[:200]}")

    # --- the bus: heartbeats out, rotation events in (its own thread) ------------------------

    def _bus_loop(self) -> None:
        name = str(self.child_id)
        holder = Holder(name, self.sym.symbol, self.writer, self.bus.send)
        interval = min(HEARTBEAT_INTERVAL,
                       self.config.supervisor["heartbeat_timeout"] / HEARTBEATS_PER_TIMEOUT)
        next_beat = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= next_beat:
                self.bus.send("heartbeat", name=name, pid=os.getpid(), stats=self.status(now))
                next_beat = now + interval
            # at most MAX_WAIT: a stop joins this thread, and waited up to a heartbeat interval
            event = self.bus.receive(timeout=max(0.0, min(next_beat - time.monotonic(),
                                                          MAX_WAIT)))
            if event is None:
                continue
            holder.on_event(event)
            if event["type"] == "tor_restarted" and event["name"] == self.sym.name:
                self.gaps.hint(GAP_TOR_RESTART, event["detail"])
            elif event["type"] == "log_level":
                set_level(event["level"])

    def status(self, now: float) -> dict:
        """What the heartbeat tells the supervisor (and mexc status shows)."""
        s, w = self.stats, self.writer
        held = w.held  # read once: the writer thread may release it meanwhile
        return {
            "symbol": self.sym.symbol, "connected": self.connected,
            "rows": dict(s.rows), "frames": s.frames, "errors": s.errors,
            "reconnects": s.reconnects, "handovers": self.handovers,
            # from the ask (dial included) to the handover: the exit guard waits for it
            "replacing": (self.replace_asked is not None or self.handover is not None
                          or self.pending_dial is not None),
            "rows_written": w.rows_written,
            "buffered_rows": w.buffered_rows() + len(self.batch), "spooled_rows": w.spool.rows,
            "insert_errors": w.insert_errors, "held": held and held.rotation,
            "gaps_recorded": self.gaps.recorded,
            "last_message_age_s": None if self.last_frame is None else round(now - self.last_frame, 3),
            # data frames only (pongs come from a delisted contract's socket too)
            "last_data_age_s": round(now - self.gaps.last_seen, 3) if self.gaps.last_seen else None,
            # a cluster counts this host as holding the symbol from here (cluster/holdings.py)
            "first_data_ms": self.gaps.first_ms,
        }

    # --- handing rows over, and stats --------------------------------------------------------

    def _housekeeping_due(self, now: float) -> float:
        """When _housekeeping next has something to do (at the latest now + MAX_WAIT)."""
        return min(now + MAX_WAIT, self.stats.last_time + self.co["stats_interval"],
                   self.next_roll)

    def _housekeeping(self, now: float) -> None:
        """The writer's health, the stats line, the channels' rhythm when due."""
        if self.writer.failed and not self.stopping:
            log.error("exiting: the writer thread failed (see above); the supervisor restarts us")
            self.stopping, self.exit_code = True, 1
        if now - self.stats.last_time >= self.co["stats_interval"]:
            self._log_stats(now)
        if now >= self.next_roll:
            self._learn_rhythm(now)

    def _learn_rhythm(self, now: float) -> None:
        """Close the rhythm bucket; the socket is stale after the shortest limit of a busy
        channel (a quiet one has none).  The gap ledger counts a silence that long on a live
        socket as a gap (a stall), else one of `silent_alarm`.  A connection that delivered
        through a whole bucket, still busy, ends the doubling of judged silences."""
        self.next_roll = now + self.rhythm_bucket
        last_data, limit = self._last_data(), self._stale_limit()
        if (self.handover is None and limit is not None and last_data is not None
                and now - last_data > limit / 2):
            return  # a silence is being judged: its bucket waits for the verdict
        factor, floor = self.ex["stale_factor"], self.ex["stale_min"]
        busy = BUSY_RATE * self.rhythm_bucket
        limits = [limit for watch in self.channels.values()
                  if (limit := watch.roll(busy, factor, floor)) is not None]
        stale_after = min(limits) if limits else None
        if (stale_after is None) != (self.stale_after is None):
            log.info("stale-socket limit %s", f"{stale_after:.1f}s (busy channels: "
                     f"{', '.join(w.name for w in self.channels.values() if w.limit)})"
                     if stale_after else "off (no busy channel)")
        self.stale_after = stale_after
        self.gaps.stall_after = stale_after or self.ex["silent_alarm"]
        link = self.link
        if (stale_after is not None and self._delivered_on_busy_channels(link)
                and now - link.first_data >= self.rhythm_bucket):
            self.judged = 0

    def _flush(self) -> None:
        if self.batch:
            self.writer.submit(self.batch)
            self.batch = []

    def _log_stats(self, now: float) -> None:
        s = self.stats
        rate = (s.frames - s.last_frames) / max(1e-9, now - s.last_time)
        log.info("stats rows %s frames/s=%.1f written=%d buffered=%d "
                 "spooled=%d errors=%d insert_errors=%d reconnects=%d",
                 " ".join(f"{mt}={n}" for mt, n in s.rows.items()), rate,
                 self.writer.rows_written, self.writer.buffered_rows() + len(self.batch),
                 self.writer.spool.rows, s.errors, self.writer.insert_errors, s.reconnects)
        s.last_frames, s.last_time = s.frames, now


class _Link:
    """One WebSocket connection and what the receive loop knows of it."""

    def __init__(self, ws, now: float, depth_versions: dict):
        self.ws = ws
        self.reader = FrameReader(ws)
        self.last_frame = self.last_ping = now
        self.last_pong = 0.0
        self.data_at: Optional[float] = None  # its last data frame
        self.first_data: Optional[float] = None
        self.delivered = set()  # the channels it brought data on
        # The stale-version check is per connection: during a handover both bring each
        # version once (Overlap drops the second); a new one starts from the old one's.
        self.depth_versions = dict(depth_versions)

    def close(self) -> None:
        self.ws.close(timeout=0.5)


class _Handover:
    """A replacement connection read beside the old one, since `started`."""

    def __init__(self, link: _Link, started: float, suspect: bool):
        self.link, self.started, self.suspect = link, started, suspect
        self.overlap = Overlap()


class _ChannelWatch:
    """Confirms a subscription by its first data frame; warns while a channel stays silent;
    learns the channel's rhythm.  The receive loop sets `last_data`, `frames` and `peak`
    itself and calls data_again() only when it matters.

    The rhythm: frames and the longest silence between two frames of one connection, per
    bucket (exchange.rhythm_window / RHYTHM_BUCKETS).  A channel that brought BUSY_RATE
    frames a second in every bucket of the last RHYTHM_BUCKETS is busy; silent
    `stale_factor` times its longest silence of that stretch (and at least `stale_min`), it
    is far beyond its rhythm.  Busy in every bucket, not on average: a burst after a quiet
    spell teaches nothing, so a quiet symbol is never judged."""

    def __init__(self, channel: Channel, subscribed_at: float):
        self.name, self.mt = channel.name, channel.mt
        self.frames, self.peak = 0, 0.0  # this bucket
        self.history = collections.deque(maxlen=RHYTHM_BUCKETS)  # (frames, peak) per bucket
        self.limit = None  # s of silence beyond the rhythm; None: not busy
        self.subscribed(subscribed_at)

    def subscribed(self, now: float) -> None:
        """A new connection: the silence before its first frame is no part of the rhythm."""
        self.subscribed_at = now
        self.last_data = None
        self.alarmed = False
        self.rejoin = False  # a silence was judged: the next frame's wait is not the rhythm

    def roll(self, busy_frames: float, factor: float, floor: float) -> Optional[float]:
        """Close the bucket; the silence (s) that is far beyond the rhythm, None if not busy
        (fewer than busy_frames in one of the buckets)."""
        self.history.append((self.frames, self.peak))
        self.frames, self.peak = 0, 0.0
        busy = (factor > 0 and len(self.history) == RHYTHM_BUCKETS
                and all(frames >= busy_frames for frames, _ in self.history))
        self.limit = max(floor, factor * max(p for _, p in self.history)) if busy else None
        return self.limit

    def data_again(self, now: float) -> None:
        if self.last_data is None:
            log.info("subscribed channel=%s confirmed after %.2fs", self.name,
                     now - self.subscribed_at)
        else:
            log.info("channel=%s data again after %.0fs of silence", self.name,
                     now - self.last_data)
        self.alarmed = False

    def alarm_due(self, silent_alarm: float) -> float:
        """When the channel counts as silent unless data comes first."""
        return self._since() + silent_alarm

    def check(self, now: float, silent_alarm: float) -> None:
        if not self.alarmed and now >= self.alarm_due(silent_alarm):
            since = self._since()
            self.alarmed = True
            what = "no data since subscribing" if self.last_data is None else "silent"
            log.warning("channel=%s %s for %.0fs", self.name, what, now - since)

    def _since(self) -> float:
        return self.last_data if self.last_data is not None else self.subscribed_at


def _ready(links, timeout: float) -> list:
    """The links with bytes to read, waiting up to `timeout` seconds for one."""
    ready = [link for link in links if _readable(link.reader.sock)]
    if ready:
        return ready
    socks = select.select([link.reader.sock for link in links], [], [], max(0.0, timeout))[0]
    return [link for link in links if link.reader.sock in socks]


def _readable(sock) -> bool:
    """Bytes wait on the socket (or decrypted in its TLS layer)."""
    if getattr(sock, "pending", None) and sock.pending():
        return True
    return bool(select.select([sock], [], [], 0)[0])


def _close_reason(payload: bytes) -> str:
    if len(payload) >= 2:
        return f"code={int.from_bytes(payload[:2], 'big')} {payload[2:].decode(errors='replace')}"
    return "(no close code)"

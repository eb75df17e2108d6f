"""One symbol's collector: socket -> parse -> batch -> store.

The receive loop (this thread) reads frames, turns them into rows (wire.parse), and hands the
rows of each read to the RowWriter, which decides when to insert (`batch_rows`,
`latency_target`).  Between frames it keeps the connection honest: a ping every
`ping_interval` seconds whatever arrives, a dead socket after `dead_after` seconds without a
frame, an alarm for a subscribed channel that stays silent, a stats line every
`stats_interval` seconds.

At live rates a collector has almost nothing to do, and every wake-up of a thread costs about
as much as parsing a frame: so the loop blocks on the socket until the next of those deadlines
is due (or a frame arrives), never on a fixed tick, and the bus thread sleeps until its next
heartbeat or event.
"""
import logging
import os
import random
import signal
import threading
import time
from typing import Optional, Tuple

import websocket

from bus.rotation import Holder
from collector import wire
from collector.backfill import Backfill
from collector.connection import OP_CLOSE, OP_TEXT, FrameReader, open_websocket
from collector.gaps import GapLedger
from collector.spool import Spool
from collector.writer import RowWriter
from core.channels import CHANNELS, Channel
from core.log import set_level
from core.process import STOP_SIGNALS
from core.vocabulary import (COLLECTOR, DEAD_LETTER, GAP_COLLECTOR_RESTART,
                             GAP_DEAD_SOCKET, GAP_DISCONNECT, GAP_EXCHANGE_ERROR, GAP_TOR_RESTART,
                             MESSAGE_TYPES, ChildId)

log = logging.getLogger(__name__)

MAX_WAIT = 1.0  # longest the loop blocks: bounds how late it sees SIGTERM or a failed writer
HEALTHY_AFTER = 60.0  # a connection that lived this long resets the reconnect backoff
STOP_GRACE = 5.0  # seconds SIGTERM waits for ClickHouse before spooling the rest
# A heartbeat every HEARTBEAT_INTERVAL s, or more often when supervisor.heartbeat_timeout
# allows fewer than HEARTBEATS_PER_TIMEOUT of them: the supervisor decodes every one (300
# collectors at 1 s: a third of its CPU), and status shows figures up to one interval old.
HEARTBEAT_INTERVAL = 2.0
HEARTBEATS_PER_TIMEOUT = 4


class DeadSocket(Exception):
    """Nothing arrived for too long."""


class ServerClosed(DeadSocket):
    """The server sent a close frame."""


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
        self.last_frame = None
        self.stats = Stats()
        # Rows go in over the native protocol; only the export reads over HTTP, so our sessions
        # skip probing the HTTP port (urllib requests: 0.3 MiB of private memory).
        ch = dict(config.clickhouse, http_port=0)
        self.writer = RowWriter(ch, self.sym.name,
                                Spool(config.spool_dir(), self.sym.name),
                                max_buffered_rows=self.co["max_buffered_rows"],
                                max_hold=self.co["max_hold"], batch_rows=self.co["batch_rows"],
                                latency_target=self.co["latency_target"])
        backfill = (Backfill(self.ex, self.sym, socks_proxy, self.writer, config.export["dir"])
                    if self.ex["backfill"] else None)
        self.gaps = GapLedger(self.sym, ch, self.writer, self.ex["silent_alarm"],
                              *started_because, backfill=backfill,
                              journal_path=os.path.join(config.spool_dir(),
                                                        f"{self.sym.name}.gaps"),
                              export_dir=config.export["dir"])
        self.depth_versions = {}  # symbol -> the last depth.full version stored (wire.parse)
        self.batch = []  # the rows of the current read
        self.child_id = ChildId(COLLECTOR, self.sym.name)

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        for signum in STOP_SIGNALS:  # SIGHUP too: `mexc collect` whose terminal closed
            signal.signal(signum, self._on_signal)
        if self.writer.spool:
            log.info("spool has %d rows from an earlier run; replaying them first",
                     self.writer.spool.rows)
        self.writer.start()
        self.gaps.start()
        bus_thread = None
        if self.bus is not None:
            bus_thread = threading.Thread(target=self._bus_loop, name="bus", daemon=True)
            bus_thread.start()
        delay = self.ex["reconnect_min"]
        while not self.stopping:
            started = time.monotonic()
            try:
                self._session()
            except (OSError, websocket.WebSocketException, DeadSocket) as e:
                self._on_disconnected(e)
            self._flush()
            if self.stopping:
                break
            if time.monotonic() - started >= HEALTHY_AFTER:
                delay = self.ex["reconnect_min"]
            wait = delay * random.uniform(0.8, 1.2)
            self.stats.reconnects += 1
            log.info("reconnecting in %.1fs", wait)
            self._sleep(wait)
            delay = min(delay * 2, self.ex["reconnect_max"])
        if bus_thread is not None:
            bus_thread.join()  # it sees self.stopping within a heartbeat interval
        return self._shutdown()

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        """Wait between connections, still flushing and logging stats when they are due."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (now := time.monotonic()) < deadline:
            time.sleep(max(0.0, min(deadline, self._housekeeping_due(now)) - now))
            self._housekeeping(time.monotonic())

    def _shutdown(self) -> int:
        log.info("stopping: storing %d buffered rows", self.writer.buffered_rows() + len(self.batch))
        self._flush()
        self.gaps.stop()
        self.writer.stop(STOP_GRACE)
        self._log_stats(time.monotonic())
        log.info("stopped rows_written=%d spooled=%d", self.writer.rows_written,
                 self.writer.spool.rows)
        return self.exit_code

    # --- one connection --------------------------------------------------------------------

    def _session(self) -> None:
        ws = open_websocket(self.ex["url"], self.ex["connect_timeout"], self.ex["ca_file"],
                            self.socks_proxy)
        try:
            self._on_connected()
            for request in wire.subscribe_requests(self.sym.symbol, self.ex["depth_limit"],
                                                   self.ex["merge_deals"]):
                ws.send(request)
            self._receive(ws)
        finally:
            self.connected = False
            ws.close(timeout=0.5)

    def _on_connected(self) -> None:
        self.connected = True
        log.info("connected url=%s%s", self.ex["url"],
                 f" via socks5 {self.socks_proxy[0]}:{self.socks_proxy[1]}"
                 if self.socks_proxy else "")

    def _on_disconnected(self, error: Exception) -> None:
        """The connection ended with `error` (a DeadSocket for a close frame or silence)."""
        if not self.stopping:
            log.warning("disconnected: %s: %s", type(error).__name__, str(error)[:200] or "-")
            self.gaps.lost(GAP_DEAD_SOCKET if type(error) is DeadSocket else GAP_DISCONNECT,
                           f"{type(error).__name__}: {str(error)[:200]}")

    def _receive(self, ws) -> None:
        """Frames until the connection dies or we stop; between them, sleep until the next
        deadline (_due) instead of waking on a tick."""
        reader = FrameReader(ws)
        symbol = self.sym.symbol
        now = time.monotonic()
        self.last_frame = self.last_ping = now
        self.channels = {channel.name: _ChannelWatch(channel, now) for channel in CHANNELS}
        due = now
        while not self.stopping:
            if now >= due:
                self._housekeeping(now)
                self._keepalive(ws, now)
                due = self._due(now)
            reader.sock.settimeout(due - now)
            messages = reader.read()
            now = time.monotonic()
            if messages is not None:
                self.last_frame = now
                rts = int(time.time() * 1000)  # one receive time for all that one read brought
                for opcode, payload in messages:
                    self._handle(opcode, payload, symbol, rts, now)
                self._flush()

    def _due(self, now: float) -> float:
        """When the receive loop must next act without a frame: the earliest of the next
        ping, the dead-socket limit, a channel's silent alarm, housekeeping, MAX_WAIT."""
        ex = self.ex
        alarms = [watch.alarm_due(ex["silent_alarm"]) for watch in self.channels.values()
                  if not watch.alarmed]
        return max(now + 0.001, min(self.last_ping + ex["ping_interval"],
                                     self.last_frame + ex["dead_after"],
                                     self._housekeeping_due(now), *alarms))

    def _handle(self, opcode: int, payload: bytes, symbol: str, rts: int, now: float) -> None:
        if opcode == OP_TEXT:
            try:
                payload = payload.decode()
            except UnicodeDecodeError:
                pass  # stays bytes: parse() dead-letters what it cannot inflate
        elif opcode == OP_CLOSE:
            raise ServerClosed(f"server closed the connection {_close_reason(payload)}")
        self.stats.frames += 1
        kind, rows = wire.parse(payload, rts, symbol, self.depth_versions)
        if rows:
            self.batch.extend(rows)
        watch = self.channels.get(kind)
        if watch is not None:
            if rows:
                self.gaps.seen(rows, now)
            self.stats.rows[watch.mt] += len(rows)
            if watch.last_data is None or watch.alarmed:
                watch.data_again(now)
            watch.last_data = now
        elif rows:
            self.stats.rows[DEAD_LETTER] += 1
            self.stats.errors += 1
            if kind == wire.ERROR:
                log.warning("exchange error: %s", rows[0][2][:200])
                self.gaps.hint(GAP_EXCHANGE_ERROR, rows[0][2][:200])
            else:
                log.warning("dead letter stored: %s", kind[len(wire.DEAD) + 1:][:200])

    def _keepalive(self, ws, now: float) -> None:
        """The ping when due, the dead-socket check, the silent-channel alarms."""
        if now - self.last_ping >= self.ex["ping_interval"]:
            ws.send(wire.PING)
            self.last_ping = now
        if now - self.last_frame >= self.ex["dead_after"]:
            raise DeadSocket(f"no frame or pong for {now - self.last_frame:.0f}s")
        for watch in self.channels.values():
            watch.check(now, self.ex["silent_alarm"])

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
            event = self.bus.receive(timeout=max(0.0, next_beat - time.monotonic()))
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
            "reconnects": s.reconnects, "rows_written": w.rows_written,
            "buffered_rows": w.buffered_rows() + len(self.batch), "spooled_rows": w.spool.rows,
            "insert_errors": w.insert_errors, "held": held and held.rotation,
            "gaps_recorded": self.gaps.recorded,
            "last_message_age_s": None if self.last_frame is None else round(now - self.last_frame, 3),
            # data frames only (pongs come from a delisted contract's socket too)
            "last_data_age_s": round(now - self.gaps.last_seen, 3) if self.gaps.last_seen else None,
        }

    # --- handing rows over, and stats --------------------------------------------------------

    def _housekeeping_due(self, now: float) -> float:
        """When _housekeeping next has something to do (at the latest now + MAX_WAIT)."""
        return min(now + MAX_WAIT, self.stats.last_time + self.co["stats_interval"])

    def _housekeeping(self, now: float) -> None:
        """The writer's health, the stats line when due."""
        if self.writer.failed and not self.stopping:
            log.error("exiting: the writer thread failed (see above); the supervisor restarts us")
            self.stopping, self.exit_code = True, 1
        if now - self.stats.last_time >= self.co["stats_interval"]:
            self._log_stats(now)

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


class _ChannelWatch:
    """Confirms a subscription by its first data frame; warns while a channel stays silent.
    The receive loop sets `last_data` itself and calls data_again() only when it matters."""

    def __init__(self, channel: Channel, subscribed_at: float):
        self.name, self.mt = channel.name, channel.mt
        self.subscribed_at = subscribed_at
        self.last_data = None
        self.alarmed = False

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


def _close_reason(payload: bytes) -> str:
    if len(payload) >= 2:
        return f"code={int.from_bytes(payload[:2], 'big')} {payload[2:].decode(errors='replace')}"
    return "(no close code)"

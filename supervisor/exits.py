"""Tor per collector: start the collector once its tor has bootstrapped, and keep every
collector's exit IP distinct (the guarantee the old system only checked by hand).

Every `tor.exit_check_interval` seconds each connected collector's exits are read through its
tor's control port: one per open stream to the exchange, two while the collector replaces its
connection (make before break).  Two rules keep them apart:
- Each tor's ExcludeExitNodes holds every exit the other collectors use, so any circuit it
  builds for a new connection (a stale socket's replacement, a tor restart, a move below)
  avoids them, also while both of a replacement's connections are open.
- When two collectors' newest connections still share an exit IP (both circuits built before
  the exclusion reached their tor), the one that came to it last moves: a NEWNYM and a
  SIGUSR1, so it dials a new circuit before it drops the old one.  A collector is not moved
  again while that replacement is under way.  After `tor.separation_retries` moves without
  success the slot shows a warning in `mexc status` and the log.
"""
import logging
import signal
from collections import defaultdict
from typing import List, Optional, Tuple

from supervisor.children import ChildState
from supervisor.tor import TorError

log = logging.getLogger(__name__)


class TorSlot:
    """A collector and its tor."""

    def __init__(self, tor, collector):
        self.tor, self.collector = tor, collector
        self.bootstrapped = False
        self.progress = 0
        self.next_check = 0.0
        self.exits: List[Tuple[str, str]] = []  # (fingerprint, address) per open stream, oldest first
        self.exit_fingerprint: Optional[str] = None  # the newest stream's
        self.exit_ip: Optional[str] = None
        self.exit_since = 0.0  # when the newest stream's exit was first seen
        self.excluded: Tuple[str, ...] = ()  # what its tor's ExcludeExitNodes holds
        self.moved_at: Optional[float] = None  # the last move, until its replacement is seen
        self.separations = 0
        self.stream_missing = 0  # exit checks in a row that found no stream for a connected collector
        self.exit_unreadable: Optional[str] = None  # why the last exit check failed, if it did
        self.warning: Optional[str] = None

    def describe(self) -> dict:
        server = self.tor.process.server if self.tor.process else None
        return {"bootstrap_progress": self.progress, "bootstrapped": self.bootstrapped,
                "separations": self.separations, "warning": self.warning,
                "exit_fingerprint": self.exit_fingerprint, "excluded_exits": len(self.excluded),
                "socks_port": server.socks_port if server else None,
                "control_port": server.control_port if server else None}

    def forget_exits(self) -> None:
        self.exits, self.exit_ip, self.exit_fingerprint = [], None, None

class ExitGuard:
    """Every collector's tor slot: starts a collector once its tor has bootstrapped, reads
    each connected collector's exits, keeps each tor off the others' exits, and moves a
    collector that shares one anyway."""

    def __init__(self, tor_config: dict, exchange_port: int, move_settle: float = 20.0):
        self.config = tor_config
        self.exchange_port = exchange_port
        # the longest a move's replacement takes (dial, then overlap) before it may move again
        self.move_settle = move_settle
        self.slots = {}  # collector name -> TorSlot
        self.next_exit_check = 0.0

    def add(self, tor, collector) -> TorSlot:
        slot = self.slots[collector.name] = TorSlot(tor, collector)
        return slot

    def any_socks(self):
        """("127.0.0.1", port) of a bootstrapped tor whose collector runs (the first by name),
        for a request that may leave by any collector's path; None without one."""
        for name in sorted(self.slots):
            slot = self.slots[name]
            if slot.bootstrapped and slot.collector.state is ChildState.RUNNING:
                server = slot.tor.process.server if slot.tor.process else None
                if server is not None:
                    return "127.0.0.1", server.socks_port
        return None

    def remove(self, collector_name: str) -> None:
        self.slots.pop(collector_name, None)

    def tick(self, now: float) -> None:
        for slot in self.slots.values():
            self._watch_bootstrap(slot, now)
        if now >= self.next_exit_check:
            self.next_exit_check = now + self.config["exit_check_interval"]
            self._read_exits(now)
            self._keep_exits_apart()
            self._separate(now)

    def _watch_bootstrap(self, slot: TorSlot, now: float) -> None:
        if slot.tor.state is not ChildState.RUNNING:
            slot.bootstrapped, slot.progress = False, 0
            slot.forget_exits()
            slot.separations, slot.moved_at = 0, None  # a new tor gets new tries
            slot.excluded = ()  # and starts without ExcludeExitNodes
            return
        if slot.bootstrapped or now < slot.next_check:
            return
        slot.next_check = now + 0.5
        try:
            with slot.tor.process.server.control() as control:
                slot.progress = control.bootstrap_progress()
                if slot.progress == 100:  # before its collector's first connection
                    self._exclude(slot, control)
        except (OSError, TorError):
            pass  # not listening yet
        if slot.progress == 100:
            slot.bootstrapped, slot.warning = True, None
            log.info("tor[%s] bootstrapped in %.1fs", slot.collector.child_id.name,
                     now - slot.tor.started_at)
            if slot.collector.state is ChildState.WAITING and slot.collector.wanted:
                slot.collector.start(now)
        elif now - slot.tor.started_at > self.config["bootstrap_timeout"]:
            log.error("tor[%s] not bootstrapped after %.0fs (stuck at %d%%); restarting it",
                      slot.collector.child_id.name, now - slot.tor.started_at,
                      slot.progress)
            slot.warning = f"bootstrap stuck at {slot.progress}%"
            slot.tor.process.signal(signal.SIGKILL)

    def _read_exits(self, now: float) -> None:
        for slot in self.slots.values():
            if not (slot.bootstrapped and slot.collector.stats.get("connected")):
                slot.forget_exits()
                continue
            try:
                with slot.tor.process.server.control() as control:
                    found = control.exits_of_streams(self.exchange_port)
            except (OSError, TorError) as e:
                self._exit_unreadable(slot, str(e))
                continue
            self._exit_unreadable(slot, None)
            if not found:
                self._stream_gone(slot, now)
                continue
            slot.stream_missing = 0
            for fingerprint, address in found:
                if fingerprint not in (fp for fp, _ip in slot.exits):
                    log.info("%s exits from %s (%s)", slot.collector.name, address,
                             fingerprint[:8])
            if found[-1][0] != slot.exit_fingerprint:
                slot.exit_since = now
            slot.exits = found
            slot.exit_fingerprint, slot.exit_ip = found[-1]

    @staticmethod
    def _exit_unreadable(slot: TorSlot, error: Optional[str]) -> None:
        """One line when reading the exit starts failing (a tor that is stopped fails every
        check), one when it works again."""
        if error is not None and slot.exit_unreadable is None:
            log.warning("%s: cannot read its exit: %s (logged once until it can)",
                        slot.collector.name, error)
        elif error is None and slot.exit_unreadable is not None:
            log.info("%s: its exit can be read again", slot.collector.name)
        slot.exit_unreadable = error

    def _stream_gone(self, slot: TorSlot, now: float) -> None:
        """The collector says it is connected but its tor carries no stream for it: the circuit
        died (an exit relay went away).  Reconnect now instead of waiting for the collector's
        dead-socket timeout."""
        slot.stream_missing += 1
        slot.forget_exits()
        if slot.stream_missing >= 2:
            log.warning("%s: its tor has no open stream to the exchange (circuit gone); "
                        "reconnecting", slot.collector.name)
            slot.stream_missing = 0
            slot.collector.restart_now(now)

    def _keep_exits_apart(self) -> None:
        """Each bootstrapped tor excludes every exit the other collectors use (both of a
        replacement's connections), so the next circuit it builds takes none of them.  Tor
        keeps the streams it has; only new circuits obey."""
        for slot in self.slots.values():
            if slot.bootstrapped and self._others_exits(slot) != slot.excluded:
                try:
                    with slot.tor.process.server.control() as control:
                        self._exclude(slot, control)
                except (OSError, TorError) as e:
                    self._exit_unreadable(slot, str(e))

    def _others_exits(self, slot: TorSlot) -> Tuple[str, ...]:
        return tuple(sorted({fp for other in self.slots.values() if other is not slot
                             for fp, _ip in other.exits}))

    def _exclude(self, slot: TorSlot, control) -> None:
        others = self._others_exits(slot)
        if others:
            control.command("SETCONF ExcludeExitNodes=" + ",".join(f"${fp}" for fp in others))
        else:
            control.command("RESETCONF ExcludeExitNodes")
        slot.excluded = others

    def _separate(self, now: float) -> None:
        """Collectors whose newest connections share an exit: the one there first keeps it."""
        by_ip = defaultdict(list)
        for slot in self.slots.values():
            if slot.exit_ip:
                by_ip[slot.exit_ip].append(slot)
        for ip, sharing in by_ip.items():
            sharing.sort(key=lambda s: (s.exit_since, s.collector.name))
            if len(sharing) == 1:
                if sharing[0].warning and sharing[0].warning.startswith("shares"):
                    sharing[0].warning = None
                if not self._moving(sharing[0], now):
                    sharing[0].separations = 0
                continue
            for slot in sharing[1:]:
                if not self._moving(slot, now):
                    self._new_exit(slot, ip, sharing[0], now)

    def _moving(self, slot: TorSlot, now: float) -> bool:
        """Its last move is still under way: the collector is replacing its connection, or
        has not yet dialled a new one since (within move_settle)."""
        if slot.collector.stats.get("replacing"):
            return True
        if slot.moved_at is None:
            return False
        if slot.exit_since > slot.moved_at or now - slot.moved_at >= self.move_settle:
            slot.moved_at = None
            return False
        return True

    def _new_exit(self, slot: TorSlot, ip: str, keeper: TorSlot, now: float) -> None:
        if slot.separations >= self.config["separation_retries"]:
            if slot.warning is None or not slot.warning.startswith("shares"):
                log.error("%s still shares exit %s with %s after %d new circuits; no more "
                          "tries until its tor restarts (mexc restart %s); check the Tor "
                          "network", slot.collector.name, ip, keeper.collector.name,
                          slot.separations, slot.tor.name)
            slot.warning = f"shares exit {ip} with {keeper.collector.name}"
            return
        try:
            with slot.tor.process.server.control() as control:
                self._exclude(slot, control)  # again: its tor may have been changed by hand
                control.command("SIGNAL NEWNYM")
        except (OSError, TorError) as e:
            log.warning("%s: cannot ask its tor for a new exit: %s", slot.collector.name, e)
            return
        slot.separations += 1
        slot.moved_at = now
        log.warning("%s shares exit %s with %s: new circuit avoiding %d exits, reconnecting "
                    "(try %d)", slot.collector.name, ip, keeper.collector.name,
                    len(slot.excluded), slot.separations)
        slot.collector.reconnect(now)

"""Tor per collector: start the collector once its tor has bootstrapped, and keep every
collector's exit IP distinct (the guarantee the old system only checked by hand).

Every `tor.exit_check_interval` seconds each connected collector's exit is read through its
tor's control port.  When two collectors share an exit IP, the later one (by name) gets
ExcludeExitNodes set to the other collectors' exits, a NEWNYM, and a SIGUSR1, so it reconnects
through a new circuit, dialling it before it drops the old one (make before break); after `tor.separation_retries` tries without success the slot shows a
warning in `mexc status` and the log.
"""
import logging
import signal
from collections import defaultdict
from typing import Optional

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
        self.exit_fingerprint: Optional[str] = None
        self.exit_ip: Optional[str] = None
        self.separations = 0
        self.stream_missing = 0  # exit checks in a row that found no stream for a connected collector
        self.exit_unreadable: Optional[str] = None  # why the last exit check failed, if it did
        self.warning: Optional[str] = None

    def describe(self) -> dict:
        server = self.tor.process.server if self.tor.process else None
        return {"bootstrap_progress": self.progress, "bootstrapped": self.bootstrapped,
                "separations": self.separations, "warning": self.warning,
                "exit_fingerprint": self.exit_fingerprint,
                "socks_port": server.socks_port if server else None,
                "control_port": server.control_port if server else None}


class ExitGuard:
    """Every collector's tor slot: starts a collector once its tor has bootstrapped, reads
    each connected collector's exit, and moves a collector that shares an exit."""

    def __init__(self, tor_config: dict, exchange_port: int):
        self.config = tor_config
        self.exchange_port = exchange_port
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
            self._separate(now)

    def _watch_bootstrap(self, slot: TorSlot, now: float) -> None:
        if slot.tor.state is not ChildState.RUNNING:
            slot.bootstrapped, slot.progress, slot.exit_ip = False, 0, None
            slot.separations = 0  # a new tor gets new tries
            return
        if slot.bootstrapped or now < slot.next_check:
            return
        slot.next_check = now + 0.5
        try:
            with slot.tor.process.server.control() as control:
                slot.progress = control.bootstrap_progress()
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
                slot.exit_ip = slot.exit_fingerprint = None
                continue
            try:
                with slot.tor.process.server.control() as control:
                    found = control.exit_of_stream(self.exchange_port)
            except (OSError, TorError) as e:
                self._exit_unreadable(slot, str(e))
                continue
            self._exit_unreadable(slot, None)
            if found is None:
                self._stream_gone(slot, now)
                continue
            slot.stream_missing = 0
            if found[1] != slot.exit_ip:
                log.info("%s exits from %s (%s)", slot.collector.name, found[1], found[0][:8])
            slot.exit_fingerprint, slot.exit_ip = found

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
        slot.exit_ip = slot.exit_fingerprint = None
        if slot.stream_missing >= 2:
            log.warning("%s: its tor has no open stream to the exchange (circuit gone); "
                        "reconnecting", slot.collector.name)
            slot.stream_missing = 0
            slot.collector.restart_now(now)

    def _separate(self, now: float) -> None:
        by_ip = defaultdict(list)
        for name in sorted(self.slots):
            if self.slots[name].exit_ip:
                by_ip[self.slots[name].exit_ip].append(self.slots[name])
        for ip, sharing in by_ip.items():
            if len(sharing) == 1:
                if sharing[0].warning and sharing[0].warning.startswith("shares"):
                    sharing[0].warning = None
                sharing[0].separations = 0
                continue
            for slot in sharing[1:]:
                self._new_exit(slot, ip, sharing[0], now)

    def _new_exit(self, slot: TorSlot, ip: str, keeper: TorSlot, now: float) -> None:
        if slot.separations >= self.config["separation_retries"]:
            if slot.warning is None or not slot.warning.startswith("shares"):
                log.error("%s still shares exit %s with %s after %d new circuits; no more "
                          "tries until its tor restarts (mexc restart %s); check the Tor "
                          "network", slot.collector.name, ip, keeper.collector.name,
                          slot.separations, slot.tor.name)
            slot.warning = f"shares exit {ip} with {keeper.collector.name}"
            return
        others = sorted({s.exit_fingerprint for s in self.slots.values()
                         if s is not slot and s.exit_fingerprint})
        try:
            with slot.tor.process.server.control() as control:
                control.command("SETCONF ExcludeExitNodes=" + ",".join(f"${fp}" for fp in others))
                control.command("SIGNAL NEWNYM")
        except (OSError, TorError) as e:
            log.warning("%s: cannot ask its tor for a new exit: %s", slot.collector.name, e)
            return
        slot.separations += 1
        slot.exit_ip = slot.exit_fingerprint = None
        log.warning("%s shares exit %s with %s: new circuit avoiding %d exits, reconnecting "
                    "(try %d)", slot.collector.name, ip, keeper.collector.name, len(others),
                    slot.separations)
        slot.collector.reconnect(now)

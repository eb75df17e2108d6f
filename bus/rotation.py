"""The rotation handshake: collectors hold their rows while the exporter swaps their tables.

Three roles, one per kind of process, all in this module:
  Requester    in the exporter: asks for a rotation, swaps the tables, says it is done
  Coordinator  in the supervisor: runs one rotation at a time through its phases
  Holder       in each collector: holds its writer's inserts from begin to end

    exporter (Requester)        supervisor (Coordinator)          collector (Holder) x N
         |  rotate_request  ------->|                                 |
         |                          |  HOLDING                        |
         |                          |--- rotate_begin (every REPEAT) ->|  writer.hold()
         |                          |<--------------- rotate_ack -----|  (no insert in flight)
         |                          |  all acked, or ack timeout      |
         |<-- rotate_ready (every REPEAT)  SWAPPING                   |
         |  swap tables             |                                 |
         |  rotate_done  ---------->|  ENDING                         |
         |                          |--- rotate_end (every REPEAT) -->|  writer.release()
         |                          |  (for ENDING_FOR, then idle)    |

Events are repeated because PUB/SUB drops messages for a subscriber that is (re)connecting:
a collector restarted mid-rotation still learns of it.  Every wait is bounded, so a process
that dies mid-rotation never stalls the others:
  ACK_WAIT          a holder waits this long for an insert in flight before it acks
                    (a later rotate_begin gets the ack instead)
  ack_timeout       the coordinator swaps without the acks still missing after this long
                    (supervisor.rotation_ack_timeout); their late rows land in the new table
  max_hold          the coordinator ends a rotation whose rotate_done is this late, and a
                    writer stops holding after this long (collector.max_hold)
  READY_TIMEOUT     the requester gives up (and retries the cycle later) after this long
"""
import enum
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

REPEAT = 0.5
ENDING_FOR = 3 * REPEAT
ACK_WAIT = 0.3
READY_TIMEOUT = 30.0


class Phase(str, enum.Enum):
    HOLDING = "holding"  # rotate_begin sent; waiting for every live collector's ack
    SWAPPING = "swapping"  # rotate_ready sent; the exporter swaps the tables
    ENDING = "ending"  # rotate_end sent; collectors write again


@dataclass(frozen=True)
class Timeouts:
    """The two configurable waits (see the module docstring)."""
    ack_timeout: float = 5.0
    max_hold: float = 30.0

    @classmethod
    def from_config(cls, config) -> "Timeouts":
        return cls(ack_timeout=config.supervisor["rotation_ack_timeout"],
                   max_hold=config.collector["max_hold"])


class RotationTimeout(RuntimeError):
    """The supervisor did not let the exporter swap in time."""


class RotationCancelled(Exception):
    """The requester was told to stop before the rotation began: nothing was swapped, and
    that is no failure (the daemon is shutting down; the next start rotates)."""


class Rotation:
    """One rotation as the coordinator sees it."""

    def __init__(self, rotation_id: str, symbols, requester: str, request: str, now: float):
        self.id, self.symbols, self.requester = rotation_id, list(symbols), requester
        self.request = request
        self.acks = set()
        self.missing = []
        self.phase = Phase.HOLDING
        self.started = self.phase_started = now
        self.last_sent = 0.0

    def enter(self, phase: Phase, now: float) -> None:
        self.phase, self.phase_started, self.last_sent = phase, now, 0.0


class Coordinator:
    """The supervisor's side: one rotation at a time.  `publish(kind, **fields)` sends an
    event to every child; call tick() from the supervisor's loop."""

    def __init__(self, publish: Callable, timeouts: Timeouts):
        self.publish = publish
        self.timeouts = timeouts
        self.rotation: Optional[Rotation] = None
        self.count = 0

    def describe(self) -> Optional[dict]:
        r = self.rotation
        return None if r is None else {"id": r.id, "phase": r.phase.value}

    def request(self, requester: str, request: str, symbols, now: float) -> None:
        """A rotate_request: start a rotation for `symbols`, unless one is running."""
        if self.rotation is not None:
            if self.rotation.request != request:
                log.info("rotation %s still running; %s asked again", self.rotation.id, requester)
            return
        self.count += 1
        rotation_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{self.count}"
        self.rotation = Rotation(rotation_id, symbols, requester, request, now)
        log.info("rotation %s begins for %s (asked by %s)", rotation_id, ",".join(symbols),
                 requester)

    def ack(self, collector: str, rotation_id: str) -> None:
        if self.rotation and rotation_id == self.rotation.id:
            self.rotation.acks.add(collector)

    def done(self, rotation_id: str, now: float) -> None:
        if self.rotation and rotation_id == self.rotation.id:
            self._end("tables swapped", now)

    def tick(self, now: float, live_collectors: set) -> None:
        """Advance the phase when its condition or timeout is met; repeat its event."""
        r = self.rotation
        if r is None:
            return
        if r.phase is Phase.HOLDING and (live_collectors <= r.acks or
                                         now - r.phase_started >= self.timeouts.ack_timeout):
            r.missing = sorted(live_collectors - r.acks)
            if r.missing:
                log.warning("rotation %s: no hold from %s after %.1fs; swapping anyway "
                            "(their late rows go to the new table)", r.id, ",".join(r.missing),
                            now - r.phase_started)
            r.enter(Phase.SWAPPING, now)
        if r.phase is Phase.SWAPPING and now - r.phase_started > self.timeouts.max_hold:
            log.error("rotation %s: no rotate_done from the exporter within %.0fs; collectors "
                      "write again", r.id, self.timeouts.max_hold)
            self._end("exporter did not finish", now)
        if r.phase is Phase.ENDING and now - r.phase_started > ENDING_FOR:
            self.rotation = None
            return
        if now - r.last_sent >= REPEAT:
            r.last_sent = now
            if r.phase is Phase.HOLDING:
                self.publish("rotate_begin", rotation=r.id, symbols=r.symbols)
            elif r.phase is Phase.SWAPPING:
                self.publish("rotate_ready", rotation=r.id, held=sorted(r.acks),
                             missing=r.missing, request=r.request)
            else:
                self.publish("rotate_end", rotation=r.id, symbols=r.symbols)

    def _end(self, why: str, now: float) -> None:
        r = self.rotation
        log.info("rotation %s ends after %.2fs: %s", r.id, now - r.started, why)
        r.enter(Phase.ENDING, now)


class Holder:
    """A collector's side.  `writer` has hold(id), holding() and release(id) (see
    collector/writer.py); `send(kind, **fields)` reports to the supervisor."""

    def __init__(self, child_name: str, symbol: str, writer, send: Callable):
        self.child_name, self.symbol = child_name, symbol
        self.writer, self.send = writer, send

    def on_event(self, event: dict) -> None:
        """Act on a rotate_begin or rotate_end that concerns this symbol; ignore the rest."""
        if self.symbol not in event.get("symbols", [self.symbol]):
            return
        if event["type"] == "rotate_begin":
            self.writer.hold(event["rotation"])
            # Ack once the insert in flight (if any) is over; an ack not sent now is sent on
            # a later, repeated rotate_begin.
            deadline = time.monotonic() + ACK_WAIT
            while not self.writer.holding() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.writer.holding():
                self.send("rotate_ack", name=self.child_name, rotation=event["rotation"])
        elif event["type"] == "rotate_end":
            self.writer.release(event["rotation"])


class Requester:
    """The exporter's side, over its ChildBus.  `on_other(event)` gets any other event that
    arrives while it waits (an export_now must not be lost)."""

    def __init__(self, bus, child_name: str, on_other: Callable = lambda event: None):
        self.bus, self.child_name, self.on_other = bus, child_name, on_other

    def hold_collectors(self, stopping: Callable[[], bool] = lambda: False) -> str:
        """Ask for a rotation; return its id once the collectors hold their rows.  Raises
        RotationTimeout when the supervisor does not answer in time, RotationCancelled as soon
        as `stopping()` (a supervisor shutting down stops its collectors, not rotations)."""
        deadline = time.monotonic() + READY_TIMEOUT
        request = f"{os.getpid()}-{time.monotonic_ns()}"  # tells our rotate_ready from old ones
        self.bus.send("rotate_request", name=self.child_name, request=request)
        while time.monotonic() < deadline:
            if stopping():
                raise RotationCancelled("stopping before the rotation began")
            event = self.bus.receive(timeout=REPEAT)
            if event and event["type"] == "rotate_ready" and event["request"] == request:
                return event["rotation"]
            if event is not None:
                self.on_other(event)
            if event is None or event["type"] == "rotate_end":  # the supervisor was busy
                self.bus.send("rotate_request", name=self.child_name, request=request)
        raise RotationTimeout(f"no rotate_ready from the supervisor within {READY_TIMEOUT:.0f}s")

    def done(self, rotation_id: str) -> None:
        """The tables are swapped: collectors may write again."""
        self.bus.send("rotate_done", name=self.child_name, rotation=rotation_id)

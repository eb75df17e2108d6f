"""The rotation handshake's three roles (bus/rotation.py) on their own: fake clock values as
`now`, fake publish/send recorders, a fake writer and a fake bus.  Nothing sleeps for real."""
import time as real_time
from collections import deque

import pytest

from bus import messages, rotation
from bus.rotation import (ENDING_FOR, REPEAT, Coordinator, Holder, Phase, Requester,
                          RotationCancelled, RotationTimeout, Timeouts)

T0 = 1000.0  # a monotonic clock value well past zero, as it is on any running machine
LIVE = {"collector-btc", "collector-eth"}


class Recorder:
    """publish/send: records (kind, fields), and checks each is a valid bus message."""

    def __init__(self):
        self.sent = []

    def __call__(self, kind, **fields):
        messages.decode(messages.encode(kind, **fields))
        self.sent.append((kind, fields))

    def kinds(self):
        return [kind for kind, _ in self.sent]

    def last(self, kind):
        return [fields for k, fields in self.sent if k == kind][-1]

    def clear(self):
        self.sent.clear()


class FakeClock:
    """Stands in for the `time` module inside bus/rotation.py: sleeping advances it."""

    def __init__(self, now=T0):
        self.now = now

    def monotonic(self):
        return self.now

    def monotonic_ns(self):
        return int(self.now * 1e9)

    def sleep(self, seconds):
        self.now += seconds

    strftime, gmtime = staticmethod(real_time.strftime), staticmethod(real_time.gmtime)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(rotation, "time", fake)
    return fake


def started(timeouts=Timeouts(ack_timeout=5.0, max_hold=30.0), symbols=("btc", "eth")):
    publish = Recorder()
    coordinator = Coordinator(publish, timeouts)
    coordinator.request("exporter", "req-1", list(symbols), T0)
    return coordinator, publish


# --- Coordinator -----------------------------------------------------------------------------

def test_idle_coordinator_publishes_nothing():
    publish = Recorder()
    coordinator = Coordinator(publish, Timeouts())
    coordinator.tick(T0, LIVE)
    assert publish.sent == [] and coordinator.describe() is None
    coordinator.ack("collector-btc", "nope")
    coordinator.done("nope", T0)
    assert coordinator.rotation is None


def test_a_request_starts_holding_and_repeats_rotate_begin():
    coordinator, publish = started()
    rotation_id = coordinator.rotation.id
    assert coordinator.describe() == {"id": rotation_id, "phase": "holding"}
    coordinator.tick(T0, LIVE)
    assert publish.sent == [("rotate_begin", {"rotation": rotation_id, "symbols": ["btc", "eth"]})]
    coordinator.tick(T0 + REPEAT / 2, LIVE)  # not yet time to repeat
    assert len(publish.sent) == 1
    coordinator.tick(T0 + REPEAT, LIVE)
    coordinator.tick(T0 + 2 * REPEAT, LIVE)
    assert publish.kinds() == ["rotate_begin"] * 3
    assert coordinator.rotation.phase is Phase.HOLDING


def test_all_acks_swap_and_rotate_ready_names_the_held():
    coordinator, publish = started()
    rotation_id = coordinator.rotation.id
    coordinator.tick(T0, LIVE)
    coordinator.ack("collector-btc", rotation_id)
    coordinator.tick(T0 + 0.1, LIVE)
    assert coordinator.rotation.phase is Phase.HOLDING  # eth has not acked
    coordinator.ack("collector-eth", rotation_id)
    coordinator.tick(T0 + 0.2, LIVE)
    assert coordinator.describe()["phase"] == "swapping"
    assert publish.last("rotate_ready") == {"rotation": rotation_id,
                                            "held": ["collector-btc", "collector-eth"],
                                            "missing": [], "request": "req-1"}
    publish.clear()
    coordinator.tick(T0 + 0.2 + REPEAT, LIVE)  # repeated while the exporter swaps
    assert publish.kinds() == ["rotate_ready"]


def test_an_ack_for_another_rotation_does_not_count():
    coordinator, _ = started()
    coordinator.ack("collector-btc", "an-old-rotation")
    coordinator.ack("collector-eth", coordinator.rotation.id)
    coordinator.tick(T0 + 1, LIVE)
    assert coordinator.rotation.phase is Phase.HOLDING
    assert coordinator.rotation.acks == {"collector-eth"}


def test_ack_timeout_swaps_anyway_and_lists_the_missing():
    coordinator, publish = started(Timeouts(ack_timeout=2.0, max_hold=30.0))
    rotation_id = coordinator.rotation.id
    coordinator.ack("collector-btc", rotation_id)
    coordinator.tick(T0 + 1.9, LIVE)
    assert coordinator.rotation.phase is Phase.HOLDING
    coordinator.tick(T0 + 2.0, LIVE)
    assert coordinator.rotation.phase is Phase.SWAPPING
    assert publish.last("rotate_ready")["held"] == ["collector-btc"]
    assert publish.last("rotate_ready")["missing"] == ["collector-eth"]


def test_no_live_collectors_swaps_at_once():
    coordinator, publish = started()
    coordinator.tick(T0, set())
    assert coordinator.rotation.phase is Phase.SWAPPING
    assert publish.kinds() == ["rotate_ready"]
    assert publish.last("rotate_ready")["held"] == [] and publish.last("rotate_ready")["missing"] == []


def test_a_collector_that_dies_while_holding_is_not_waited_for():
    coordinator, _ = started()
    coordinator.ack("collector-btc", coordinator.rotation.id)
    coordinator.tick(T0, LIVE)
    coordinator.tick(T0 + 0.5, {"collector-btc"})  # eth is gone
    assert coordinator.rotation.phase is Phase.SWAPPING
    assert coordinator.rotation.missing == []


def test_rotate_done_ends_repeats_rotate_end_then_goes_idle():
    coordinator, publish = started()
    rotation_id = coordinator.rotation.id
    coordinator.tick(T0, set())
    t = T0 + 1.0
    coordinator.done("some-other-rotation", t)
    assert coordinator.rotation.phase is Phase.SWAPPING
    coordinator.done(rotation_id, t)
    assert coordinator.describe() == {"id": rotation_id, "phase": "ending"}
    publish.clear()
    now = t
    while now <= t + ENDING_FOR:
        coordinator.tick(now, LIVE)
        now += REPEAT / 4  # exact in binary, so the last step lands on ENDING_FOR
    assert publish.kinds() == ["rotate_end"] * (int(ENDING_FOR / REPEAT) + 1)
    assert publish.last("rotate_end") == {"rotation": rotation_id, "symbols": ["btc", "eth"]}
    coordinator.tick(t + ENDING_FOR + 0.01, LIVE)
    assert coordinator.rotation is None and coordinator.describe() is None
    publish.clear()
    coordinator.tick(t + 100, LIVE)
    assert publish.sent == []


def test_max_hold_without_rotate_done_ends_the_rotation():
    coordinator, publish = started(Timeouts(ack_timeout=5.0, max_hold=10.0))
    coordinator.tick(T0, set())
    assert coordinator.rotation.phase is Phase.SWAPPING
    coordinator.tick(T0 + 10.0, LIVE)
    assert coordinator.rotation.phase is Phase.SWAPPING  # not over it yet
    publish.clear()
    coordinator.tick(T0 + 10.01, LIVE)
    assert coordinator.rotation.phase is Phase.ENDING
    assert publish.kinds() == ["rotate_end"]
    coordinator.tick(T0 + 10.02 + ENDING_FOR, LIVE)
    assert coordinator.rotation is None


def test_a_second_request_while_one_runs_is_ignored():
    coordinator, publish = started()
    first = coordinator.rotation
    coordinator.request("exporter", "req-2", ["sol"], T0 + 1)
    coordinator.request("exporter", "req-1", ["sol"], T0 + 1)  # the same request repeated
    assert coordinator.rotation is first and coordinator.count == 1
    assert first.symbols == ["btc", "eth"] and first.request == "req-1"
    coordinator.tick(T0 + 1, set())
    assert publish.last("rotate_ready")["request"] == "req-1"


def test_the_next_request_after_the_end_is_a_new_rotation():
    coordinator, _ = started()
    first = coordinator.rotation.id
    coordinator.tick(T0, set())
    coordinator.done(first, T0 + 1)
    coordinator.tick(T0 + 1, set())
    coordinator.tick(T0 + 1 + ENDING_FOR + 0.1, set())
    assert coordinator.rotation is None
    coordinator.request("exporter", "req-2", ["btc"], T0 + 10)
    assert coordinator.rotation.id != first and coordinator.count == 2
    assert coordinator.rotation.phase is Phase.HOLDING and coordinator.rotation.acks == set()


def test_timeouts_from_config():
    class Config:
        supervisor = {"rotation_ack_timeout": 1.5}
        collector = {"max_hold": 12.0}

    assert Timeouts.from_config(Config()) == Timeouts(ack_timeout=1.5, max_hold=12.0)


# --- Holder ----------------------------------------------------------------------------------

class FakeWriter:
    def __init__(self, holding_after=0):
        self.calls = []
        self.holding_after = holding_after  # holding() answers True from this call on
        self.polls = 0

    def hold(self, rotation_id):
        self.calls.append(("hold", rotation_id))

    def holding(self):
        self.polls += 1
        return self.holding_after is not None and self.polls > self.holding_after

    def release(self, rotation_id):
        self.calls.append(("release", rotation_id))


def holder(writer):
    send = Recorder()
    return Holder("collector-btc", "btc", writer, send), send


def begin(symbols=("btc", "eth"), rotation_id="r1"):
    return {"type": "rotate_begin", "rotation": rotation_id, "symbols": list(symbols)}


def test_holder_holds_and_acks_when_the_writer_holds(clock):
    writer = FakeWriter()
    h, send = holder(writer)
    h.on_event(begin())
    assert writer.calls == [("hold", "r1")]
    assert send.sent == [("rotate_ack", {"name": "collector-btc", "rotation": "r1"})]


def test_holder_waits_for_the_insert_in_flight_then_acks(clock):
    writer = FakeWriter(holding_after=3)
    h, send = holder(writer)
    h.on_event(begin())
    assert send.kinds() == ["rotate_ack"]
    assert clock.now - T0 < rotation.ACK_WAIT


def test_holder_does_not_ack_while_the_writer_is_not_holding(clock):
    writer = FakeWriter(holding_after=None)
    h, send = holder(writer)
    h.on_event(begin())
    assert writer.calls == [("hold", "r1")] and send.sent == []
    assert clock.now - T0 >= rotation.ACK_WAIT  # it waited its bounded while, no longer
    assert clock.now - T0 < rotation.ACK_WAIT + 0.1
    writer.holding_after = 0  # the insert is over: the repeated rotate_begin gets the ack
    h.on_event(begin())
    assert send.kinds() == ["rotate_ack"]


def test_holder_ignores_other_symbols_events(clock):
    writer = FakeWriter()
    h, send = holder(writer)
    h.on_event(begin(symbols=["eth", "sol"]))
    h.on_event({"type": "rotate_end", "rotation": "r1", "symbols": ["eth"]})
    assert writer.calls == [] and send.sent == []


def test_holder_releases_on_rotate_end(clock):
    writer = FakeWriter()
    h, send = holder(writer)
    h.on_event(begin())
    h.on_event({"type": "rotate_end", "rotation": "r1", "symbols": ["btc"]})
    h.on_event({"type": "rotate_end", "rotation": "r2"})  # no symbols: it concerns everyone
    assert writer.calls == [("hold", "r1"), ("release", "r1"), ("release", "r2")]
    assert send.kinds() == ["rotate_ack"]


def test_holder_ignores_other_events(clock):
    writer = FakeWriter()
    h, send = holder(writer)
    h.on_event({"type": "export_now", "request": "x"})
    h.on_event({"type": "rotate_ready", "rotation": "r1", "held": [], "missing": [],
                "request": "q"})
    assert writer.calls == [] and send.sent == []


# --- Requester -------------------------------------------------------------------------------

class FakeBus:
    """The exporter's ChildBus: receive() hands out prepared events (None = a silent REPEAT,
    which also passes on the fake clock)."""

    def __init__(self, clock, events=()):
        self.clock = clock
        self.events = deque(events)
        self.sent = Recorder()

    def send(self, kind, **fields):
        self.sent(kind, **fields)

    def receive(self, timeout):
        assert timeout == REPEAT
        event = self.events.popleft() if self.events else None
        if callable(event):
            event = event(self)
        if event is None:
            self.clock.sleep(timeout)
        return event


def ready(rotation_id="r1", request=None):
    def make(bus):  # echoes the request the requester sent, unless told otherwise
        return {"type": "rotate_ready", "rotation": rotation_id, "held": ["collector-btc"],
                "missing": [], "request": request or bus.sent.last("rotate_request")["request"]}
    return make


def test_requester_returns_the_rotation_once_ready(clock):
    bus = FakeBus(clock, [ready("r7")])
    assert Requester(bus, "exporter").hold_collectors() == "r7"
    assert bus.sent.kinds() == ["rotate_request"]
    assert bus.sent.sent[0][1]["name"] == "exporter"


def test_requester_asks_again_on_silence_with_the_same_request(clock):
    bus = FakeBus(clock, [None, None, ready()])
    assert Requester(bus, "exporter").hold_collectors() == "r1"
    requests = [fields["request"] for kind, fields in bus.sent.sent]
    assert len(requests) == 3 and len(set(requests)) == 1


def test_requester_asks_again_after_someone_elses_rotation_ends(clock):
    others = []
    end = {"type": "rotate_end", "rotation": "r0", "symbols": ["btc"]}
    bus = FakeBus(clock, [end, ready()])
    assert Requester(bus, "exporter", on_other=others.append).hold_collectors() == "r1"
    assert bus.sent.kinds() == ["rotate_request", "rotate_request"]
    assert others == [end]


def test_requester_passes_other_events_on_and_ignores_old_readies(clock):
    others = []
    export_now = {"type": "export_now", "request": "export-1"}
    stale = {"type": "rotate_ready", "rotation": "r0", "held": [], "missing": [],
             "request": "an-earlier-request"}
    bus = FakeBus(clock, [export_now, stale, ready("r1")])
    assert Requester(bus, "exporter", on_other=others.append).hold_collectors() == "r1"
    assert others == [export_now, stale]  # an export_now must not be lost
    assert bus.sent.kinds() == ["rotate_request"]  # neither is a reason to ask again


def test_requester_gives_up_after_ready_timeout(clock):
    bus = FakeBus(clock)  # the supervisor never answers
    with pytest.raises(RotationTimeout):
        Requester(bus, "exporter").hold_collectors()
    assert clock.now - T0 == pytest.approx(rotation.READY_TIMEOUT)
    assert bus.sent.kinds() == ["rotate_request"] * (int(rotation.READY_TIMEOUT / REPEAT) + 1)


def test_requester_gives_up_after_a_shorter_ready_timeout(clock, monkeypatch):
    monkeypatch.setattr(rotation, "READY_TIMEOUT", 2.0)
    bus = FakeBus(clock, [None] * 100)
    with pytest.raises(RotationTimeout, match="2s"):
        Requester(bus, "exporter").hold_collectors()
    assert clock.now - T0 == pytest.approx(2.0)


def test_requester_stops_waiting_when_stopping(clock):
    bus = FakeBus(clock)
    stop = iter([False, False, True])
    with pytest.raises(RotationCancelled):
        Requester(bus, "exporter").hold_collectors(stopping=lambda: next(stop))
    assert clock.now - T0 == pytest.approx(2 * REPEAT)


def test_requester_done_sends_rotate_done(clock):
    bus = FakeBus(clock)
    Requester(bus, "exporter").done("r9")
    assert bus.sent.sent == [("rotate_done", {"name": "exporter", "rotation": "r9"})]


# --- the three together ----------------------------------------------------------------------

def test_a_whole_rotation_through_all_three_roles(clock):
    """Requester -> Coordinator -> Holders and back, events carried by hand."""
    published = Recorder()
    coordinator = Coordinator(published, Timeouts(ack_timeout=5.0, max_hold=30.0))
    writers = {name: FakeWriter() for name in ("btc", "eth")}
    acks = Recorder()
    holders = [Holder(f"collector-{n}", n, w, acks) for n, w in writers.items()]
    live = {"collector-btc", "collector-eth"}

    def supervisor_turn(bus):
        request = bus.sent.last("rotate_request")
        coordinator.request(request["name"], request["request"], ["btc", "eth"], clock.now)
        coordinator.tick(clock.now, live)  # rotate_begin
        for kind, fields in published.sent:
            for h in holders:
                h.on_event({"type": kind, **fields})
        for kind, fields in acks.sent:
            coordinator.ack(fields["name"], fields["rotation"])
        coordinator.tick(clock.now + 0.01, live)  # all acked: rotate_ready
        return {"type": "rotate_ready", **published.last("rotate_ready")}

    bus = FakeBus(clock, [supervisor_turn])
    requester = Requester(bus, "exporter")
    rotation_id = requester.hold_collectors()
    assert all(w.calls == [("hold", rotation_id)] for w in writers.values())
    requester.done(rotation_id)
    coordinator.done(bus.sent.last("rotate_done")["rotation"], clock.now + 0.02)
    published.clear()
    coordinator.tick(clock.now + 0.03, live)
    for kind, fields in published.sent:
        for h in holders:
            h.on_event({"type": kind, **fields})
    assert all(w.calls == [("hold", rotation_id), ("release", rotation_id)]
               for w in writers.values())

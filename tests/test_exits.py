"""ExitGuard's rules on their own: fake tor control ports, no tor process (the private Tor
network tests in test_tor.py run the same rules against real tor)."""
import logging
from types import SimpleNamespace

from supervisor.children import ChildState
from supervisor.exits import ExitGuard

FP = {"a": "A" * 40, "b": "B" * 40, "c": "C" * 40}
IP = {"a": "127.0.2.1", "b": "127.0.2.2", "c": "127.0.2.3"}


class FakeControl:
    """A tor's control port: fails while `failing`, else reports `streams` (exit letters,
    oldest first) and records the commands it gets."""

    def __init__(self, *streams):
        self.failing = False
        self.streams = list(streams)
        self.commands = []

    def __call__(self):
        return self

    def __enter__(self):
        if self.failing:
            raise OSError("timed out")
        return self

    def __exit__(self, *exc):
        return False

    def exits_of_streams(self, port):
        return [(FP[x], IP[x]) for x in self.streams]

    def command(self, line):
        self.commands.append(line)
        return ["OK"]


def slot_for(guard, name, control, **stats):
    collector = SimpleNamespace(name=f"collector-{name}", stats={"connected": True, **stats},
                                reconnects=[])
    collector.reconnect = collector.reconnects.append
    tor = SimpleNamespace(name=f"tor-{name}", state=ChildState.RUNNING,
                          process=SimpleNamespace(server=SimpleNamespace(control=control)))
    slot = guard.add(tor, collector)
    slot.bootstrapped = True
    return slot


def guard():
    return ExitGuard({"exit_check_interval": 1.0, "separation_retries": 3}, exchange_port=443,
                     move_settle=20.0)


def check(g, now):
    g._read_exits(now)
    g._keep_exits_apart()
    g._separate(now)


def test_an_unreadable_exit_is_logged_once_per_episode(caplog):
    """A stopped tor fails every exit check (once a second in the soak): one line when it
    starts failing, one when it works again, not one per check."""
    control = FakeControl("a")
    g = guard()
    slot = slot_for(g, "btc", control)
    with caplog.at_level(logging.INFO, logger="supervisor.exits"):
        for failing in (True, True, True, False, False, True, True):
            control.failing = failing
            g._read_exits(now=0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read its exit: timed out" in m for m in messages) == 2, messages
    assert sum("its exit can be read again" in m for m in messages) == 1, messages
    assert slot.exit_unreadable == "timed out"


def test_each_tor_excludes_every_exit_the_others_use_also_during_an_overlap():
    g = guard()
    btc, eth = FakeControl("a"), FakeControl("b", "c")  # eth mid-replacement: two streams
    slot_for(g, "btc", btc)
    slot_for(g, "eth", eth)
    check(g, 0.0)
    assert btc.commands == [f"SETCONF ExcludeExitNodes=${FP['b']},${FP['c']}"]
    assert eth.commands == [f"SETCONF ExcludeExitNodes=${FP['a']}"]
    check(g, 1.0)  # nothing changed: no command
    assert len(btc.commands) == len(eth.commands) == 1
    eth.streams = ["c"]  # the handover is done
    check(g, 2.0)
    assert btc.commands[-1] == f"SETCONF ExcludeExitNodes=${FP['c']}"
    eth.streams = []  # eth disconnected: btc may use any exit again
    g.slots["collector-eth"].collector.stats["connected"] = False
    check(g, 3.0)
    assert btc.commands[-1] == "RESETCONF ExcludeExitNodes"


def test_the_collector_that_came_to_a_shared_exit_last_moves_once_per_replacement():
    g = guard()
    btc, eth = FakeControl("a"), FakeControl("b")
    btc_slot, eth_slot = slot_for(g, "btc", btc), slot_for(g, "eth", eth)
    check(g, 0.0)
    btc.streams = ["b"]  # btc's new connection took eth's exit: btc moves, not eth (by name)
    check(g, 1.0)
    assert btc_slot.collector.reconnects == [1.0] and eth_slot.collector.reconnects == []
    assert btc.commands[-2:] == [f"SETCONF ExcludeExitNodes=${FP['b']}", "SIGNAL NEWNYM"]
    assert "SIGNAL NEWNYM" not in eth.commands
    btc_slot.collector.stats["replacing"] = True  # dialling and overlapping: not moved again
    for now in (2.0, 3.0, 30.0):
        check(g, now)
    assert btc_slot.collector.reconnects == [1.0]
    btc_slot.collector.stats["replacing"] = False  # the replacement ended on a shared exit
    btc.streams = ["b", "b"]
    check(g, 31.0)
    assert btc_slot.collector.reconnects == [1.0, 31.0] and btc_slot.separations == 2
    btc.streams = ["c"]  # apart at last: its tries start again
    check(g, 32.0)
    assert btc_slot.separations == 0 and eth_slot.collector.reconnects == []


def test_a_move_not_yet_seen_by_the_collector_waits_move_settle():
    """SIGUSR1 sent, but the next heartbeat does not say "replacing" yet: no second move
    until a new stream shows or move_settle passes; after separation_retries, a warning."""
    g = guard()
    btc, eth = FakeControl("b"), FakeControl("b")
    btc_slot, eth_slot = slot_for(g, "btc", btc), slot_for(g, "eth", eth)
    check(g, 0.0)  # same age: the later by name moves
    assert eth_slot.collector.reconnects == [0.0] and btc_slot.collector.reconnects == []
    check(g, 5.0)
    assert eth_slot.collector.reconnects == [0.0]
    for now in (21.0, 42.0, 63.0, 84.0):
        check(g, now)
    assert eth_slot.collector.reconnects == [0.0, 21.0, 42.0]  # separation_retries = 3
    assert eth_slot.warning == "shares exit 127.0.2.2 with collector-btc"


def test_a_tor_that_bootstraps_excludes_the_others_exits_before_its_collector_starts():
    g = guard()
    g.config["bootstrap_timeout"] = 60.0
    slot_for(g, "btc", FakeControl("a"))
    eth = FakeControl()
    eth.bootstrap_progress = lambda: 100
    slot = slot_for(g, "eth", eth)
    slot.bootstrapped = False
    slot.collector.state, slot.collector.wanted = ChildState.WAITING, True
    slot.collector.start = lambda now: eth.commands.append("collector started")
    slot.collector.child_id = SimpleNamespace(name="eth")
    slot.tor.started_at = 0.0
    g._read_exits(0.0)
    g._watch_bootstrap(slot, 1.0)
    assert eth.commands == [f"SETCONF ExcludeExitNodes=${FP['a']}", "collector started"]

"""ExitGuard's exit reading on its own: a fake tor control port, no tor process."""
import logging
from types import SimpleNamespace

from supervisor.exits import ExitGuard


class FakeControl:
    """tor's control port: fails while `failing`, else reports one exit."""

    def __init__(self):
        self.failing = False

    def __call__(self):
        return self

    def __enter__(self):
        if self.failing:
            raise OSError("timed out")
        return self

    def __exit__(self, *exc):
        return False

    def exit_of_stream(self, port):
        return "ABCDEF0123456789", "127.0.2.1"


def test_an_unreadable_exit_is_logged_once_per_episode(caplog):
    """A stopped tor fails every exit check (once a second in the soak): one line when it
    starts failing, one when it works again, not one per check."""
    control = FakeControl()
    collector = SimpleNamespace(name="collector-btc", stats={"connected": True})
    tor = SimpleNamespace(process=SimpleNamespace(server=SimpleNamespace(control=control)))
    guard = ExitGuard({"exit_check_interval": 1.0}, exchange_port=443)
    slot = guard.add(tor, collector)
    slot.bootstrapped = True
    with caplog.at_level(logging.INFO, logger="supervisor.exits"):
        for failing in (True, True, True, False, False, True, True):
            control.failing = failing
            guard._read_exits(now=0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read its exit: timed out" in m for m in messages) == 2, messages
    assert sum("its exit can be read again" in m for m in messages) == 1, messages
    assert slot.exit_unreadable == "timed out"

"""The fork server (supervisor/forkserver.py): children it forks are this process's own (a
subreaper), run the target with the server's fixed arguments and the request's, and report
their exit; the server ends when its socket closes, its children run on."""
import ctypes
import gc
import os
import signal
import time

import pytest

from supervisor.forkserver import ForkServer, become_subreaper
from tests.conftest import wait_for


def body(pipe_fd: int, word: str, code: int) -> None:
    """A child: says who its parent is and what it was given; exits with `code`, or waits to
    be killed (None)."""
    os.write(pipe_fd, f"{os.getppid()} {word}\n".encode())
    if code is None:
        time.sleep(60)
    os._exit(code)


@pytest.fixture
def subreaper():
    become_subreaper()
    yield
    ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER off: pytest is no supervisor
    gc.unfreeze()  # the server's fork froze this process's objects


def exit_of(process) -> str:
    wait_for(lambda: not process.alive(), 10, "the child's exit")
    return process.exit_description()


def test_children_of_the_fork_server_are_ours_and_report_their_exit(subreaper):
    read_end, write_end = os.pipe()
    server = ForkServer(body, (write_end,))
    try:
        failed, clean, killed = (server.start("one", 3), server.start("two", 0),
                                 server.start("three", None))
        with os.fdopen(read_end) as lines:
            said = sorted(lines.readline().split() for _ in range(3))
        assert said == [[str(os.getpid()), word] for word in ("one", "three", "two")]
        assert exit_of(failed) == "exit code 3" and exit_of(clean) == "exit code 0"
        assert killed.alive()
        killed.signal(signal.SIGKILL)
        assert exit_of(killed) == "killed by SIGKILL"
        assert server.process.alive()
        assert not {failed.pid, clean.pid, killed.pid} & {server.process.pid, os.getpid()}
    finally:
        os.close(write_end)
        server.stop()
    assert exit_of(server.process) in ("exit code 0", "killed by SIGTERM")

"""`mexc status --watch` in a terminal ends on Ctrl-C, SIGTERM and the terminal closing alike:
exit 0, no traceback, the terminal's modes as it found them.  No daemon needed: without one
it shows that mexc is not running and keeps trying."""
import signal

import pytest

from mexc.watch import HOME_AND_CLEAR
from tests.conftest import MEXC, Terminal, toml_dump, wait_for


@pytest.mark.parametrize("how", ["ctrl-c", "SIGTERM", "terminal-closed"])
def test_status_watch_ends_cleanly_on_each_stop_signal(tmp_path, how):
    config = tmp_path / "mexc.toml"
    config.write_text(toml_dump({"paths": {"state_dir": str(tmp_path / "state"),
                                           "runtime_dir": str(tmp_path / "run")}}))
    terminal = Terminal([MEXC, "status", "--watch", "--interval", "0.2", "--config",
                         str(config)])
    try:
        wait_for(lambda: terminal.read().count(HOME_AND_CLEAR) >= 2, 20, "two screens")
        assert "mexc is not running" in terminal.read()
        if how == "ctrl-c":
            terminal.type(Terminal.CTRL_C)
        elif how == "terminal-closed":
            terminal.hang_up()  # its next writes fail: it must not trip over them
        else:
            terminal.popen.send_signal(signal.SIGTERM)
        assert terminal.wait(10) == 0, terminal.read()[-2000:]
        assert "Traceback" not in terminal.read()
        if how != "terminal-closed":
            assert terminal.modes() == terminal.modes_at_start
    finally:
        terminal.close()

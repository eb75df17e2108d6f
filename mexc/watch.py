"""`mexc status --watch`: the status table redrawn in place, like top, instead of scrolling."""
import sys
import time

from bus.sockets import NotRunning
from supervisor.commands import COMMANDS, ask

HOME_AND_CLEAR = "\033[H\033[J"  # cursor to the top left, erase the screen below it


def screen(runtime_dir: str, **filters) -> str:
    """The status table (filters: Status.show's symbol, state), or why there is none (the
    daemon may be starting or gone)."""
    try:
        return COMMANDS["status"].show(ask(runtime_dir, "status", timeout=2.0), **filters)
    except NotRunning as e:
        return f"mexc is not running ({e}); trying again"


def watch(runtime_dir: str, interval: float, title: str = "", keep_going=lambda: True,
          out=sys.stdout, **filters) -> None:
    """Redraw every `interval` s while keep_going(); Ctrl-C (KeyboardInterrupt) ends it."""
    while keep_going():
        out.write(f"{HOME_AND_CLEAR}{title}{time.strftime('%H:%M:%S')}  every {interval:g}s, "
                  f"Ctrl-C quits\n\n{screen(runtime_dir, **filters)}\n")
        out.flush()
        time.sleep(interval)  # the pace of the screen, not a wait for some state

"""The fault injectors: each takes (soak, fault), injects the fault and may return its undo,
which the schedule runs fault.duration seconds later; FAULTS maps a kind to its injector."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

from bus import sockets

from .common import MARKETS, SYMBOLS, SoakError, say, wait_for
from .schedule import Fault

BURST_FACTOR = 100  # a burst is one second of frames at this many times the rate


class Daemon:
    """What the injectors need of a daemon (`runtime_dir`, `stopped_pids`): its status, its
    running children, signals that remember what they stopped."""

    def status(self, timeout: float = 3.0) -> Optional[dict]:
        try:
            return sockets.request(self.runtime_dir, "status", timeout=timeout)["result"]
        except Exception:  # not running, restarting, a reply we cannot read
            return None

    def child(self, name: str) -> Optional[dict]:
        for c in (self.status() or {}).get("children", []):
            if c["name"] == name and c["state"] == "running" and c["pid"]:
                return c
        return None

    def signal_pid(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        if signum == signal.SIGSTOP:
            self.stopped_pids.add(pid)
        elif signum == signal.SIGCONT:
            self.stopped_pids.discard(pid)


def _signal_child(soak, fault: Fault, name: str, signum: int):
    child = soak.child(name)
    if child is None:
        raise SoakError(f"{name} is not running")
    soak.note(fault, f"pid {child['pid']}")
    soak.signal_pid(child["pid"], signum)
    if signum == signal.SIGSTOP:
        return lambda: soak.signal_pid(child["pid"], signal.SIGCONT)
    return None


def kill_collector(soak, fault):
    return _signal_child(soak, fault, f"collector-{fault.target}", signal.SIGKILL)


def stop_collector(soak, fault):
    return _signal_child(soak, fault, f"collector-{fault.target}", signal.SIGSTOP)


def kill_exporter(soak, fault):
    return _signal_child(soak, fault, "exporter", signal.SIGKILL)


def stop_exporter(soak, fault):
    return _signal_child(soak, fault, "exporter", signal.SIGSTOP)


def kill_tor(soak, fault):
    return _signal_child(soak, fault, f"tor-{fault.target}", signal.SIGKILL)


def stop_tor(soak, fault):
    return _signal_child(soak, fault, f"tor-{fault.target}", signal.SIGSTOP)


def clickhouse_outage(soak, fault):
    if soak.args.managed:  # the daemon's own server crashes; its supervisor restarts it
        return _signal_child(soak, fault, "clickhouse", signal.SIGKILL)
    soak.note(fault, "stopping our clickhouse")
    soak.ch.stop()

    def back():
        soak.ch.start()
        say("clickhouse started again")
    return back


def fill_disk(soak, fault):
    if soak.tmpfs:
        soak.filler = os.path.join(soak.tmpfs, "filler")
        # unbuffered: a buffered file's close() would try the last partial block again and
        # raise ENOSPC, the fault would count as skipped, and its filler would stay for good
        with open(soak.filler, "wb", buffering=0) as f:
            block = b"\0" * (1 << 20)
            try:
                while True:
                    f.write(block)
            except OSError:
                pass
        soak.note(fault, f"{os.path.getsize(soak.filler) >> 20} MiB filler, tmpfs full")
    else:
        os.rename(soak.export_dir, soak.export_dir + ".away")
        with open(soak.export_dir, "w") as f:
            f.write("a file where the export directory should be\n")
        soak.note(fault, "export.dir replaced by a file")
    # The exporter may be waiting out a retry (a minute, whatever the clock speed): ask for a
    # cycle now, so the full disk is met at once.
    try:
        sockets.request(soak.runtime_dir, "export", timeout=3.0)
    except Exception as e:
        say(f"export request: {type(e).__name__}: {e}")
    return lambda: free_disk(soak)


def free_disk(soak) -> None:
    if soak.filler:
        os.unlink(soak.filler)
        soak.filler = None
    elif not os.path.isdir(soak.export_dir):
        os.unlink(soak.export_dir)
        os.rename(soak.export_dir + ".away", soak.export_dir)
    say("export disk usable again")


def reload(soak, fault):
    """SIGHUP without fault.target (maybe after an invalid file first), later with it again."""
    if soak.rng.random() < 0.3:
        soak.write_config(invalid=True)
        soak.daemon.signal(signal.SIGHUP)
        time.sleep(1.0)
    soak.removed = fault.target
    soak.write_config([n for n in soak.names if n != fault.target])
    soak.note(fault, f"SIGHUP without {SYMBOLS[fault.target]}")
    soak.daemon.signal(signal.SIGHUP)

    def add_back():
        soak.write_config()
        soak.daemon.signal(signal.SIGHUP)
        soak.removed = None
        say(f"SIGHUP with {SYMBOLS[fault.target]} again")
    return add_back


def kill_supervisor(soak, fault):
    """SIGKILL `mexc run` and start it again at once, as systemd would: the new run must wait
    for the old children (they die with it, storing or spooling their rows) by itself."""
    soak.note(fault, f"pid {soak.daemon.pid}")
    soak.daemon.signal(signal.SIGKILL)
    soak.daemon.popen.wait(10)
    for _attempt in range(5):
        proc = soak.start_daemon()
        try:
            wait_for(lambda: proc.popen.poll() is not None or soak.status(timeout=1.0), 60,
                     "the new mexc run to answer status", 0.2)
        except SoakError as e:
            say(str(e))
        if proc.popen.poll() is None:
            return None
        soak.report.supervisor_restart_refusals += 1
        say(f"mexc run exited {proc.popen.returncode}: {proc.log().strip()[-300:]}")
        time.sleep(1.0)
    raise SoakError("mexc run would not start again")


def disconnect(soak, fault):
    soak.note(fault)
    soak.sim.force_disconnect()


def stall(soak, fault):
    soak.note(fault)
    soak.sim.stall(fault.duration)


def inject(soak, fault: Fault, what: str, send: Callable[[str], object]) -> bool:
    """A simulator-side send for fault.target, in a thread of its own (a send to a SIGSTOPped
    collector blocks until it runs again); `what` a dead letter's kind, recorded once sent.
    False when no connection is subscribed to the symbol (soak.streaming)."""
    symbol = MARKETS[fault.target]
    if not soak.streaming(symbol):
        return False
    wall = time.time()

    def run():
        if send(symbol) and what:
            with soak.lock:
                soak.injections.append((wall, fault.target, what))
    thread = threading.Thread(target=run, name=f"inject-{fault.kind}", daemon=True)
    thread.start()
    soak.injectors.append(thread)
    return True


def burst(soak, fault):
    frames = int(BURST_FACTOR * soak.args.rate * 3)
    if inject(soak, fault, "", lambda symbol: soak.sim.send_frames(symbol, frames)):
        soak.note(fault, f"{frames} frames at once")
    else:
        soak.report.faults_skipped.append(f"{fault} (not connected)")


def junk(soak, fault):
    sim = soak.sim
    kinds = {
        "junk": lambda s: sim.send_junk(s),
        "unknown_channel": lambda s: sim.send_unknown_channel(s),
        "wrong_types": lambda s: sim.send_wrong_types(s),
        "bad_binary": lambda s: sim.send_bad_binary(s),
        "gzip_deal": lambda s: sim.send_gzip_deal(s),
    }
    what = soak.rng.choice(sorted(kinds))
    dead_letter = what != "gzip_deal"  # a gzip deal is ordinary data
    if inject(soak, fault, what if dead_letter else "", kinds[what]):
        soak.note(fault, what)
    else:
        soak.report.faults_skipped.append(f"{fault} (not connected)")


def huge(soak, fault):
    nbytes = soak.rng.randint(2, 6) << 20
    if inject(soak, fault, "huge", lambda s: soak.sim.send_huge(s, nbytes)):
        soak.note(fault, f"{nbytes >> 20} MiB frame")
    else:
        soak.report.faults_skipped.append(f"{fault} (not connected)")


FAULTS = {
    "kill_collector": kill_collector, "stop_collector": stop_collector,
    "kill_exporter": kill_exporter, "stop_exporter": stop_exporter,
    "kill_tor": kill_tor, "stop_tor": stop_tor,
    "clickhouse_outage": clickhouse_outage, "disk_full": fill_disk, "reload": reload,
    "kill_supervisor": kill_supervisor, "disconnect": disconnect, "stall": stall,
    "burst": burst, "junk": junk, "huge": huge,
}

"""One tor process per collector, and the little of Tor's control protocol we need.

Each instance gets its own torrc and persistent DataDirectory under state_dir/tor/<name>
(restarts bootstrap fast), a SocksPort and a cookie-authenticated ControlPort on loopback, and
dies with the supervisor.  Its log lines go to mexc's log tagged `tor[<name>]`.

Which exit carries a collector's connection: GETINFO stream-status gives
"<stream> <status> <circuit> <target>"; GETINFO circuit-status gives "<circuit> BUILT
$FP~nick,...,$FP~nick ..."; the last hop is the exit; GETINFO ns/id/<FP> gives its "r" line,
whose 7th field is its address.
"""
import logging
import os
import shutil
import socket
import subprocess
import threading
from typing import List, Tuple

from core.process import dies_with_this_process, free_port

log = logging.getLogger(__name__)
_LEVELS = {"[debug]": logging.DEBUG, "[info]": logging.INFO, "[notice]": logging.INFO,
           "[warn]": logging.WARNING, "[err]": logging.ERROR}
# tor notices caused by our own exit checks (a control connection every few seconds): debug
_ROUTINE = ("New control connection opened",)


class TorError(RuntimeError):
    pass


class TorControl:
    """A control-port connection: AUTHENTICATE with the cookie, then commands."""

    def __init__(self, port: int, cookie_path: str, timeout: float = 1.0):
        # a short timeout: the supervisor's loop (and systemd's watchdog) waits on it
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        with open(cookie_path, "rb") as f:
            self.command(f"AUTHENTICATE {f.read().hex()}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def command(self, line: str) -> List[str]:
        """One command -> its reply lines (data lines included); TorError on an error reply."""
        self.sock.sendall(line.encode() + b"\r\n")
        lines = []
        while True:
            reply = self._readline()
            code, kind, rest = reply[:3], reply[3:4], reply[4:]
            lines.append(rest)
            if kind == "+":  # a data block up to "."
                while (data := self._readline()) != ".":
                    lines.append(data[1:] if data.startswith("..") else data)
            elif kind == " ":
                if not code.startswith("2"):
                    raise TorError(f"{line.split()[0]}: {reply}")
                return lines

    def getinfo(self, key: str) -> List[str]:
        """GETINFO key -> its value lines (without "key=" and the final OK)."""
        values = []
        for line in self.command(f"GETINFO {key}"):
            if line.startswith(f"{key}="):
                line = line[len(key) + 1:]
            if line and line != "OK":
                values.append(line)
        return values

    def bootstrap_progress(self) -> int:
        phase = " ".join(self.getinfo("status/bootstrap-phase"))
        for word in phase.split():
            if word.startswith("PROGRESS="):
                return int(word[9:])
        return 0

    def exits_of_streams(self, target_port: int) -> List[Tuple[str, str]]:
        """(fingerprint, address) of the exit of each of our open streams to target_port,
        oldest stream first: one, or two while a collector replaces its connection (make
        before break)."""
        circuits = {}
        for line in self.getinfo("circuit-status"):
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "BUILT":
                circuits[parts[0]] = parts[2]
        exits = []
        for line in sorted(self.getinfo("stream-status"), key=_stream_id):
            parts = line.split()
            if (len(parts) >= 4 and parts[1] == "SUCCEEDED" and parts[2] in circuits
                    and parts[3].rsplit(":", 1)[-1] == str(target_port)):
                fingerprint = circuits[parts[2]].split(",")[-1].split("~")[0].lstrip("$")
                for entry in self.getinfo(f"ns/id/{fingerprint}"):
                    if entry.startswith("r "):
                        exits.append((fingerprint, entry.split()[6]))
        return exits

    def _readline(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TorError("control connection closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode(errors="replace")


class TorProcess:
    """A tor for one collector; `start()` launches it (bootstrap is watched separately)."""

    def __init__(self, directory: str, name: str, socks_port: int, control_port: int,
                 binary: str = "tor", extra_lines=()):
        self.directory = os.path.abspath(directory)
        self.name = name
        self.socks_port = socks_port or free_port()
        self.control_port = control_port or free_port()
        self.binary = binary
        self.extra_lines = list(extra_lines)
        self.process = None

    @property
    def cookie_path(self) -> str:
        return os.path.join(self.directory, "data", "control_auth_cookie")

    def write_torrc(self) -> str:
        os.makedirs(os.path.join(self.directory, "data"), mode=0o700, exist_ok=True)
        lines = [
            f"DataDirectory {self.directory}/data",
            f"SocksPort 127.0.0.1:{self.socks_port}",
            f"ControlPort 127.0.0.1:{self.control_port}",
            "CookieAuthentication 1",
            f"__OwningControllerProcess {os.getpid()}",  # exit when the supervisor does
            "Log notice stdout",
            "AvoidDiskWrites 1",
            # no GeoIP tables: ~34 MiB and ~0.5 s of start-up per instance; a torrc_extra that
            # needs country codes (ExcludeNodes {cc}) sets GeoIPFile again, later lines win
            f"GeoIPFile {os.devnull}",
            f"GeoIPv6File {os.devnull}",
            # Padding hides traffic patterns from a local observer; what mexc needs from tor
            # is distinct exit IPs, which padding does not touch.  The reduced modes send far
            # fewer cells.  (Predicted circuits must stay on: tor's bootstrap ends by building
            # one, and the supervisor starts a collector only after it.)
            "ReducedConnectionPadding 1",
            "ReducedCircuitPadding 1",
            *self.extra_lines,
        ]
        path = os.path.join(self.directory, "torrc")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self, wait: bool = False) -> "TorProcess":
        binary = shutil.which(self.binary)
        if binary is None:
            raise TorError(f"{self.binary} not found: run ./setup (it installs tor)")
        torrc = self.write_torrc()
        # --defaults-torrc /dev/null: the system's /etc/tor/torrc never applies to our instances
        self.process = subprocess.Popen(
            [binary, "--defaults-torrc", os.devnull, "-f", torrc], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=dies_with_this_process())
        threading.Thread(target=self._pump_log, args=(self.process.stdout,),
                         name=f"tor-{self.name}-log", daemon=True).start()
        log.info("tor[%s] starting pid=%d socks=%d control=%d", self.name, self.process.pid,
                 self.socks_port, self.control_port)
        return self

    def control(self) -> TorControl:
        return TorControl(self.control_port, self.cookie_path)

    def _pump_log(self, stream) -> None:
        """tor's own log lines, one event each, into mexc's log with the symbol's name."""
        for raw in stream:
            line = raw.decode(errors="replace").strip()
            level = next((lvl for tag, lvl in _LEVELS.items() if tag in line), logging.INFO)
            message = line.split("] ", 1)[-1] if "] " in line else line
            if message.startswith(_ROUTINE):
                level = logging.DEBUG
            log.log(level, "tor[%s] %s", self.name, message)


def _stream_id(line: str) -> int:
    """A stream-status line's stream id: tor numbers streams in the order it opens them."""
    head = line.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0

"""systemd's notify protocol (Type=notify): datagrams to $NOTIFY_SOCKET.  No-op elsewhere."""
import os
import socket
from typing import Optional


class Notifier:
    def __init__(self, address: Optional[str], watchdog_interval: Optional[float]):
        self.address = address
        self.watchdog_interval = watchdog_interval  # seconds between WATCHDOG=1, or None

    @classmethod
    def from_environment(cls) -> "Notifier":
        """Take the variables out of the environment, so children (collectors, ClickHouse)
        do not inherit them and try to notify on the supervisor's behalf."""
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        interval = None
        if usec and (not pid or pid == str(os.getpid())):
            interval = int(usec) / 2e6  # ping at half of WatchdogSec
        return cls(address, interval)

    def notify(self, message: str) -> bool:
        """Send e.g. "READY=1" or "STATUS=..."; False when not run by systemd."""
        if not self.address:
            return False
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(address)
                sock.sendall(message.encode())
            except OSError:
                return False
        return True

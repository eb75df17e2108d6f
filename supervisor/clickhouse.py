"""A private ClickHouse server run as a child process (`clickhouse.managed = true`).

Its data lives under `<state_dir>/clickhouse`, it listens on loopback only, and it dies with its
parent (PR_SET_PDEATHSIG), so a killed supervisor never leaves it behind.  The tests start the
same class on a temporary directory.
"""
import logging
import os
import shutil
import socket
import subprocess
import time
from xml.sax.saxutils import escape


from core.config import listen_address
from core.process import dies_with_this_process, free_port
from core.store import Store

log = logging.getLogger(__name__)

CONFIG_XML = """<?xml version="1.0"?>
<clickhouse>
  <logger>
    <level>warning</level>
    <log>{dir}/log/clickhouse-server.log</log>
    <errorlog>{dir}/log/clickhouse-server.err.log</errorlog>
    <size>50M</size>
    <count>3</count>
  </logger>
  <listen_host>{listen_host}</listen_host>
  <tcp_port>{port}</tcp_port>
  <http_port>{http_port}</http_port>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>{dir}/users.xml</users_config>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
{extra_config}</clickhouse>
"""

# poll_interval: an idle native connection looks at the server's stop every second, not every
# 10 s (18.16's default): with a client connected, SIGTERM took 10 s instead of 1.
USERS_XML = """<?xml version="1.0"?>
<clickhouse>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage>
    <poll_interval>1</poll_interval></default></profiles>
  <users>
    <{user}>
      <password>{password}</password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip>{networks}</networks>
      <profile>default</profile>
      <quota>default</quota>
    </{user}>
  </users>
  <quotas><default></default></quotas>
</clickhouse>
"""


class ClickHouseStartError(RuntimeError):
    pass


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


class ManagedClickHouse:
    """clickhouse-server on loopback with its config, data and logs in `directory`.

    A test bed of several servers (tests/cluster_bed.py) gives each its own `listen_host`,
    `extra_config` (XML elements put inside <clickhouse>: zookeeper, macros, remote_servers)
    and `client_networks` (the addresses of the other servers, which may then query it)."""

    def __init__(self, directory: str, port: int = 0, user: str = "default", password: str = "",
                 binary: str = "clickhouse-server", http_port: int = 0,
                 listen_host: str = "127.0.0.1", extra_config: str = "",
                 client_networks: tuple = ()):
        self.directory = os.path.abspath(directory)
        self.listen_host = listen_host
        self.extra_config = extra_config
        self.client_networks = tuple(client_networks)
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.user = user
        self.password = password
        self.binary = binary
        self.process = None

    @classmethod
    def from_config(cls, config, directory: str) -> "ManagedClickHouse":
        """The server `clickhouse.managed` asks for.  In a cluster it listens on
        cluster.clickhouse's address as well as on loopback, and takes the configured user
        from any address (with its password, which a cluster requires: core/config.py): the
        other hosts read its rows and holdings there (docs/cluster.md, the ports to open)."""
        ch, peers = config.clickhouse, {}
        if config.clustered:
            host, _port = listen_address(config.cluster["clickhouse"])
            also_loopback = host not in ("127.0.0.1", "localhost", "0.0.0.0", "::")
            peers = dict(listen_host=host, client_networks=("0.0.0.0/0", "::/0"),
                         extra_config="  <listen_host>127.0.0.1</listen_host>\n"
                         if also_loopback else "")
        return cls(directory, port=ch["port"], user=ch["user"], password=ch["password"],
                   binary=ch["binary"], http_port=ch["http_port"], **peers)

    def write_config(self) -> str:
        for sub in ("log", "data", "tmp", "user_files", "format_schemas"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        config_path = os.path.join(self.directory, "config.xml")
        with open(config_path, "w") as f:
            f.write(CONFIG_XML.format(dir=escape(self.directory), port=self.port,
                                      http_port=self.http_port,
                                      listen_host=escape(self.listen_host),
                                      extra_config=self.extra_config))
        users_path = os.path.join(self.directory, "users.xml")
        # The password sits in this file, so only the owner may read it.
        fd = os.open(users_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            networks = "".join(f"<ip>{escape(ip)}</ip>" for ip in self.client_networks)
            f.write(USERS_XML.format(user=escape(self.user), password=escape(self.password),
                                     networks=networks))
        return config_path

    def start(self, timeout: float = 60.0, wait: bool = True) -> "ManagedClickHouse":
        """Launch the server; with wait, return once it answers queries."""
        self._wait_port_free(timeout if wait else 0.0)  # a restart must not block its caller
        command = self.command(self.write_config())
        output = open(os.path.join(self.directory, "log", "stdout.log"), "ab")
        self.process = subprocess.Popen(
            command, cwd=self.directory, stdout=output, stderr=output, stdin=subprocess.DEVNULL,
            preexec_fn=dies_with_this_process())
        output.close()
        log.info("clickhouse starting pid=%d port=%d dir=%s", self.process.pid, self.port,
                 self.directory)
        if wait:
            self.wait_ready(timeout)
        return self

    def command(self, config_path: str) -> list:
        """The server's command line (the working directory is self.directory)."""
        binary = shutil.which(self.binary)
        if binary is None:
            raise ClickHouseStartError(f"{self.binary} not found: run ./setup "
                                       "(it installs clickhouse-server)")
        return [binary, f"--config-file={config_path}"]

    def _wait_port_free(self, timeout: float) -> None:
        """A server on our port (one of a killed `mexc run`, still stopping) would answer
        wait_ready() in place of ours."""
        deadline = time.monotonic() + timeout
        while _listening(self.listen_host, self.port):
            if time.monotonic() >= deadline:
                raise ClickHouseStartError(f"port {self.port} is in use by another program; "
                                           "set clickhouse.port to a free one")
            time.sleep(0.1)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClickHouseStartError(f"clickhouse-server exited with code "
                                           f"{self.process.returncode}: {self._error_tail()}")
            if self.healthy():
                log.info("clickhouse ready pid=%d port=%d", self.process.pid, self.port)
                return
            time.sleep(0.1)
        self.stop()
        raise ClickHouseStartError(f"clickhouse-server not ready after {timeout:.0f} s: "
                                   f"{self._error_tail()}")

    def healthy(self) -> bool:
        with Store({"host": self.listen_host, "port": self.port, "user": self.user,
                    "password": self.password, "database": "default"}, timeout=1.0) as session:
            return session.reachable()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("clickhouse did not stop in %.0f s; killing pid=%d", timeout,
                        self.process.pid)
            self.process.kill()
            self.process.wait()
        log.info("clickhouse stopped")

    def _error_tail(self, lines: int = 3) -> str:
        path = os.path.join(self.directory, "log", "clickhouse-server.err.log")
        try:
            with open(path, errors="replace") as f:
                tail = [line.strip() for line in f.readlines()[-lines:]]
            return " | ".join(tail) or "(error log empty)"
        except OSError:
            return "(no error log)"

"""A cluster on one machine, for tests and benches: hosts as network namespaces on a private
bridge, each with its own address and its own ClickHouse (Debian's 18.16), one ZooKeeper
(Debian's 3.8) and the MEXC simulator reachable from every host.

Layout (N hosts, default 3), in one private /24 picked at start from 10.233.0.0/16 (the first
10.233.K.0/24 no device in the root namespace uses yet, so beds run side by side):

    root namespace   bridge <prefix>-br   10.233.K.1    the test process: simulator, queries
    <prefix>-zk      eth0                 10.233.K.2    ZooKeeper, client port 2181
    <prefix>-h1      eth0                 10.233.K.11   ClickHouse h1: tcp 9000, http 8123,
    <prefix>-h2      eth0                 10.233.K.12     interserver 9009 (the same ports on
    ...                                                   every host, as on real machines)

Each namespace has its loopback and one veth end (`eth0`) on the bridge, and no other route:
a process in it can reach the bed's own addresses and its loopback, nothing else (a DNS query
to the machine's resolver fails at once, without a packet sent). The root namespace gains only
the bridge with its address; nothing is forwarded or NATed. IPv6 is off on every device made.
`assert_contained()` proves it from /proc: every socket of every process in the bed's
namespaces talks to the bed's subnet or to loopback.

Every ClickHouse is ManagedClickHouse (mexc's own config writer) run under `ip netns exec`,
listening on its host's address, with `<zookeeper>`, `<macros>` (shard `01`, replica = host
name), `interserver_http_host/port` and two clusters in `<remote_servers>`:
  `bed`       one shard per host: `cluster('bed', db, t)` reads every host's own rows
  `bed_one`   one shard with every host a replica (for Distributed over replicated tables)
so `ReplicatedMergeTree('/clickhouse/tables/{shard}/db/t', '{replica}')` created on each host
is one replica set across all of them.

Names: every namespace and device is `mxb<owner pid, base 36>_<n>-<role>` (15 bytes at most).
`start()` first removes what a killed earlier run left (the owner pid is gone): the processes
in its namespaces, the namespaces, veths and bridge; `stop()` removes everything this bed made,
also after a failed start. Processes die with the test process as well (PR_SET_PDEATHSIG).

Faults: `cut(host)` / `restore(host)` take the host's veth down and up (its ZooKeeper session
expires once the ZooKeeper session timeout passes; other hosts cannot reach it);
`zookeeper.stop()/start()`, `host.clickhouse.stop()/start()`. Timeouts are short so that the
tests are: ZooKeeper tickTime 500 ms, ClickHouse's ZooKeeper session 3 s.

Only the network is separate: the hosts share the machine's file system, users and host name
(`hostName()` answers the same on each; tell hosts apart by address or the `replica` macro).
Needs root and iproute2.

Tor (`ClusterBed(..., tor=True)`): a private Tor network of the bed's own, on its subnet
(BedTorNetwork: tests/tor_network.py's keys, torrcs, voting and socket watcher, its relays
placed here). Every authority and exit relay runs in a namespace of its own on the bridge:

    <prefix>-a0 ...  eth0   10.233.K.120 ...   directory authorities (ORPort 5000, DirPort 7000)
    <prefix>-x0 ...  eth0   the next ones      exit relays (ORPort 5000)

so each exit's connections really come from its own address, as the simulator (on the
bridge's address) sees them. A host's daemon runs its own tors, one per collector as in
production, inside its namespace; `bed.torrc_extra(host)` is their `[tor] torrc_extra`: the
network's DirAuthority lines (which replace tor's built-in authorities and fallbacks),
`TestingTorNetwork 1`, `UseDefaultFallbackDirs 0`, and `ExitNodes` pinned to the host's own
`exits_per_host` exits. The exits are per host because the simulator knows a connection only
by its peer address: with exits of its own, what each host was sent stays apart (a soak
counts each host against it). Exits accept the bed's subnet only. No tor of the bed can
reach anything but the bed: its namespaces have no route out, and the network's watcher
checks, every 0.25 s, every socket of every tor in the bed's namespaces (the relays and the
hosts' own tors, found in /proc) and kills the relays on a socket outside the subnet and
loopback; `assert_contained()` checks every process of the bed the same way.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from clickhouse_driver import Client

from supervisor.clickhouse import ManagedClickHouse
from core.process import dies_with_this_process
from tests.tor_network import TOR, Relay, TorNetwork, process_sockets

PREFIX = "mxb"
NAME = re.compile(rf"^{PREFIX}([0-9a-z]+)_(\d+)-")
LOCK = "/run/lock/mexc-cluster-bed.lock"
SUBNETS = ipaddress.ip_network("10.233.0.0/16")
GATEWAY, ZOOKEEPER, FIRST_HOST = 1, 2, 11     # last octets
ZK_PORT, CH_PORT, CH_HTTP_PORT, INTERSERVER_PORT = 2181, 9000, 8123, 9009
ZK_TICK_MS = 500
CH_ZK_SESSION_MS = 3000
TOR_FIRST = 120     # last octet of the first authority; the exits follow
TOR_OR_PORT, TOR_DIR_PORT = 5000, 7000
TOR_KEY_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache",
                             "tor-keys")
ZOOKEEPER_JARS = ("/usr/share/java/zookeeper.jar", "/usr/share/java/slf4j-simple.jar")
ZOOKEEPER_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
ROUTE_TYPES = ("unicast", "local", "broadcast", "multicast", "anycast", "blackhole",
               "unreachable", "prohibit", "throw", "nat")
_beds = itertools.count(1)      # a process may run several beds, one after the other or at once


class ClusterBedError(RuntimeError):
    pass


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        n, d = divmod(n, 36)
        text = digits[d] + text
        if n == 0:
            return text


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS`; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterBedError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _owner_alive(pid36: str) -> bool:
    try:
        os.kill(int(pid36, 36), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process in a namespace, wait until they are gone, delete it."""
    deadline = time.monotonic() + 10
    while True:
        pids = [int(p) for p in ip("netns", "pids", netns, check=False).stdout.split()]
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    ip("netns", "del", netns, check=False)


@contextlib.contextmanager
def bed_lock():
    """Held while a bed removes stale beds and picks its subnet (beds of other processes, e.g.
    pytest-xdist's other worker, wait)."""
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def remove_stale() -> List[str]:
    """Remove the namespaces and devices of beds whose owner process is gone; their names."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        netns = line.split()[0] if line.split() else ""
        m = NAME.match(netns)
        if m and not _owner_alive(m.group(1)):
            _kill_namespace(netns)
            removed.append(netns)
    for line in ip("-o", "link", "show").stdout.splitlines():
        device = line.split(":")[1].strip().split("@")[0]
        m = NAME.match(device)
        if m and not _owner_alive(m.group(1)):
            ip("link", "del", device, check=False)
            removed.append(device)
    return removed


def _used_networks() -> List[ipaddress.IPv4Network]:
    """The networks of the root namespace's addresses and the destinations of its routes
    (other than the default one)."""
    nets = [ipaddress.ip_interface(line.split()[3]).network
            for line in ip("-4", "-o", "addr", "show").stdout.splitlines()]
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()                   # [type] destination ...
        destination = words[1] if words[0] in ROUTE_TYPES else words[0]
        if destination != "default":
            nets.append(ipaddress.ip_network(destination, strict=False))
    return nets


def free_subnet() -> ipaddress.IPv4Network:
    """The first 10.233.K.0/24 that overlaps none of the root namespace's addresses and
    routes: what the bed sends to its own addresses can then go nowhere else."""
    used = _used_networks()
    for net in SUBNETS.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used):
            return net
    raise ClusterBedError(f"no free /24 left in {SUBNETS}")


def _no_ipv6(netns: Optional[str], device: str) -> None:
    """IPv6 off on a device: no router solicitations or DAD, only the addresses given."""
    path = f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6"
    if netns is None:
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("1")
    else:
        subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                        f"[ ! -e {path} ] || echo 1 > {path}"], check=False)


class ZooKeeper:
    """Debian's ZooKeeper, standalone, inside a namespace, its data in `directory`."""

    def __init__(self, bed: "ClusterBed", directory: str, address: str):
        self.bed = bed
        self.directory = directory
        self.address = address
        self.port = ZK_PORT
        self.process: Optional[subprocess.Popen] = None

    @property
    def hosts(self) -> str:
        """The connect string (kazoo's `hosts`)."""
        return f"{self.address}:{self.port}"

    def _write_config(self) -> str:
        os.makedirs(os.path.join(self.directory, "data"), exist_ok=True)
        path = os.path.join(self.directory, "zoo.cfg")
        with open(path, "w") as f:
            f.write(f"tickTime={ZK_TICK_MS}\ndataDir={self.directory}/data\n"
                    f"clientPort={self.port}\nclientPortAddress={self.address}\n"
                    "admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr,stat,cons\n"
                    f"minSessionTimeout={2 * ZK_TICK_MS}\n")
        return path

    def start(self, timeout: float = 30.0) -> "ZooKeeper":
        java = shutil.which("java")
        if java is None or not os.path.exists(ZOOKEEPER_JARS[0]):
            raise ClusterBedError("ZooKeeper is not installed: run ./setup --test "
                                  "(Debian package zookeeper)")
        config = self._write_config()
        log = open(os.path.join(self.directory, "zookeeper.log"), "ab")
        self.process = self.bed.popen_in(
            self.bed.zk_netns, [java, "-Xmx256m", "-Dzookeeper.jmx.log4j.disable=true",
                                "-cp", ":".join(ZOOKEEPER_JARS), ZOOKEEPER_MAIN, config],
            stdout=log, stderr=subprocess.STDOUT, track=False)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ClusterBedError(f"ZooKeeper did not answer at {self.hosts}: "
                                      f"{self.log_tail()}")
            time.sleep(0.1)
        return self

    def healthy(self) -> bool:
        """Serving sessions? (`ruok` says imok before the server takes them: on a loaded
        machine a CREATE TABLE ... ReplicatedMergeTree right after start failed with "All
        connection tries failed while connecting to ZooKeeper".)"""
        return "Mode: " in self.four_letter("srvr")

    def four_letter(self, word: str) -> str:
        """ZooKeeper's answer to a four-letter word (ruok, srvr, stat, cons); "" when none."""
        try:
            with socket.create_connection((self.address, self.port), timeout=1) as s:
                s.sendall(word.encode())
                answer = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return answer.decode(errors="replace")
                    answer += chunk
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        _stop(self.process, timeout)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.directory, "zookeeper.log"), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"


class NamespacedClickHouse(ManagedClickHouse):
    """ManagedClickHouse run inside a network namespace (`ip netns exec` keeps its pid)."""

    def __init__(self, directory: str, netns: str, **kwargs):
        super().__init__(directory, **kwargs)
        self.netns = netns

    def command(self, config_path: str) -> list:
        return ["ip", "netns", "exec", self.netns] + super().command(config_path)


class BedTorNetwork(TorNetwork):
    """The bed's private Tor network (see the module's docstring): TorNetwork's relays, each
    in a namespace of its own on the bed's bridge; `exits_per_host` exits for each host."""

    # Votes posted 2 s late are refused: on a machine whose load was near 100 (other benches'
    # hundreds of processes) no consensus came in 83 s.  A slower schedule leaves them 4 s.
    voting = (20, 4, 4)

    def __init__(self, bed: "ClusterBed", workdir: str, n_authorities: int,
                 exits_per_host: int, key_cache_dir: Optional[str]):
        self.bed = bed
        self.exit_targets = str(bed.subnet)
        self.netns = {}      # relay nickname -> its namespace
        super().__init__(workdir, n_authorities, bed.n_hosts * exits_per_host, key_cache_dir)

    def relay_place(self, role: str, index: int) -> tuple:
        if role == "authority":
            nickname, octet, suffix = f"bedauth{index}", TOR_FIRST + index, "a"
        else:
            nickname, suffix = f"bedexit{index}", "x"
            octet = TOR_FIRST + len(self.authorities) + index
        self.netns[nickname] = f"{self.bed.prefix}-{suffix}{_base36(index)}"
        return nickname, self.bed.address(octet)

    def pick_ports(self, r: Relay) -> None:
        r.or_port = TOR_OR_PORT      # each relay has a namespace, and so its ports, to itself
        r.dir_port = TOR_DIR_PORT if r.role == "authority" else 0

    def prepare_relays(self) -> None:
        for r in self.authorities + self.exits:
            netns = self.netns[r.nickname]
            self.bed._namespace(netns, netns, r.address)

    def spawn_relay(self, r: Relay) -> subprocess.Popen:
        process = self.bed.popen_in(
            self.netns[r.nickname], [TOR, "--defaults-torrc", self.empty_defaults, "-f", r.torrc],
            track=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._popens.append(process)
        return process

    def socket_violations(self, pids) -> List[str]:
        """Every tor in the bed (the relays and the hosts' own), not only `pids`: each may
        talk to the bed's subnet and its loopback, nothing else."""
        return self.bed.outside(set(pids) | set(self.bed.tor_pids()))


@dataclass
class Host:
    name: str            # h1, h2, ...: also its ClickHouse replica name
    netns: str
    veth: str            # the root end on the bridge; cut() takes it down
    address: str
    clickhouse: NamespacedClickHouse
    exits: List[Relay] = field(default_factory=list)   # with Tor: the exits its tors use

    def client(self, timeout: float = 5.0) -> Client:
        return Client(host=self.address, port=CH_PORT, connect_timeout=timeout,
                      send_receive_timeout=timeout)

    def query(self, sql: str, rows=None, timeout: float = 5.0, settings=None):
        """sql on this host's server; an INSERT takes its rows as a list of tuples (the
        driver sends them as a block: values written into the SQL would not be sent)."""
        client = self.client(timeout)
        try:
            return client.execute(sql, rows, settings=settings)
        finally:
            client.disconnect()


class ClusterBed:
    """N hosts as network namespaces on a private bridge; see the module's docstring."""

    def __init__(self, workdir: str, n_hosts: int = 3, tor: bool = False,
                 exits_per_host: int = 3, tor_authorities: int = 3,
                 tor_key_cache: Optional[str] = TOR_KEY_CACHE):
        if not 1 <= n_hosts <= 99:
            raise ValueError("a bed has 1 to 99 hosts")
        if tor and (exits_per_host < 1 or tor_authorities < 1
                    or TOR_FIRST + tor_authorities + n_hosts * exits_per_host > 255):
            raise ValueError(f"Tor relays are last octets {TOR_FIRST}..254 of the bed's /24")
        self.workdir = os.path.abspath(workdir)
        self.n_hosts = n_hosts
        self.prefix = f"{PREFIX}{_base36(os.getpid())}_{next(_beds)}"
        self.bridge = f"{self.prefix}-br"
        self.zk_netns = f"{self.prefix}-zk"
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self.hosts: List[Host] = []
        self.zookeeper: Optional[ZooKeeper] = None
        self.simulators: list = []
        self.processes: List[subprocess.Popen] = []
        self.start_seconds = 0.0
        self.tor = tor
        self.tor_options = (tor_authorities, exits_per_host, tor_key_cache)
        self.tor_network: Optional[BedTorNetwork] = None
        self._made_netns: List[str] = []
        self._made_links: List[str] = []

    # ---- addresses ---------------------------------------------------------------------------
    def address(self, last_octet: int) -> str:
        return str(self.subnet.network_address + last_octet)

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace: the test process (simulator) is here."""
        return self.address(GATEWAY)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    # ---- bring-up ----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "ClusterBed":
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise ClusterBedError("the cluster bed needs root and iproute2 (ip netns)")
        began = time.monotonic()
        try:
            self._make_network()
            self.zookeeper = ZooKeeper(self, os.path.join(self.workdir, "zookeeper"),
                                       self.address(ZOOKEEPER)).start(timeout)
            for h in self.hosts:                  # all start at once, then each is awaited
                h.clickhouse.start(timeout, wait=False)
            if self.tor:                          # meanwhile
                self._start_tor(timeout)
            for h in self.hosts:
                h.clickhouse.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _make_network(self) -> None:
        with bed_lock():                          # one bed at a time picks and takes a subnet
            remove_stale()
            self.subnet = free_subnet()
            self._link("add", self.bridge, "type", "bridge", "forward_delay", "0")
            _no_ipv6(None, self.bridge)
            ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        self._namespace(self.zk_netns, f"{self.prefix}-zk", self.address(ZOOKEEPER))
        all_hosts = [(f"h{i + 1}", self.address(FIRST_HOST + i)) for i in range(self.n_hosts)]
        for name, address in all_hosts:
            netns, veth = f"{self.prefix}-{name}", f"{self.prefix}-{name}"
            self._namespace(netns, veth, address)
            server = NamespacedClickHouse(
                os.path.join(self.workdir, name), netns, port=CH_PORT, http_port=CH_HTTP_PORT,
                listen_host=address, extra_config=self._cluster_xml(name, address, all_hosts),
                client_networks=(str(self.subnet),))
            self.hosts.append(Host(name, netns, veth, address, server))

    def _start_tor(self, timeout: float) -> None:
        authorities, per_host, key_cache = self.tor_options
        self.tor_network = BedTorNetwork(self, os.path.join(self.workdir, "tor"), authorities,
                                         per_host, key_cache)
        for i, h in enumerate(self.hosts):
            h.exits = self.tor_network.exits[i * per_host:(i + 1) * per_host]
        self.tor_network.start(timeout)

    def torrc_extra(self, host: str) -> List[str]:
        """A host's `[tor] torrc_extra`: its tors join the bed's network and leave by its
        own exits only."""
        return [*self.tor_network.torrc_extra(),
                "ExitNodes " + ",".join(f"${e.fingerprint}" for e in self.host(host).exits),
                "StrictNodes 1"]

    def _link(self, *args: str) -> None:
        ip("link", *args)
        self._made_links.append(args[1])

    def _namespace(self, netns: str, veth: str, address: str) -> None:
        """A namespace with loopback and eth0 (address/24) on the bridge, and no other route."""
        ip("netns", "add", netns)
        self._made_netns.append(netns)
        self._link("add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _no_ipv6(None, veth)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        _no_ipv6(netns, "eth0")
        for args in (("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0"),
                     ("link", "set", "eth0", "up"), ("link", "set", "lo", "up")):
            ip("-n", netns, *args)

    def _cluster_xml(self, name: str, address: str, all_hosts) -> str:
        def replica(a):
            return f"<replica><host>{a}</host><port>{CH_PORT}</port></replica>"
        per_host = "".join(f"<shard>{replica(a)}</shard>" for _, a in all_hosts)
        one_shard = "".join(replica(a) for _, a in all_hosts)
        return f"""  <interserver_http_host>{address}</interserver_http_host>
  <interserver_http_port>{INTERSERVER_PORT}</interserver_http_port>
  <zookeeper>
    <node><host>{self.address(ZOOKEEPER)}</host><port>{ZK_PORT}</port></node>
    <session_timeout_ms>{CH_ZK_SESSION_MS}</session_timeout_ms>
  </zookeeper>
  <macros><shard>01</shard><replica>{name}</replica></macros>
  <remote_servers>
    <bed>{per_host}</bed>
    <bed_one><shard><internal_replication>true</internal_replication>{one_shard}</shard></bed_one>
  </remote_servers>
"""

    # ---- running things inside a host --------------------------------------------------------
    def popen_in(self, netns: str, argv: Sequence[str], track: bool = True,
                 **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process = subprocess.Popen(["ip", "netns", "exec", netns, *argv],
                                   preexec_fn=dies_with_this_process(), **kwargs)
        if track:
            self.processes.append(process)
        return process

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start argv inside a host's namespace; stopped by stop() if still running."""
        return self.popen_in(self.host(host).netns, argv, **kwargs)

    def exec(self, host: str, argv: Sequence[str], timeout: float = 30.0
             ) -> subprocess.CompletedProcess:
        """Run argv inside a host's namespace to its end (output captured as text)."""
        return subprocess.run(["ip", "netns", "exec", self.host(host).netns, *argv],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def python(self, host: str, code: str, *args: str, timeout: float = 30.0
               ) -> subprocess.CompletedProcess:
        """This Python (with mexc's packages) running `code` inside a host."""
        return self.exec(host, [sys.executable, "-c", code, *args], timeout=timeout)

    def start_simulator(self, **options):
        """The MEXC simulator in this process, on the bridge's address (every host reaches
        it); stopped by stop()."""
        from mexc.simulator import MexcSimulator
        simulator = MexcSimulator(host=self.gateway, **options).start()
        self.simulators.append(simulator)
        return simulator

    # ---- faults ------------------------------------------------------------------------------
    def cut(self, host: str) -> None:
        """The host's cable out: nothing reaches it and it reaches nothing (its own loopback
        still works)."""
        ip("link", "set", self.host(host).veth, "down")

    def restore(self, host: str) -> None:
        ip("link", "set", self.host(host).veth, "up")

    # ---- checks ------------------------------------------------------------------------------
    def pids(self) -> List[int]:
        """Every process inside the bed's namespaces (as `ip netns pids` finds them: by the
        network namespace /proc/<pid>/ns/net names, without a process started per namespace)."""
        inodes = set()
        for netns in list(self._made_netns):
            try:
                inodes.add(os.stat(f"/run/netns/{netns}").st_ino)
            except OSError:
                pass
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def tor_pids(self) -> List[int]:
        """Every tor process in the bed: the Tor network's relays and the hosts' own tors."""
        found = []
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "tor":
                        found.append(pid)
            except OSError:
                pass
        return found

    def outside(self, pids) -> List[str]:
        """The sockets of these processes that reach, or are bound to, an address neither on
        the bed's subnet nor on loopback."""
        wrong = []
        for pid in pids:
            for s in process_sockets(pid):
                for addr in (s.local, s.remote):
                    a = ipaddress.ip_address(addr)
                    a = getattr(a, "ipv4_mapped", None) or a
                    if not (a.is_loopback or a.is_unspecified or a in self.subnet):
                        wrong.append(f"pid {pid}: {s}")
        return wrong

    def assert_contained(self) -> int:
        """Every socket of every process in the bed (its tors among them: the Tor network's
        relays and the hosts' own) talks only to the bed's subnet or to loopback, now and, for
        the tors, at every check of the Tor network's watcher so far; returns the number of
        sockets checked."""
        pids = self.pids()
        wrong = self.outside(pids) + (self.tor_network.violations if self.tor_network else [])
        if wrong:
            raise ClusterBedError("traffic outside the bed:\n" + "\n".join(wrong))
        return sum(len(process_sockets(pid)) for pid in pids)

    # ---- teardown ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process, then remove every namespace and device this bed made."""
        for simulator in self.simulators:
            simulator.stop()
        for process in self.processes:
            _stop(process, 5.0)
        violations = []
        if self.tor_network is not None:
            violations = list(self.tor_network.violations)
            try:
                self.tor_network.stop()
            except Exception:        # its violations: raised below, once all is gone
                pass
            self.tor_network = None
        for h in self.hosts:
            h.clickhouse.stop()
        if self.zookeeper is not None:
            self.zookeeper.stop()
        for netns in reversed(self._made_netns):
            _kill_namespace(netns)
        for device in reversed(self._made_links):
            ip("link", "del", device, check=False)   # veths went with their namespace
        self._made_netns.clear()
        self._made_links.clear()
        self.simulators.clear()
        self.processes.clear()
        if violations:
            raise ClusterBedError("Tor traffic outside the bed:\n" + "\n".join(violations))

    def __enter__(self) -> "ClusterBed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop(process: Optional[subprocess.Popen], timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

"""A private Tor network on loopback, for tests: directory authorities, exit relays, clients.

Nothing here ever talks to the public Tor network or leaves 127.0.0.0/8:

- every torrc written here carries the network's own `DirAuthority` lines (they replace tor's
  built-in authorities and fallback directories), `UseDefaultFallbackDirs 0`,
  `TestingTorNetwork 1` (tor refuses it with the default authorities) and `ClientUseIPv6 0`;
- tor is always started as `tor --defaults-torrc <empty file> -f <our torrc>`, so
  /etc/tor/torrc is never read;
- relays resolve nothing through the machine's resolver: `ServerDNSResolvConfFile` names
  `nameserver 127.0.0.1`, hijack detection and test addresses are off; clients are expected to
  connect to IP literals only;
- every listener and `Address` is a 127.x.y.z literal; `__OwningControllerProcess` makes every
  tor exit when the process that started it dies;
- `TorNetwork.assert_loopback_only()` maps each tor process's socket inodes
  (/proc/<pid>/fd) to /proc/<pid>/net/{tcp,tcp6,udp,udp6} and fails loudly on any peer (or
  listener) outside 127.0.0.0/8. A watcher thread runs the same check every 0.25 s for as
  long as the network runs; on a violation it SIGKILLs every tor this network started at once
  and records it, and `assert_loopback_only()` / `stop()` then raise. Tests call
  `assert_loopback_only()` whenever they like (with extra pids, e.g. the daemon's own tors).

Distinct exit addresses: on loopback Linux gives every connection to 127.0.0.0/8 the source
address 127.0.0.1, and tor deliberately ignores OutboundBindAddress* for loopback
destinations, so out of the box a server on 127.0.0.1 sees every exit as 127.0.0.1. Of the two
known ways around it this module uses an LD_PRELOAD shim rather than network namespaces:

- the shim (a 40-line C file compiled with gcc into the work dir at start) wraps `connect()`:
  an unbound IPv4 TCP socket connecting to 127.0.0.0/8 is first bound to `$TOR_TEST_BIND_ADDR`
  (the relay's own address, e.g. 127.0.2.1; port left to connect() via
  IP_BIND_ADDRESS_NO_PORT). It is loaded into every relay, so all of a relay's outgoing
  connections -- relay-to-relay OR and directory traffic as well as exit streams -- come from
  the same address the relay advertises in the consensus. That keeps tor's own traffic
  consistent and means a relay's consensus address is exactly what a test server sees.
- namespaces would need root, a veth pair plus routes per exit and, worse, 127.0.0.1 inside a
  namespace is that namespace's own loopback: a test server on 127.0.0.1 would be unreachable
  from the exits unless it listened on a veth address or was reached through DNAT, and the
  authorities and clients on the host's loopback would need routing into every namespace.
  The shim needs no privileges, no system state to clean up after a crash, and keeps every
  address in 127.0.0.0/8 where the socket check can prove it.

Layout: authority i listens on 127.0.1.(i+1), exit i on 127.0.2.(i+1), clients on 127.0.0.1;
ports are picked free at start. Authority (and relay) keys are cached in `key_cache_dir` when
given (an empty or missing cache works, it is filled on the way).

Bring-up is about timing: authorities vote on a 10 s schedule (about the minimum tor allows
on a testing network), shifted with `TestingV3AuthVotingStartOffset` so that the first vote comes a
couple of seconds after the exits have published their descriptors; the first consensus
(valid-after = vote + 4 s) then already lists them. `start()` returns once every authority
serves a consensus listing every exit as Running, Valid and Exit.

A client joins with `torrc_extra()`; `TorClient.controller()` reads which exit carried a stream
(circuit path last hop -> `ns/id/<fp>` address) through the control port, with the daemon's own
control-port client (supervisor.tor.TorControl).
"""
from __future__ import annotations

import binascii
import calendar
import http.client
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from supervisor.tor import TorControl

TOR = shutil.which("tor") or "/usr/bin/tor"
TOR_GENCERT = shutil.which("tor-gencert") or "/usr/bin/tor-gencert"

# Voting schedule (seconds). Vote and distribution delays of 2 are the smallest tor accepts
# with TestingTorNetwork, and their sum must be under half the interval: 10 is about the
# smallest interval.
VOTING_INTERVAL = 10
VOTE_DELAY = 2
DIST_DELAY = 2
# A consensus stays valid for 4 intervals (40 s), so a network kept up for minutes on a busy
# machine survives a few failed voting rounds without its consensus expiring.
INTERVALS_VALID = 4
# Seconds between starting the relays and the authorities' first vote: the exits must have
# uploaded their descriptors by then (they do within ~1 s of starting).
FIRST_VOTE_LEAD = 2.5

KEY_CACHE_VERSION = "v1"
AUTHORITY_CERT_MONTHS = 24
WATCH_INTERVAL = 0.25

SHIM_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* Bind outgoing IPv4 TCP connections to 127.0.0.0/8 to $TOR_TEST_BIND_ADDR first, so that a
   test server on 127.0.0.1 sees this process's own loopback address as the peer. */
static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static struct in_addr bind_addr;
static int state = -1; /* -1 unknown, 0 disabled, 1 enabled */

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    if (!real_connect)
        real_connect = (int (*)(int, const struct sockaddr *, socklen_t))
            dlsym(RTLD_NEXT, "connect");
    if (state < 0) {
        const char *s = getenv("TOR_TEST_BIND_ADDR");
        state = (s && inet_pton(AF_INET, s, &bind_addr) == 1) ? 1 : 0;
    }
    if (state == 1 && addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *dst = (const struct sockaddr_in *)addr;
        int type = 0;
        socklen_t tlen = sizeof type;
        struct sockaddr_in cur;
        socklen_t clen = sizeof cur;
        int saved = errno;
        if ((ntohl(dst->sin_addr.s_addr) >> 24) == 127
            && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 && type == SOCK_STREAM
            && getsockname(fd, (struct sockaddr *)&cur, &clen) == 0 && cur.sin_family == AF_INET
            && cur.sin_port == 0 && cur.sin_addr.s_addr == htonl(INADDR_ANY)) {
            struct sockaddr_in src;
            int one = 1;
            memset(&src, 0, sizeof src);
            src.sin_family = AF_INET;
            src.sin_addr = bind_addr;
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            bind(fd, (struct sockaddr *)&src, sizeof src); /* on failure: connect unbound */
        }
        errno = saved;
    }
    return real_connect(fd, addr, len);
}
"""


class TorNetworkError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Socket check: /proc/<pid>/net/{tcp,udp}[6] lines for the inodes /proc/<pid>/fd points at.

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}


@dataclass(frozen=True)
class ProcSocket:
    proto: str           # tcp, tcp6, udp, udp6
    local: str           # ip address as text
    local_port: int
    remote: str
    remote_port: int
    state: str
    inode: int

    def __str__(self):
        return (f"{self.proto} {self.local}:{self.local_port} -> {self.remote}:{self.remote_port}"
                f" {self.state} inode={self.inode}")


def _proc_addr(hexaddr: str) -> str:
    """/proc/net address field (host byte order per 32-bit word) -> text."""
    raw = binascii.unhexlify(hexaddr)
    words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    return str(ipaddress.ip_address(b"".join(words)))


def parse_proc_net_line(line: str, proto: str) -> Optional[ProcSocket]:
    """One line of /proc/net/tcp|tcp6|udp|udp6 -> ProcSocket (None for the header line)."""
    fields = line.split()
    if len(fields) < 10 or fields[0] == "sl":
        return None
    local, lport = fields[1].split(":")
    remote, rport = fields[2].split(":")
    state = int(fields[3], 16)
    state_name = TCP_STATES.get(state, str(state)) if proto.startswith("tcp") else str(state)
    return ProcSocket(proto, _proc_addr(local), int(lport, 16), _proc_addr(remote),
                      int(rport, 16), state_name, int(fields[9]))


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _is_unspecified(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_unspecified


def socket_problem(s: ProcSocket) -> Optional[str]:
    """Why this socket is not loopback-only, or None when it is.

    A peer must be in 127.0.0.0/8 (or ::1); a socket without a peer (listening, unconnected
    UDP, just created) must not be bound to a non-loopback address -- a listener on 0.0.0.0
    would be reachable from outside.
    """
    has_peer = not (_is_unspecified(s.remote) and s.remote_port == 0)
    if has_peer and not _is_loopback(s.remote):
        return f"peer outside loopback: {s}"
    if not has_peer and not _is_loopback(s.local):
        if _is_unspecified(s.local) and s.local_port == 0:
            return None        # created, neither bound nor connected
        return f"bound to a non-loopback address: {s}"
    return None


def process_sockets(pid: int) -> List[ProcSocket]:
    """The inet sockets held by one process (its fds resolved against its netns tables)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]$", target)
        if m:
            inodes.add(int(m.group(1)))
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{proto}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            s = parse_proc_net_line(line, proto)
            if s is not None and s.inode in inodes:
                found.append(s)
    return found


def process_start(pid: int) -> Optional[int]:
    """When a process started (clock ticks since boot), None once it is gone: with its pid,
    it names one process, where a pid alone may be reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def loopback_violations(pids: Iterable[int], sockets_of=process_sockets) -> List[str]:
    problems = []
    for pid in pids:
        for s in sockets_of(pid):
            why = socket_problem(s)
            if why:
                problems.append(f"pid {pid}: {why}")
    return problems


# ----------------------------------------------------------------------------------------------
# Helpers


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as e:
        return f"(no log: {e})"


def _run(argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    if p.returncode != 0:
        raise TorNetworkError(f"{' '.join(argv)} failed ({p.returncode}):\n"
                              f"{p.stdout.decode(errors='replace')[-2000:]}")
    return p


def _wait_all(procs: List[subprocess.Popen], what: str, timeout: float = 60) -> List[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise TorNetworkError(f"{what}: {' '.join(p.args)} failed ({p.returncode}):\n"
                                  f"{out.decode(errors='replace')[-2000:]}")
        outs.append(out.decode(errors="replace"))
    return outs


def voting_start_offset(now: float, lead: float, interval: int = VOTING_INTERVAL,
                        vote_delay: int = VOTE_DELAY, dist_delay: int = DIST_DELAY) -> int:
    """TestingV3AuthVotingStartOffset making the first vote start about `lead` s after `now`.

    Tor puts consensus boundaries (valid-after) at midnight UTC + k*interval + offset and starts
    voting vote_delay + dist_delay before a boundary.
    """
    target = now + lead + vote_delay + dist_delay       # the wanted first valid-after
    since_midnight = int(target) % 86400 + (1 if target % 1 else 0)
    return since_midnight % interval


# ----------------------------------------------------------------------------------------------


@dataclass
class Relay:
    role: str                  # "authority" or "exit"
    nickname: str
    address: str               # advertised address == source address of its connections
    or_port: int
    dir_port: int              # 0 for exits
    datadir: str
    torrc: str = ""
    fingerprint: str = ""
    v3ident: str = ""          # authorities only
    popen: Optional[subprocess.Popen] = None
    killed: bool = False       # by kill_exit()

    @property
    def pid(self) -> Optional[int]:
        return self.popen.pid if self.popen else None

    @property
    def log_path(self) -> str:
        return os.path.join(self.datadir, "notice.log")

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return _tail(self.log_path, n)


class TorClient:
    """A tor client process joined to the network (the fixture's own; the daemon runs its own)."""

    def __init__(self, network: "TorNetwork", workdir: str, socks_port: int, control_port: int,
                 extra: Sequence[str] = ()):
        self.network = network
        self.workdir = os.path.abspath(workdir)
        self.socks_port = socks_port
        self.control_port = control_port
        self.log_path = os.path.join(self.workdir, "notice.log")
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        lines = [
            f"DataDirectory {self.workdir}",
            f"SocksPort 127.0.0.1:{socks_port}",
            f"ControlPort 127.0.0.1:{control_port}",
            "CookieAuthentication 1",
            "WarnUnsafeSocks 0",                # we hand tor IP literals on purpose
            *network.common_lines(),
            *network.torrc_extra(),
            f"Log notice file {self.log_path}",
            *extra,
        ]
        self.torrc = os.path.join(self.workdir, "torrc")
        with open(self.torrc, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.popen = network._spawn_tor(self.torrc, env=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return _tail(self.log_path, 10 ** 7)

    def wait_bootstrapped(self, timeout: float = 30) -> "TorClient":
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if "Bootstrapped 100%" in log:
                return self
            if not self.alive():
                raise TorNetworkError(f"tor client {self.workdir} exited "
                                      f"({self.popen.returncode}):\n{log[-3000:]}")
            if time.monotonic() >= deadline:
                last = re.findall(r"Bootstrapped \d+%[^\n]*", log)
                raise TorNetworkError(
                    f"tor client {self.workdir} not bootstrapped after {timeout:.0f}s "
                    f"(last: {last[-1] if last else 'no progress'}):\n{log[-3000:]}")
            time.sleep(0.1)

    def controller(self) -> TorControl:
        """The daemon's own control-port client (supervisor.tor.TorControl) on this client:
        cookie-authenticated; command(), getinfo(), exits_of_streams(port) (one (fingerprint,
        address) per succeeded stream there, oldest first); a 10 s timeout (the daemon's is
        1 s)."""
        return TorControl(self.control_port, os.path.join(self.workdir, "control_auth_cookie"),
                          timeout=10)

    def stop(self, timeout: float = 10) -> None:
        self.network._stop_popen(self.popen, timeout)


class TorNetwork:
    """n authorities + n exits on 127.0.0.0/8; see the module docstring.

    The cluster bed's network (tests/cluster_bed.py BedTorNetwork) is this class with its
    relays elsewhere: it overrides the hooks marked "where the relays live" (addresses and
    nicknames, ports, how a relay is started, the targets its exits accept, what a socket may
    reach) and shares keys, torrcs, voting, the consensus wait and the socket watcher."""

    # where the relays live (hooks): the exits' reachable targets, in their exit policy
    exit_targets = "127.0.0.0/8"
    # the voting schedule (s): interval, vote delay, distribution delay
    voting = (VOTING_INTERVAL, VOTE_DELAY, DIST_DELAY)

    def __init__(self, workdir: str, n_authorities: int = 3, n_exits: int = 3,
                 key_cache_dir: Optional[str] = None, log_level: str = "notice"):
        if not 1 <= n_authorities <= 200 or not 1 <= n_exits <= 200:
            raise ValueError("1..200 authorities and exits")
        self.workdir = os.path.abspath(workdir)
        self.key_cache_dir = os.path.abspath(key_cache_dir) if key_cache_dir else None
        self.log_level = log_level
        self.authorities: List[Relay] = []
        self.exits: List[Relay] = []
        self.clients: List[TorClient] = []
        self._popens: List[subprocess.Popen] = []     # every tor we started, for stop()
        self.shim_path = os.path.join(self.workdir, "bindshim.so")
        self.empty_defaults = os.path.join(self.workdir, "empty-defaults-torrc")
        self.resolv_conf = os.path.join(self.workdir, "resolv.conf")
        self.timings = {}
        self.progress = []
        self.violations: List[str] = []      # found by the watcher thread
        self.sockets_of = process_sockets    # pid -> [ProcSocket]; replaceable in tests
        self.watched_pids: dict = {}         # other processes' tors the watcher checks too: pid -> start
        self._watch_stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        for i in range(n_authorities):
            nickname, address = self.relay_place("authority", i)
            self.authorities.append(Relay("authority", nickname, address, 0, 0,
                                          os.path.join(self.workdir, nickname)))
        for i in range(n_exits):
            nickname, address = self.relay_place("exit", i)
            self.exits.append(Relay("exit", nickname, address, 0, 0,
                                    os.path.join(self.workdir, nickname)))

    # -- where the relays live (hooks) ---------------------------------------------------------

    def relay_place(self, role: str, index: int) -> tuple:
        """(nickname, address) of the index-th authority or exit."""
        if role == "authority":
            return f"auth{index}", f"127.0.1.{index + 1}"
        return f"exit{index}", f"127.0.2.{index + 1}"

    def pick_ports(self, r: Relay) -> None:
        r.or_port = free_port(r.address)
        if r.role == "authority":
            r.dir_port = free_port(r.address)

    def prepare_relays(self) -> None:
        """What the relays need before they start: here the bind shim."""
        self._build_shim()

    def spawn_relay(self, r: Relay) -> subprocess.Popen:
        env = {**os.environ, "LD_PRELOAD": self.shim_path, "TOR_TEST_BIND_ADDR": r.address}
        return self._spawn_tor(r.torrc, env)

    def socket_violations(self, pids: Iterable[int]) -> List[str]:
        """Sockets of these processes that reach (or listen) where no tor of ours may."""
        return loopback_violations(pids, self.sockets_of)

    # -- configuration -------------------------------------------------------------------------

    def dir_authority_lines(self) -> List[str]:
        return [f"DirAuthority {a.nickname} orport={a.or_port} no-v2 v3ident={a.v3ident} "
                f"{a.address}:{a.dir_port} {a.fingerprint}" for a in self.authorities]

    def torrc_extra(self) -> List[str]:
        """The lines a client tor needs to join this network (and nothing else)."""
        return [
            "TestingTorNetwork 1",
            *self.dir_authority_lines(),
            "UseDefaultFallbackDirs 0",
            "ClientUseIPv6 0",
            "UseMicrodescriptors 0",
        ]

    def common_lines(self) -> List[str]:
        """Process hygiene for every tor started here (not needed by the daemon's clients)."""
        return [
            "RunAsDaemon 0",
            "Sandbox 0",
            "AvoidDiskWrites 1",
            "ShutdownWaitLength 0",
            "SafeLogging 0",
            "LogTimeGranularity 1",
            # No GeoIP databases: parsing them costs ~1 s of CPU per tor at start.
            "GeoIPFile /dev/null",
            "GeoIPv6File /dev/null",
            f"__OwningControllerProcess {os.getpid()}",
        ]

    def _relay_lines(self, r: Relay) -> List[str]:
        lines = [
            f"DataDirectory {r.datadir}",
            f"Nickname {r.nickname}",
            f"Address {r.address}",
            f"ORPort {r.address}:{r.or_port}",
            "SocksPort 0",
            "AssumeReachable 1",
            "ContactInfo test@127.0.0.1",
            f"ServerDNSResolvConfFile {self.resolv_conf}",
            "ServerDNSDetectHijacking 0",
            "ServerDNSTestAddresses",
            "ServerDNSAllowBrokenConfig 1",
            *self.common_lines(),
            *self.torrc_extra(),
            f"Log {self.log_level} file {r.log_path}",
        ]
        if r.role == "authority":
            lines += [
                f"DirPort {r.address}:{r.dir_port}",
                "AuthoritativeDirectory 1",
                "V3AuthoritativeDirectory 1",
                "ExitRelay 0",
                "ExitPolicy reject *:*",
                f"TestingV3AuthInitialVotingInterval {self.voting[0]}",
                f"TestingV3AuthInitialVoteDelay {self.voting[1]}",
                f"TestingV3AuthInitialDistDelay {self.voting[2]}",
                f"V3AuthVotingInterval {self.voting[0]}",
                f"V3AuthVoteDelay {self.voting[1]}",
                f"V3AuthDistDelay {self.voting[2]}",
                f"V3AuthNIntervalsValid {INTERVALS_VALID}",
                "TestingDirAuthVoteExit *",
                "TestingDirAuthVoteGuard *",
                "TestingDirAuthVoteHSDir *",
                "TestingMinExitFlagThreshold 0",
            ]
        else:
            lines += [
                "ExitRelay 1",
                "IPv6Exit 0",
                "ExitPolicyRejectPrivate 0",
                "ExitPolicyRejectLocalInterfaces 0",
                f"ExitPolicy accept {self.exit_targets}:*",
                "ExitPolicy reject 0.0.0.0/1:*",
                "ExitPolicy reject 128.0.0.0/1:*",
                # Never reached for a real address, but without it clients judge a loopback
                # (or private) target "probably rejected" by every exit.
                "ExitPolicy accept *4:*",
                "DirCache 0",
                "RefuseUnknownExits 0",
            ]
        return lines

    # -- processes -----------------------------------------------------------------------------

    def _spawn_tor(self, torrc: str, env: Optional[dict], extra_args: Sequence[str] = ()):
        argv = [TOR, "--defaults-torrc", self.empty_defaults, "-f", torrc, *extra_args]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
        self._popens.append(p)
        return p

    @staticmethod
    def _stop_popen(p: subprocess.Popen, timeout: float = 10) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def pids(self) -> List[int]:
        """Every tor process started by this network that is still running."""
        return [p.pid for p in self._popens if p.poll() is None]

    # -- keys ----------------------------------------------------------------------------------

    def _keygen_torrc(self, r: Relay) -> str:
        """A torrc for `tor --list-fingerprint`: network disabled, never the public network."""
        path = os.path.join(self.workdir, f"keygen-{r.nickname}.torrc")
        dummy = "0" * 40
        with open(path, "w") as f:
            f.write("\n".join([
                f"DataDirectory {r.datadir}",
                "DisableNetwork 1",
                "TestingTorNetwork 1",
                f"DirAuthority placeholder orport=1 no-v2 v3ident={dummy} 127.0.0.1:1 {dummy}",
                "UseDefaultFallbackDirs 0",
                "ClientUseIPv6 0",
                f"ORPort {r.address}:{r.or_port}",
                "Address " + r.address,
                "Log err stderr",
            ]) + "\n")
        return path

    def _cache_path(self, r: Relay) -> Optional[str]:
        if not self.key_cache_dir:
            return None
        return os.path.join(self.key_cache_dir, KEY_CACHE_VERSION, r.nickname)

    @staticmethod
    def _cache_usable(r: Relay, cache: str) -> bool:
        if not os.path.isfile(os.path.join(cache, "fingerprint")):
            return False
        if r.role != "authority":
            return True
        try:
            with open(os.path.join(cache, "keys", "authority_certificate")) as f:
                m = re.search(r"^dir-key-expires (\S+ \S+)", f.read(), re.M)
            expires = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
        except (OSError, AttributeError, ValueError):
            return False
        return expires - time.time() > 30 * 86400      # regenerate a month before expiry

    def _prepare_keys(self) -> None:
        relays = self.authorities + self.exits
        todo_gencert, todo_fp = [], []
        for r in relays:
            os.makedirs(os.path.join(r.datadir, "keys"), mode=0o700, exist_ok=True)
            os.chmod(r.datadir, 0o700)
            cache = self._cache_path(r)
            if cache and self._cache_usable(r, cache):
                shutil.rmtree(os.path.join(r.datadir, "keys"))
                shutil.copytree(os.path.join(cache, "keys"), os.path.join(r.datadir, "keys"))
                shutil.copy(os.path.join(cache, "fingerprint"), r.datadir)
                continue
            if r.role == "authority":
                todo_gencert.append(r)
            todo_fp.append(r)
        # tor-gencert (a 3072-bit RSA identity key: ~0.9 s each) in parallel.
        procs = []
        for r in todo_gencert:
            k = os.path.join(r.datadir, "keys")
            procs.append(subprocess.Popen(
                [TOR_GENCERT, "--create-identity-key", "-m", str(AUTHORITY_CERT_MONTHS),
                 "-i", f"{k}/authority_identity_key", "-s", f"{k}/authority_signing_key",
                 "-c", f"{k}/authority_certificate", "--passphrase-fd", "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        _wait_all(procs, "tor-gencert")
        procs = [subprocess.Popen(
            [TOR, "--defaults-torrc", self.empty_defaults, "-f", self._keygen_torrc(r),
             "--list-fingerprint"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT) for r in todo_fp]
        _wait_all(procs, "tor --list-fingerprint")
        for r in relays:
            with open(os.path.join(r.datadir, "fingerprint")) as f:
                r.fingerprint = f.read().split()[1]
            if r.role == "authority":
                with open(os.path.join(r.datadir, "keys", "authority_certificate")) as f:
                    r.v3ident = re.search(r"^fingerprint (\w{40})", f.read(), re.M).group(1)
        for r in todo_fp:
            cache = self._cache_path(r)
            if cache:
                tmp = f"{cache}.tmp{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                os.makedirs(tmp, mode=0o700)
                shutil.copytree(os.path.join(r.datadir, "keys"), os.path.join(tmp, "keys"))
                shutil.copy(os.path.join(r.datadir, "fingerprint"), tmp)
                shutil.rmtree(cache, ignore_errors=True)      # stale (expiring) entry
                try:
                    os.rename(tmp, cache)          # atomic; loses the race harmlessly
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)

    def _build_shim(self) -> None:
        src = os.path.join(self.workdir, "bindshim.c")
        with open(src, "w") as f:
            f.write(SHIM_C)
        _run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", self.shim_path, src, "-ldl"])

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "TorNetwork":
        t0 = time.monotonic()
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.empty_defaults, "w"):
            pass
        with open(self.resolv_conf, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        for r in self.authorities + self.exits:
            self.pick_ports(r)
        self.prepare_relays()
        self._prepare_keys()
        self.timings["keys"] = time.monotonic() - t0

        offset = voting_start_offset(time.time(), FIRST_VOTE_LEAD, *self.voting)
        for r in self.authorities + self.exits:
            lines = self._relay_lines(r)
            if r.role == "authority":
                lines.append(f"TestingV3AuthVotingStartOffset {offset}")
            r.torrc = os.path.join(r.datadir, "torrc")
            with open(r.torrc, "w") as f:
                f.write("\n".join(lines) + "\n")
        try:
            for r in self.exits + self.authorities:
                r.popen = self.spawn_relay(r)
            self._watcher = threading.Thread(target=self._watch, name="tor-socket-watch",
                                             daemon=True)
            self._watcher.start()
            self._wait_consensus(timeout - (time.monotonic() - t0))
            self.timings["consensus"] = time.monotonic() - t0
            self.assert_loopback_only()
        except BaseException:
            self.stop()
            raise
        return self

    def fetch_consensus(self, authority: Relay) -> Optional[str]:
        conn = http.client.HTTPConnection(authority.address, authority.dir_port, timeout=5)
        try:
            conn.request("GET", "/tor/status-vote/current/consensus")
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            return body if resp.status == 200 else None
        except OSError:
            return None
        finally:
            conn.close()

    @staticmethod
    def consensus_flags(consensus: str) -> dict:
        """{fingerprint: set(flags)} from a (full, ns-flavoured) consensus document."""
        out, fp = {}, None
        for line in consensus.splitlines():
            if line.startswith("r "):
                ident = line.split()[2]
                pad = "=" * (-len(ident) % 4)
                fp = binascii.b2a_hex(binascii.a2b_base64(ident + pad)).decode().upper()
                out[fp] = set()
            elif line.startswith("s ") and fp:
                out[fp] = set(line.split()[1:])
        return out

    def _missing(self) -> List[str]:
        missing = []
        for a in self.authorities:
            cons = self.fetch_consensus(a)
            if cons is None:
                missing.append(f"{a.nickname}: no consensus yet")
                continue
            flags = self.consensus_flags(cons)
            for e in self.exits:
                got = flags.get(e.fingerprint)
                need = {"Exit", "Running", "Valid"}
                if got is None:
                    missing.append(f"{a.nickname}: {e.nickname} not in consensus")
                elif not need <= got:
                    missing.append(f"{a.nickname}: {e.nickname} lacks {sorted(need - got)}")
        return missing

    def _check_alive(self) -> None:
        for r in self.authorities + self.exits:
            if r.popen is not None and not r.alive() and not r.killed:
                raise TorNetworkError(f"{r.nickname} (pid {r.pid}) exited with "
                                      f"{r.popen.returncode}:\n{r.log_tail()}")

    def _wait_consensus(self, timeout: float) -> None:
        start = time.monotonic()
        deadline = start + timeout
        last = None
        while True:
            self._check_alive()
            missing = self._missing()
            if missing != last:       # what was still missing when, for diagnostics
                self.progress.append((round(time.monotonic() - start, 2), missing))
                last = missing
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TorNetworkError(
                    f"no consensus listing every exit after {timeout:.0f}s: "
                    + "; ".join(missing) + "\n--- auth0 log:\n"
                    + self.authorities[0].log_tail(2000))
            time.sleep(0.2)

    def start_client(self, workdir: str, socks_port: int = 0, control_port: int = 0,
                     extra: Sequence[str] = ()) -> TorClient:
        """A tor client joined to the network; call .wait_bootstrapped() before using it."""
        client = TorClient(self, workdir, socks_port or free_port("127.0.0.1"),
                           control_port or free_port("127.0.0.1"), extra)
        self.clients.append(client)
        return client

    def kill_exit(self, index: int, sig: int = signal.SIGKILL) -> Relay:
        """An exit relay dies (SIGKILL by default: no goodbye to anyone)."""
        e = self.exits[index]
        e.killed = True
        if e.alive():
            e.popen.send_signal(sig)
            e.popen.wait(10)
        return e

    def watch(self, *pids: int) -> None:
        """Have the watcher check these processes too (e.g. the tors a daemon under test
        started). A violation there is recorded and kills this network's own tors; the
        watched processes themselves are left to their owner.  Each is known by its start
        time too: once it exits its pid may be given to an unrelated process (a soak kills
        tors, and a cluster test's ZooKeeper once got such a pid and "violated" here)."""
        self.watched_pids.update((pid, process_start(pid)) for pid in pids)

    def _watch(self) -> None:
        """Check every tor's sockets until stop(); on a violation kill ours all at once."""
        while not self._watch_stop.wait(WATCH_INTERVAL):
            alive = [p for p, start in list(self.watched_pids.items())
                     if start is not None and process_start(p) == start]
            problems = self.socket_violations(self.pids() + alive)
            if problems:
                self.violations += problems
                for p in self._popens:
                    if p.poll() is None:
                        p.kill()
                sys.stderr.write("tor_network: NON-LOOPBACK SOCKETS, killed the network:\n"
                                 + "\n".join(problems) + "\n")
                return

    def assert_loopback_only(self, extra_pids: Iterable[int] = ()) -> int:
        """Fail unless every socket of every tor we started (and extra_pids) is loopback-only,
        now and at every check of the watcher so far.

        Returns how many sockets were checked (so a caller can see it checked something).
        """
        pids = self.pids() + list(extra_pids)
        problems = self.violations + self.socket_violations(pids)
        if problems:
            raise TorNetworkError("NON-LOOPBACK SOCKETS:\n" + "\n".join(problems))
        return sum(len(self.sockets_of(p)) for p in pids)

    def stop(self) -> None:
        """Stop every tor this network started (clients too); raise if the watcher ever
        saw a non-loopback socket."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        for p in self._popens:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self._popens:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.violations:
            raise TorNetworkError("NON-LOOPBACK SOCKETS seen while the network ran:\n"
                                  + "\n".join(self.violations))

    def __enter__(self) -> "TorNetwork":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

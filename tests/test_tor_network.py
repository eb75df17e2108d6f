"""The private Tor network fixture (tests/tor_network.py) does what the Tor tests rely on.

One network per module (3 authorities, 3 exits), four clients: three pinned to one exit each,
one free. A peer-reporting TCP server on 127.0.0.1 tells each connection which source address
it came from, i.e. which exit carried it. The exit-killing test runs last: it leaves the
network with one dead exit.
"""
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid

import psutil
import pytest
import socks

from tests.conftest import wait_for
from tests.tor_network import (TorNetwork, TorNetworkError, loopback_violations,
                               parse_proc_net_line, process_sockets, socket_problem,
                               voting_start_offset)

# Every test has a timeout: this one unless marked otherwise. The module's network bring-up
# (~8-10 s, more on a loaded machine) counts against whichever test needs it first.
pytestmark = pytest.mark.timeout(120)


class PeerServer:
    """Accepts on 127.0.0.1, answers each connection with the peer address it sees + "\\n",
    then keeps it open until the other side closes (so a test can watch a stream die)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.peers = []            # every peer address seen, in order
        self.closed_peers = []     # connections that ended (EOF or error) on the server side
        self.conns = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                conn, (host, port) = self.sock.accept()
            except OSError:
                return
            self.peers.append(host)
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, host, port), daemon=True).start()

    def _serve(self, conn, host, port):
        try:
            conn.sendall(f"{host}\n".encode())
            while conn.recv(4096):
                pass
        except OSError:
            pass
        finally:
            self.closed_peers.append((host, port))
            conn.close()

    def stop(self):
        self.stopping = True
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def open_via(client, port, isolation=None, timeout=30.0):
    """Connect through a tor client's SocksPort to 127.0.0.1:port; return (socket, peer seen).

    `isolation` becomes the SOCKS username/password: tor puts streams with different
    credentials on different circuits, so a new value forces a fresh circuit.
    """
    s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", client.socks_port, rdns=True,
                username=isolation, password=isolation and "x")
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", port))
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                raise ConnectionError(f"server closed before answering (got {line!r})")
            line += chunk
    except BaseException:
        s.close()
        raise
    return s, line.decode().strip()


def peer_via(client, port, isolation=None, timeout=30.0):
    s, peer = open_via(client, port, isolation, timeout)
    s.close()
    return peer


def retry_peer_via(client, port, timeout, attempt_timeout=15.0):
    """Keep trying (each attempt on a fresh circuit) until one connection works."""
    deadline = time.monotonic() + timeout
    errors = []
    while time.monotonic() < deadline:
        try:
            return peer_via(client, port, isolation=uuid.uuid4().hex,
                            timeout=min(attempt_timeout, max(1.0, deadline - time.monotonic())))
        except (OSError, socks.ProxyError) as e:
            errors.append(repr(e))
            time.sleep(0.2)
    raise AssertionError(f"no connection through {client.workdir} within {timeout}s: {errors}")


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tor_net(request, tmp_path_factory):
    if shutil.which("tor") is None or shutil.which("tor-gencert") is None:
        pytest.fail("tor is not installed: run ./setup --test", pytrace=False)
    cache = getattr(request.config, "cache", None)
    key_cache = str(cache.mkdir("tor-network-keys")) if cache is not None else None
    net = TorNetwork(str(tmp_path_factory.mktemp("tornet")), n_authorities=3, n_exits=3,
                     key_cache_dir=key_cache)
    t0 = time.monotonic()
    net.start(timeout=60)
    print(f"\ntor network up in {time.monotonic() - t0:.1f}s {net.timings}")
    yield net
    popens = list(net._popens)
    pids = [p.pid for p in popens]
    net.stop()
    assert all(p.poll() is not None for p in popens), "a tor process survived stop()"
    leftover = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.name() == "tor" and proc.status() != psutil.STATUS_ZOMBIE:
                leftover.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not leftover, f"tor processes still running after stop(): {leftover}"


@pytest.fixture(scope="module")
def server():
    s = PeerServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def clients(tor_net, tmp_path_factory):
    """Three clients pinned to exit 0, 1, 2 and one free client (all started at once)."""
    base = tmp_path_factory.mktemp("torclients")
    pinned = [tor_net.start_client(str(base / f"pinned{i}"),
                                   extra=[f"ExitNodes ${e.fingerprint}", "StrictNodes 1"])
              for i, e in enumerate(tor_net.exits)]
    free = tor_net.start_client(str(base / "free"))
    t0 = time.monotonic()
    for c in pinned + [free]:
        c.wait_bootstrapped(45)
    print(f"\n4 clients bootstrapped in {time.monotonic() - t0:.1f}s")
    return {"pinned": pinned, "free": free}


# ---------------------------------------------------------------------------------------------
# Unit tests of the socket check (no tor needed)


def test_parse_proc_net_line_and_detect_non_local_peer():
    # Fabricated /proc/net/tcp lines (x86 little-endian words): 127.0.0.1:8080 -> 8.8.8.8:443
    outside = ("   0: 0100007F:1F90 08080808:01BB 01 00000000:00000000 00:00000000 00000000"
               "     0        0 424242 1 0000000000000000 20 4 30 10 -1")
    s = parse_proc_net_line(outside, "tcp")
    assert (s.local, s.local_port, s.remote, s.remote_port, s.state, s.inode) == \
        ("127.0.0.1", 8080, "8.8.8.8", 443, "ESTABLISHED", 424242)
    assert "peer outside loopback" in socket_problem(s)

    inside = ("   1: 0102007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000"
              "     0        0 424243 1 0000000000000000 20 4 30 10 -1")
    s = parse_proc_net_line(inside, "tcp")
    assert (s.local, s.remote, s.remote_port) == ("127.0.2.1", "127.0.0.1", 8080)
    assert socket_problem(s) is None

    listen_any = ("   2: 00000000:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
                  "     0        0 424244 1 0000000000000000 100 0 0 10 0")
    s = parse_proc_net_line(listen_any, "tcp")
    assert s.state == "LISTEN" and "non-loopback" in socket_problem(s)

    listen_lo = listen_any.replace("00000000:2382", "0100007F:2382")
    assert socket_problem(parse_proc_net_line(listen_lo, "tcp")) is None

    fresh = listen_any.replace("00000000:2382", "00000000:0000").replace(" 0A ", " 07 ")
    assert socket_problem(parse_proc_net_line(fresh, "tcp")) is None   # not bound, no peer

    # tcp6: ::ffff:127.0.0.1 peer is fine, 2001:db8::1 is not; ::1 is fine
    v6_mapped = ("   0: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:"
                 "C350 01 00000000:00000000 00:00000000 00000000     0        0 5 1 0 20 4 30 "
                 "10 -1")
    assert socket_problem(parse_proc_net_line(v6_mapped, "tcp6")) is None
    v6_out = v6_mapped.replace("0000000000000000FFFF00000100007F:C350",
                               "B80D0120000000000000000001000000:01BB")
    s = parse_proc_net_line(v6_out, "tcp6")
    assert s.remote == "2001:db8::1" and "peer outside" in socket_problem(s)
    v6_lo = v6_mapped.replace("0000000000000000FFFF00000100007F:C350",
                              "00000000000000000000000001000000:C350")
    assert parse_proc_net_line(v6_lo, "tcp6").remote == "::1"
    assert socket_problem(parse_proc_net_line(v6_lo, "tcp6")) is None

    # header line
    assert parse_proc_net_line("  sl  local_address rem_address   st tx_queue rx_queue tr "
                               "tm->when retrnsmt   uid  timeout inode", "tcp") is None


def test_process_sockets_sees_this_process_sockets():
    """The fd -> inode -> /proc/<pid>/net/tcp mapping finds a real socket of a real process."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    try:
        mine = process_sockets(os.getpid())
        port = cli.getsockname()[1]
        assert any(s.local_port == port and s.remote_port == srv.getsockname()[1]
                   and s.state == "ESTABLISHED" for s in mine), mine
        assert loopback_violations([os.getpid()]) == []
    finally:
        for s in (cli, acc, srv):
            s.close()


def test_voting_start_offset_puts_first_valid_after_just_after_lead():
    now = 86400 * 20000 + 3600 + 12.3        # 01:00:12.3 UTC some day
    off = voting_start_offset(now, lead=2.5, interval=10, vote_delay=2, dist_delay=2)
    # first boundary = next time t > now with t % 10 == off: 01:00:19 (= 12.3 + 6.5, rounded up)
    assert off == 9


# ---------------------------------------------------------------------------------------------
# The network


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_network_up_with_distinct_exits(tor_net):
    assert len(tor_net.exits) == 3 and len(tor_net.authorities) == 3
    assert len({e.fingerprint for e in tor_net.exits}) == 3
    assert len({e.address for e in tor_net.exits}) == 3
    for e in tor_net.exits:
        assert e.address.startswith("127.") and e.address != "127.0.0.1"
        assert e.alive() and e.pid
    extra = tor_net.torrc_extra()
    for needed in ("TestingTorNetwork 1", "UseDefaultFallbackDirs 0", "ClientUseIPv6 0",
                   "UseMicrodescriptors 0"):
        assert needed in extra
    dir_auths = [line for line in extra if line.startswith("DirAuthority ")]
    assert len(dir_auths) == 3 and all(" 127.0.1." in line for line in dir_auths)
    # every authority serves a consensus listing each exit at its address with the Exit flag
    for a in tor_net.authorities:
        cons = tor_net.fetch_consensus(a)
        flags = tor_net.consensus_flags(cons)
        for e in tor_net.exits:
            assert {"Exit", "Running", "Valid"} <= flags[e.fingerprint]
            assert f" {e.address} {e.or_port} " in cons


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pinned_clients_come_from_their_exits_address(tor_net, clients, server):
    seen = []
    for client, exit_relay in zip(clients["pinned"], tor_net.exits):
        s, peer = open_via(client, server.port)
        try:
            assert peer == exit_relay.address, (client.workdir, peer, exit_relay)
            # What the daemon does (supervisor.tor.TorControl): ask the client's control port
            # which exit carries the stream (circuit path last hop) and where the consensus
            # says that exit is.
            with client.controller() as ctl:
                found = ctl.exits_of_streams(server.port)
            assert found, f"{client.workdir}: no stream to port {server.port}"
            assert found == [(exit_relay.fingerprint, exit_relay.address)]
        finally:
            s.close()
        seen.append(peer)
    assert len(set(seen)) == 3
    assert server.peers[-3:] == seen


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_free_client_connects(tor_net, clients, server):
    peer = peer_via(clients["free"], server.port)
    assert peer in {e.address for e in tor_net.exits}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_only_loopback_sockets_while_streams_are_open(tor_net, clients, server):
    held = [open_via(c, server.port)[0] for c in clients["pinned"] + [clients["free"]]]
    try:
        checked = tor_net.assert_loopback_only(extra_pids=[os.getpid()])
        assert checked > 20          # it really looked: listeners, OR links, exit streams
        # the exits' streams to the server are among them, each from the exit's own address,
        # and every connection of every relay (OR links, directory fetches/uploads, exit
        # streams; in or out) has the relay's own address at its end: the shim binds them all
        for e in tor_net.exits:
            assert any(s.remote_port == server.port and s.local == e.address
                       for s in process_sockets(e.pid)), e
        for r in tor_net.authorities + tor_net.exits:
            connected = [s for s in process_sockets(r.pid) if s.state == "ESTABLISHED"]
            assert connected and all(s.local == r.address for s in connected), (r, connected)
        assert len(tor_net.pids()) == 3 + 3 + 4
    finally:
        for s in held:
            s.close()


BAD_SOCKET = parse_proc_net_line(
    "   0: 0102007F:C350 08080808:01BB 01 00000000:00000000 00:00000000 00000000"
    "     0        0 1 1 0 20 4 30 10 -1", "tcp")


@pytest.mark.slow
def test_assert_loopback_only_raises_on_a_violation(tor_net, tmp_path):
    """The check the fixture uses, on a real exit's real sockets plus one fabricated bad one
    (through a separate, unstarted TorNetwork, so the running network's watcher is unaffected)."""
    victim = tor_net.exits[0].pid
    probe = TorNetwork(str(tmp_path))
    assert probe.assert_loopback_only(extra_pids=[victim]) > 0          # real: all fine
    probe.sockets_of = lambda pid: process_sockets(pid) + [BAD_SOCKET]
    with pytest.raises(TorNetworkError, match=rf"pid {victim}: peer outside loopback.*8\.8\.8\.8"):
        probe.assert_loopback_only(extra_pids=[victim])


def test_watcher_kills_everything_on_a_violation(tmp_path):
    """The watcher thread (here watching a stand-in process, not tor) kills at once."""
    net = TorNetwork(str(tmp_path))
    dummy = subprocess.Popen(["sleep", "60"])
    net._popens.append(dummy)
    net.sockets_of = lambda pid: [BAD_SOCKET]
    net._watcher = threading.Thread(target=net._watch, daemon=True)
    net._watcher.start()
    wait_for(lambda: dummy.poll() is not None, 5, "the watcher to kill the process")
    assert net.violations and "8.8.8.8" in net.violations[0]
    with pytest.raises(TorNetworkError, match="NON-LOOPBACK"):
        net.assert_loopback_only()
    with pytest.raises(TorNetworkError, match="seen while the network ran"):
        net.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_exit_mid_stream(tor_net, clients, server):
    """Runs last in this module: exit 2 dies while carrying a stream."""
    victim_index = 2
    victim = tor_net.exits[victim_index]
    pinned = clients["pinned"][victim_index]
    s, peer = open_via(pinned, server.port)
    assert peer == victim.address
    held_port = s.getsockname()[1]

    tor_net.kill_exit(victim_index)
    assert not victim.alive()

    # the held stream ends on both sides: the server (the exit's socket died with it) ...
    wait_for(lambda: any(h == victim.address for h, _ in server.closed_peers), 15,
             "the server to see the killed exit's connection close")

    # ... and the client (the middle relay tears the circuit down, tor ends the stream)
    def stream_ended():
        try:
            s.settimeout(0.2)
            return s.recv(100) == b""
        except socket.timeout:
            return False
        except OSError:
            return True
    wait_for(stream_ended, 30, f"the client stream (local port {held_port}) to end")
    s.close()

    # A client pinned (StrictNodes) to the dead exit cannot connect. Seen: a stream put on a
    # circuit that was still being torn down fails at once (SOCKS 0x01); later ones wait for a
    # circuit to the dead exit until SocksTimeout (120 s) and then get SOCKS 0x06. The
    # consensus keeps listing it as Running (the authorities AssumeReachable).
    t0 = time.monotonic()
    with pytest.raises((OSError, socks.ProxyError)) as failure:
        peer_via(pinned, server.port, isolation="after-kill", timeout=6)
    print(f"\npinned client to a dead exit: {failure.value!r} {failure.value} "
          f"after {time.monotonic() - t0:.1f}s")

    # every other client still works, through a surviving exit
    alive = {e.address for e in tor_net.exits if e is not victim}
    for i, c in enumerate(clients["pinned"]):
        if i != victim_index:
            assert retry_peer_via(c, server.port, 60) == tor_net.exits[i].address
    for _ in range(3):
        assert retry_peer_via(clients["free"], server.port, 60) in alive
    tor_net.assert_loopback_only()

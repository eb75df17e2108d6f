"""This host in the cluster: its registration in ZooKeeper, the copies it reports live, and
which symbols it should run now (docs/cluster.md).

Under `[cluster] root` (kazoo, nothing of our own on the wire):
  hosts/{host}        ephemeral, one per running daemon: JSON {clickhouse, version, started_ms}
  live/{name}/{host}  ephemeral: the host's collector of the symbol is subscribed and delivering

ZooKeeper's sessions are the heartbeats: a host whose session expires (cluster.session_timeout
after it fell silent) disappears with its nodes, and every other host's assignment moves its
symbols.  Without a session (suspended, lost) nothing is added or dropped: the host keeps
collecting what it runs (plan() answers None) until a new session has registered it again.

Kazoo calls the watches and the state listener in its own threads; they only record what they
see.  ZooKeeper writes happen in this module's worker thread; the supervisor's loop calls
set_live() and plan(), which never wait on the network.
"""
import json
import logging
import threading
import time
from typing import Dict, Iterable, NamedTuple, Optional, Set

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch
from kazoo.retry import KazooRetry

from cluster.assignment import assign, copies, wanted
from core import __version__

log = logging.getLogger(__name__)

SYNC_EVERY = 1.0  # the worker checks its nodes at least this often
CONNECTED, SUSPENDED, LOST = "connected", "suspended", "lost"


class Plan(NamedTuple):
    take: Dict[str, str]  # name -> why
    release: Dict[str, str]


class Membership:
    """One host's view of the cluster; start() connects, stop() leaves (its nodes go at once)."""

    def __init__(self, cluster: dict, names: Iterable[str]):
        self.me = cluster["host"]
        self.root = cluster["root"]
        self.replicas = cluster["replicas"]
        self.info = json.dumps({"clickhouse": cluster["clickhouse"], "version": __version__,
                                "started_ms": int(time.time() * 1000)}).encode()
        self.names = sorted(set(names))
        self.zk = KazooClient(hosts=cluster["zookeeper"], timeout=cluster["session_timeout"],
                              connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=2.0),
                              command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=1.0))
        logging.getLogger("kazoo").setLevel(logging.ERROR)  # one line per retry otherwise
        self._lock = threading.Lock()
        self._hosts: Set[str] = set()  # as the hosts/ watch last saw them
        self._addresses: Dict[str, str] = {}  # host -> its cluster.clickhouse (hosts/ data)
        self._live: Dict[str, Set[str]] = {name: set() for name in self.names}
        self._state = LOST
        self._session = None  # the session id this host's nodes belong to
        self._published: Set[str] = set()  # live nodes made in that session
        self._want_live: Set[str] = set()
        self._watched: Set[str] = set()  # paths with a ChildrenWatch
        self._last_hosts: Optional[Set[str]] = None  # the hosts of the last plan with changes
        self._wake = threading.Event()
        self._stopped = False
        self._worker = threading.Thread(target=self._work, name="cluster-membership",
                                        daemon=True)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Membership":
        self.zk.add_listener(self._on_state)
        self.zk.start_async()  # connects in the background, retrying for ever
        self._worker.start()
        return self

    def stop(self) -> None:
        """Leave: the session is closed, so the others take over at once."""
        self._stopped = True
        self._wake.set()
        self._worker.join(timeout=2.0)
        try:
            self.zk.stop()
            self.zk.close()
        except Exception as e:  # leaving never fails the shutdown
            log.warning("cluster: leaving ZooKeeper: %s", e)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.ready()

    # --- what the supervisor's loop asks and tells -------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def ready(self) -> bool:
        """Connected, registered in this session, and seen in hosts/: a view to act on."""
        with self._lock:
            return (self._state == CONNECTED and self._session is not None
                    and self._session == self._client_session() and self.me in self._hosts)

    def set_live(self, names: Set[str]) -> None:
        """The symbols whose collector here is live now; the worker publishes the change."""
        names = set(names) & set(self.names)
        if names != self._want_live:
            self._want_live = names
            self._wake.set()

    def set_names(self, names: Iterable[str]) -> None:
        """The config's symbols after a reload; the worker registers again for new ones."""
        with self._lock:
            self.names = sorted(set(names))
            self._live = {n: self._live.get(n, set()) for n in self.names}
        self._wake.set()

    def plan(self, running: Set[str]) -> Optional[Plan]:
        """What to start and stop so that this host runs what it should; None while frozen
        (no session, or not registered in it yet): then nothing changes."""
        if not self.ready():
            return None
        with self._lock:
            hosts, live = set(self._hosts), {n: set(h) for n, h in self._live.items()}
        assignment = assign(self.names, hosts, self.replicas)
        should = wanted(self.me, assignment, set(running), live)
        take = {n: self._why_taken(hosts) for n in sorted(should - set(running))}
        release = {n: "live on " + ", ".join(h for h in assignment[n] if h in live.get(n, ()))
                   for n in sorted(set(running) - should)}
        if take or release:
            self._last_hosts = hosts
        return Plan(take, release)

    def _why_taken(self, hosts: Set[str]) -> str:
        n = copies(len(hosts), self.replicas)
        wanted_copies = f"{n} live {'copy' if n == 1 else 'copies'} wanted"
        if self._last_hosts is None or self._last_hosts == hosts:
            return f"assigned; {wanted_copies}"
        changes = [f"host {h} gone" for h in sorted(self._last_hosts - hosts)] + \
            [f"host {h} joined" for h in sorted(hosts - self._last_hosts)]
        return f"{', '.join(changes)}; {wanted_copies}"

    def describe(self) -> dict:
        """The cluster section of `mexc status`: hosts alive and the symbols live on each."""
        with self._lock:
            hosts, live = sorted(self._hosts), {n: set(h) for n, h in self._live.items()}
            addresses = {h: self._addresses.get(h) for h in hosts}
        return {"host": self.me, "zookeeper": self._state, "frozen": not self.ready(),
                "replicas": self.replicas,
                "hosts": {h: sorted(n for n in self.names if h in live[n]) for h in hosts},
                "clickhouse": addresses}

    # --- kazoo's threads: record only ------------------------------------------------------

    def _client_session(self):
        client_id = self.zk.client_id
        return client_id[0] if client_id else None

    def _on_state(self, state) -> None:
        self._state = {KazooState.CONNECTED: CONNECTED, KazooState.SUSPENDED: SUSPENDED,
                       KazooState.LOST: LOST}[state]
        self._wake.set()

    def _on_hosts(self, children) -> None:
        with self._lock:
            self._hosts = set(children)

    def _on_live(self, name: str, children) -> None:
        with self._lock:
            self._live[name] = set(children)

    # --- the worker: every ZooKeeper write -------------------------------------------------

    def _work(self) -> None:
        while not self._stopped:
            self._wake.wait(SYNC_EVERY)
            self._wake.clear()
            if self._stopped or self._state != CONNECTED:
                continue
            try:
                self._sync()
            except KazooException as e:  # the session went meanwhile: next time
                log.debug("cluster: sync with ZooKeeper: %r", e)

    def _sync(self) -> None:
        session = self._client_session()
        if session != self._session:
            self._register(session)
        self._watch_names()  # new ones after a reload
        self._read_addresses()
        want = set(self._want_live)
        for name in sorted(want - self._published):
            self._own(f"{self.root}/live/{name}/{self.me}", b"")
            self._published.add(name)
        for name in sorted(self._published - want):
            try:
                self.zk.delete(f"{self.root}/live/{name}/{self.me}")
            except NoNodeError:
                pass
            self._published.discard(name)

    def _read_addresses(self) -> None:
        """Each live host's ClickHouse address, read once per host that joined (again after
        it left and came back: it may have moved)."""
        with self._lock:
            self._addresses = {h: a for h, a in self._addresses.items() if h in self._hosts}
            missing = self._hosts - set(self._addresses)
        for host in sorted(missing):
            try:
                data, _stat = self.zk.get(f"{self.root}/hosts/{host}")
                address = json.loads(data.decode() or "{}").get("clickhouse")
            except (NoNodeError, ValueError):
                continue
            with self._lock:
                self._addresses[host] = address

    def _register(self, session) -> None:
        """In a new session: this host's node, no live node of an earlier session of this
        host (a restart within the session timeout finds its old nodes still there), watches."""
        for name in self.names:
            self.zk.ensure_path(f"{self.root}/live/{name}")
            path = f"{self.root}/live/{name}/{self.me}"
            stat = self.zk.exists(path)
            if stat is not None and stat.ephemeralOwner != session:
                self.zk.delete(path)
        self.zk.ensure_path(f"{self.root}/hosts")
        self._own(f"{self.root}/hosts/{self.me}", self.info)
        self._published = set()
        self._watch(f"{self.root}/hosts", self._on_hosts)
        self._watch_names()
        with self._lock:
            self._session = session
        log.info("cluster: registered as %s in ZooKeeper session 0x%x", self.me, session)

    def _own(self, path: str, data: bytes) -> None:
        """An ephemeral node of this session at path; one of an earlier session is replaced."""
        try:
            self.zk.create(path, data, ephemeral=True)
        except NodeExistsError:
            stat = self.zk.exists(path)
            if stat is not None and stat.ephemeralOwner == self._client_session():
                return
            log.warning("cluster: %s was held by session 0x%x (an earlier run of this host, or "
                        "another host with cluster.host = %s); replacing it", path,
                        stat.ephemeralOwner if stat else 0, self.me)
            try:
                self.zk.delete(path)
            except NoNodeError:
                pass
            self.zk.create(path, data, ephemeral=True)

    def _watch_names(self) -> None:
        for name in self.names:
            path = f"{self.root}/live/{name}"
            if path not in self._watched:
                self.zk.ensure_path(path)
                self._watch(path, lambda children, n=name: self._on_live(n, children))

    def _watch(self, path: str, func) -> None:
        if path not in self._watched:  # a ChildrenWatch re-arms itself in each new session
            ChildrenWatch(self.zk, path, func)
            self._watched.add(path)

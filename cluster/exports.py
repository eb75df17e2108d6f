"""What the hosts of a cluster tell each other about hourly files, in ZooKeeper (kazoo), and the
lock that lets exactly one of them merge a symbol-hour (docs/cluster.md "One merged archive").

Nodes, all under `{root}` ([cluster] root):

    hosts/{host}                        {"clickhouse": "addr:port", ...}: a live host (written by
                                        the membership, cluster/membership.py; ephemeral)
    hours/{name}/{YYYYMMDD_HH00}/
        copies/{host}                   {"host", "sha256", "rows", "clickhouse", "ledger"}: the
                                        host's copy of the hour, its bytes in its ClickHouse's
                                        hour_copies, "ledger" what its gap ledger held of the
                                        hour (changes when a gap is recorded later); or
                                        {"host", "none": true}: it has no rows of the hour
        merged                          {"sha256", "rows", "merged_by", "copies": {host: sha256},
                                        "ledgers": {host: ledger}, "holders": {host: addr:port}}:
                                        the merged file, what it was merged from, and the hosts
                                        holding its bytes (in export.dir and in hour_copies)
        lock                            a kazoo Lock: the host merging the hour holds it
    changes/{name}/{YYYYMMDD_HH00}-{seq}
                                        the symbol's change log: one sequential node per write
                                        of a copy, a "none" or the merged node, made in one
                                        transaction with that write, so a host re-examines only
                                        the hours named since its cursor (the highest seq it
                                        read); the oldest beyond CHANGES_KEEP are pruned, and
                                        changes/{name}'s data says up to which seq
                                        ({"pruned_through": seq}): a host whose cursor is older
                                        examines every hour once
    pruned/{name}                       {"before": hour ms}: hours before it are past
                                        cluster.retention_hours and their nodes are gone (or
                                        going); a copy, "none" or merged node of such an hour
                                        is refused (each write checks this node's version)

Values are JSON.  Every change of a node that several hosts write is a compare-and-set on the
node's version, so no host's word is lost.  kazoo is imported here only, when a cluster is
configured: a single host never loads it.
"""
import calendar
import json
import logging
import time
from typing import Dict, List, Optional, Set, Tuple

from core.log import first_line

log = logging.getLogger(__name__)

HOUR_FORMAT = "%Y%m%d_%H00"
CHANGES_KEEP = 400  # change-log entries kept per symbol (about 3 days of 5 changes an hour)


OTHERS = "(others)"  # the unreachable "host" when ZooKeeper could not name the hosts


# seconds a command waits for ZooKeeper before it answers from this host alone
ZOOKEEPER_WAIT = 5.0


def cluster_hosts(cluster: dict, timeout: Optional[float] = None
                  ) -> Tuple[Dict[str, Optional[str]], Dict[str, str]]:
    """({host: its ClickHouse as remote() reaches it, None for this host}, {}) of the hosts
    registered in ZooKeeper; ({this host: None}, {OTHERS: why}) when ZooKeeper does not
    answer within `timeout` (ZOOKEEPER_WAIT): what answers from any host read (docs/cluster.md)."""
    nodes, hosts, problem = HourNodes(cluster), {}, {}
    try:
        nodes.start(timeout=ZOOKEEPER_WAIT if timeout is None else timeout)
        hosts = {h: data.get("clickhouse") for h, data in nodes.live_hosts().items()}
    except Exception as e:  # the other hosts cannot be found: this host's answer
        problem = {OTHERS: f"ZooKeeper {cluster['zookeeper']}: "
                           f"{first_line(e) or type(e).__name__}"}
    finally:
        nodes.stop()
    hosts[cluster["host"]] = None
    return hosts, problem


class HourPruned(Exception):
    """The hour is past the retention: its nodes are gone and no node of it is written."""


def hour_label(hour_ms: int) -> str:
    return time.strftime(HOUR_FORMAT, time.gmtime(hour_ms // 1000))


def hour_of_label(label: str) -> int:
    return calendar.timegm(time.strptime(label, HOUR_FORMAT)) * 1000


class HourNodes:
    """One host's view of the cluster's hour nodes; a kazoo client of its own."""

    def __init__(self, cluster: dict):
        from kazoo.client import KazooClient  # only in a cluster
        from kazoo.retry import KazooRetry
        self.root = cluster["root"].rstrip("/")
        self.host = cluster["host"]
        self.zk = KazooClient(hosts=cluster["zookeeper"], timeout=cluster["session_timeout"],
                              connection_retry=KazooRetry(max_tries=-1, delay=0.2,
                                                          max_delay=2.0),
                              command_retry=KazooRetry(max_tries=3, delay=0.2))
        self.started = False

    def start(self, timeout: float = 10.0) -> None:
        if not self.started:
            self.zk.start(timeout=timeout)
            self.started = True

    def stop(self) -> None:
        if self.started:
            self.zk.stop()
            self.zk.close()
            self.started = False

    # --- paths -----------------------------------------------------------------------------

    def _hour(self, name: str, hour_ms: int) -> str:
        return f"{self.root}/hours/{name}/{hour_label(hour_ms)}"

    def _get(self, path: str) -> Tuple[Optional[dict], int]:
        from kazoo.exceptions import NoNodeError
        try:
            data, stat = self.zk.get(path)
        except NoNodeError:
            return None, -1
        return json.loads(data.decode() or "{}"), stat.version

    def _changes(self, name: str) -> str:
        return f"{self.root}/changes/{name}"

    def _pruned_path(self, name: str) -> str:
        return f"{self.root}/pruned/{name}"

    def _pruned(self, name: str) -> Tuple[int, int]:
        """(hours before this are pruned, the pruned node's version); made when missing."""
        from kazoo.exceptions import NodeExistsError
        value, version = self._get(self._pruned_path(name))
        if value is None:
            try:
                self.zk.create(self._pruned_path(name), b'{"before": 0}', makepath=True)
            except NodeExistsError:
                pass
            value, version = self._get(self._pruned_path(name))
        return value["before"], version

    def _write(self, name: str, hour_ms: int, path: str, value: dict,
               version: Optional[int] = None):
        """Create `path` (version None) or set it at `version` (-1: any), in one transaction
        with a change-log entry naming the hour and a check that the hour is not pruned.
        Returns None when written, else the kazoo error of the write (NodeExistsError,
        BadVersionError); raises HourPruned for an hour past the retention."""
        from kazoo.exceptions import BadVersionError, NoNodeError, RolledBackError
        data = json.dumps(value, sort_keys=True).encode()
        while True:
            before, pruned_version = self._pruned(name)
            if hour_ms < before:
                raise HourPruned(f"{name} {hour_label(hour_ms)} is past the retention (hour "
                                 f"nodes before {hour_label(before)} are pruned)")
            self.zk.ensure_path(path.rsplit("/", 1)[0])
            self.zk.ensure_path(self._changes(name))
            transaction = self.zk.transaction()
            transaction.check(self._pruned_path(name), pruned_version)
            if version is None:
                transaction.create(path, data)
            else:
                transaction.set_data(path, data, version)
            transaction.create(f"{self._changes(name)}/{hour_label(hour_ms)}-", b"",
                               sequence=True)
            results = transaction.commit()
            errors = [r for r in results if isinstance(r, Exception)
                      and not isinstance(r, RolledBackError)]
            if not errors:
                return None
            if isinstance(results[0], (BadVersionError, NoNodeError)):
                continue  # the retention moved meanwhile: look again
            return errors[0]

    def _put(self, name: str, hour_ms: int, path: str, value: dict) -> None:
        """Create or replace a node only this host writes (with its change-log entry)."""
        from kazoo.exceptions import NodeExistsError
        error = self._write(name, hour_ms, path, value)
        if isinstance(error, NodeExistsError):
            error = self._write(name, hour_ms, path, value, version=-1)
        if error is not None:
            raise error

    # --- hosts -----------------------------------------------------------------------------

    def live_hosts(self) -> Dict[str, dict]:
        """{host: its membership data} of every live host."""
        path = f"{self.root}/hosts"
        if not self.zk.exists(path):
            return {}
        hosts = {}
        for host in self.zk.get_children(path):
            data, _version = self._get(f"{path}/{host}")
            if data is not None:
                hosts[host] = data
        return hosts

    # --- copies ----------------------------------------------------------------------------

    def register_copy(self, name: str, hour_ms: int, sha256: str, rows: int,
                      clickhouse: str, ledger: str) -> None:
        self._put(name, hour_ms, f"{self._hour(name, hour_ms)}/copies/{self.host}",
                  {"host": self.host, "sha256": sha256, "rows": rows, "clickhouse": clickhouse,
                   "ledger": ledger})

    def register_none(self, name: str, hour_ms: int) -> None:
        """This host has no rows of the hour (it did not hold the symbol, or was down)."""
        path = f"{self._hour(name, hour_ms)}/copies/{self.host}"
        if not self.zk.exists(path):
            self._write(name, hour_ms, path, {"host": self.host, "none": True})

    def copies(self, name: str, hour_ms: int) -> Dict[str, dict]:
        """{host: its copy node} of the hour (a "none" node included)."""
        path = f"{self._hour(name, hour_ms)}/copies"
        if not self.zk.exists(path):
            return {}
        nodes = {}
        for host in self.zk.get_children(path):
            data, _version = self._get(f"{path}/{host}")
            if data is not None:
                nodes[host] = data
        return nodes

    def first_copy_ms(self, name: str, hour_ms: int) -> Optional[int]:
        """When the first copy of the hour was registered (ZooKeeper's clock), or None."""
        stat = self.zk.exists(f"{self._hour(name, hour_ms)}/copies")
        return stat.ctime if stat else None

    def hours(self, name: str) -> List[int]:
        """Every hour with nodes for the symbol, oldest first."""
        path = f"{self.root}/hours/{name}"
        if not self.zk.exists(path):
            return []
        return sorted(hour_of_label(label) for label in self.zk.get_children(path))

    # --- the merged file -------------------------------------------------------------------

    def merged(self, name: str, hour_ms: int) -> Tuple[Optional[dict], int]:
        """(the merged node, its version) or (None, -1)."""
        return self._get(f"{self._hour(name, hour_ms)}/merged")

    def set_merged(self, name: str, hour_ms: int, value: dict, version: int) -> bool:
        """Write the merged node if it is still at `version` (-1: not there), with its
        change-log entry; False when another host changed it first."""
        return self._write(name, hour_ms, f"{self._hour(name, hour_ms)}/merged", value,
                           None if version < 0 else version) is None

    def add_holder(self, name: str, hour_ms: int, sha256: str, clickhouse: str) -> bool:
        """Note that this host holds the merged file `sha256` (False: the node now names
        another file, a newer version)."""
        from kazoo.exceptions import BadVersionError, NoNodeError
        while True:
            value, version = self.merged(name, hour_ms)
            if value is None or value["sha256"] != sha256:
                return False
            if value["holders"].get(self.host) == clickhouse:
                return True
            value["holders"][self.host] = clickhouse
            try:  # no change-log entry: no other host acts on a holder more
                self.zk.set(f"{self._hour(name, hour_ms)}/merged",
                            json.dumps(value, sort_keys=True).encode(), version=version)
                return True
            except BadVersionError:
                continue
            except NoNodeError:  # pruned meanwhile
                return False

    def lock(self, name: str, hour_ms: int, timeout: float):
        """The hour's kazoo Lock, acquired within `timeout` s (release() it), or None: another
        host holds it (it merges the hour now).

        A contender node of this session found before acquiring is stale, and deleted: this
        process merges one hour at a time, so none of its own is live then.  kazoo leaves one
        behind when an acquire times out while the connection is lost (its clean-up is best
        effort), and the session outlives the loss: that node stood before every later
        acquire, this host's and every other's, until the daemon stopped (an hour unmerged
        for 5 minutes in a cluster soak after a ZooKeeper outage)."""
        from kazoo.exceptions import LockTimeout, NoNodeError
        path = f"{self._hour(name, hour_ms)}/lock"
        session = self.zk.client_id[0] if self.zk.client_id else None
        try:
            contenders = self.zk.get_children(path)
        except NoNodeError:
            contenders = []
        for node in contenders:
            stat = self.zk.exists(f"{path}/{node}")
            if stat is None or stat.ephemeralOwner != session:
                continue
            try:
                self.zk.delete(f"{path}/{node}")
            except NoNodeError:
                continue
            log.warning("cluster: %s %s: a lock node this host left behind (an acquire cut "
                        "short by a lost connection) deleted", name, hour_label(hour_ms))
        lock = self.zk.Lock(path, self.host)
        try:
            lock.acquire(timeout=timeout)
        except LockTimeout:
            return None
        return lock


    # --- the change log and the retention --------------------------------------------------

    def changes(self, name: str, cursor: Optional[int], seen: Optional[int]
                ) -> Tuple[Optional[int], Optional[Set[int]], Optional[int]]:
        """(the change log's cversion, the hours named by entries after `cursor`, the new
        cursor).  One read when nothing changed since the cversion `seen`.  The hours are
        None when every hour must be examined: no cursor yet, or entries after it pruned
        unread."""
        path = self._changes(name)
        stat = self.zk.exists(path)
        if stat is None:  # no entry yet: examine every hour once, then wait for the first
            return None, None if cursor is None else set(), -1 if cursor is None else cursor
        if cursor is not None and stat.cversion == seen:
            return seen, set(), cursor
        entries = sorted((int(child.rsplit("-", 1)[1]), child.rsplit("-", 1)[0])
                         for child in self.zk.get_children(path))
        pruned = json.loads(self.zk.get(path)[0].decode() or "{}").get("pruned_through", -1)
        newest = max([cursor if cursor is not None else -1] + [seq for seq, _ in entries])
        hours = None if cursor is None or cursor < pruned else \
            {hour_of_label(label) for seq, label in entries if seq > cursor}
        if len(entries) > CHANGES_KEEP * 3 // 2:
            self._prune_changes(path, entries[:len(entries) - CHANGES_KEEP])
        return stat.cversion, hours, newest

    def _prune_changes(self, path: str, old: list) -> None:
        """The oldest entries deleted, once changes/{name} says up to which seq (a host whose
        cursor is older then examines every hour)."""
        from kazoo.exceptions import BadVersionError, NoNodeError
        through = old[-1][0]
        while True:
            data, stat = self.zk.get(path)
            value = json.loads(data.decode() or "{}")
            if value.get("pruned_through", -1) >= through:
                break
            value["pruned_through"] = through
            try:
                self.zk.set(path, json.dumps(value).encode(), version=stat.version)
                break
            except BadVersionError:
                continue
        for seq, label in old:
            try:
                self.zk.delete(f"{path}/{label}-{seq:010d}")
            except NoNodeError:
                pass

    def prune(self, name: str, before_ms: int) -> List[int]:
        """Hours before `before_ms`: refused from now on (pruned/{name}), then their nodes
        deleted; returns the hours deleted."""
        from kazoo.exceptions import BadVersionError, NoNodeError
        while True:
            current, version = self._pruned(name)
            if current >= before_ms:
                break
            try:
                self.zk.set(self._pruned_path(name), json.dumps({"before": before_ms}).encode(),
                            version=version)
                break
            except BadVersionError:
                continue
        old = [hour for hour in self.hours(name) if hour < max(current, before_ms)]
        for hour in old:
            try:
                self.zk.delete(self._hour(name, hour), recursive=True)
            except NoNodeError:
                pass
        return old

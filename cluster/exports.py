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

Values are JSON.  Every change of a node that several hosts write is a compare-and-set on the
node's version, so no host's word is lost.  kazoo is imported here only, when a cluster is
configured: a single host never loads it.
"""
import calendar
import json
import logging
import time
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

HOUR_FORMAT = "%Y%m%d_%H00"


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

    def _put(self, path: str, value: dict) -> None:
        """Create or replace a node only this host writes."""
        from kazoo.exceptions import NodeExistsError
        data = json.dumps(value, sort_keys=True).encode()
        try:
            self.zk.create(path, data, makepath=True)
        except NodeExistsError:
            self.zk.set(path, data)

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
        self._put(f"{self._hour(name, hour_ms)}/copies/{self.host}",
                  {"host": self.host, "sha256": sha256, "rows": rows, "clickhouse": clickhouse,
                   "ledger": ledger})

    def register_none(self, name: str, hour_ms: int) -> None:
        """This host has no rows of the hour (it did not hold the symbol, or was down)."""
        path = f"{self._hour(name, hour_ms)}/copies/{self.host}"
        if not self.zk.exists(path):
            self._put(path, {"host": self.host, "none": True})

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
        """Write the merged node if it is still at `version` (-1: not there); False when
        another host changed it first."""
        from kazoo.exceptions import BadVersionError, NodeExistsError
        path = f"{self._hour(name, hour_ms)}/merged"
        data = json.dumps(value, sort_keys=True).encode()
        try:
            if version < 0:
                self.zk.create(path, data, makepath=True)
            else:
                self.zk.set(path, data, version=version)
            return True
        except (BadVersionError, NodeExistsError):
            return False

    def add_holder(self, name: str, hour_ms: int, sha256: str, clickhouse: str) -> bool:
        """Note that this host holds the merged file `sha256` (False: the node now names
        another file, a newer version)."""
        while True:
            value, version = self.merged(name, hour_ms)
            if value is None or value["sha256"] != sha256:
                return False
            if value["holders"].get(self.host) == clickhouse:
                return True
            value["holders"][self.host] = clickhouse
            if self.set_merged(name, hour_ms, value, version):
                return True

    def lock(self, name: str, hour_ms: int):
        """The kazoo Lock of the hour: `with nodes.lock(...)`, or acquire(timeout=...)."""
        return self.zk.Lock(f"{self._hour(name, hour_ms)}/lock", self.host)


"""Loading and validating etc/mexc.toml.

Every setting has a default here; the file only overrides.  A bad file raises ConfigError
with one line naming the file, the key and the problem; the CLI turns it into exit code 78.
"""
import grp
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple
from urllib.parse import urlsplit

from core.symbols import ALL, SYMBOL_RE, Patterns, Symbol, is_pattern, parse_patterns

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

SEARCH_PATHS = ("/etc/mexc/mexc.toml", "etc/mexc.toml")
NAME_RE = re.compile(r"^[a-z0-9_]{1,40}$")

# section -> key -> (type, default).  bool is checked before int (bool is an int in Python).
SCHEMA = {
    "exchange": {
        "url": (str, "wss://contract.mexc.com/edge"),
        "ca_file": (str, ""),
        "ping_interval": (float, 2.0),
        "dead_after": (float, 5.0),
        "silent_alarm": (float, 30.0),
        "stale_factor": (float, 4.0),  # 0: no stale-socket detection from the rhythm
        "stale_min": (float, 3.0),
        "rhythm_window": (float, 60.0),  # s of recent traffic a channel's rhythm is learnt from
        "make_before_break": (bool, True),  # replacements dial the new connection first
        "overlap_max": (float, 10.0),  # s both connections are read at most during a handover
        "depth_limit": (int, 20),
        "merge_deals": (bool, False),
        "book": (str, "top"),  # "top": depth.full snapshots; "full": sub.depth + REST; "both"
        "book_merge": (bool, False),  # sub.depth as MEXC merges it (compress), or every change
        "book_snapshot_interval": (float, 300.0),  # s between REST snapshots of a full book
        "rest_url": (str, ""),  # "": the WebSocket's host (rest_url_of), contract.mexc.com
        "backfill": (bool, True),
        "connect_timeout": (float, 10.0),
        "reconnect_min": (float, 1.0),
        "reconnect_max": (float, 60.0),
        # MEXC's contract list, for patterns in `symbols` (core/symbols.py): how often it is
        # read, and along which path: "direct", or "tor" (the first running collector's tor)
        "contracts_refresh": (float, 900.0),
        "contracts_via": (str, "direct"),
    },
    "clickhouse": {
        "host": (str, "127.0.0.1"),
        "port": (int, 9100),
        "http_port": (int, 9101),  # the exporter streams hours over HTTP where it can
        "database": (str, "mexc"),
        "user": (str, "default"),
        "password": (str, ""),
        "managed": (bool, True),
        "binary": (str, "clickhouse-server"),
    },
    "collector": {
        "batch_rows": (int, 1000),
        "latency_target": (float, 1.0),
        "max_buffered_rows": (int, 200_000),
        "stats_interval": (float, 15.0),
        "max_hold": (float, 30.0),
    },
    "supervisor": {
        "heartbeat_timeout": (float, 10.0),
        "restart_min": (float, 1.0),
        "restart_max": (float, 60.0),
        "rotation_ack_timeout": (float, 5.0),
        # first starts of collectors (or their tors) per second: 300 symbols start in 30 s
        # instead of 300 connects (MEXC may limit them per IP) or tor bootstraps at once
        "start_rate": (float, 10.0),
    },
    "tor": {
        "enabled": (bool, True),
        "binary": (str, "tor"),
        "socks_port_base": (int, 0),
        "control_port_base": (int, 0),
        "bootstrap_timeout": (float, 120.0),
        "exit_check_interval": (float, 5.0),
        "separation_retries": (int, 5),
        "torrc_extra": (list, []),
    },
    "export": {
        "dir": (str, "/var/lib/mexc/export"),
        "delay": (float, 60.0),
        "file_mode": (int, 0o640),
        "group": (str, ""),
        "clock_speed": (float, 1.0),
        "clock_anchor_ms": (int, 0),
    },
    "paths": {
        "state_dir": (str, "/var/lib/mexc"),
        "runtime_dir": (str, "/run/mexc"),
    },
    "log": {
        "level": (str, "info"),
    },
    "http": {
        "listen": (str, "127.0.0.1:8470"),
        "token": (str, ""),
    },
    "alerts": {
        "command": (str, ""),
        "webhook": (str, ""),
        "export_behind": (float, 7200.0),
        "spool_rows": (int, 0),
        "disk_free_percent": (float, 10.0),
        "max_per_minute": (int, 20),
    },
    # Several hosts, one archive (docs/cluster.md).  host = "": one host, as without [cluster].
    "cluster": {
        "host": (str, ""),  # this host's unique name, e.g. "tokyo"
        "zookeeper": (str, ""),  # the ensemble, "zk1:2181,zk2:2181,zk3:2181"
        "clickhouse": (str, ""),  # this host's ClickHouse (native port) as the others reach it
        "replicas": (int, 2),  # hosts that collect each symbol (capped at the live hosts)
        "root": (str, "/mexc"),  # mexc's ZooKeeper path: one per cluster
        "session_timeout": (float, 10.0),  # a host silent this long is gone: failover starts
        "export_wait": (float, 600.0),  # longest wait for a live host's copy of an hour
        "retention_hours": (int, 2160),  # hour nodes and hour_copies rows older: pruned; 0 never
    },
}
# Keys of earlier releases that were renamed or removed: old key -> the key that took its
# place.  A file that still has one loads, with a warning naming the new key (Config.warnings),
# for at least one release after the rename (CHANGELOG.md): an upgrade must not stop a working
# install.  The old value is carried over unless the file sets the new key too.
RENAMED = {
    # Both bound how long a received row waits for its insert; the new default, 1.0, costs a
    # tenth of the inserts of the old 0.1 (an INSERT costs about the same for 4 rows or 1,000).
    "collector.flush_interval": "collector.latency_target",
}
LOG_LEVELS = ("debug", "info", "warning", "error")
CONTRACT_PATHS = ("direct", "tor")
DEFAULT_SYMBOLS = ["BTC_USDT", "ETH_USDT", "SOL_USDT"]
DEPTH_LIMITS = (5, 10, 20)
BOOKS = ("top", "full", "both")  # exchange.book: the top-20 snapshots, the whole book, or both


class ConfigError(Exception):
    """A problem with the configuration file; str() is the one line shown to the operator."""


@dataclass
class Config:
    path: str
    symbols: List[Symbol]
    exchange: dict
    clickhouse: dict
    collector: dict
    supervisor: dict
    tor: dict
    export: dict
    paths: dict
    log: dict
    http: dict
    alerts: dict
    cluster: dict
    # what an operator should change in the file (old keys still read); logged at every load
    warnings: List[str] = field(default_factory=list)
    # the patterns of `symbols` (core/symbols.py), None without any.  With patterns, the
    # daemon replaces `symbols` by what they resolve to; `named` keeps the file's own entries
    patterns: Optional[Patterns] = None
    named: List[Symbol] = field(default_factory=list)

    def book(self, symbol: Symbol) -> str:
        """Which order book the symbol collects: its own `book`, else exchange.book."""
        return symbol.book or self.exchange["book"]

    def symbol(self, symbol: str) -> Symbol:
        for s in self.symbols:
            if s.symbol == symbol or s.name == symbol:
                return s
        raise ConfigError(f"{self.path}: symbols: {symbol!r} is not configured")

    @property
    def clustered(self) -> bool:
        """Several hosts share the symbols and the archive ([cluster] host is set)."""
        return bool(self.cluster["host"])

    def spool_dir(self) -> str:
        return os.path.join(self.paths["state_dir"], "spool")


def find_config(explicit: Optional[str] = None) -> str:
    """--config, then $MEXC_CONFIG, then /etc/mexc/mexc.toml, then ./etc/mexc.toml."""
    if explicit:
        return explicit
    if os.environ.get("MEXC_CONFIG"):
        return os.environ["MEXC_CONFIG"]
    for path in SEARCH_PATHS:
        if os.path.exists(path):
            return path
    raise ConfigError("no config file: pass --config PATH or set MEXC_CONFIG "
                      f"(looked in {', '.join(SEARCH_PATHS)})")


def load(explicit: Optional[str] = None) -> Config:
    path = find_config(explicit)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path)


def parse(data: dict, path: str = "<config>") -> Config:
    unknown = set(data) - set(SCHEMA) - {"symbols"}
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown key")
    warnings = []
    data = _renamed(data, path, warnings)
    sections = {name: _section(data.get(name, {}), name, keys, path)
                for name, keys in SCHEMA.items()}
    symbols, patterns = _symbols(data.get("symbols", DEFAULT_SYMBOLS), path)
    sections["exchange"]["rest_url"] = (sections["exchange"]["rest_url"]
                                        or rest_url_of(sections["exchange"]["url"]))
    _check_values(sections, path)
    _check_contracts(sections, symbols, patterns, path)
    if sections["cluster"]["host"] and sections["clickhouse"]["managed"] \
            and not sections["clickhouse"]["password"]:
        warnings.append(f"{path}: clickhouse.password is empty: in a cluster the managed "
                        "ClickHouse takes connections from other hosts; set one, and open its "
                        "port to the cluster's hosts only (docs/cluster.md)")
    return Config(path=path, symbols=symbols, warnings=warnings, patterns=patterns,
                  named=list(symbols), **sections)


def rest_url_of(websocket_url: str) -> str:
    """The REST API on the WebSocket's own host: wss://contract.mexc.com/edge ->
    https://contract.mexc.com (MEXC serves both there; a test's simulator too)."""
    parts = urlsplit(websocket_url)
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"


def _section(values, section: str, keys: dict, path: str) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: [{section}]: must be a table")
    for key in values:
        if key not in keys:
            raise ConfigError(f"{path}: {section}.{key}: unknown key")
    result = {}
    for key, (kind, default) in keys.items():
        value = values.get(key, default)
        result[key] = _typed(value, kind, f"{section}.{key}", path)
    return result


def _renamed(data: dict, path: str, warnings: list) -> dict:
    """The file's tables with each old key of RENAMED moved to its new name, and a warning
    for each."""
    data = {name: dict(value) if isinstance(value, dict) else value
            for name, value in data.items()}
    for old, new in RENAMED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        values = data.get(old_section)
        if not isinstance(values, dict) or old_key not in values:
            continue
        value = values.pop(old_key)
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # _section says what is wrong with it
        if new_key in target:
            warnings.append(f"{path}: {old}: renamed {new}; {new} is set too, so "
                            f"{old} = {value!r} is ignored: remove it")
        else:
            target[new_key] = value
            warnings.append(f"{path}: {old}: renamed {new}; read as {new} = "
                            f"{value!r}: rename it (CHANGELOG.md says what changed)")
    return data


def _typed(value, kind, key: str, path: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{path}: {key}: expected {kind.__name__}, got {type(value).__name__} "
                          f"{value!r}")
    return value


def _symbols(entries, path: str) -> Tuple[List[Symbol], Optional[Patterns]]:
    """The contracts named outright, and the patterns (None without any)."""
    if entries == ALL:
        entries = [ALL]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: symbols: expected a non-empty list of contracts and "
                          'patterns like ["BTC_USDT", "*_USDT", "!*STOCK*_USDT"], or "all"')
    globs = [e for e in entries if isinstance(e, str) and is_pattern(e)]
    try:
        patterns = parse_patterns(globs) if globs else None
    except ValueError as e:
        raise ConfigError(f"{path}: symbols: {e}") from None
    symbols, seen_names, seen_symbols = [], {}, set()
    for entry in entries:
        if isinstance(entry, str) and is_pattern(entry):
            continue
        symbol, name, book = _symbol_entry(entry, path)
        if not SYMBOL_RE.match(symbol):
            raise ConfigError(f"{path}: symbols: {symbol!r} is not a contract like BTC_USDT")
        if not NAME_RE.match(name):
            raise ConfigError(f"{path}: symbols: name {name!r} for {symbol} must be 1-40 of a-z 0-9 _")
        if symbol in seen_symbols:
            raise ConfigError(f"{path}: symbols: {symbol} is listed twice")
        if name in seen_names:
            raise ConfigError(f"{path}: symbols: {symbol} and {seen_names[name]} both have the "
                              f"name {name!r}; give one a name = \"...\"")
        seen_symbols.add(symbol)
        seen_names[name] = symbol
        if book not in ("", *BOOKS):
            raise ConfigError(f"{path}: symbols: {symbol}: book must be one of {BOOKS}")
        symbols.append(Symbol(symbol, name, book))
    return symbols, patterns


def default_name(symbol: str) -> str:
    """A symbol's short name unless the config gives one: its lower-cased base asset."""
    return symbol.split("_", 1)[0].lower()


def _symbol_entry(entry, path: str) -> Tuple[str, str, str]:
    if isinstance(entry, str):
        return entry, default_name(entry), ""
    if isinstance(entry, dict):
        extra = set(entry) - {"symbol", "name", "book"}
        if extra or not isinstance(entry.get("symbol"), str):
            raise ConfigError(f"{path}: symbols: {entry!r}: expected {{symbol = \"BTC_USDT\", "
                              "name = \"btc\", book = \"full\"}")
        symbol = entry["symbol"]
        name = entry.get("name", default_name(symbol))
        if not isinstance(name, str):
            raise ConfigError(f"{path}: symbols: {symbol}: name must be a string")
        if not isinstance(entry.get("book", ""), str):
            raise ConfigError(f"{path}: symbols: {symbol}: book must be a string")
        return symbol, name, entry.get("book", "")
    raise ConfigError(f"{path}: symbols: {entry!r}: expected a contract name or "
                      "{symbol = ..., name = ...}")


def _check_contracts(s: dict, symbols: List[Symbol], patterns, path: str) -> None:
    ex = s["exchange"]
    if ex["contracts_refresh"] < 1:
        raise ConfigError(f"{path}: exchange.contracts_refresh: must be at least 1 second")
    if ex["contracts_via"] not in CONTRACT_PATHS:
        raise ConfigError(f"{path}: exchange.contracts_via: must be one of "
                          f"{', '.join(CONTRACT_PATHS)}")
    if ex["contracts_via"] == "tor" and not s["tor"]["enabled"]:
        raise ConfigError(f"{path}: exchange.contracts_via: \"tor\" needs tor.enabled = true")
    if ex["contracts_via"] == "tor" and patterns is not None and not symbols:
        raise ConfigError(f"{path}: exchange.contracts_via: \"tor\" reads the contract list "
                          "through a running collector's tor: name at least one contract "
                          'outright in symbols (e.g. "BTC_USDT") besides the patterns')


def _check_values(s: dict, path: str) -> None:
    def bad(key, problem):
        raise ConfigError(f"{path}: {key}: {problem}")

    if not s["exchange"]["url"].startswith(("ws://", "wss://")):
        bad("exchange.url", "must start with ws:// or wss://")
    if not s["exchange"]["rest_url"].startswith(("http://", "https://")):
        bad("exchange.rest_url", "must start with http:// or https://")
    if s["exchange"]["book"] not in BOOKS:
        bad("exchange.book", f"must be one of {BOOKS}")
    if s["exchange"]["book_snapshot_interval"] < 0:
        bad("exchange.book_snapshot_interval", "must be >= 0 (0: only at starts, breaks, hours)")
    if s["exchange"]["depth_limit"] not in DEPTH_LIMITS:
        bad("exchange.depth_limit", f"must be one of {DEPTH_LIMITS}")
    if s["exchange"]["ping_interval"] <= 0 or s["exchange"]["dead_after"] <= s["exchange"]["ping_interval"]:
        bad("exchange.dead_after", "must be greater than exchange.ping_interval (> 0)")
    if s["exchange"]["stale_factor"] != 0 and s["exchange"]["stale_factor"] < 1:
        bad("exchange.stale_factor", "must be 0 (off) or at least 1")
    if s["exchange"]["stale_min"] <= 0:
        bad("exchange.stale_min", "must be > 0")
    if s["exchange"]["rhythm_window"] <= 0:
        bad("exchange.rhythm_window", "must be > 0")
    if s["exchange"]["overlap_max"] <= 0:
        bad("exchange.overlap_max", "must be > 0")
    for key in ("port", "http_port"):
        if not 0 < s["clickhouse"][key] < 65536:
            bad(f"clickhouse.{key}", "must be 1-65535")
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", s["clickhouse"]["database"]):
        bad("clickhouse.database", "must be a plain identifier (letters, digits, _)")
    if s["supervisor"]["start_rate"] <= 0:
        bad("supervisor.start_rate", "must be > 0 (collectors started per second)")
    if s["collector"]["batch_rows"] < 1:
        bad("collector.batch_rows", "must be at least 1")
    if s["collector"]["latency_target"] <= 0:
        bad("collector.latency_target", "must be > 0")
    if s["collector"]["max_buffered_rows"] < 0:
        bad("collector.max_buffered_rows", "must be >= 0")
    for line in s["tor"]["torrc_extra"]:
        if not isinstance(line, str) or "\n" in line:
            bad("tor.torrc_extra", "must be a list of torrc lines (strings)")
    for key in ("socks_port_base", "control_port_base"):
        if not 0 <= s["tor"][key] < 65536 - 1000:
            bad(f"tor.{key}", "must be 0 (pick free ports) or a port number")
    if s["export"]["group"]:
        try:
            grp.getgrnam(s["export"]["group"])
        except KeyError:
            bad("export.group", f"no group named {s['export']['group']!r} on this machine")
    if not 0 <= s["export"]["file_mode"] <= 0o777:
        bad("export.file_mode", "must be a file mode like 0o640")
    if s["export"]["delay"] < 0 or s["export"]["delay"] >= 3600:
        bad("export.delay", "must be 0 to 3599 seconds")
    if s["export"]["clock_speed"] <= 0:
        bad("export.clock_speed", "must be > 0")
    if s["log"]["level"] not in LOG_LEVELS:
        bad("log.level", f"must be one of {', '.join(LOG_LEVELS)}")
    for key in ("state_dir", "runtime_dir"):
        if not s["paths"][key]:
            bad(f"paths.{key}", "must not be empty")
    _check_http(s["http"], bad)
    if s["alerts"]["webhook"] and not s["alerts"]["webhook"].startswith(("http://", "https://")):
        bad("alerts.webhook", "must be an http:// or https:// URL")
    if s["alerts"]["max_per_minute"] < 1:
        bad("alerts.max_per_minute", "must be at least 1")
    _check_cluster(s["cluster"], s["clickhouse"], bad)


def listen_address(listen: str) -> Tuple[str, int]:
    """`127.0.0.1:8470` or `[::1]:8470` -> (host, port); ValueError if it is neither."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_cluster(cluster: dict, clickhouse: dict, bad) -> None:
    if not cluster["host"]:
        return
    if not NAME_RE.match(cluster["host"]):
        bad("cluster.host", "must be 1-40 of a-z 0-9 _ (it names the host's rows and ZooKeeper nodes)")
    if not cluster["zookeeper"]:
        bad("cluster.zookeeper", 'must list the ensemble, e.g. "zk1:2181,zk2:2181,zk3:2181"')
    for node in cluster["zookeeper"].split(","):
        try:
            listen_address(node.strip())
        except ValueError as e:
            bad("cluster.zookeeper", f"{e} (expected HOST:PORT[,HOST:PORT...])")
    port = None
    try:
        _host, port = listen_address(cluster["clickhouse"])
    except ValueError:
        bad("cluster.clickhouse", "must be this host's ClickHouse native address as the other "
                                  'hosts reach it, e.g. "10.0.0.1:9100"')
    if cluster["replicas"] < 1:
        bad("cluster.replicas", "must be at least 1")
    if not re.match(r"^(/[A-Za-z0-9_.-]+)+$", cluster["root"]):
        bad("cluster.root", 'must be a ZooKeeper path like "/mexc"')
    if not 2 <= cluster["session_timeout"] <= 20:
        bad("cluster.session_timeout", "must be 2-20 seconds (failover takes about this long)")
    if cluster["export_wait"] < 0:
        bad("cluster.export_wait", "must be >= 0")
    if cluster["retention_hours"] == 1 or cluster["retention_hours"] < 0:
        bad("cluster.retention_hours", "must be 0 (never prune) or at least 2")
    if clickhouse["managed"] and port is not None and port != clickhouse["port"]:
        bad("cluster.clickhouse", f"must end in :{clickhouse['port']} (clickhouse.port): the "
                                  "managed server listens there for the other hosts too")


def _check_http(http: dict, bad) -> None:
    if not http["listen"]:
        return
    try:
        host, _port = listen_address(http["listen"])
    except ValueError as e:
        bad("http.listen", f"{e} (e.g. \"127.0.0.1:8470\"; empty disables it)")
    if not is_loopback(host) and not http["token"]:
        bad("http.listen", f"{host} is not loopback: set http.token too, or anyone who can "
                           "reach it reads the dashboard")

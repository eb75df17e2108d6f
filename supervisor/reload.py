"""What a reload (SIGHUP, `systemctl reload mexc`) applies to the running daemon, and what waits
for a restart.  The arbiter applies the first; changes() and lines() say both, one log line per
changed section.  Symbols are the arbiter's own business (collectors added and removed).
"""
import dataclasses
from typing import Dict, List, NamedTuple

from core.config import SCHEMA

# How a changed key takes effect.
NOW = "applied"  # by the supervisor, at once
EXPORTER = "applied by restarting the exporter"  # a restarted exporter reads the new config
COLLECTORS = "applies to each collector at its next start (`mexc restart collector-NAME`: " \
             "a gap of about a second)"
RESTART = "needs `systemctl restart mexc`"  # the running daemon keeps the old value meanwhile

# section -> how its keys take effect; exceptions per key in KEYS
SECTIONS = {
    "http": NOW,  # listener rebound, token swapped
    "alerts": NOW,
    "log": NOW,  # the supervisor at once, its children by a log_level event
    "supervisor": NOW,  # heartbeat and restart timing, rotation timeouts
    "exchange": COLLECTORS,
    "collector": COLLECTORS,
    "export": EXPORTER,
    "clickhouse": RESTART,  # the managed server and every connection
    "tor": RESTART,  # every tor's torrc and ports
    "paths": RESTART,  # sockets, lock, spool
    "cluster": RESTART,  # this host's name, ZooKeeper session, replicas: a restart rejoins
}
KEYS = {
    # the hour clock is shared by the supervisor's rotation timing and the monitor
    "export.clock_speed": RESTART,
    "export.clock_anchor_ms": RESTART,
    # the contract list's thread reads them at each try
    "exchange.contracts_refresh": NOW,
    "exchange.contracts_via": NOW,
}
SECRETS = {"http.token", "clickhouse.password"}  # changes named, values never logged
ORDER = (NOW, EXPORTER, COLLECTORS, RESTART)


class Change(NamedTuple):
    section: str
    by_effect: Dict[str, List[str]]  # effect -> ["key=value", ...] as the new config has them


def effect(key: str) -> str:
    return KEYS.get(key, SECTIONS[key.split(".")[0]])


def changes(old, new) -> List[Change]:
    """Every section whose settings differ between two configs, in SCHEMA order."""
    found = []
    for section in SCHEMA:
        before, after = getattr(old, section), getattr(new, section)
        by_effect = {}
        for key in SCHEMA[section]:
            if before[key] != after[key]:
                name = f"{section}.{key}"
                shown = f"{key} changed" if name in SECRETS else f"{key}={after[key]!r}"
                by_effect.setdefault(effect(name), []).append(shown)
        if by_effect:
            found.append(Change(section, by_effect))
    return found


def adopted(old, new):
    """The config the running daemon goes on with: `new`, but every key that needs a restart
    as it was (the managed ClickHouse still listens on the old port, the tors still run)."""
    sections = {}
    for section in SCHEMA:
        values = dict(getattr(new, section))
        for key in values:
            if effect(f"{section}.{key}") == RESTART:
                values[key] = getattr(old, section)[key]
        sections[section] = values
    return dataclasses.replace(new, **sections)


def lines(found: List[Change]) -> List[str]:
    """One line per changed section: what was applied, what waits for what."""
    return [f"reload [{change.section}]: " + "; ".join(
        f"{', '.join(change.by_effect[e])}: {e}" for e in ORDER if e in change.by_effect)
        for change in found]


def touches(found: List[Change], section: str, how: str) -> bool:
    return any(c.section == section and how in c.by_effect for c in found)

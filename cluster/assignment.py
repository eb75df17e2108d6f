"""Which live hosts collect which symbol: pure logic, the same answer on every host.

Every host computes assign() from the same inputs (the symbols of the shared config, the live
hosts as ZooKeeper lists them, replicas), so no leader is needed.  Each symbol goes to
min(replicas, len(hosts)) distinct hosts; per-host counts differ by at most one; each symbol
prefers its hosts in rendezvous (highest-random-weight) order, so a host coming or going moves
few symbols.

A host releases a symbol it is no longer assigned only once the symbol's assigned hosts
(other than itself) report it live (releases()): a rebalance makes a copy before it breaks
one, and never leaves a symbol with fewer live copies than before.
"""
import hashlib
from typing import Dict, Iterable, Mapping, Sequence, Set, Tuple


def _weight(name: str, host: str) -> int:
    """The rendezvous weight of a host for a symbol: stable across hosts and Python runs."""
    return int.from_bytes(hashlib.sha256(f"{name}\0{host}".encode()).digest()[:8], "big")


def copies(n_hosts: int, replicas: int) -> int:
    """How many hosts collect each symbol."""
    return min(replicas, n_hosts)


def _capacities(n_names: int, hosts: Sequence[str], r: int) -> Dict[str, int]:
    """Symbols per host: n*r spread so that counts differ by at most one; which hosts carry
    the one extra is decided by a hash of their names (stable while they stay)."""
    base, extra = divmod(n_names * r, len(hosts))
    ranked = sorted(hosts, key=lambda h: (_weight("", h), h), reverse=True)
    return {h: base + (1 if i < extra else 0) for i, h in enumerate(ranked)}


def assign(names: Iterable[str], hosts: Iterable[str], replicas: int
           ) -> Dict[str, Tuple[str, ...]]:
    """{name: its hosts, in preference order}.  Deterministic from the inputs alone.

    Symbols are placed in name order, each on its highest-weight hosts with room left.  A host
    whose room equals the symbols still to place must take every one of them (else some
    symbol would find fewer than r hosts with room at the end); taking those first keeps every
    later symbol placeable, since no host's room then exceeds the symbols left."""
    names, hosts = sorted(set(names)), sorted(set(hosts))
    if not hosts:
        return {name: () for name in names}
    r = copies(len(hosts), replicas)
    room = _capacities(len(names), hosts, r)
    result = {}
    for i, name in enumerate(names):
        left = len(names) - i  # symbols still to place, this one included
        order = sorted(hosts, key=lambda h: (_weight(name, h), h), reverse=True)
        forced = [h for h in order if room[h] == left]
        chosen = forced + [h for h in order if room[h] > 0 and h not in forced][:r - len(forced)]
        for h in chosen:
            room[h] -= 1
        result[name] = tuple(sorted(chosen, key=order.index))
    return {name: result[name] for name in names}


def releases(me: str, assigned: Sequence[str], live: Set[str]) -> bool:
    """May `me` stop a symbol it runs but is no longer assigned?  Only once at least as many
    of its assigned hosts, other than `me`, report it live as it is assigned to."""
    others = [h for h in assigned if h != me]
    return len(assigned) > 0 and sum(1 for h in others if h in live) >= len(assigned)


def wanted(me: str, assignment: Mapping[str, Sequence[str]], running: Set[str],
           live: Mapping[str, Set[str]]) -> Set[str]:
    """The symbols `me` should run now: those assigned to it, and those it runs that it may
    not release yet (see releases())."""
    mine = {name for name, hosts in assignment.items() if me in hosts}
    kept = {name for name in running - mine if name in assignment
            and not releases(me, assignment[name], live.get(name, set()))}
    return mine | kept

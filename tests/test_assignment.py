"""cluster/assignment.py: balance, determinism, replica count, few moves, the release rule."""
from collections import Counter

from hypothesis import given, settings, strategies as st

from cluster.assignment import assign, releases, wanted

NAMES = st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=0, max_size=60,
                 unique=True)
HOSTS = st.lists(st.from_regex(r"h[a-z0-9]{0,4}", fullmatch=True), min_size=1, max_size=9,
                 unique=True)
REPLICAS = st.integers(1, 5)


@settings(max_examples=80, deadline=None)
@given(NAMES, HOSTS, REPLICAS)
def test_each_symbol_on_min_replicas_hosts_distinct_and_spread_evenly(names, hosts, replicas):
    result = assign(names, hosts, replicas)
    assert set(result) == set(names)
    for chosen in result.values():
        assert len(chosen) == min(replicas, len(hosts)) == len(set(chosen))
        assert set(chosen) <= set(hosts)
    counts = Counter(h for chosen in result.values() for h in chosen)
    per_host = [counts[h] for h in hosts]
    assert max(per_host) - min(per_host) <= 1


@settings(max_examples=50, deadline=None)
@given(NAMES, HOSTS, REPLICAS, st.randoms())
def test_the_answer_depends_on_the_inputs_alone_not_their_order(names, hosts, replicas, rnd):
    shuffled_names, shuffled_hosts = list(names), list(hosts)
    rnd.shuffle(shuffled_names)
    rnd.shuffle(shuffled_hosts)
    assert assign(shuffled_names, shuffled_hosts, replicas) == assign(names, hosts, replicas)


def test_one_host_leaving_moves_few_symbols():
    """60 symbols, 2 copies on 6 hosts (20 each): when h6 goes, its 20 copies must move;
    measured: the other hosts' copies that move besides them stay a handful."""
    names = [f"s{i}" for i in range(60)]
    hosts = [f"h{i}" for i in range(1, 7)]
    before, after = assign(names, hosts, 2), assign(names, hosts[:-1], 2)
    kept = sum(len(set(before[n]) & set(after[n])) for n in names)
    lost_with_h6 = sum(1 for n in names if "h6" in before[n])
    moved_besides = 120 - lost_with_h6 - kept
    print(f"h6 gone: {lost_with_h6} copies had to move, {moved_besides} others moved")
    assert moved_besides <= 12  # of 100 copies on the hosts that stayed


def test_no_hosts_no_copies_and_one_host_takes_everything():
    assert assign(["btc", "eth"], [], 2) == {"btc": (), "eth": ()}
    assert assign(["btc", "eth"], ["solo"], 2) == {"btc": ("solo",), "eth": ("solo",)}


def test_a_symbol_is_released_only_once_its_assigned_hosts_report_it_live():
    assigned = ("h2", "h3")
    assert not releases("h1", assigned, set())
    assert not releases("h1", assigned, {"h1", "h2"})  # h3's copy is not live yet
    assert releases("h1", assigned, {"h1", "h2", "h3"})
    assert releases("h1", ("h2",), {"h2"})  # one host left: one copy wanted


@settings(max_examples=80, deadline=None)
@given(NAMES, HOSTS, st.integers(1, 3), st.data())
def test_a_rebalance_never_leaves_a_symbol_with_fewer_live_copies(names, hosts, replicas, data):
    """A host returns (or any change of membership): each host runs what wanted() says, given
    which copies are live; whatever of the new copies are live already, no symbol has fewer
    live copies than before."""
    before_hosts = data.draw(st.lists(st.sampled_from(hosts), unique=True, min_size=1))
    before = assign(names, before_hosts, replicas)
    after = assign(names, hosts, replicas)
    running = {h: {n for n in names if h in before[n]} for h in hosts}
    # which copies are live now: every old one, and any subset of the new ones
    live = {n: set(before[n]) | {h for h in after[n]
                                 if data.draw(st.booleans(), label=f"{h} live on {n}")}
            for n in names}
    runs_next = {h: wanted(h, after, running[h], live) for h in hosts}
    for n in names:
        still_live = {h for h in live[n] if n in runs_next[h]}
        assert len(still_live) >= len(before[n])

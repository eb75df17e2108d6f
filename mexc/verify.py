"""`mexc verif` (data collection), `mexc iptest` (IP separation) and `mexc verify`
(everything: IP separation, collection, export integrity), as the old ./verif, ./iptest and
./verify scripts did, from ClickHouse, the files and the running daemon.
Each check returns (ok, lines)."""
import json
import os
import time

from bus.sockets import NotRunning
from core import archive
from core.clock import HOUR_MS
from core.log import first_line
from core.store import current_table
from core.vocabulary import (BOOK_SNAPSHOT, BOOK_UPDATE, COLLECTOR, DEAD_LETTER, DEAL, DEPTH,
                             GAP_BOOK_RESYNC, TICKER)
from exporter import parquet_files
from exporter.cluster_archive import CLUSTER_KEY
from mexc import fullbook
from supervisor import commands

RECENT_S = 300  # a symbol with no row received in this many seconds has "no recent data"


def server(config, store):
    """`clickhouse 127.0.0.1:9100: ClickHouse 26.9.2.1, time columns DateTime64(3, 'UTC'),
    ...`: what the checks below ran against."""
    ch = config.clickhouse
    return True, [f"clickhouse {ch['host']}:{ch['port']}: {store.features.describe()}"]


def collection(config, store, unreachable=None):
    """`btc_current: 4,128 records (t: 128, d: 2,890, dp: 1,110)` per symbol.  In a cluster,
    "no recent data" is judged on each host that holds the symbol now (its cluster_holdings),
    through remote() for the others; hosts that do not answer go into `unreachable`."""
    unreachable = {} if unreachable is None else unreachable
    held = _holders(config, store, unreachable) if config.clustered else None
    ok, lines = True, []
    now_ms = int(time.time() * 1000)
    for symbol in config.symbols:
        table = current_table(symbol.name)
        try:
            counts = store.rows_by_type(table)
            newest = store.newest_receive_ms(table)
        except Exception as e:
            ok = False
            lines.append(f"❌ {table}: {first_line(e)}")
            continue
        by_type = ", ".join(f"{mt}: {counts.get(mt, 0):,}" for mt in (TICKER, DEAL, DEPTH)) + \
            "".join(f", {mt}: {counts[mt]:,}" for mt in (DEAD_LETTER, BOOK_UPDATE, BOOK_SNAPSHOT)
                    if counts.get(mt))
        line = f"{table}: {sum(counts.values()):,} records ({by_type})"
        if held is None:
            if not counts or now_ms - newest > RECENT_S * 1000:
                ok = False
                line = f"❌ {line}: no data in the last {RECENT_S // 60} minutes"
            lines.append(line)
            continue
        holders = sorted(h for h, (names, _source) in held.items() if symbol.name in names)
        if config.cluster["host"] not in holders:
            line += f": not held here (held by {', '.join(holders) or 'no host that answered'})"
        lines.append(line)
        for host in holders:
            source = held[host][1]
            with store.asking(host, unreachable):
                newest = store.newest_receive_ms(table, source) if source else newest
            if host in unreachable:
                continue
            if now_ms - newest > RECENT_S * 1000:
                ok = False
                lines.append(f"❌ {table} on {host}, which holds it: no data in the last "
                             f"{RECENT_S // 60} minutes")
        if not holders and not unreachable:
            ok = False
            lines.append(f"❌ {symbol.name}: held by no host (cluster_holdings)")
    return ok, lines


def _holders(config, store, unreachable: dict) -> dict:
    """{host: (the symbols it holds now, its ClickHouse; None here)} of the cluster's hosts
    that answer; the others into `unreachable`."""
    from cluster.exports import cluster_hosts

    sources, problem = cluster_hosts(config.cluster)
    unreachable.update(problem)
    held = {}
    for host, source in sorted(sources.items()):
        with store.asking(host, unreachable, required=source is None):
            held[host] = (set(store.held_before(host, source=source)), source)
    return held


def exports(config, store):
    """Every logged file readable, its rows and sha256 as logged, rows inside its hour; per
    hour the gaps of the ledger and its completeness; an hour without a file between a
    symbol's first and last export is a failure unless the ledger shows no live data in it.

    Completeness is recomputed from the ledger, not read from the file: a gap is recorded
    when data is back, which can be after its hour was exported, and the ledger is the one
    place every record lands.  A file whose metadata says otherwise is reported as stale
    (its data is right; its metadata was written before the record)."""
    ok, lines = True, []
    for symbol in config.symbols:
        logged = store.logged_exports(symbol.symbol)
        if not logged:
            lines.append(f"{symbol.name}: no exports yet")
            continue
        problems, notes = [], []
        for hour, path, rows, digest in logged:
            try:
                parquet_files.verify(path, rows, hour)
                if parquet_files.sha256(path) != digest:
                    problems.append(f"{os.path.basename(path)}: sha256 differs from export_log")
                notes += (_merged_hour_gaps(path) if config.clustered
                          else _hour_gaps(store, symbol.name, hour, path))
                if config.book(symbol) != "top":
                    book_ok, line = _hour_book(store, symbol.name, hour, path)
                    (notes if book_ok else problems).append(line)
            except Exception as e:
                problems.append(f"{os.path.basename(path)}: {e}")
        hours = [h for h, *_ in logged]
        for hour in sorted(set(range(hours[0], hours[-1] + 1, HOUR_MS)) - set(hours)):
            gaps = store.gaps(symbol.name, hour, hour + HOUR_MS)
            what = f"hour {archive.file_name(symbol.name, hour)} missing"
            if gaps and float(parquet_files.completeness(gaps, hour)) == 0:
                notes.append(f"{what}: no live data in it ({_describe(gaps)})")
            else:
                problems.append(what + (f" ({_describe(gaps)})" if gaps else ""))
        if problems:
            ok = False
            lines += [f"❌ {symbol.name}: {p}" for p in problems]
        else:
            lines.append(f"{symbol.name}: {len(logged)} files verified, "
                         f"{sum(r for _h, _p, r, _d in logged):,} rows, "
                         f"{archive.file_name(symbol.name, hours[0])} .. "
                         f"{archive.file_name(symbol.name, hours[-1])}")
        lines += [f"   {symbol.name}: {note}" for note in notes]
    return ok, lines


def cluster_copies(config, store, unreachable=None):
    """In a cluster: each hour this host logged is the merged file ZooKeeper names, and every
    host holding it logged the same sha256 (read from its export_log through remote()); a
    holder that does not answer goes into `unreachable`, not among the problems."""
    if not config.clustered:
        return True, []
    from cluster.exports import HourNodes, hour_label

    unreachable = {} if unreachable is None else unreachable
    nodes = HourNodes(config.cluster)
    try:
        nodes.start(timeout=10.0)
    except Exception as e:
        return False, [f"❌ cluster: ZooKeeper {config.cluster['zookeeper']}: {first_line(e)}"]
    ok, lines = True, []
    try:
        for symbol in config.symbols:
            problems, holders = [], set()
            logged = store.logged_exports(symbol.symbol)
            for hour, _path, _rows, digest in logged:
                label = f"{symbol.name} {hour_label(hour)}"
                merged, _version = nodes.merged(symbol.name, hour)
                if merged is None:
                    problems.append(f"{label}: no merged file in ZooKeeper")
                    continue
                if merged["sha256"] != digest:
                    problems.append(f"{label}: this host has {digest[:12]}, the merged file is "
                                    f"{merged['sha256'][:12]} (not pulled yet?)")
                for host, source in sorted(merged["holders"].items()):
                    if host in unreachable:
                        continue
                    with store.asking(host, unreachable):
                        theirs = digest if host == config.cluster["host"] else \
                            store.logged_sha256(symbol.symbol, hour, source)
                    if host in unreachable:
                        continue
                    holders.add(host)
                    if theirs != merged["sha256"]:
                        problems.append(f"{label}: {host} ({source}) logged "
                                        f"{(theirs or 'nothing')[:12]}, not "
                                        f"{merged['sha256'][:12]}")
            if problems:
                ok = False
                lines += [f"❌ {symbol.name}: {p}" for p in problems]
            elif logged:
                lines.append(f"{symbol.name}: {len(logged)} merged hours, the same sha256 on "
                             f"{', '.join(sorted(holders))}")
    finally:
        nodes.stop()
    return ok, lines


def _merged_hour_gaps(path: str) -> list:
    """A cluster's merged file: the gaps no host covered (its metadata: the hosts' ledgers
    when it was merged) and each host's hole that another covered."""
    metadata = parquet_files.metadata(path)
    gaps = archive.gaps_from_json(metadata.get(archive.GAPS_KEY, b"[]"))
    holes = json.loads(metadata.get(CLUSTER_KEY, b"{}") or b"{}").get("holes", [])
    lines = [f"{os.path.basename(path)}: completeness "
             f"{metadata.get(parquet_files.COMPLETENESS_KEY, b'?').decode()}, {_describe(gaps)}"
             f" no host covered"] if gaps else []
    lines += [f"{os.path.basename(path)}: {hole['host']} {hole['reason']} "
              f"{(hole['end_ms'] - hole['start_ms']) / 1000:.3f} s covered by "
              f"{', '.join(hole['covered_by'])}" for hole in holes if hole["covered_by"]]
    return lines


def _hour_gaps(store, name: str, hour: int, path: str) -> list:
    """One line for an hour with gaps: its completeness and gaps, and whether the file's
    metadata still says what the ledger says."""
    gaps = store.gaps(name, hour, hour + HOUR_MS)
    if not gaps:
        return []
    completeness = parquet_files.completeness(gaps, hour)
    written = parquet_files.metadata(path).get(parquet_files.COMPLETENESS_KEY, b"").decode()
    stale = "" if written == completeness else \
        f"; the file says {written or 'nothing'} (written before a gap was recorded)"
    return [f"{os.path.basename(path)}: completeness {completeness}, {_describe(gaps)}{stale}"]


def _hour_book(store, name: str, hour: int, path: str):
    """(ok, line): the hour's increments replayed from its first snapshot equal every later
    snapshot where no resync intervenes; the resyncs the ledger has in the hour."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["ts", "mt", "m"])
    mt = table.column("mt").cast("string")
    rows = {}
    for kind in (BOOK_SNAPSHOT, BOOK_UPDATE):
        part = table.filter(pc.equal(mt, kind))
        rows[kind] = (part.column("ts").cast("int64").to_pylist(), part.column("m").to_pylist())
    check = fullbook.check_hour(fullbook.snapshots(*rows[BOOK_SNAPSHOT]),
                                fullbook.updates(*rows[BOOK_UPDATE]))
    resyncs = sum(1 for g in store.gaps(name, hour, hour + HOUR_MS)
                  if g.reason == GAP_BOOK_RESYNC and hour <= g.end_ms < hour + HOUR_MS)
    line = (f"{os.path.basename(path)}: book: {check.snapshots} snapshots, {check.checked} "
            f"checked against the replay, {check.differ} differ, {check.unchecked} after a "
            f"break, {resyncs} resyncs")
    return check.differ == 0 and (check.snapshots > 0 or not rows[BOOK_UPDATE][0]), line


def _describe(gaps) -> str:
    seconds = sum(g.end_ms - g.start_ms for g in gaps) / 1000
    reasons = ", ".join(sorted({g.reason for g in gaps}))
    return (f"{len(gaps)} gaps ({reasons}), {seconds:.3f} s, "
            f"{sum(g.backfilled for g in gaps)} trades backfilled, "
            f"{sum(1 for g in gaps if not g.covered)} not covered")


def ip_separation(config):
    """From the running daemon's knowledge of each collector's exit."""
    if not config.tor["enabled"]:
        return True, ["IP separation: Tor is off (tor.enabled = false); every collector uses "
                      "this machine's address"]
    try:
        return exits_apart(commands.ask(config.paths["runtime_dir"], "status"))
    except NotRunning as e:
        return False, [f"IP separation: cannot check, mexc is not running ({e})"]


def exits_apart(status: dict):
    """The old ./iptest block from a status answer -> (ok, lines)."""
    collectors = [c for c in status["children"] if c["kind"] == COLLECTOR]
    lines = ["IP SEPARATION VERIFICATION", "=" * 26]
    for c in collectors:
        lines.append(f"{c['name']:<16} {c['symbol']:<14} exit IP: {c['exit_ip'] or 'unknown'}")
    ips = [c["exit_ip"] for c in collectors]
    unique = len(set(ip for ip in ips if ip))
    if ips and all(ips) and unique == len(ips):
        lines.append(f"✅ IP Separation Success: {unique} unique IPs detected")
        return True, lines
    unknown = sum(1 for ip in ips if not ip)
    lines.append(f"❌ IP Separation Failure: {unique} unique IPs for {len(ips)} collectors"
                 + (f" ({unknown} not known yet)" if unknown else ""))
    return False, lines

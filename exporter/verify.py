"""`mexc verif` (data collection) and `mexc verify` (everything: IP separation, collection,
export integrity), as the old ./verif and ./verify scripts did, from ClickHouse and the files.
Each check returns (ok, lines)."""
import os
import time

from exporter import parquet_files
from exporter.parquet_files import HOUR_MS
from mexc import schema

RECENT_S = 300  # a symbol with no row received in this many seconds has "no recent data"


def collection(config, client):
    """`btc_current: 4,128 records (t: 128, d: 2,890, dp: 1,110)` per symbol."""
    ok, lines = True, []
    db = schema.quote(config.clickhouse["database"])
    features = schema.detect(client, config.clickhouse["database"])
    now_ms = int(time.time() * 1000)
    for symbol in config.symbols:
        table = schema.current_table(symbol.name)
        try:
            counts = dict(client.execute(f"SELECT toString(mt), count() FROM {db}.{schema.quote(table)} "
                                         f"GROUP BY mt"))
            newest = client.execute(f"SELECT max({features.ts_ms('rts')}) FROM "
                                    f"{db}.{schema.quote(table)}")[0][0]
        except Exception as e:
            ok = False
            lines.append(f"❌ {table}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        by_type = ", ".join(f"{mt}: {counts.get(mt, 0):,}" for mt in ("t", "d", "dp")) + \
            (f", dl: {counts['dl']:,}" if counts.get("dl") else "")
        line = f"{table}: {sum(counts.values()):,} records ({by_type})"
        if not counts or now_ms - newest > RECENT_S * 1000:
            ok = False
            line = f"❌ {line}: no data in the last {RECENT_S // 60} minutes"
        lines.append(line)
    return ok, lines


def exports(config, client):
    """Every logged file readable, its rows and sha256 as logged, rows inside its hour, and no
    hour missing between a symbol's first and last export."""
    ok, lines = True, []
    db = schema.quote(config.clickhouse["database"])
    features = schema.detect(client, config.clickhouse["database"])
    for symbol in config.symbols:
        logged = client.execute(
            f"SELECT {features.ts_ms('hour_start')}, argMax(filepath, export_time), "
            f"argMax(row_count, export_time), argMax(sha256, export_time) FROM {db}.export_log "
            f"WHERE symbol = %(symbol)s GROUP BY hour_start ORDER BY hour_start",
            {"symbol": symbol.symbol})
        if not logged:
            lines.append(f"{symbol.name}: no exports yet")
            continue
        problems = []
        for hour, path, rows, digest in logged:
            try:
                parquet_files.verify(path, rows, hour)
                if parquet_files.sha256(path) != digest:
                    problems.append(f"{os.path.basename(path)}: sha256 differs from export_log")
            except Exception as e:
                problems.append(f"{os.path.basename(path)}: {e}")
        hours = [h for h, *_ in logged]
        missing = sorted(set(range(hours[0], hours[-1] + 1, HOUR_MS)) - set(hours))
        problems += [f"hour {parquet_files.file_name(symbol.name, h)} missing" for h in missing]
        if problems:
            ok = False
            lines += [f"❌ {symbol.name}: {p}" for p in problems]
        else:
            lines.append(f"{symbol.name}: {len(logged)} files verified, "
                         f"{sum(r for _h, _p, r, _d in logged):,} rows, "
                         f"{parquet_files.file_name(symbol.name, hours[0])} .. "
                         f"{parquet_files.file_name(symbol.name, hours[-1])}")
    return ok, lines


def ip_separation(config):
    """From the running daemon's knowledge of each collector's exit."""
    from bus.sockets import NotRunning
    from mexc import status

    if not config.tor["enabled"]:
        return True, ["IP separation: Tor is off (tor.enabled = false); every collector uses "
                      "this machine's address"]
    try:
        return status.ip_separation(status.fetch(config.paths["runtime_dir"]))
    except NotRunning as e:
        return False, [f"IP separation: cannot check, mexc is not running ({e})"]

"""`mexc status` / `mexc-status`: ask the running supervisor and show its answer."""
import json

from bus import sockets

COLUMNS = [  # header, width, how to show a child entry
    ("NAME", 16, lambda c: c["name"]),
    ("PID", 8, lambda c: c["pid"] or "-"),
    ("STATE", 10, lambda c: _state(c)),
    ("UPTIME", 8, lambda c: _duration(c["uptime_s"])),
    ("RESTARTS", 8, lambda c: c["restarts"]),
    ("MSGS/S t/d/dp/dl", 20, lambda c: _rates(c["msgs_per_s"])),
    ("WRITTEN", 10, lambda c: _number(c["rows_written"])),
    ("HELD/SPOOL", 12, lambda c: f"{_number(c['buffered_rows'])}/{_number(c['spooled_rows'])}"),
    ("LAST MSG", 8, lambda c: _age(c["last_message_age_s"])),
    ("EXIT IP", 15, lambda c: c["exit_ip"] or "-"),
    ("RSS", 7, lambda c: _mib(c["rss_bytes"])),
    ("CPU%", 5, lambda c: "-" if c["cpu_percent"] is None else c["cpu_percent"]),
]


def fetch(runtime_dir: str, timeout: float = 3.0) -> dict:
    reply = sockets.request(runtime_dir, "status", timeout=timeout)
    return reply["result"]


def render(status: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(status, indent=2, sort_keys=True)
    return "\n".join([_header(status["supervisor"]), _row([h for h, _w, _f in COLUMNS])]
                     + [_row([show(child) for _h, _w, show in COLUMNS])
                        for child in status["children"]]
                     + _notes(status["children"]))


def _header(sup: dict) -> str:
    ch = sup["clickhouse"]
    clickhouse = (f"clickhouse {ch['host']}:{ch['port']} "
                  f"{'reachable' if ch['reachable'] else 'NOT REACHABLE'}"
                  f"{' (managed)' if ch['managed'] else ''}")
    rotation = f", rotation {sup['rotation']['id']} {sup['rotation']['phase']}" \
        if sup.get("rotation") else ""
    export = sup.get("export") or {}
    last_export = sup.get("last_export") or "never"
    next_rotation = f" (next {export['next_rotation']})" if export.get("next_rotation") else ""
    failing = f", EXPORT FAILING: {export['last_error']}" if export.get("last_error") else ""
    return (f"mexc {sup['version']}  supervisor pid {sup['pid']}  up {_duration(sup['uptime_s'])}"
            f"  {clickhouse}  last export: {last_export}{next_rotation}{rotation}{failing}")


def _notes(children) -> list:
    notes = []
    for child in children:
        if child["state"] == "backoff":
            notes.append(f"  {child['name']}: {child['last_exit']}; next start in "
                         f"{child['next_start_in_s']}s")
        elif child.get("connected") is False and child["kind"] == "collector":
            notes.append(f"  {child['name']}: not connected to the exchange")
        if child.get("held"):
            notes.append(f"  {child['name']}: * holding rows for rotation {child['held']}")
        if (child.get("tor") or {}).get("warning") and child["kind"] == "collector":
            notes.append(f"  {child['name']}: * {child['tor']['warning']}")
    return notes


def _row(cells) -> str:
    return " ".join(str(cell).ljust(width)[:width] if i < len(COLUMNS) - 1 else str(cell)
                    for i, (cell, (_h, width, _f)) in enumerate(zip(cells, COLUMNS))).rstrip()


def _state(child: dict) -> str:
    tor = child.get("tor") or {}
    if child["kind"] == "tor" and child["state"] == "running" and not tor.get("bootstrapped"):
        return f"boot {tor.get('bootstrap_progress', 0)}%"
    return child["state"] + ("*" if child.get("held") or tor.get("warning") else "")


def ip_separation(status: dict):
    """The old ./iptest block from a status answer -> (ok, lines)."""
    collectors = [c for c in status["children"] if c["kind"] == "collector"]
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


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds < 86400 else \
        f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _rates(rates: dict) -> str:
    if not rates:
        return "-"
    return "/".join(f"{rates.get(mt, 0):.0f}" for mt in ("t", "d", "dp", "dl"))


def _number(value) -> str:
    return "-" if value is None else f"{value:,}"


def _age(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 1048576:.0f}M"


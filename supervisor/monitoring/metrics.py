"""/metrics: the monitor's last status and ledger in the Prometheus text format.

Written with prometheus_client (its text format and escaping, kept by the Prometheus
project): one metric family per figure, built anew from a snapshot at each scrape, so the
numbers are exactly those of `mexc status --json`.  Counters are the children's own (a
restarted collector starts again at 0; Prometheus' rate() handles such resets).  No secret
is ever a label or a value here.

In a cluster the series above stay as they are, this host's own (Prometheus' `instance` tells
the hosts' scrapes apart, and the shipped alert rules keep working), and the cluster-wide
series, the same on every host, gain a `host` label: mexc_cluster_host_up,
mexc_cluster_live_symbols, mexc_receive_lag_seconds{host,symbol}; mexc_cluster_this_host
names the host that serves the page.
"""
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from core import __version__
from core.clock import HOUR_MS, from_iso
from core.vocabulary import DEAD_LETTER, MESSAGE_TYPES, TOR
from supervisor.monitoring.monitor import collectors

CONTENT_TYPE = CONTENT_TYPE_LATEST

# name (without _total), help, the collector entry's key; labelled by symbol
COLLECTOR_COUNTERS = [
    ("mexc_frames_received", "WebSocket frames received", "frames"),
    ("mexc_rows_written", "rows stored in ClickHouse", "rows_written"),
    ("mexc_reconnects", "connections to the exchange lost and dialled again", "reconnects"),
    ("mexc_handovers", "connections replaced without a break (make before break)",
     "handovers"),
    ("mexc_insert_errors", "ClickHouse inserts that failed (rows kept, retried)",
     "insert_errors"),
    ("mexc_frame_errors", "frames that could not be parsed (stored as dead letters)", "errors"),
]
COLLECTOR_GAUGES = [
    ("mexc_rows_buffered", "rows held in the collector's memory, not yet stored",
     "buffered_rows"),
    ("mexc_rows_spooled", "rows in the collector's spool file, not yet stored", "spooled_rows"),
    ("mexc_last_message_age_seconds", "seconds since the last frame from the exchange",
     "last_message_age_s"),
]


def render(monitor) -> bytes:
    """The text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(*monitor.view(), symbols=monitor.config.symbols))
    return generate_latest(registry)


class _Snapshot:
    """A prometheus_client collector over one (status, ledger, disks)."""

    def __init__(self, status, ledger, disks, symbols=()):
        self.status, self.ledger, self.disks = status, ledger, disks
        self.symbols = symbols  # the config's: a cluster's lag is by short name

    def collect(self):
        yield _gauge("mexc_build_info", "mexc's version", {"version": __version__}, 1)
        if self.status is None:  # the daemon has not answered yet
            return
        yield from self._supervisor(self.status["supervisor"])
        yield from self._collectors(collectors(self.status))
        yield from self._children(self.status["children"])
        yield from self._tor([c for c in self.status["children"] if c["kind"] == TOR])
        yield from self._export(self.status["supervisor"].get("export") or {})
        yield from self._gaps(self.ledger.gaps)
        yield from self._disks(self.disks)
        if self.status.get("cluster"):
            yield from self._cluster(self.status["cluster"])

    def _supervisor(self, sup):
        yield _gauge("mexc_supervisor_uptime_seconds", "seconds since mexc run started", {},
                     sup["uptime_s"])
        yield _gauge("mexc_supervisor_resident_memory_bytes", "the supervisor's RSS", {},
                     sup["rss_bytes"])
        yield _gauge("mexc_clickhouse_up", "1 when ClickHouse answers a query", {},
                     int(sup["clickhouse"]["reachable"]))
        contracts = self.status.get("contracts")
        if contracts:
            yield _gauge("mexc_contract_list_up", "1 when MEXC's contract list loaded at the "
                         "last try (patterns in symbols)", {}, int(not contracts["failures"]))
        if self.ledger.version:
            yield _gauge("mexc_clickhouse_info", "the ClickHouse server's version",
                         {"version": self.ledger.version}, 1)

    def _collectors(self, entries):
        for name, help_text, key in COLLECTOR_COUNTERS:
            yield _per_symbol(CounterMetricFamily, name, help_text, entries, key)
        for name, help_text, key in COLLECTOR_GAUGES:
            yield _per_symbol(GaugeMetricFamily, name, help_text, entries, key)
        received = CounterMetricFamily("mexc_rows_received", "rows parsed from frames, by "
                                       "message type (t, d, dp, dl)", labels=["symbol", "type"])
        rates = GaugeMetricFamily("mexc_messages_per_second", "rows received per second over "
                                  "the last heartbeat", labels=["symbol", "type"])
        dead = CounterMetricFamily("mexc_dead_letters", "frames stored as dead letters (dl)",
                                   labels=["symbol"])
        connected = GaugeMetricFamily("mexc_connected", "1 while subscribed to the exchange",
                                      labels=["symbol"])
        holding = GaugeMetricFamily("mexc_rotation_holding", "1 while the collector holds "
                                    "its rows for a table rotation", labels=["symbol"])
        for c in entries:
            for mt in MESSAGE_TYPES:
                if c["rows"] is not None:
                    received.add_metric([c["symbol"], mt], c["rows"].get(mt, 0))
                if c["msgs_per_s"]:
                    rates.add_metric([c["symbol"], mt], c["msgs_per_s"].get(mt, 0))
            if c["rows"] is not None:
                dead.add_metric([c["symbol"]], c["rows"].get(DEAD_LETTER, 0))
            if c["connected"] is not None:
                connected.add_metric([c["symbol"]], int(c["connected"]))
            holding.add_metric([c["symbol"]], int(bool(c["held"])))
        yield from (received, rates, dead, connected, holding)

    def _children(self, entries):
        up = GaugeMetricFamily("mexc_child_up", "1 while the child runs", labels=["child"])
        state = GaugeMetricFamily("mexc_child_state", "1 for the child's state", labels=[
            "child", "state"])
        restarts = CounterMetricFamily("mexc_child_restarts", "restarts of the child",
                                       labels=["child"])
        flapping = GaugeMetricFamily("mexc_child_flapping", "1 while the child keeps exiting "
                                     "(5 exits within 60 s)", labels=["child"])
        uptime = GaugeMetricFamily("mexc_child_uptime_seconds", "seconds since it started",
                                   labels=["child"])
        rss = GaugeMetricFamily("mexc_child_resident_memory_bytes", "its RSS", labels=["child"])
        cpu = GaugeMetricFamily("mexc_child_cpu_ratio", "its CPU use since the last status "
                                "(1 = one core)", labels=["child"])
        for c in entries:
            label = [c["name"]]
            up.add_metric(label, int(c["state"] == "running"))
            state.add_metric(label + [c["state"]], 1)
            restarts.add_metric(label, c["restarts"])
            flapping.add_metric(label, int(c["flapping"]))
            for family, value in ((uptime, c["uptime_s"]), (rss, c["rss_bytes"]),
                                  (cpu, None if c["cpu_percent"] is None
                                   else c["cpu_percent"] / 100)):
                if value is not None:
                    family.add_metric(label, value)
        yield from (up, state, restarts, flapping, uptime, rss, cpu)

    def _tor(self, entries):
        bootstrapped = GaugeMetricFamily("mexc_tor_bootstrapped", "1 once the symbol's tor "
                                         "has bootstrapped", labels=["symbol"])
        separated = GaugeMetricFamily("mexc_tor_exit_separated", "1 while the symbol's exit IP "
                                      "is known and no other collector shares it",
                                      labels=["symbol"])
        for c in entries:
            tor = c.get("tor") or {}
            bootstrapped.add_metric([c["symbol"]], int(bool(tor.get("bootstrapped"))))
            separated.add_metric([c["symbol"]], int(bool(c["exit_ip"]) and not tor.get("warning")))
        yield from (bootstrapped, separated)

    def _export(self, export):
        last_hour = GaugeMetricFamily("mexc_export_last_hour_timestamp_seconds", "start of the "
                                      "last hour exported to Parquet", labels=["symbol"])
        for symbol, until in (export.get("exported_until") or {}).items():
            last_hour.add_metric([symbol], from_iso(until) / 1000 - HOUR_MS / 1000)
        files = CounterMetricFamily("mexc_export_files", "Parquet files written",
                                    labels=["symbol"])
        for symbol, n in (export.get("files_by_symbol") or {}).items():
            files.add_metric([symbol], n)
        yield from (last_hour, files)
        yield _counter("mexc_export_failures", "export cycles' failed steps",
                       export.get("errors", 0))
        yield _gauge("mexc_export_failing", "1 when the last export cycle failed", {},
                     int(bool(export.get("last_error"))))
        if export.get("cycle_s") is not None:
            yield _gauge("mexc_export_duration_seconds", "how long the last export cycle took",
                         {}, export["cycle_s"])

    def _gaps(self, gaps):
        total = CounterMetricFamily("mexc_gaps", "stretches without a live subscription "
                                    "(the gap ledger)", labels=["symbol", "reason"])
        uncovered = GaugeMetricFamily("mexc_gaps_uncovered", "gaps the REST backfill did not "
                                      "cover (trades may be missing)", labels=["symbol"])
        backfilled = CounterMetricFamily("mexc_backfilled_trades", "trades stored by backfill",
                                         labels=["symbol"])
        counts, open_gaps, trades = {}, {}, {}
        for gap in gaps:
            counts[(gap.symbol, gap.reason)] = counts.get((gap.symbol, gap.reason), 0) + 1
            open_gaps[gap.symbol] = open_gaps.get(gap.symbol, 0) + (not gap.covered)
            trades[gap.symbol] = trades.get(gap.symbol, 0) + gap.backfilled
        for labels, n in counts.items():
            total.add_metric(list(labels), n)
        for symbol in open_gaps:
            uncovered.add_metric([symbol], open_gaps[symbol])
            backfilled.add_metric([symbol], trades[symbol])
        yield from (total, uncovered, backfilled)

    def _disks(self, disks):
        free = GaugeMetricFamily("mexc_disk_free_bytes", "free space where mexc writes",
                                 labels=["path"])
        size = GaugeMetricFamily("mexc_disk_size_bytes", "size of that file system",
                                 labels=["path"])
        for path, (free_bytes, size_bytes) in disks.items():
            free.add_metric([path], free_bytes)
            size.add_metric([path], size_bytes)
        yield from (free, size)


    def _cluster(self, cluster):
        yield _gauge("mexc_cluster_this_host", "1 for the host serving these metrics",
                     {"host": cluster["host"]}, 1)
        up = GaugeMetricFamily("mexc_cluster_host_up", "1 for each host registered in "
                               "ZooKeeper", labels=["host"])
        live = GaugeMetricFamily("mexc_cluster_live_symbols", "symbols whose collector is "
                                 "live on the host", labels=["host"])
        for host, names in cluster["hosts"].items():
            up.add_metric([host], 1)
            live.add_metric([host], len(names))
        yield from (up, live)
        yield _gauge("mexc_cluster_frozen", "1 while this host's assignment is frozen (no "
                     "ZooKeeper session)", {}, int(cluster["frozen"]))
        lag = GaugeMetricFamily("mexc_receive_lag_seconds", "median seconds the host received "
                                "a trade after the earliest host did (its last minute of "
                                "trades): which host sits closest to MEXC",
                                labels=["host", "symbol"])
        symbols = {s.name: s.symbol for s in self.symbols}
        for name, by_host in ((cluster.get("lag") or {}).get("symbols") or {}).items():
            for host, seconds in by_host.items():
                lag.add_metric([host, symbols.get(name, name)], seconds)
        yield lag


def _per_symbol(family_type, name: str, help_text: str, entries, key: str):
    family = family_type(name, help_text, labels=["symbol"])
    for c in entries:
        if c[key] is not None:
            family.add_metric([c["symbol"]], c[key])
    return family


def _gauge(name: str, help_text: str, labels: dict, value):
    family = GaugeMetricFamily(name, help_text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, help_text: str, value):
    family = CounterMetricFamily(name, help_text)
    family.add_metric([], value)
    return family

"""The `mexc` command.  Exit codes: 0 ok, 1 failure, 2 usage error, 3 partial answer (`mexc gaps`,
`mexc verify` in a cluster: a host did not answer, named on stderr), 78 bad configuration."""
import argparse
import dataclasses
import os
import sys

from core import config as configuration, log as logging_setup
from core.log import first_line
from core.symbols import resolved_symbols
from mexc import __version__

EX_CONFIG = 78
EX_PARTIAL = 3  # in a cluster, a host did not answer (gaps, verify, history): the rest answered
# seconds `mexc export --once` keeps polling a daemon that accepted its request but does not
# answer (a loaded host); longer, and the daemon is taken for gone
EXPORT_POLL_PATIENCE = 30.0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="config file (default: $MEXC_CONFIG, /etc/mexc/mexc.toml, "
                             "./etc/mexc.toml)")
    common.add_argument("--version", action="version", version=f"mexc {__version__}")
    parser = argparse.ArgumentParser(
        prog="mexc", description="MEXC futures market data: WebSocket to ClickHouse to "
                                 "hourly Parquet.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 78 bad configuration.")
    parser.add_argument("--version", action="version", version=f"mexc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    collect = commands.add_parser(
        "collect", parents=[common], help="run one symbol's collector in the foreground",
        description="Stream one symbol's ticker, deals and top-20 depth into ClickHouse "
                    "until Ctrl-C, SIGTERM or SIGHUP (then flush and exit 0).  SIGUSR1 "
                    "moves it to a new connection (through a fresh circuit with --socks), "
                    "the old one closed once the new one delivers.")
    collect.add_argument("--symbol", required=True, help="contract (BTC_USDT) or its short name")
    collect.add_argument("--socks", metavar="HOST:PORT",
                         help="connect through this SOCKS5 proxy (remote DNS)")
    collect.set_defaults(handler=_collect)

    setup_db = commands.add_parser(
        "setup-db", parents=[common], help="create the database and tables (idempotent)",
        description="Create the database, export_log, the gap ledger (gaps) and every "
                    "configured symbol's {name}_current table that is missing.  Safe to run "
                    "again.")
    setup_db.set_defaults(handler=_setup_db)

    run = commands.add_parser(
        "run", parents=[common], help="run the whole pipeline (the daemon systemd starts)",
        description="Start the supervisor: managed ClickHouse (if configured), one collector "
                    "per symbol; restart whatever dies or hangs.  SIGTERM stops everything "
                    "in order; SIGHUP reloads the config.")
    run.set_defaults(handler=_run)

    status = commands.add_parser(
        "status", parents=[common], help="show the running daemon's children and figures",
        description="Ask the running daemon (over its control socket in paths.runtime_dir). "
                    "Exit 1 when it does not answer.")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", action="store_true",
                        help="redraw the table in place, like top, until Ctrl-C "
                             "(or SIGTERM, SIGHUP)")
    status.add_argument("--interval", type=float, default=2.0,
                        help="seconds between redraws with --watch (2)")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (3)")
    status.add_argument("--symbol", default="",
                        help="only this symbol's children: a contract or short name, or a "
                             "glob (`BTC_*`, `s0*`)")
    status.add_argument("--state", default="",
                        help="only children in this state (running, waiting, backoff, "
                             "stopping, stopped), or `problem`: every child worth a look")
    status.set_defaults(handler=_status)

    restart = commands.add_parser(
        "restart", parents=[common], help="restart one child of the running daemon",
        description="Stop one child (e.g. collector-btc) of the running daemon; the "
                    "supervisor starts it again at once.")
    restart.add_argument("name", help="child name as shown by mexc status")
    restart.set_defaults(handler=_restart)

    export = commands.add_parser(
        "export", parents=[common], help="rotate and export now (asks the running daemon)",
        description="Ask the running daemon to rotate every table and write the Parquet files "
                    "of every finished hour now; wait for it, print the files written.")
    export.add_argument("--once", action="store_true", required=True,
                        help="one rotation and export, now")
    export.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (600)")
    export.set_defaults(handler=_export)

    verif = commands.add_parser(
        "verif", parents=[common], help="data collection summary per table and message type",
        description="Rows per table and message type; exit 1 if a configured symbol has no "
                    "data from the last 5 minutes.")
    verif.set_defaults(handler=_verif)

    verify = commands.add_parser(
        "verify", parents=[common], help="check IP separation, data collection and exports",
        description="IP separation, data collection (as mexc verif), and export integrity: "
                    "every file readable, rows and sha256 as in export_log, rows inside their "
                    "hour, no hour missing.  In a cluster, every host's part too; a host that "
                    "does not answer is named on stderr.",
        epilog="Exit codes: 0 all checks passed, 1 a check failed, 2 usage, 3 partial: all "
               "passed on the hosts that answered, one or more did not, 78 bad configuration.")
    verify.set_defaults(handler=_verify)

    gaps = commands.add_parser(
        "gaps", parents=[common], help="list the gap ledger: stretches without live data",
        description="Every stretch in which a symbol had no live subscription (disconnect, "
                    "dead socket, stall, exchange error, collector restart or crash, tor or "
                    "daemon restart), oldest first, with the trades backfilled from MEXC's REST "
                    "API and whether backfill reached back to the stretch's start (covered).  In "
                    "a cluster, every live host's ledger; a host that does not answer is named "
                    "on stderr.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 partial: a cluster's host did not "
               "answer (its gaps are missing), 78 bad configuration.")
    gaps.add_argument("--symbol", help="only this contract (BTC_USDT) or short name (btc)")
    gaps.add_argument("--since", metavar="T",
                      help="only gaps ending after T: 2h, 30m, 1d ago, an ISO time "
                           "(2026-11-26T10:00, UTC), or epoch ms")
    gaps.add_argument("--json", action="store_true",
                      help="a JSON list, one object per gap (symbol, name, start_ms, end_ms, "
                           "reason, detail, backfilled, covered, recorded_ms, seconds)")
    gaps.set_defaults(handler=_gaps)

    iptest = commands.add_parser(
        "iptest", parents=[common], help="show each collector's Tor exit IP; exit 0 if all differ",
        description="IP separation from the running daemon's knowledge: one line per collector "
                    "with its exit IP; exit 0 only when every collector has its own.")
    iptest.set_defaults(handler=_iptest)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline against a local MEXC simulator (no network)",
        description="Start a local MEXC simulator, a managed ClickHouse in a temporary "
                    "directory and the real daemon with three collectors; show the status "
                    "table every few seconds.  Ctrl-C, SIGTERM or SIGHUP (the terminal "
                    "closed) stops everything and says what was stored where (also at the end "
                    "of the demo's log); if the demo is killed, the daemon still stops.  Needs "
                    "no config and no network.")
    demo.add_argument("--rate", type=float, default=20.0,
                      help="simulated frames/s per symbol and channel (20)")
    demo.add_argument("--duration", type=float, default=0.0,
                      help="stop by itself after this many seconds (0: run until Ctrl-C)")
    demo.set_defaults(handler=_demo, needs_config=False)
    _add_history_commands(commands, common)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(_relative_times(sys.argv[1:] if argv is None else argv))
    try:
        config = configuration.load(args.config) if getattr(args, "needs_config", True) else None
        for warning in config.warnings if config else ():
            _complain(4, f"mexc: config: {warning}")
        if config is not None and config.patterns is not None and args.handler is not _run:
            # the contracts the patterns gave names to (the daemon resolves them itself)
            config = dataclasses.replace(config, symbols=resolved_symbols(config))
        return args.handler(args, config)
    except configuration.ConfigError as e:
        _complain(3, f"mexc: bad config: {e}")
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _complain(priority: int, line: str) -> None:
    """One line on stderr, before logging is set up; under journald with its priority prefix
    (`journalctl -p warning`), as core/log does for log lines."""
    prefix = f"<{priority}>" if os.environ.get("JOURNAL_STREAM") else ""
    print(f"{prefix}{line}", file=sys.stderr)


def _collect(args, config) -> int:
    from collector.collector import Collector
    from collector.spool import SpoolBusy

    symbol = config.symbol(args.symbol)
    socks_proxy = _host_port(args.socks) if args.socks else None
    log = logging_setup.setup(f"collector[{symbol.name}]", config.log["level"])
    try:
        return Collector(config, symbol.symbol, socks_proxy=socks_proxy).run()
    except SpoolBusy as e:
        log.error("cannot start: %s", e)
        return 1


def _setup_db(args, config) -> int:
    from core.store import SCHEMA_VERSION, Store, current_table

    log = logging_setup.setup("setup-db", config.log["level"])
    try:
        with Store(config.clickhouse) as store:
            features = store.setup([s.name for s in config.symbols], clustered=config.clustered)
            schema = store.schema_version()
    except Exception as e:
        log.error("cannot set up ClickHouse at %s:%d: %s", config.clickhouse["host"],
                  config.clickhouse["port"], first_line(e))
        return 1
    log.info("database %s ready on ClickHouse %s (time columns %s): %s",
             config.clickhouse["database"], features.version, features.time_type,
             ", ".join(current_table(s.name) for s in config.symbols)
             + ", export_log, gaps, schema_version")
    if schema < SCHEMA_VERSION:  # a copy of a table must not race a running collector
        log.warning("store schema %d: `mexc run` brings it to %d at its start", schema,
                    SCHEMA_VERSION)
    return 0


def _run(args, config) -> int:
    from supervisor.arbiter import Arbiter, RunError

    log = logging_setup.setup("supervisor", config.log["level"])
    try:
        return Arbiter(config).run()
    except RunError as e:
        log.error("%s", e)
        return e.code


def _status(args, config) -> int:
    import json

    if args.watch:
        from core.process import stop_like_ctrl_c
        from mexc.watch import watch

        stop_like_ctrl_c()  # SIGTERM, or the terminal closing, end it as Ctrl-C does
        try:
            watch(config.paths["runtime_dir"], args.interval, symbol=args.symbol,
                  state=args.state)
        except KeyboardInterrupt:
            return 0

    from supervisor.commands import COMMANDS

    return _ask(config, "status", timeout=args.timeout,
                show=(lambda result: json.dumps(result, indent=2, sort_keys=True))
                if args.json else (lambda result: COMMANDS["status"].show(
                    result, symbol=args.symbol, state=args.state)))


def _restart(args, config) -> int:
    return _ask(config, "restart", name=args.name)


def _ask(config, name: str, timeout: float = 3.0, show=None, **fields) -> int:
    """One control command; print what it shows.  Exit 1 when the daemon does not answer or
    refuses."""
    from bus.sockets import NotRunning
    from supervisor.commands import COMMANDS, CommandError, ask

    try:
        result = ask(config.paths["runtime_dir"], name, timeout=timeout, **fields)
    except NotRunning as e:
        print(f"mexc is not running ({e})", file=sys.stderr)
        return 1
    except CommandError as e:
        print(f"mexc: {e}", file=sys.stderr)
        return 1
    print((show or COMMANDS[name].show)(result))
    return 0


def _export(args, config) -> int:
    import time

    from bus.sockets import NotRunning
    from supervisor.commands import CommandError, ask

    runtime_dir = config.paths["runtime_dir"]
    try:
        request_id = ask(runtime_dir, "export")["request"]
        deadline = time.monotonic() + args.timeout
        result, answered = None, time.monotonic()
        while result is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                result = ask(runtime_dir, "export_result", request=request_id)
                answered = time.monotonic()
            except NotRunning:  # a busy daemon misses a poll now and then: it has the request
                if time.monotonic() - answered > EXPORT_POLL_PATIENCE:
                    raise
    except NotRunning as e:
        print(f"mexc is not running ({e})", file=sys.stderr)
        return 1
    except CommandError as e:
        print(f"mexc: cannot export: {e}", file=sys.stderr)
        return 1
    if result is None:
        print(f"mexc: export {request_id} still running after {args.timeout:.0f}s", file=sys.stderr)
        return 1
    for path in result["files"]:
        print(path)
    if not result["ok"]:
        print(f"mexc: export incomplete: {result['error']}", file=sys.stderr)
        return 1
    print(f"export done: {len(result['files'])} files", file=sys.stderr)
    return 0


def _gaps(args, config) -> int:
    from core.clock import parse_time
    from core.store import Store
    from mexc import gaps

    try:
        since = parse_time(args.since) if args.since else None
    except ValueError:
        print(f"mexc: --since expects 2h, 30m, an ISO time or epoch ms, got {args.since!r}",
              file=sys.stderr)
        return 2
    name = config.symbol(args.symbol).name if args.symbol else None
    try:
        with Store(config.clickhouse) as store:
            if config.clustered:  # every live host's ledger
                found, unreachable = gaps.of_cluster(config, store, name, since)
                print(gaps.cluster_json(found) if args.json else gaps.cluster_table(found))
                for line in gaps.unreachable_lines(unreachable, "gaps are missing"):
                    print(line, file=sys.stderr)
                return EX_PARTIAL if unreachable else 0
            found = store.gaps(name, since_ms=since)
    except Exception as e:
        print(f"mexc: cannot read the gap ledger: ClickHouse at {config.clickhouse['host']}:"
              f"{config.clickhouse['port']}: {first_line(e)}", file=sys.stderr)
        return 1
    print(gaps.as_json(found) if args.json else gaps.table(found))
    return 0


def _iptest(args, config) -> int:
    from mexc import verify

    ok, lines = verify.ip_separation(config)
    print("\n".join(lines))
    return 0 if ok else 1


def _verif(args, config) -> int:
    from mexc import verify

    return _report(config, lambda store: [verify.server(config, store),
                                          verify.collection(config, store)])


def _verify(args, config) -> int:
    from mexc import verify

    unreachable = {}  # in a cluster: hosts that did not answer, why
    return _report(config, lambda store: [verify.server(config, store),
                                          verify.ip_separation(config),
                                          verify.collection(config, store, unreachable),
                                          verify.exports(config, store),
                                          verify.cluster_copies(config, store, unreachable)],
                   unreachable)


def _report(config, checks, unreachable=None) -> int:
    """Exit 0 all passed, 1 a check failed, EX_PARTIAL all passed on the hosts that answered
    (a cluster's host unreachable: one line each on stderr)."""
    from core.store import Store
    from mexc import gaps

    try:
        with Store(config.clickhouse) as store:
            results = checks(store)
    except Exception as e:
        print(f"mexc: cannot check: ClickHouse at {config.clickhouse['host']}:"
              f"{config.clickhouse['port']}: {first_line(e)}", file=sys.stderr)
        return 1
    for _ok, lines in results:
        print("\n".join(lines))
    for line in gaps.unreachable_lines(unreachable or {}, "files and rows are not checked"):
        print(line, file=sys.stderr)
    if not all(ok for ok, _lines in results):
        print("❌ some checks failed")
        return 1
    if unreachable:
        print(f"✅ all checks passed on the hosts that answered; not checked: "
              f"{', '.join(sorted(unreachable))}")
        return EX_PARTIAL
    print("✅ all checks passed")
    return 0


def _demo(args, _config) -> int:
    from mexc import demo

    return demo.run(rate=args.rate, duration=args.duration)


# --- history: mexc trades|book|ticker|bars (mexc/history.py does the work) ------------------

HISTORY_KINDS = {
    "trades": "every trade: ts, price, volume, side (buy/sell), rts",
    "book": "order-book snapshots: one row per level (ts, side, level, price, size, rts); "
            "Parquet keeps each snapshot's levels as lists unless --per-level.  With --at T: "
            "the whole book at that instant, rebuilt from the nearest whole-book snapshot and "
            "the increments after it (exchange.book \"full\" or \"both\")",
    "ticker": "tickers: ts, last_price, fair_price, index_price, hold_vol, funding_rate, rts",
    "bars": "OHLCV bars from the trades: ts, open, high, low, close, volume, vwap, trades, "
            "buy_volume, sell_volume, gap (the interval overlaps a gap in the data)",
}


def _add_history_commands(commands, common) -> None:
    for kind, what in HISTORY_KINDS.items():
        command = commands.add_parser(
            kind, parents=[common], help=f"{kind} of a time range, typed, from the archive",
            description=f"{what[0].upper()}{what[1:]}.  From the hourly Parquet files and, for "
                        "what is not exported yet, ClickHouse; every row once.  Gaps in the "
                        "range are listed on stderr.  Times: ISO-8601 (2026-11-24T14:00, UTC "
                        "unless a zone is given), relative (-2h, -30m, -1d) or now.  In a cluster: every "
                        "host's rows, each event once, with a host column; a host that does "
                        "not answer is named on stderr.",
            epilog="Exit codes: 0 ok, 1 failure, 2 usage, 78 bad configuration.")
        command.add_argument("symbol", help="contract (BTC_USDT) or its short name (btc)")
        command.add_argument("--from", dest="start", required=kind != "book", metavar="T",
                             help="start of the range (inclusive)")
        command.add_argument("--to", dest="end", default="now", metavar="T",
                             help="end of the range (exclusive; default now)")
        command.add_argument("--format", choices=("parquet", "csv", "table"),
                             help="output format (default: from --out's extension, else table)")
        command.add_argument("--out", metavar="PATH", help="write here (default: stdout)")
        command.add_argument("--offline", action="store_true",
                             help="the Parquet files only; do not ask ClickHouse")
        if kind == "bars":
            command.add_argument("--interval", default="1m", help="bar length: 1s, 5m, 1h, 1d "
                                                                  "(1m)")
        else:
            command.add_argument("--exact", action="store_true",
                                 help="numbers as exact decimals, not float64")
        if kind == "book":
            command.add_argument("--at", metavar="T", help="the whole book at this instant "
                                 "(instead of --from/--to)")
            command.add_argument("--levels", type=int, default=20, help="levels per side (20)")
            command.add_argument("--per-level", action="store_true",
                                 help="one row per level in Parquet too")
        command.set_defaults(handler=_history, kind=kind)


def _history(args, config) -> int:
    from mexc import history

    output = args.format or _format_of(args.out)
    try:
        start, end, options = _history_request(args, output)
    except history.HistoryError as e:
        print(f"mexc: {e}", file=sys.stderr)
        return 2
    archive = history.Archive.from_config(config, offline=args.offline)
    try:
        table = getattr(archive, args.kind)(args.symbol, start, end, **options)
        history.write(table, output, args.out or sys.stdout)
    except (history.HistoryError, OSError) as e:
        print(f"mexc: {args.kind} {args.symbol}: {first_line(e)}", file=sys.stderr)
        return 1
    print(history.summary(table, args.kind), file=sys.stderr)
    return EX_PARTIAL if archive.unreachable else 0


def _history_request(args, output: str):
    """(start ms, end ms, keyword arguments) from the command line; HistoryError if unusable."""
    from mexc import history

    if output == "parquet" and not args.out:
        raise history.HistoryError("--format parquet needs --out PATH")
    if args.kind == "book" and (args.at is None) == (args.start is None):
        raise history.HistoryError("book needs --from T (snapshots of a range) or --at T (the "
                                   "whole book at an instant), not both")
    if args.kind == "book" and args.at is not None:
        if args.exact:
            raise history.HistoryError("--at rebuilds the book in float64; --exact does not apply")
        if args.levels < 1:
            raise history.HistoryError("--levels must be at least 1")
        return history.parse_time(args.at), None, {
            "levels": args.levels, "full": True, "per_level": args.per_level or output != "parquet"}
    start, end = history.parse_time(args.start), history.parse_time(args.end)
    if end <= start:
        raise history.HistoryError(f"--to must be after --from ({args.start} .. {args.end})")
    if args.kind == "bars":
        history.parse_interval(args.interval)
        return start, end, {"interval": args.interval}
    if args.kind == "book":
        if args.levels < 1:
            raise history.HistoryError("--levels must be at least 1")
        return start, end, {"exact": args.exact, "levels": args.levels,
                            "per_level": args.per_level or output != "parquet"}
    return start, end, {"exact": args.exact}


def _relative_times(argv: list) -> list:
    """`--from -2h` as `--from=-2h` (also --to, --since): argparse takes a value starting with
    '-' for an option."""
    argv = list(argv)
    for i, word in enumerate(argv[:-1]):
        if word in ("--from", "--to", "--since", "--at") and argv[i + 1].startswith("-"):
            argv[i:i + 2] = [f"{word}={argv[i + 1]}", None]
    return [word for word in argv if word is not None]


def _format_of(path) -> str:
    extension = os.path.splitext(path or "")[1].lower()
    return {".parquet": "parquet", ".csv": "csv"}.get(extension, "table")


def status_main(argv=None) -> int:
    """`mexc-status [--json] [--config PATH]`: the same as `mexc status`."""
    return main(["status", *(sys.argv[1:] if argv is None else argv)])


def _host_port(value: str):
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"mexc: --socks expects HOST:PORT, got {value!r}")
    return host, int(port)


if __name__ == "__main__":
    sys.exit(main())

"""The `mexc` command.  Exit codes: 0 ok, 1 failure, 2 usage error, 78 bad configuration."""
import argparse
import os
import sys

from core import config as configuration, log as logging_setup
from core.log import first_line
from mexc import __version__

EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="config file (default: $MEXC_CONFIG, /etc/mexc/mexc.toml, "
                             "./etc/mexc.toml)")
    parser = argparse.ArgumentParser(
        prog="mexc", description="MEXC futures market data: WebSocket to ClickHouse to "
                                 "hourly Parquet.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 78 bad configuration.")
    parser.add_argument("--version", action="version", version=f"mexc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    collect = commands.add_parser(
        "collect", parents=[common], help="run one symbol's collector in the foreground",
        description="Stream one symbol's ticker, deals and top-20 depth into ClickHouse "
                    "until SIGTERM or Ctrl-C (then flush and exit 0).")
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
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (3)")
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
                    "hour, no hour missing.  Exit 1 on any problem.")
    verify.set_defaults(handler=_verify)

    iptest = commands.add_parser(
        "iptest", parents=[common], help="show each collector's Tor exit IP; exit 0 if all differ",
        description="IP separation from the running daemon's knowledge: one line per collector "
                    "with its exit IP; exit 0 only when every collector has its own.")
    iptest.set_defaults(handler=_iptest)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline against a local MEXC simulator (no network)",
        description="Start a local MEXC simulator, a managed ClickHouse in a temporary "
                    "directory and the real daemon with three collectors; show the status "
                    "table every few seconds; Ctrl-C stops everything and says where the "
                    "data is.  Needs no config and no network.")
    demo.add_argument("--rate", type=float, default=20.0,
                      help="simulated frames/s per symbol and channel (20)")
    demo.add_argument("--duration", type=float, default=0.0,
                      help="stop by itself after this many seconds (0: run until Ctrl-C)")
    demo.set_defaults(handler=_demo, needs_config=False)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = configuration.load(args.config) if getattr(args, "needs_config", True) else None
        return args.handler(args, config)
    except configuration.ConfigError as e:
        # <3>: an error for journald (`journalctl -p err`), as mexc.log does for log lines
        prefix = "<3>" if os.environ.get("JOURNAL_STREAM") else ""
        print(f"{prefix}mexc: bad config: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


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
    from core.store import Store, current_table

    log = logging_setup.setup("setup-db", config.log["level"])
    try:
        with Store(config.clickhouse) as store:
            features = store.setup([s.name for s in config.symbols])
    except Exception as e:
        log.error("cannot set up ClickHouse at %s:%d: %s", config.clickhouse["host"],
                  config.clickhouse["port"], first_line(e))
        return 1
    log.info("database %s ready on ClickHouse %s (time columns %s): %s",
             config.clickhouse["database"], features.version, features.time_type,
             ", ".join(current_table(s.name) for s in config.symbols) + ", export_log, gaps")
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

    return _ask(config, "status", timeout=args.timeout,
                show=(lambda result: json.dumps(result, indent=2, sort_keys=True))
                if args.json else None)


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
        result = None
        while result is None and time.monotonic() < deadline:
            time.sleep(0.5)
            result = ask(runtime_dir, "export_result", request=request_id)
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

    return _report(config, lambda store: [verify.server(config, store),
                                          verify.ip_separation(config),
                                          verify.collection(config, store),
                                          verify.exports(config, store)])


def _report(config, checks) -> int:
    from core.store import Store

    try:
        with Store(config.clickhouse) as store:
            results = checks(store)
    except Exception as e:
        print(f"mexc: cannot check: ClickHouse at {config.clickhouse['host']}:"
              f"{config.clickhouse['port']}: {first_line(e)}", file=sys.stderr)
        return 1
    for _ok, lines in results:
        print("\n".join(lines))
    ok = all(ok for ok, _lines in results)
    print("✅ all checks passed" if ok else "❌ some checks failed")
    return 0 if ok else 1


def _demo(args, _config) -> int:
    from mexc import demo

    return demo.run(rate=args.rate, duration=args.duration)


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

"""python -m mexc.simulator: the simulator as a process (bench/, scaling runs)."""
import argparse
import json
import signal
import ssl
import threading

from mexc.simulator import shards
from mexc.simulator.server import MexcSimulator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mexc.simulator",
        description="A MEXC futures exchange on loopback (WebSocket and REST), for the tests, "
                    "benchmarks, `mexc demo`.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--processes", type=int, default=1,
                        help="serve the exchange from this many processes on the one port, each "
                             "symbol's market in one of them (benchmarks of hundreds of symbols; "
                             "plain ws:// only)")
    args = parser.parse_args(argv)
    if args.processes > 1:
        if args.tls_cert:
            parser.error("--processes works with plain ws:// only")
        return shards.serve(args.host, args.port, args.rate, args.idle_timeout, args.processes)
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    simulator = MexcSimulator(args.host, args.port, context, args.rate,
                              idle_timeout=args.idle_timeout)
    with simulator:
        print(f"LISTENING {simulator.url} REST {simulator.rest_url}", flush=True)
        while not stop.wait(0.2):
            pass
    # rs.error dead letters sent before any subscription have no symbol: listed under "".
    counts = {symbol or "": c for symbol, c in simulator.sent_counts_by_symbol().items()}
    print(json.dumps(counts, sort_keys=True), flush=True)
    return 0

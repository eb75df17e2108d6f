"""Benchmark of planned replacements: trades lost per replacement with drop-then-dial (before)
and make-before-break (after), side by side in one run.

Run from the repository root:

    .venv/bin/python bench/handover_bench.py [--replacements N] [--rate R] [--no-tor] [--json]

Everything on 127.0.0.1: a private ClickHouse, one MEXC simulator per collector (in this
process, `--rate` 2.4 by default: deals about 5 frames/s as on live BTC_USDT), `mexc collect`
as users run it, through a tor client of a private Tor network (tests/tor_network.py, on
127.0.0.0/8, never the public network), as under `[tor] enabled = true`, so that a new
connection costs what a new circuit costs (`--no-tor`: straight to the simulator, where a new
connection costs a loopback handshake).  Two collectors run side by side, each against its own simulator: one with
`exchange.make_before_break = false` (before: the old connection is dropped, then the new one
dialled, as the exit guard's restart did) and one with the shipped default (after).  Backfill
is off in both, so a lost trade is one the WebSocket never delivered.  Each collector gets
SIGUSR1 (what the exit guard sends) `--replacements` times, `--spacing` s apart.  Then the
trades the market made between the first trade stored and the last replacement are counted
against those stored: lost (made, stored nowhere), doubled (stored more than once), and the
ledger's gaps.  Exit 0 when make-before-break loses and doubles none and records no gap.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import time

import benchlib
from benchlib import MEXC, BenchError, verdict
from core.store import Store
from mexc.simulator import MexcSimulator
from tests.tor_network import TorNetwork

KEY_CACHE = os.path.join(benchlib.ROOT, ".pytest_cache", "tor-keys")  # shared with the tests

SYMBOL, NAME = "BTC_USDT", "btc"
SETTLE = 5.0  # s after the last replacement before the count: rows queryable, gaps recorded


class Run:
    """One collector with its own simulator and database."""

    def __init__(self, world, stack, label: str, rate: float, make_before_break: bool,
                 socks: list):
        self.label, self.world = label, world
        self.sim = stack.enter_context(MexcSimulator(rate=rate, seed=7))
        self.database = f"handover_{label}"
        with Store(world.ch_section(self.database)) as store:
            store.setup([NAME])
        config = world.write_config(world.config_data(
            self.database, [SYMBOL], exchange={
                "url": self.sim.url, "rest_url": self.sim.rest_url, "backfill": False,
                "make_before_break": make_before_break}))
        self.proc = benchlib.LoggedProcess([MEXC, "collect", "--config", config, "--symbol",
                                            SYMBOL, *socks],
                                           config.replace("mexc.toml", "collector.log"),
                                           label, stop_timeout=15)
        stack.callback(self.proc.stop)

    def deals(self) -> list:
        with Store(self.world.ch_section(self.database)) as store:
            return [(ts, mt, m) for ts, mt, m, _rts in store.rows(f"{NAME}_current") if mt == "d"]

    def gaps(self) -> list:
        with Store(self.world.ch_section(self.database)) as store:
            return store.gaps(NAME) if store.exists("gaps") else []

    def replace(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR1)

    def count(self, since_ms: int, until_ms: int) -> dict:
        truth = collections.Counter(t.row for t in self.sim.trades(SYMBOL, since_ms, until_ms))
        stored = collections.Counter(r for r in self.deals() if since_ms <= r[0] <= until_ms)
        gaps = self.gaps()
        return {"trades": sum(truth.values()), "lost": sum((truth - stored).values()),
                "doubled": sum((stored - truth).values()), "gaps": len(gaps),
                "gap_seconds": round(sum((g.end_ms - g.start_ms) / 1000 for g in gaps), 3),
                "connections": self.sim.total_connections}


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        world = benchlib.World.start(stack, "mexc-handover-bench-")
        socks = []
        if args.tor:
            network = TorNetwork(os.path.join(world.dir, "tornet"), key_cache_dir=KEY_CACHE)
            stack.callback(network.stop)  # its own tors and clients
            network.start(timeout=120)
            client = network.start_client(os.path.join(world.dir, "tor-client"))
            client.wait_bootstrapped(60)
            socks = ["--socks", f"127.0.0.1:{client.socks_port}"]
        before = Run(world, stack, "before", args.rate, False, socks)
        after = Run(world, stack, "after", args.rate, True, socks)
        for run_ in (before, after):
            wait(lambda: bool(run_.deals()), 60, f"{run_.label}: a trade stored")
        since = {run_.label: min(r[0] for r in run_.deals()) for run_ in (before, after)}
        for _ in range(args.replacements):
            connections = [run_.sim.total_connections for run_ in (before, after)]
            before.replace()
            after.replace()
            wait(lambda: before.sim.total_connections > connections[0]
                 and after.sim.total_connections > connections[1], 60, "the new connections")
            time.sleep(args.spacing)  # the market's pace between replacements
        until_ms = int(time.time() * 1000)
        time.sleep(SETTLE)
        for run_ in (before, after):
            run_.proc.check_alive()
        out = {run_.label: run_.count(since[run_.label], until_ms) for run_ in (before, after)}
    return report(out, args)


def report(out: dict, args) -> int:
    n = args.replacements
    rows = []
    for label in ("before", "after"):
        o = out[label]
        o["lost_per_replacement"] = round(o["lost"] / n, 2)
        what = "drop-then-dial" if label == "before" else "make-before-break"
        rows += [
            (f"{what}: trades made / connections", f"{o['trades']:,} / {o['connections']}", "", ""),
            (f"{what}: trades lost per replacement", f"{o['lost_per_replacement']:.1f}",
             "0" if label == "after" else "", verdict(o["lost"] == 0) if label == "after" else ""),
            (f"{what}: trades lost, doubled", f"{o['lost']:,}, {o['doubled']:,}",
             "0, 0" if label == "after" else "",
             verdict(o["lost"] == o["doubled"] == 0) if label == "after" else ""),
            (f"{what}: ledger gaps (s in all)", f"{o['gaps']} ({o['gap_seconds']:.1f} s)",
             "0" if label == "after" else "", verdict(o["gaps"] == 0) if label == "after" else ""),
        ]
    print(f"handover_bench: {n} planned replacements (SIGUSR1) {args.spacing:g} s apart, "
          f"rate {args.rate:g} (deals ~{2.1 * args.rate:.1f} frames/s), backfill off, "
          f"{'through a private Tor network' if args.tor else 'no tor'}")
    benchlib.print_table(rows, 14, 6)
    a = out["after"]
    out["ok"] = a["lost"] == a["doubled"] == a["gaps"] == 0
    if args.json:
        benchlib.print_json({}, {"replacements": n, "rate": args.rate, "tor": args.tor, **out})
    return 0 if out["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replacements", type=int, default=20,
                        help="planned replacements per collector (20)")
    parser.add_argument("--spacing", type=float, default=2.0,
                        help="s between replacements (2)")
    parser.add_argument("--rate", type=float, default=2.4,
                        help="simulator events/s per stream (2.4: deals ~5 frames/s)")
    parser.add_argument("--no-tor", dest="tor", action="store_false",
                        help="connect straight to the simulators, not through tor")
    return benchlib.main("handover_bench", run, benchlib.parse_args(parser, argv))


if __name__ == "__main__":
    raise SystemExit(main())

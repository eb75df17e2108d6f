"""Benchmark of stale-socket detection: how soon a socket that stops delivering is replaced,
what the gap costs, and that a quiet symbol is never replaced; the new defaults beside the old.

Run from the repository root:

    .venv/bin/python bench/stale_bench.py [--faults N] [--rate R] [--json]

Everything on 127.0.0.1: a private ClickHouse, one MEXC simulator per collector (in this
process), `mexc collect` as users run it.  Two busy collectors run side by side, each against
its own simulator at `--rate` (2.4 by default: deals about 5 frames/s as on live BTC_USDT,
depth.full about 1.8/s, a ticker every 2.8 s), one with the shipped keepalive settings (after)
and one with those before issue 26 (before: ping_interval 15, dead_after 45, stale_factor 0).
A third collector, on the new settings, gets a quiet symbol: one deal every 5-60 s.

Once the rhythm is learnt (exchange.rhythm_window, 60 s), each busy simulator gets the same
faults, 30 s apart, alternately:
  path   every connection open then sends nothing, TCP open, for 20 s (a frozen exit relay;
         MexcSimulator.stall_path): no data, no pong
  mute   the market pushes nothing to it for 20 s, pongs still come (the exchange lost the
         subscriptions; MexcSimulator.mute_data)
Per fault: seconds from the fault until data flows again (a new connection, or, when none
was opened, the old one coming back by itself after 20 s), the ledger's gaps (seconds,
reasons), and the trades the market made in the fault's 20 s that are stored nowhere (after
backfill).  Exit 0 when the new settings replace every stalled socket within 6 s and never
the quiet one.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import threading
import time

import benchlib
from benchlib import MEXC, BenchError, verdict
from core.store import Store
from mexc.simulator import MexcSimulator

SYMBOL, NAME = "BTC_USDT", "btc"
WARM_UP = 75.0  # s: the rhythm window (60 s) and a bucket, with room
FAULT_SECONDS = 20.0
FAULT_SPACING = 30.0
BEFORE = {"ping_interval": 15.0, "dead_after": 45.0, "stale_factor": 0.0}
GOAL_REPLACED_S = 6.0


class Run:
    """One collector with its own simulator and database."""

    def __init__(self, world, stack, label: str, rate: float, exchange: dict):
        self.label = label
        self.sim = stack.enter_context(MexcSimulator(rate=rate, seed=7))
        self.database = f"stale_{label}"
        with Store(world.ch_section(self.database)) as store:
            store.setup([NAME])
        config = world.write_config(world.config_data(
            self.database, [SYMBOL],
            exchange={"url": self.sim.url, "rest_url": self.sim.rest_url, **exchange}))
        self.proc = benchlib.LoggedProcess([MEXC, "collect", "--config", config, "--symbol",
                                            SYMBOL], config.replace("mexc.toml", "collector.log"),
                                           label, stop_timeout=15)
        stack.callback(self.proc.stop)
        self.world = world
        self.results = []  # (kind, replaced_after_s or None, missing trades)

    def fault(self, kind: str) -> threading.Thread:
        """Inject `kind` now and measure it in a thread of its own."""
        thread = threading.Thread(target=self._measure, args=(kind,), daemon=True)
        thread.start()
        return thread

    def _measure(self, kind: str) -> None:
        connections, started = self.sim.total_connections, time.monotonic()
        start_ms = int(time.time() * 1000)
        getattr(self.sim, {"path": "stall_path", "mute": "mute_data"}[kind])(FAULT_SECONDS)
        replaced = None
        while time.monotonic() - started < FAULT_SECONDS + 5:
            if self.sim.total_connections > connections:
                replaced = time.monotonic() - started
                break
            time.sleep(0.05)
        time.sleep(max(0.0, started + FAULT_SECONDS + 8 - time.monotonic()))  # backfill done
        truth = self.sim.trades(SYMBOL, start_ms, start_ms + int(FAULT_SECONDS * 1000))
        with Store(self.world.ch_section(self.database)) as store:
            stored = {(ts, m) for ts, mt, m, _rts in store.rows(f"{NAME}_current") if mt == "d"}
        missing = sum(1 for trade in truth if (trade.t, trade.row[2]) not in stored)
        self.results.append((kind, replaced, missing))

    def gaps(self):
        with Store(self.world.ch_section(self.database)) as store:
            return store.gaps(NAME) if store.exists("gaps") else []


def quiet_market(sim: MexcSimulator, stop: threading.Event) -> None:
    """A deal every 5-60 s (a quiet symbol), until stop."""
    rng = random.Random(3)
    while not stop.wait(rng.uniform(5.0, 60.0)):
        sim.trade(SYMBOL)


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        world = benchlib.World.start(stack, "mexc-stale-bench-")
        after = Run(world, stack, "after", args.rate, {})
        before = Run(world, stack, "before", args.rate, BEFORE)
        quiet = Run(world, stack, "quiet", 0.0, {})
        stop = threading.Event()
        stack.callback(stop.set)
        threading.Thread(target=quiet_market, args=(quiet.sim, stop), daemon=True).start()
        time.sleep(WARM_UP)  # the rhythm is learnt from a minute of traffic
        for run_ in (after, before, quiet):
            run_.proc.check_alive()
        if "stale-socket limit" not in after.proc.log_text():
            raise BenchError("the rhythm was not learnt in time:\n" + after.proc.log_tail())
        for n in range(args.faults):
            kind = ("path", "mute")[n % 2]
            threads = [after.fault(kind), before.fault(kind)]
            time.sleep(FAULT_SPACING)
            for thread in threads:
                thread.join(FAULT_SECONDS)
        result = report(after, before, quiet, args)
    return 0 if result["ok"] else 1


def report(after: Run, before: Run, quiet: Run, args) -> dict:
    rows, out = [], {"rate": args.rate, "faults": args.faults}
    for run_ in (before, after):
        for kind in ("path", "mute"):
            mine = [r for r in run_.results if r[0] == kind]
            replaced = sorted(r[1] for r in mine if r[1] is not None)
            out[f"{run_.label}_{kind}"] = {
                "faults": len(mine), "replaced": len(replaced),
                "replaced_median_s": statistics.median(replaced) if replaced else None,
                "replaced_max_s": replaced[-1] if replaced else None,
                "missing_trades": sum(r[2] for r in mine)}
            rows.append((f"{run_.label}: {kind} stall, replaced / faults",
                         f"{len(replaced)}/{len(mine)}", "", ""))
            # not replaced: live data again only when the stall ended by itself
            resumed = sorted(FAULT_SECONDS if r[1] is None else r[1] for r in mine)
            if resumed:
                rows.append((f"{run_.label}: {kind} stall, s until data flows (median, max)",
                             f"{statistics.median(resumed):.1f}, {resumed[-1]:.1f}",
                             f"<= {GOAL_REPLACED_S:g}" if run_ is after else "",
                             verdict(resumed[-1] <= GOAL_REPLACED_S) if run_ is after else ""))
            rows.append((f"{run_.label}: {kind} stall, trades missing after backfill",
                         f"{sum(r[2] for r in mine):,}", "", ""))
        seconds = sorted((g.end_ms - g.start_ms) / 1000 for g in run_.gaps())
        reasons = sorted({g.reason for g in run_.gaps()})
        out[f"{run_.label}_gaps"] = {"count": len(seconds), "reasons": reasons,
                                     "median_s": statistics.median(seconds) if seconds else None}
        rows.append((f"{run_.label}: ledger gaps (median s; reasons)",
                     f"{len(seconds)} ({statistics.median(seconds):.1f} s; {', '.join(reasons)})"
                     if seconds else "0", "", ""))
    quiet_replaced = quiet.sim.total_connections - 1
    out["quiet_replaced"] = quiet_replaced
    out["quiet_trades"] = len(quiet.sim.trades(SYMBOL))
    rows.append((f"quiet symbol ({out['quiet_trades']} deals): sockets replaced",
                 quiet_replaced, "0", verdict(quiet_replaced == 0)))
    limit = [line for line in after.proc.log_text().splitlines() if "stale-socket limit" in line]
    out["limit_line"] = limit[-1].split("collector[btc] ")[-1] if limit else ""
    print(f"stale_bench: rate {args.rate:g} (deals ~{2.1 * args.rate:.1f} frames/s), "
          f"{args.faults} faults of {FAULT_SECONDS:g} s; learnt: {out['limit_line']}")
    benchlib.print_table(rows, 24, 6)
    a = out["after_path"], out["after_mute"]
    out["ok"] = (quiet_replaced == 0 and all(x["replaced"] == x["faults"] for x in a)
                 and all((x["replaced_max_s"] or 99) <= GOAL_REPLACED_S for x in a))
    if args.json:
        benchlib.print_json({}, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=4, help="faults per busy collector (4)")
    parser.add_argument("--rate", type=float, default=2.4,
                        help="simulator events/s per stream (2.4: deals ~5 frames/s)")
    return benchlib.main("stale_bench", run, benchlib.parse_args(parser, argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""Every benchmark in one run, one after the other on this machine, into one report.

    python bench/all.py [--quick] [--out DIR]

Runs collector_bench, supervisor_bench, exporter_bench, tor_bench, scaling_bench,
history_bench, stale_bench and handover_bench (each
with its default arguments, or shorter ones with --quick) and writes each one's report and
JSON figures to DIR (default bench/results-<UTC time>/), then prints all the reports, one after
the other, under a header naming the machine, the commit and the time. Every ratio in them
compares with a baseline measured in the same bench, and all of them come from this one run.
Exit status: 0 when every bench ran, 1 when one failed (the others still run).
"""
import argparse
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (default arguments, --quick arguments)
BENCHES = {
    "collector_bench": ([], ["--frames", "100000", "--rounds", "1", "--latency-seconds", "5"]),
    "supervisor_bench": ([], ["--idle-seconds", "3", "--repetitions", "2"]),
    "exporter_bench": ([], ["--rows", "200000", "--rotation-seconds", "20"]),
    "tor_bench": ([], ["--repetitions", "1", "--frames", "50000"]),
    "scaling_bench": ([], ["--symbols", "1,3", "--tor-symbols", "3", "--seconds", "5"]),
    "history_bench": ([], ["--trades", "200000", "--rounds", "1"]),
    "stale_bench": ([], ["--faults", "2"]),
    "handover_bench": ([], ["--replacements", "5"]),
}


def commit() -> str:
    done = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_bench(name: str, args: list, out: str) -> tuple:
    """Run one bench with --json; its report and JSON go to out/<name>.txt and .json."""
    started = time.monotonic()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        done = subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py"), *args, "--json"],
                              stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    lines = done.stdout.rstrip("\n").split("\n")
    figures = lines.pop() if done.returncode == 0 and lines[-1].startswith("{") else ""
    report = "\n".join(lines)
    with open(os.path.join(out, f"{name}.txt"), "w") as f:
        f.write(report + "\n")
    if figures:
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            f.write(figures + "\n")
    return done.returncode, report, time.monotonic() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="shorter runs of every bench (minutes, not the full figures)")
    parser.add_argument("--out", help="directory for the reports (default bench/results-<time>)")
    parser.add_argument("--only", help="comma-separated bench names (default: all)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(HERE, time.strftime("results-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(out, exist_ok=True)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    print(f"mexc benchmarks, one run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"commit {commit()}, {platform.node()}, {os.cpu_count()} cores, "
          f"{'quick' if args.quick else 'default'} arguments; reports in {out}", flush=True)
    failed, started = [], time.monotonic()
    for name in names:
        code, report, seconds = run_bench(name, BENCHES[name][args.quick], out)
        print(f"\n## {name} ({seconds / 60:.1f} min, exit {code})\n\n{report}", flush=True)
        if code != 0:
            failed.append(name)
            print(f"{name} failed: see {os.path.join(out, name + '.log')}", flush=True)
    print(f"\nall benches: {(time.monotonic() - started) / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else "; every bench ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

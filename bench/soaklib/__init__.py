"""The parts of the fault-injection soak; bench/soak.py is its entry point and its manual.

  common      what every part shares: paths, the symbols, the daemon settings that make faults
              show quickly, say(), wait_for(), SoakError
  schedule    the seeded schedule of faults (Fault, build_schedule) and the fault rates
  windows     faults as injected and the outage windows the status sampler found
  world       the Soak: simulator, ClickHouse, the daemon, the private Tor network; the status
              sampler that opens and closes outage windows; running the schedule; the end phase
  faults      the fault injectors (kill_collector ... huge), each (soak, fault) -> its undo
  accounting  every row read back and counted against what the simulator sent
  ledger      the gap ledger against the outage windows, the trades against the simulator's
              truth: missing before and after backfill
  report      the figures (Report, SymbolReport), the verdict, the text and JSON output

Importing this package puts the repository root first on sys.path (for mexc, core, tests ...).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # for tests.*

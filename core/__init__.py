"""The ground every part of mexc stands on: configuration, the ClickHouse store, logging, pid
locks, the hour clock, the shared vocabulary and small process helpers.

Nothing here imports bus/, collector/, exporter/, supervisor/ or mexc/: layers point down.
"""
import os

__version__ = "0.2.0"

# clickhouse-driver builds a ~22 MB date lookup table at import unless told to do it lazily
# (the variable's name is spelled so); every collector process would pay for it.
os.environ.setdefault("CLICKHOUSE_DRIVER_LASY_DATE_LUT", "1")

"""mexc: MEXC futures market data, WebSocket to ClickHouse to hourly Parquet.

This package is the front door: the `mexc` command (cli), `mexc demo`, the status view and
`mexc verify`.  The parts it drives live in bus/, collector/, exporter/ and supervisor/; the
ground they stand on in core/ (see docs/architecture.md).
"""
from core import __version__

__all__ = ["__version__"]

"""mexc: MEXC futures market data, WebSocket to ClickHouse to hourly Parquet."""
import os

__version__ = "0.1.0"

# clickhouse-driver builds a ~22 MB date lookup table at import unless told to do it lazily
# (the variable's name is spelled so); every collector process would pay for it.
os.environ.setdefault("CLICKHOUSE_DRIVER_LASY_DATE_LUT", "1")

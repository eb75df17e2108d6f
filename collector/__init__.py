"""The collector: one process per symbol, MEXC WebSocket to ClickHouse."""

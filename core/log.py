"""One event per line, tagged with the process, e.g. `collector[btc] connected url=...`.

Under journald (JOURNAL_STREAM set) each line starts with a syslog priority prefix such as `<4>`
so `journalctl -p warning` works and journald adds the timestamp; on a terminal lines carry a
UTC timestamp and the level name instead.
"""
import collections
import logging
import os
import re
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _Formatter(logging.Formatter):
    def __init__(self, tag: str, journald: bool):
        super().__init__()
        self.tag = tag
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", " | ")
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{self.tag} {message}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        return f"{stamp}.{millis:03d}Z {record.levelname:<7} {self.tag} {message}"


def setup(tag: str, level: str = "info") -> logging.Logger:
    """Configure the root logger of this process; `tag` names it in every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(tag, journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # clickhouse-driver logs each failed connect with a traceback; our own lines say it better.
    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)
    return logging.getLogger("mexc")


def set_level(level: str) -> None:
    """`log.level` for this process, at start and after a reload."""
    logging.getLogger().setLevel(level.upper())


class RecentProblems(logging.Handler):
    """The last `size` warnings and errors of this process, for the dashboard: a ring buffer
    (old ones fall out), read from other threads with lines()."""

    def __init__(self, size: int = 30):
        super().__init__(logging.WARNING)
        self.records = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        self.records.append({"ts_ms": int(record.created * 1000), "level": record.levelname,
                             "message": record.getMessage().replace("\n", " | ")[:500]})

    def lines(self) -> list:
        """Oldest first; a copy taken under the handler's lock."""
        with self.lock:
            return list(self.records)


def first_line(e: BaseException) -> str:
    """An exception as one short log-friendly line (ClickHouse errors carry a stack trace;
    clickhouse-driver puts their code alone on the first line, `Code: 279.`, and what went
    wrong on the next: both are kept)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and re.fullmatch(r"Code: \d+\.", lines[0]):
        lines = [f"{lines[0]} {lines[1]}"]
    return (lines or [type(e).__name__])[0][:300]

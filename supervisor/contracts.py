"""MEXC's contract list (GET /api/v1/contract/detail), for the patterns of `symbols`.

A thread of its own reads it every `exchange.contracts_refresh` seconds, directly or through
a running collector's tor (`exchange.contracts_via`), so a slow or absent REST API never holds
up the supervisor's loop.  The loop takes each new list with latest() and resolves the
patterns against it (core/symbols.py).  A list that fails to load (an error answer, rate
limiting, no answer) changes nothing: the last good one stays in force, the status says the
list is failing (the alert contract_list_failing), and it is tried again after RETRY seconds.
The last good list is kept in paths.state_dir (contracts.json), so a start while MEXC does not
answer resolves the patterns as the last run did.
"""
import logging
import threading
import time
from typing import List, Optional, Tuple

from collector import wire
from collector.connection import http_get
from core.log import first_line
from core.symbols import TRADING, Contract, NameBook

log = logging.getLogger(__name__)

RETRY = 30.0  # seconds before a failed read is tried again (at most contracts_refresh)


class ContractList:
    """The last good contract list and how its reading goes."""

    def __init__(self, exchange: dict, book: NameBook):
        self.exchange = exchange  # replaced by a reload; read at each try
        self.book = book
        self.proxy: Optional[Tuple[str, int]] = None  # a collector's tor, set by the loop
        self.lock = threading.Lock()
        self.fetched_ms, self.contracts = book.last_contracts()
        self.version = 0 if self.contracts is None else 1  # rises with every changed list
        self.tries = self.failures = 0  # failures: in a row since the last good read
        self.error: Optional[str] = None
        self.done_once = threading.Event()  # the first try is over (answered or not)
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="contracts", daemon=True)

    # --- the supervisor's loop ---------------------------------------------------------------

    def start(self) -> "ContractList":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def refresh_now(self) -> None:
        self.wake.set()

    def latest(self) -> Tuple[int, Optional[List[Contract]]]:
        """(version, the last good list or None if none was ever read)."""
        with self.lock:
            return self.version, self.contracts

    def describe(self) -> dict:
        with self.lock:
            contracts, failures = self.contracts, self.failures
        return {"ok": contracts is not None and failures == 0, "failures": failures,
                "error": self.error, "tries": self.tries,
                "contracts": None if contracts is None else len(contracts),
                "trading": None if contracts is None else sum(
                    1 for c in contracts if c.state == TRADING),
                "fetched_ms": self.fetched_ms or None,
                "via": self.exchange["contracts_via"]}

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self.stopping:
            self._read()
            self.done_once.set()
            ex = self.exchange
            wait = ex["contracts_refresh"] if self.failures == 0 else min(
                RETRY, ex["contracts_refresh"])
            self.wake.wait(wait)
            self.wake.clear()

    def _read(self) -> None:
        ex = self.exchange
        url = ex["rest_url"].rstrip("/") + wire.CONTRACTS_PATH
        if ex["contracts_via"] == "tor" and self.proxy is None:
            self.error = "waiting for a collector's tor to read the list through"
            log.info("contract list: %s", self.error)
            return
        proxy = self.proxy if ex["contracts_via"] == "tor" else None
        self.tries += 1
        try:
            status, body = http_get(url, ex["connect_timeout"], ex["ca_file"], proxy)
            if status != 200:
                raise wire.BadFrame(f"HTTP {status}: {body[:200]!r}")
            contracts = wire.contract_list(body)
        except Exception as e:
            self._failed(url, f"{type(e).__name__}: {first_line(e)}")
            return
        self._loaded(contracts)

    def _failed(self, url: str, error: str) -> None:
        with self.lock:
            self.failures += 1
            self.error = error
            kept = (f"keeping the last good list ({len(self.contracts)} contracts)"
                    if self.contracts is not None else "no list yet: only the contracts "
                    "named outright run")
        log.warning("contract list not loaded (failure %d in a row) url=%s: %s; %s; next try "
                    "in %.0fs", self.failures, url, error, kept,
                    min(RETRY, self.exchange["contracts_refresh"]))

    def _loaded(self, contracts: List[Contract]) -> None:
        now_ms = int(time.time() * 1000)
        with self.lock:
            changed = contracts != self.contracts
            failures, self.failures, self.error = self.failures, 0, None
            self.contracts, self.fetched_ms = contracts, now_ms
            if changed:
                self.version += 1
        if failures:
            log.info("contract list loaded again after %d failure(s)", failures)
        if changed:
            log.info("contract list: %d contracts, %d trading", len(contracts),
                     sum(1 for c in contracts if c.state == TRADING))
            try:
                self.book.save_contracts(now_ms, contracts)
            except OSError as e:
                log.error("contract list not saved to %s (a start while MEXC does not answer "
                          "uses an older one): %s", self.book.contracts_path, e)

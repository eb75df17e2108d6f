"""Which contracts `symbols` means, and the short name each one gets, once and for good.

`symbols` lists contracts by name (`"BTC_USDT"`, `{symbol = "1000PEPE_USDT", name = "pepe"}`),
glob patterns (`"*_USDT"`), exclusions (`"!*STOCK*_USDT"`) or is `"all"`.  Patterns are
resolved against MEXC's contract list (supervisor/contracts.py fetches it): every contract
open for trading (state 0) that a pattern matches and no exclusion does.  Exclusions apply to
patterns only: a contract named outright is always collected while MEXC lists it.

Short names (tables `{name}_current`, files `{name}_*.parquet`) of matched contracts, in this
order, the first not held by another contract:
  1. the name this installation gave the contract before (the name book, names.json in
     paths.state_dir): a name once given never changes, since the archive depends on it;
  2. the lower-cased base asset for a USDT contract (`PEPE_USDT` -> `pepe`), otherwise the
     lower-cased contract (`BTC_USDC` -> `btc_usdc`, which no USDT contract can take);
  3. the lower-cased contract, then that with `_2`, `_3`, ... (only when an operator gave
     the name of rule 2 to another contract).
An operator's `name` wins over every rule; one that another contract holds in the name book
is a configuration error (its archive would change hands).  Contracts are taken in symbol
order, so every host of a cluster with the same config and book names them alike.
"""
import fnmatch
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from core.process import write_json_atomic

ALL = "all"
SYMBOL_RE = re.compile(r"^[A-Z0-9]{1,20}_[A-Z0-9]{1,20}$")  # a contract: BTC_USDT
PATTERN_RE = re.compile(r"^[A-Z0-9_*?\[\]-]{1,41}$")
GLOB_CHARS = "*?["
TRADING = 0  # MEXC's contract state: 0 enabled, 1 delivering, 2 delivered, 3 offline, 4 paused
STATES = {0: "trading", 1: "delivering", 2: "settled", 3: "offline", 4: "paused"}
NAMES_FILE, CONTRACTS_FILE = "names.json", "contracts.json"
NAME_LIMIT = 40  # core.config.NAME_RE


@dataclass(frozen=True)
class Symbol:
    symbol: str  # exchange contract, e.g. BTC_USDT
    name: str  # short name for tables and files, e.g. btc
    book: str = ""  # its own exchange.book ("top", "full", "both"); "": the exchange's


class Contract(NamedTuple):
    """One entry of MEXC's contract list (GET /api/v1/contract/detail)."""
    symbol: str
    state: int  # STATES
    base: str = ""
    quote: str = ""
    settle: str = ""
    kind: int = 1  # futureType: 1 perpetual, 2 delivery

    def describe_state(self) -> str:
        return STATES.get(self.state, f"state {self.state}")


@dataclass(frozen=True)
class Patterns:
    """The patterns of `symbols` ("all" is `*`); fnmatch globs, case-sensitive."""
    include: Tuple[str, ...]
    exclude: Tuple[str, ...] = ()

    def matches(self, symbol: str) -> bool:
        return (any(fnmatch.fnmatchcase(symbol, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(symbol, p) for p in self.exclude))

    def __str__(self) -> str:
        return ", ".join([*self.include, *(f"!{p}" for p in self.exclude)])


def is_pattern(entry: str) -> bool:
    """A `symbols` string that is a pattern or an exclusion rather than a contract's name."""
    return entry == ALL or entry.startswith("!") or any(c in entry for c in GLOB_CHARS)


def parse_patterns(entries: Iterable[str]) -> Patterns:
    """ValueError (one line) for a pattern that cannot match a contract name."""
    include, exclude = [], []
    for entry in entries:
        text = "*" if entry == ALL else entry
        target = exclude if text.startswith("!") else include
        text = text[1:] if text.startswith("!") else text
        if not PATTERN_RE.match(text):
            raise ValueError(f"{entry!r} is not a pattern like \"*_USDT\" or \"!*STOCK*_USDT\" "
                             "(A-Z 0-9 _ and * ? [ ])")
        target.append(text)
    if exclude and not include:
        raise ValueError(f"{'!' + exclude[0]!r} excludes from nothing: add a pattern such as "
                         '"*_USDT" or "all"')
    return Patterns(tuple(include), tuple(exclude))


def derived_name(symbol: str) -> str:
    """Rule 2: `pepe` for PEPE_USDT, `btc_usdc` for BTC_USDC."""
    base, _, quote = symbol.partition("_")
    return base.lower() if quote == "USDT" else symbol.lower()


def _candidates(symbol: str, book: Dict[str, str]):
    if symbol in book:
        yield book[symbol]
    yield derived_name(symbol)
    yield symbol.lower()
    for n in range(2, 100):
        yield f"{symbol.lower()}_{n}"


class Resolution(NamedTuple):
    symbols: List[Symbol]  # sorted by symbol
    new_names: Dict[str, str]  # symbol -> name given now for the first time (for the book)
    unlisted: List[str]  # contracts named outright that the list does not show trading
    skipped: List[str]  # matched contracts that cannot get a name (logged)


class NameClash(ValueError):
    """An operator's name is held by another contract in the name book."""


def resolve(explicit: list, patterns: Optional[Patterns], contracts: Optional[List[Contract]],
            book: Dict[str, str]) -> Resolution:
    """The contracts to collect now, sorted by symbol.  explicit: the Symbols named outright;
    contracts: the last good list, or None when none was ever loaded (then only the explicit
    ones); book: symbol -> name given before."""
    holders = {name: symbol for symbol, name in book.items()}
    for s in explicit:
        holder = holders.get(s.name)
        if holder is not None and holder != s.symbol:
            raise NameClash(f"name {s.name!r} for {s.symbol} is held by {holder} "
                            f"({NAMES_FILE} in paths.state_dir): its archive is under that "
                            "name; choose another")
    trading = None if contracts is None else {c.symbol for c in contracts if c.state == TRADING}
    chosen = {s.symbol: s for s in explicit if trading is None or s.symbol in trading}
    unlisted = sorted(s.symbol for s in explicit if s.symbol not in chosen)
    taken = {s.name for s in explicit} | set(book.values())
    new_names, skipped = {}, []
    explicit_symbols = {s.symbol for s in explicit}
    for symbol in sorted(trading or ()):
        if symbol in explicit_symbols or patterns is None or not patterns.matches(symbol):
            continue
        name = next((n for n in _candidates(symbol, book)
                     if len(n) <= NAME_LIMIT and (n not in taken or book.get(symbol) == n)), None)
        if name is None or not SYMBOL_RE.match(symbol):
            skipped.append(symbol)
            continue
        if book.get(symbol) != name:
            new_names[symbol] = name
        taken.add(name)
        chosen[symbol] = Symbol(symbol, name)
    return Resolution([chosen[k] for k in sorted(chosen)], new_names, unlisted, skipped)


class NameBook:
    """Every name this installation gave a contract (names.json in paths.state_dir), kept for
    good, and the last good contract list (contracts.json), for a start while MEXC does not
    answer."""

    def __init__(self, state_dir: str):
        """ValueError (one line) when names.json does not read."""
        self.names_path = os.path.join(state_dir, NAMES_FILE)
        self.contracts_path = os.path.join(state_dir, CONTRACTS_FILE)
        self.names: Dict[str, str] = _read(self.names_path, {})

    def remember(self, symbols: Iterable[Symbol]) -> Dict[str, str]:
        """Add the names of `symbols` that the book does not hold yet; the new ones.  A symbol
        keeps its first name here even if an operator renames it (`name = ...` wins in the
        config; the book only keeps patterns from taking the old name)."""
        new = {s.symbol: s.name for s in symbols if s.symbol not in self.names}
        if new:
            self.names.update(new)
            write_json_atomic(self.names_path, dict(sorted(self.names.items())))
        return new

    def save_contracts(self, fetched_ms: int, contracts: List[Contract]) -> None:
        write_json_atomic(self.contracts_path, {"fetched_ms": fetched_ms,
                                                "contracts": [list(c) for c in contracts]})

    def last_contracts(self) -> Tuple[int, Optional[List[Contract]]]:
        """(fetched_ms, the list) as last saved, or (0, None) (also for a file that does not
        read: the list is only a stand-in until MEXC answers)."""
        try:
            saved = _read(self.contracts_path, None)
            if not saved:
                return 0, None
            return saved["fetched_ms"], [Contract(*c) for c in saved["contracts"]]
        except (ValueError, KeyError, TypeError):
            return 0, None


def resolved_symbols(config) -> List[Symbol]:
    """For commands other than the daemon (verify, gaps, history, collect): the symbols named
    outright plus every contract the patterns gave a name (the name book), so an archive is
    found by its names whatever MEXC lists today."""
    if config.patterns is None:
        return list(config.symbols)
    explicit = {s.symbol for s in config.symbols}
    names = {s.name for s in config.symbols}
    book = NameBook(config.paths["state_dir"]).names
    return list(config.symbols) + [
        Symbol(symbol, name) for symbol, name in sorted(book.items())
        if symbol not in explicit and name not in names and config.patterns.matches(symbol)]


def _read(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable: {e}") from None

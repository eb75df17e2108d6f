"""MEXC's contract list as the simulator serves it (GET /api/v1/contract/detail): every contract
with its state, listed, delisted, paused or settled on command while the simulator runs."""
import json
import threading
from typing import Iterable, Optional

TRADING, OFFLINE = 0, 3  # MEXC's states: 0 enabled, 1 delivering, 2 delivered, 3 offline, 4 paused
DEFAULT_CONTRACTS = ("BTC_USDT", "ETH_USDT", "SOL_USDT")


class Contracts:
    """symbol -> state; a contract taken off the list is gone from the answer."""

    def __init__(self, symbols: Iterable[str]):
        self.lock = threading.Lock()
        self.states = {symbol: TRADING for symbol in symbols}
        self.removed = set()  # taken off the list: the WebSocket refuses it too

    def list(self, symbol: str, state: int = TRADING) -> None:
        with self.lock:
            self.states[symbol] = state
            self.removed.discard(symbol)

    def delist(self, symbol: str, state: Optional[int] = None) -> None:
        """Off the list (state None), or listed with a state other than trading."""
        with self.lock:
            if state is None:
                self.states.pop(symbol, None)
                self.removed.add(symbol)
            else:
                self.states[symbol] = state

    def trading(self, symbol: str) -> Optional[bool]:
        """True/False for a contract the list knows or took off; None for any other."""
        with self.lock:
            if symbol in self.removed:
                return False
            state = self.states.get(symbol)
        return None if state is None else state == TRADING

    def answer(self) -> str:
        """The answer's JSON, in MEXC's shape (fields abridged)."""
        with self.lock:
            entries = sorted(self.states.items())
        data = [_entry(symbol, state) for symbol, state in entries]
        return json.dumps({"success": True, "code": 0, "data": data})


def _entry(symbol: str, state: int) -> dict:
    base, _, quote = symbol.partition("_")
    return {"symbol": symbol, "displayNameEn": f"{symbol} PERPETUAL", "baseCoin": base,
            "quoteCoin": quote, "settleCoin": quote, "futureType": 1, "state": state,
            "apiAllowed": True, "isHidden": False, "contractSize": 0.0001, "priceScale": 2}

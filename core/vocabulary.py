"""The words every part of mexc shares, defined once.

A row is what one exchange message becomes and what ClickHouse and the Parquet files store:
  ts   event time at the exchange, ms since the epoch, UTC
  mt   message type: TICKER 't', DEAL 'd', DEPTH 'dp', DEAD_LETTER 'dl'
  m    the message text, the exchange's own number text (README, "Row format")
  rts  local receive time, ms since the epoch, UTC

Children of the supervisor are named by ChildId: `collector-btc`, `tor-btc`, `exporter`,
`clickhouse`.
"""
from typing import NamedTuple, Optional

TICKER, DEAL, DEPTH, DEAD_LETTER = "t", "d", "dp", "dl"
MESSAGE_TYPES = (TICKER, DEAL, DEPTH, DEAD_LETTER)

# the channels a collector subscribes to, and the message type of their rows
CHANNEL_TYPES = {"ticker": TICKER, "deal": DEAL, "depth.full": DEPTH}
CHANNELS = tuple(CHANNEL_TYPES)


class Row(NamedTuple):
    """One stored message.  The hot path builds plain tuples in this order; Row names them."""
    ts: int
    mt: str
    m: str
    rts: int


ROW_COLUMNS = Row._fields

# kinds of supervised children
COLLECTOR, TOR, EXPORTER, CLICKHOUSE = "collector", "tor", "exporter", "clickhouse"
CHILD_KINDS = (COLLECTOR, TOR, EXPORTER, CLICKHOUSE)


class ChildId(NamedTuple):
    """A supervised child: its kind and, for per-symbol children, the symbol's short name."""
    kind: str
    name: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.kind}-{self.name}" if self.name else self.kind

    @classmethod
    def parse(cls, text: str) -> "ChildId":
        """`collector-btc` -> ChildId("collector", "btc"); ValueError for an unknown kind."""
        kind, _, name = text.partition("-")
        if kind not in CHILD_KINDS or bool(name) != (kind in (COLLECTOR, TOR)):
            raise ValueError(f"not a child name: {text!r}")
        return cls(kind, name or None)

    def sibling(self, kind: str) -> "ChildId":
        """The same symbol's child of another kind (a collector's tor, a tor's collector)."""
        return ChildId(kind, self.name)

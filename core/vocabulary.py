"""The words every part of mexc shares, defined once.

A row is what one exchange message becomes and what ClickHouse and the Parquet files store:
  ts   event time at the exchange, ms since the epoch, UTC
  mt   message type: TICKER 't', DEAL 'd', DEPTH 'dp', DEAD_LETTER 'dl', BOOK_UPDATE 'bu',
       BOOK_SNAPSHOT 'bs'
  m    the message text, the exchange's own number text (layouts: core/channels.py)
  rts  local receive time, ms since the epoch, UTC

Children of the supervisor are named by ChildId: `collector-btc`, `tor-btc`, `exporter`,
`clickhouse`.
"""
from typing import NamedTuple, Optional

TICKER, DEAL, DEPTH, DEAD_LETTER = "t", "d", "dp", "dl"
# the whole book: an increment of sub.depth, and a REST depth snapshot
BOOK_UPDATE, BOOK_SNAPSHOT = "bu", "bs"
# The order is ClickHouse's Enum8 (t = 1, ...): a new type is appended.  Which channel's rows
# have which type, and how their m is spelled: core/channels.py.
MESSAGE_TYPES = (TICKER, DEAL, DEPTH, DEAD_LETTER, BOOK_UPDATE, BOOK_SNAPSHOT)


class Row(NamedTuple):
    """One stored message.  The hot path builds plain tuples in this order; Row names them."""
    ts: int
    mt: str
    m: str
    rts: int


ROW_COLUMNS = Row._fields


def event_key(row) -> tuple:
    """What makes two rows one exchange event: (ts, mt, m), the receive time left out.  Two
    connections to one symbol deliver the same event as rows with one key: a trade by its
    time, price, volume, side and MEXC's trade id `i` (the 4th field of its m, when the frame
    had one), a depth snapshot by its ts and levels (one per version), a ticker by its
    timestamp and fields.  Two equal trades in one millisecond without ids share a key too;
    whoever deduplicates by it counts them (collector/overlap.py, row by row).  The cluster's
    merge of hosts' copies (exporter/merge.py, column by column) keeps the same identities,
    plus one rule only it needs: a trade one copy has without its id (from REST) is the one
    another copy has with it (core.channels.DEAL_WITH_ID)."""
    return row[0], row[1], row[2]

# Why a symbol had no live subscription for a while (the gap ledger, table `gaps`)
GAP_DISCONNECT = "disconnect"            # the exchange or the network closed the WebSocket
GAP_DEAD_SOCKET = "dead_socket"          # nothing at all arrived (no pong) for too long
GAP_STALL = "stall"                      # pongs arrive, data frames do not (silent alarm)
GAP_EXCHANGE_ERROR = "exchange_error"    # the exchange refused a subscription or errored
GAP_COLLECTOR_RESTART = "collector_restart"  # the collector was stopped and started again
GAP_COLLECTOR_CRASH = "collector_crash"  # the collector died (crash, SIGKILL) and came back
GAP_TOR_RESTART = "tor_restart"          # the symbol's tor was restarted
GAP_DAEMON_RESTART = "daemon_restart"    # the whole daemon was down
# The whole book's versions broke (a missed or out-of-order increment, a reconnect, a restart)
# and a REST snapshot resynced it: the book is unknown between the two sides; the
# subscription itself may have stayed live (so it does not count against completeness).
GAP_BOOK_RESYNC = "book_resync"
GAP_DELISTED = "delisted"                # MEXC stopped listing the contract (or paused, settled it)
GAP_REASONS = (GAP_DISCONNECT, GAP_DEAD_SOCKET, GAP_STALL, GAP_EXCHANGE_ERROR,
               GAP_COLLECTOR_RESTART, GAP_COLLECTOR_CRASH, GAP_TOR_RESTART, GAP_DAEMON_RESTART,
               GAP_BOOK_RESYNC, GAP_DELISTED)


class Gap(NamedTuple):
    """One stretch in which a symbol had no live subscription, as the ledger stores it.

    start_ms/end_ms are exchange times (the clock of a row's ts and a trade's T): the last
    data frame stored before the stretch and the first one after it.  `covered` says whether
    the REST backfill reached back to start_ms (so no trade of the stretch is missing)."""
    symbol: str        # exchange contract, e.g. BTC_USDT
    name: str          # short name, e.g. btc
    start_ms: int
    end_ms: int
    reason: str        # one of GAP_REASONS
    detail: str        # e.g. "close code 1006", "SIGKILL"; free text for operators
    backfilled: int    # trades stored by backfill inside the stretch
    covered: bool
    recorded_ms: int   # local time the record was written


GAP_COLUMNS = Gap._fields

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

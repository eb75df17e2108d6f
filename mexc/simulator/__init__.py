"""A MEXC futures exchange on loopback (WebSocket and REST), for the tests, benchmarks, `mexc demo`.

Hand-rolled RFC 6455 on plain sockets and threads (stdlib only), speaking the protocol described
in README "Row format" and collector/wire.py. A market per symbol trades on the simulator's
clock whether or not anyone listens, and keeps every trade (`trades()`, the truth); the REST
API lists the latest ones. Every frame whose sendall completed is turned into the rows a
correct collector must store, so tests can compare the database with `expected_rows()`.

One module per concern; each part gets what it uses of the others in its constructor:
  wire.py        WebSocket framing, MEXC's envelope, dead letters, decimal spellings
  feed.py        one symbol's trades, book and ticker as push frames and the rows they become
  book.py        one symbol's whole book: sub.depth increments (merged or not), the REST
                 depth snapshot, its faults, every change kept (the truth)
  pool.py        pre-rendered frames (send_frames, burst, benchmarks)
  market.py      the market thread: events on the clock, pushed to subscribers; the truth
  rest.py        GET /api/v1/contract/deals and /depth with their rate limit and failures
  connection.py  one client: handshake, requests, pushes, replies (Venue: what it may use)
  traffic.py     the connections and every row sent (expected_rows, orphaned_rows)
  server.py      MexcSimulator, the façade tests use
  cli.py         python -m mexc.simulator
  shards.py      python -m mexc.simulator --processes K: one exchange from K processes

Run standalone: python -m mexc.simulator --port 0 --rate 1000 [--tls-cert C --tls-key K]
(prints "LISTENING ws://HOST:PORT/edge REST http://HOST:PORT"; SIGTERM prints the rows sent)
"""
from mexc.simulator.feed import CHANNEL_WEIGHTS, Trade, merged_prints
from mexc.simulator.pool import book_update_rows, live_mix_frames, live_mix_rows
from mexc.simulator.rest import RestAnswer
from mexc.simulator.server import MexcSimulator
from mexc.simulator.wire import decimal_text, encode_frame, style_cycle, text_frame

__all__ = ["CHANNEL_WEIGHTS", "MexcSimulator", "RestAnswer", "Trade", "book_update_rows",
           "decimal_text",
           "encode_frame", "live_mix_frames", "live_mix_rows", "merged_prints", "style_cycle",
           "text_frame"]

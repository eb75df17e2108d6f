"""Every message on the mexc bus: its name, its fields, and how it is encoded.

A message is one ZeroMQ frame holding a JSON object: {"v": 1, "type": NAME, ...fields}.
`decode()` raises BadMessage for anything malformed, unknown or of another version; receivers
log it and drop it, so a bad message never kills a process.

Sockets (all ipc:// in paths.runtime_dir, see bus/sockets.py):
  control  REQ -> REP   status, export, restart            replies: reply
  events   PUB -> SUB   rotate_begin, rotate_ready, rotate_end
  reports  PUSH -> PULL heartbeat, rotate_request, rotate_ack, rotate_done
"""
import json

VERSION = 1
MAX_BYTES = 1 << 20

# name -> required fields (more fields are allowed and passed through)
MESSAGES = {
    # control: requests carry an id, the reply echoes it
    "status": ("id",),
    "export": ("id",),
    "restart": ("id", "name"),
    "reply": ("id", "ok"),  # plus "result" when ok, "error" when not
    # events, published by the supervisor; rotate_begin is repeated until the rotation ends,
    # so a collector that was restarting when it was first sent still learns of it
    "rotate_begin": ("rotation", "symbols"),
    "rotate_ready": ("rotation", "held", "missing"),  # collectors hold their rows: swap now
    "rotate_end": ("rotation",),
    # reports, pushed by children
    "heartbeat": ("name", "pid", "stats"),
    "rotate_request": ("name",),  # the exporter asks for a rotation
    "rotate_ack": ("name", "rotation"),  # a collector holds its rows
    "rotate_done": ("name", "rotation"),  # the exporter swapped the tables
}


class BadMessage(ValueError):
    pass


def encode(kind: str, **fields) -> bytes:
    if kind not in MESSAGES:
        raise BadMessage(f"unknown message type {kind!r}")
    missing = [f for f in MESSAGES[kind] if f not in fields]
    if missing:
        raise BadMessage(f"{kind}: missing {', '.join(missing)}")
    return json.dumps({"v": VERSION, "type": kind, **fields}, separators=(",", ":")).encode()


def decode(data: bytes) -> dict:
    """bytes -> {"type": ..., fields...}; BadMessage if it is not a valid message."""
    if len(data) > MAX_BYTES:
        raise BadMessage(f"message of {len(data)} bytes is over {MAX_BYTES}")
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(message, dict):
        raise BadMessage("not a JSON object")
    if message.get("v") != VERSION:
        raise BadMessage(f"version {message.get('v')!r}, expected {VERSION}")
    kind = message.get("type")
    if kind not in MESSAGES:
        raise BadMessage(f"unknown message type {str(kind)[:40]!r}")
    missing = [f for f in MESSAGES[kind] if f not in message]
    if missing:
        raise BadMessage(f"{kind}: missing {', '.join(missing)}")
    return message

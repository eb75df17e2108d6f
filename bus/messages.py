"""Every message on the mexc bus: its name, its fields, and how it is encoded.

A message is one ZeroMQ frame holding a JSON object: {"v": 1, "type": NAME, ...fields}.
`decode()` raises BadMessage for anything malformed, unknown or of another version; receivers
log it and drop it, so a bad message never kills a process.

Sockets (all ipc:// in paths.runtime_dir, see bus/sockets.py):
  control  REQ -> REP   status, export, export_result, restart     replies: reply
  events   PUB -> SUB   rotate_begin, rotate_ready, rotate_end, export_now, tor_restarted,
                        log_level
  reports  PUSH -> PULL heartbeat, rotate_request, rotate_ack, rotate_done, export_done
"""
import json

VERSION = 1
MAX_BYTES = 1 << 20

# name -> required fields (more fields are allowed and passed through)
MESSAGES = {
    # control: requests carry an id, the reply echoes it
    "status": ("id",),
    "export": ("id",),  # start a rotation + export now; the reply carries a request id
    "export_result": ("id", "request"),  # how that request ended (or that it is running)
    "restart": ("id", "name"),
    "reply": ("id", "ok"),  # plus "result" when ok, "error" when not
    # events, published by the supervisor; rotate_begin is repeated until the rotation ends,
    # so a collector that was restarting when it was first sent still learns of it
    "rotate_begin": ("rotation", "symbols"),
    # collectors hold their rows: swap now; `request` echoes the rotate_request's
    "rotate_ready": ("rotation", "held", "missing", "request"),
    "rotate_end": ("rotation",),
    "export_now": ("request",),  # to the exporter: run a cycle now
    # a symbol's tor exited and is being restarted: its collector's gap has this reason
    "tor_restarted": ("name", "detail"),
    "log_level": ("level",),  # a reload changed log.level: every child takes it at once
    # reports, pushed by children
    "heartbeat": ("name", "pid", "stats"),
    "rotate_request": ("name", "request"),  # the exporter asks for a rotation
    "rotate_ack": ("name", "rotation"),  # a collector holds its rows
    "rotate_done": ("name", "rotation"),  # the exporter swapped the tables
    "export_done": ("name", "request", "ok", "files", "error"),
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

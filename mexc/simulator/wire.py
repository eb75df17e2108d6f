"""What the simulator puts on the wire: RFC 6455 server frames, MEXC's JSON envelope for acks,
pongs and errors, the dead-letter rows a collector stores for what it cannot use, and MEXC's
spellings of exact decimal numbers."""
import itertools
import json
import random
import struct
import time

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEAD_LETTER_CHARS = 500

_SHORT_HEADER = struct.Struct("!BB")
_MEDIUM_HEADER = struct.Struct("!BBH")
_LONG_HEADER = struct.Struct("!BBQ")


def wall_ms() -> int:
    return int(time.time() * 1000)


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One unmasked, unfragmented server frame."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADER.pack(0x80 | opcode, n) + payload
    if n < 65536:
        return _MEDIUM_HEADER.pack(0x80 | opcode, 126, n) + payload
    return _LONG_HEADER.pack(0x80 | opcode, 127, n) + payload


def text_frame(text: str) -> bytes:
    return encode_frame(text.encode())


def unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def control_message(channel: str, data: str) -> str:
    """An ack, pong or rs.error in MEXC's envelope; data is already JSON text."""
    return f'{{"channel":"{channel}","data":{data},"ts":{wall_ms()}}}'


def rs_error(text: str) -> str:
    return control_message("rs.error", json.dumps(text))


def merges_deals(param: dict) -> bool:
    """Whether MEXC merges this sub.deal's prints: unless its param says "compress": false."""
    return param.get("compress") is not False


def dead_letter(text: str | None) -> tuple:
    # The simulator cannot know the receive time a collector stamps on a dead letter.
    return (None, "dl", None if text is None else text[:DEAD_LETTER_CHARS])


# --- exact decimal text -------------------------------------------------------------------------

PLAIN, PADDED, EXPONENT = range(3)


def decimal_text(units: int, scale: int, style: int = PLAIN) -> str:
    """JSON number text for units * 10**-scale, spelled as MEXC does: plain (ints when whole),
    padded with trailing zeros (0.080100) or in exponent form (7.548E+4)."""
    sign = "-" if units < 0 else ""
    digits = str(abs(units))
    if style == EXPONENT and units:
        mantissa = digits.rstrip("0")
        fraction = "." + mantissa[1:] if len(mantissa) > 1 else ""
        return f"{sign}{mantissa[0]}{fraction}E{len(digits) - 1 - scale:+d}"
    digits = digits.rjust(scale + 1, "0")
    whole, fraction = digits[: len(digits) - scale], digits[len(digits) - scale:]
    fraction = fraction + "00" if style == PADDED else fraction.rstrip("0")
    return f"{sign}{whole}.{fraction}" if fraction else sign + whole


def style_cycle(rng: random.Random):
    """An endless seeded mix of spellings: mostly plain, some padded, a few exponents.
    Cycling a precomputed list is far cheaper than a random draw per number."""
    return itertools.cycle([PLAIN if r < 0.85 else PADDED if r < 0.95 else EXPONENT
                            for r in (rng.random() for _ in range(1009))])

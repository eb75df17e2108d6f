"""FrameReader (collector/connection.py), the hand-made RFC 6455 reader, fed prepared bytes.

No server: a fake `ws` whose sock.recv_into() hands out prepared chunks (or raises socket.timeout)
and whose pong() records what it was asked to send.
"""
import ctypes
import random
import socket
import struct
import time
from collections import deque

import pytest
from hypothesis import given, settings, strategies as st

from collector import connection
from collector.connection import (MAX_MESSAGE_BYTES, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING,
                                  OP_PONG, OP_TEXT, FrameReader, ProtocolError)

TIMEOUT = object()  # a chunk that makes recv() raise socket.timeout


class FakeSock:
    def __init__(self, chunks):
        self.chunks = deque(chunks)
        self.asked = []

    def recv_into(self, buffer):
        self.asked.append(len(buffer))
        chunk = self.chunks.popleft()
        if chunk is TIMEOUT:
            raise socket.timeout("timed out")
        assert len(chunk) <= len(buffer), "the fake hands out at most what was asked"
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def add(self, *chunks):
        self.chunks.extend(chunks)


class FakeWs:
    def __init__(self, chunks=()):
        self.sock = FakeSock(chunks)
        self.pongs = []

    def pong(self, payload):
        self.pongs.append(payload)


def frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = False) -> bytes:
    """One server frame (unmasked unless asked), with the shortest length encoding."""
    head = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([m | n])
    elif n < 1 << 16:
        head += bytes([m | 126]) + struct.pack("!H", n)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n)
    if mask:
        key = b"\x01\x02\x03\x04"
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def reader_for(*chunks):
    ws = FakeWs(chunks)
    return FrameReader(ws), ws


def read_all(reader):
    """Read until the prepared chunks are used up; every message, in order."""
    messages = []
    while reader.sock.chunks:
        got = reader.read()
        assert got is not None
        messages += got
    return messages


# --- single frames and lengths ---------------------------------------------------------------

def test_a_text_frame():
    reader, ws = reader_for(frame(OP_TEXT, b'{"a":1}'))
    assert reader.read() == [(OP_TEXT, b'{"a":1}')]
    assert ws.pongs == [] and reader.buffer == bytearray()


def test_a_binary_frame():
    reader, _ = reader_for(frame(OP_BINARY, b"\x00\xff\x10"))
    assert reader.read() == [(OP_BINARY, b"\x00\xff\x10")]


def test_payloads_are_bytes():
    reader, _ = reader_for(frame(OP_TEXT, b"x"))
    [(_op, payload)] = reader.read()
    assert type(payload) is bytes


@pytest.mark.parametrize("size, length_byte", [
    (0, 0), (1, 1), (125, 125),  # 7-bit length
    (126, 126), (127, 126), (65535, 126),  # 16-bit length
    (65536, 127), (70000, 127),  # 64-bit length
])
def test_every_length_encoding(size, length_byte):
    payload = random.Random(size).randbytes(size)
    data = frame(OP_BINARY, payload)
    assert data[1] == length_byte
    reader, _ = reader_for(data)
    assert read_all(reader) == [(OP_BINARY, payload)]
    assert reader.buffer == bytearray()


def test_a_long_length_field_with_a_short_payload_is_accepted():
    # not the shortest encoding, but RFC-legal for a reader to take
    data = bytes([0x81, 126]) + struct.pack("!H", 3) + b"abc"
    data += bytes([0x81, 127]) + struct.pack("!Q", 2) + b"de"
    reader, _ = reader_for(data)
    assert reader.read() == [(OP_TEXT, b"abc"), (OP_TEXT, b"de")]


def test_a_frame_of_exactly_the_maximum_is_not_refused_by_its_header():
    reader, _ = reader_for(bytes([0x82, 127]) + struct.pack("!Q", MAX_MESSAGE_BYTES))
    assert reader.read() == []  # waits for the body


# --- many frames, split frames ---------------------------------------------------------------

def test_several_frames_in_one_recv():
    data = (frame(OP_TEXT, b"one") + frame(OP_BINARY, b"two") + frame(OP_TEXT, b"x" * 300)
            + frame(OP_TEXT, b""))
    reader, _ = reader_for(data)
    assert reader.read() == [(OP_TEXT, b"one"), (OP_BINARY, b"two"), (OP_TEXT, b"x" * 300),
                             (OP_TEXT, b"")]
    assert reader.buffer == bytearray()


def test_a_partial_frame_waits_and_returns_an_empty_list():
    data = frame(OP_TEXT, b"hello")
    reader, _ = reader_for(data[:3], data[3:])
    assert reader.read() == []
    assert reader.read() == [(OP_TEXT, b"hello")]


STREAM_MESSAGES = [(OP_TEXT, b"a"), (OP_BINARY, bytes(range(200))), (OP_TEXT, b"z" * 70000),
                   (OP_TEXT, b"")]
STREAM = b"".join(frame(op, payload) for op, payload in STREAM_MESSAGES)


@pytest.mark.parametrize("opcode, payload", [(OP_TEXT, b"hello world"), (OP_BINARY, b"b" * 300)],
                         ids=["7-bit", "16-bit"])
def test_a_frame_split_at_every_byte_gives_the_same_message(opcode, payload):
    frame_bytes, expected = frame(opcode, payload), [(opcode, payload)]
    for cut in range(1, len(frame_bytes)):
        reader, _ = reader_for(frame_bytes[:cut], frame_bytes[cut:])
        first = reader.read()
        assert first == [], cut
        assert reader.read() == expected, cut


def test_a_64_bit_frame_split_at_every_header_byte_and_in_its_body():
    payload = random.Random(7).randbytes(65536 + 5)
    data = frame(OP_BINARY, payload)
    for cut in list(range(1, 14)) + [100, 65536, len(data) - 1]:
        reader, _ = reader_for(data[:cut], data[cut:])
        assert reader.read() == [], cut
        assert reader.read() == [(OP_BINARY, payload)], cut


def test_a_stream_split_at_every_byte_boundary_into_two_reads():
    small = STREAM_MESSAGES[:2] + [(OP_TEXT, b"q" * 130), (OP_TEXT, b"")]
    data = b"".join(frame(op, payload) for op, payload in small)
    for cut in range(1, len(data)):
        reader, _ = reader_for(data[:cut], data[cut:])
        assert read_all(reader) == small, cut
        assert reader.buffer == bytearray()


def test_a_stream_delivered_one_byte_at_a_time():
    small = [(OP_TEXT, b"a"), (OP_BINARY, b"b" * 300), (OP_TEXT, b"")]
    data = b"".join(frame(op, payload) for op, payload in small)
    reader, _ = reader_for(*[data[i:i + 1] for i in range(len(data))])
    assert read_all(reader) == small


def test_a_big_stream_in_uneven_chunks():
    rng = random.Random(3)
    chunks, pos = [], 0
    while pos < len(STREAM):
        step = rng.choice([1, 2, 3, 7, 100, 5000, 40000])
        chunks.append(STREAM[pos:pos + step])
        pos += step
    reader, _ = reader_for(*chunks)
    assert read_all(reader) == STREAM_MESSAGES


# --- fragmented messages and control frames --------------------------------------------------

def test_a_fragmented_text_message_is_reassembled():
    data = (frame(OP_TEXT, b"hel", fin=False) + frame(OP_CONT, b"lo ", fin=False)
            + frame(OP_CONT, b"world"))
    reader, _ = reader_for(data)
    assert reader.read() == [(OP_TEXT, b"hello world")]
    assert reader.fragments is None


def test_a_fragmented_binary_message_across_reads():
    parts = [frame(OP_BINARY, b"\x01" * 200, fin=False), frame(OP_CONT, b"", fin=False),
             frame(OP_CONT, b"\x02" * 70000)]
    reader, _ = reader_for(*parts)
    assert reader.read() == []
    assert reader.read() == []
    assert reader.read() == [(OP_BINARY, b"\x01" * 200 + b"\x02" * 70000)]


def test_a_ping_between_fragments_is_answered_and_reassembly_goes_on():
    data = (frame(OP_TEXT, b"ab", fin=False) + frame(OP_PING, b"are you there")
            + frame(OP_CONT, b"cd", fin=False) + frame(OP_PONG, b"late pong")
            + frame(OP_CONT, b"ef"))
    for cut in range(1, len(data)):
        reader, ws = reader_for(data[:cut], data[cut:])
        assert read_all(reader) == [(OP_TEXT, b"abcdef")], cut
        assert ws.pongs == [b"are you there"], cut


def test_a_ping_is_answered_with_its_payload():
    reader, ws = reader_for(frame(OP_PING, b"") + frame(OP_PING, b"x" * 125))
    assert reader.read() == []
    assert ws.pongs == [b"", b"x" * 125]


def test_a_ping_and_a_message_in_one_read():
    reader, ws = reader_for(frame(OP_TEXT, b"m1") + frame(OP_PING, b"p") + frame(OP_TEXT, b"m2"))
    assert reader.read() == [(OP_TEXT, b"m1"), (OP_TEXT, b"m2")]
    assert ws.pongs == [b"p"]


def test_a_pong_counts_as_traffic_with_no_messages():
    reader, ws = reader_for(frame(OP_PONG, b"keepalive"))
    got = reader.read()
    assert got == [] and got is not None
    assert ws.pongs == []


def test_a_close_frame_is_returned_with_its_payload():
    payload = struct.pack("!H", 1000) + b"bye"
    reader, _ = reader_for(frame(OP_TEXT, b"last") + frame(OP_CLOSE, payload))
    assert reader.read() == [(OP_TEXT, b"last"), (OP_CLOSE, payload)]


def test_an_empty_close_frame():
    reader, _ = reader_for(frame(OP_CLOSE))
    assert reader.read() == [(OP_CLOSE, b"")]


# --- errors ----------------------------------------------------------------------------------

def test_a_masked_server_frame_is_a_protocol_error():
    reader, _ = reader_for(frame(OP_TEXT, b"hidden", mask=True))
    with pytest.raises(ProtocolError, match="masked"):
        reader.read()


def test_an_oversized_length_is_refused_before_the_body_arrives():
    header = bytes([0x82, 127]) + struct.pack("!Q", MAX_MESSAGE_BYTES + 1)
    reader, _ = reader_for(header)  # the header alone: no body is ever buffered
    with pytest.raises(ProtocolError, match="over"):
        reader.read()
    assert len(reader.buffer) == len(header)


def test_a_huge_64_bit_length_is_refused():
    reader, _ = reader_for(bytes([0x81, 127]) + b"\xff" * 8)
    with pytest.raises(ProtocolError):
        reader.read()


def test_a_fragmented_message_growing_past_the_maximum_is_refused(monkeypatch):
    monkeypatch.setattr(connection, "MAX_MESSAGE_BYTES", 1000)
    data = (frame(OP_TEXT, b"a" * 600, fin=False) + frame(OP_CONT, b"b" * 300, fin=False)
            + frame(OP_CONT, b"c" * 300))  # every frame is under the maximum, the sum is not
    reader, _ = reader_for(data)
    with pytest.raises(ProtocolError, match="message over 1000"):
        reader.read()


def test_a_fragmented_message_of_exactly_the_maximum_is_accepted(monkeypatch):
    monkeypatch.setattr(connection, "MAX_MESSAGE_BYTES", 1000)
    data = frame(OP_TEXT, b"a" * 600, fin=False) + frame(OP_CONT, b"b" * 400)
    reader, _ = reader_for(data)
    assert reader.read() == [(OP_TEXT, b"a" * 600 + b"b" * 400)]


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_an_unexpected_opcode_is_a_protocol_error(opcode):
    reader, _ = reader_for(frame(opcode, b"?"))
    with pytest.raises(ProtocolError, match="opcode"):
        reader.read()


def test_a_continuation_without_a_first_fragment_is_a_protocol_error():
    reader, _ = reader_for(frame(OP_CONT, b"orphan"))
    with pytest.raises(ProtocolError):
        reader.read()


def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error():
    for second in (frame(OP_TEXT, b"x", fin=False), frame(OP_BINARY, b"x")):
        reader, _ = reader_for(frame(OP_TEXT, b"ab", fin=False) + second + frame(OP_CONT, b"cd"))
        with pytest.raises(ProtocolError, match="inside a fragmented"):
            reader.read()


@pytest.mark.parametrize("bits", [0x40, 0x20, 0x10])
def test_reserved_bits_are_a_protocol_error(bits):
    data = frame(OP_TEXT, b"x")
    reader, _ = reader_for(bytes([data[0] | bits]) + data[1:])
    with pytest.raises(ProtocolError, match="reserved"):
        reader.read()


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frames_must_be_whole_and_short(opcode):
    for bad in (frame(opcode, b"p", fin=False), frame(opcode, b"p" * 126)):
        reader, ws = reader_for(bad)
        with pytest.raises(ProtocolError, match="control frame"):
            reader.read()
        assert ws.pongs == []


def test_many_tiny_fragments_cost_linear_time():
    """The running total: 100,000 empty continuation frames in one read are quick (the old
    reader summed every fragment again on each one: quadratic, seconds of CPU)."""
    stream = frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"", fin=False) * 100_000 \
        + frame(OP_CONT, b"z")
    reader, _ = reader_for(*[stream[i:i + 200_000] for i in range(0, len(stream), 200_000)])
    started = time.process_time()
    assert read_all(reader) == [(OP_TEXT, b"az")]
    # a complexity guard, not a timing goal: CPU time (not wall), linear ~0.2 s, quadratic minutes
    assert time.process_time() - started < 5.0


def test_an_empty_recv_is_a_connection_reset():
    reader, _ = reader_for(b"")
    with pytest.raises(ConnectionResetError):
        reader.read()


def test_an_empty_recv_after_a_partial_frame_is_a_connection_reset():
    reader, _ = reader_for(frame(OP_TEXT, b"cut short")[:4], b"")
    assert reader.read() == []
    with pytest.raises(ConnectionResetError):
        reader.read()


def test_a_socket_timeout_returns_none_and_keeps_the_partial_frame():
    data = frame(OP_TEXT, b"slow")
    reader, _ = reader_for(data[:3], TIMEOUT, data[3:])
    assert reader.read() == []
    assert reader.read() is None
    assert reader.read() == [(OP_TEXT, b"slow")]


def test_it_asks_for_big_reads():
    reader, ws = reader_for(frame(OP_TEXT, b"x"))
    reader.read()
    assert ws.sock.asked == [connection.READ_BYTES]


def resident_bytes(mapped) -> int:
    """How much of an mmap object is in memory now (its Rss in /proc/self/smaps)."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    with open("/proc/self/smaps") as f:
        lines = iter(f)
        for line in lines:
            if line.split("-", 1)[0] == f"{start:x}":
                for field in lines:
                    if field.startswith("Rss:"):
                        return int(field.split()[1]) * 1024
    raise AssertionError("the read buffer is not in /proc/self/smaps")


def test_after_a_long_read_the_buffer_keeps_only_its_first_pages_in_memory():
    """A burst reaches deep into the 256 KiB read buffer; a collector keeps none of that."""
    burst = [frame(OP_BINARY, bytes([i]) * 50_000) for i in range(4)]
    reader, _ = reader_for(frame(OP_TEXT, b"x"), b"".join(burst))
    assert reader.read() == [(OP_TEXT, b"x")]
    assert resident_bytes(reader.chunk) <= 4096  # only what reads reached is memory
    assert reader.read() == [(OP_BINARY, bytes([i]) * 50_000) for i in range(4)]
    assert resident_bytes(reader.chunk) <= connection.KEEP_BYTES


# --- fuzz ------------------------------------------------------------------------------------

SIZES = st.one_of(st.integers(0, 140), st.sampled_from([125, 126, 127, 300, 65535, 65536, 70001]))


class Conversation(tuple):
    """(stream, messages, pongs), shown short when hypothesis reports a failing example."""

    def __repr__(self):
        stream, messages, pongs = self
        return (f"<{len(stream)} bytes: messages {[(op, len(p)) for op, p in messages]}, "
                f"pongs {[len(p) for p in pongs]}>")


@st.composite
def conversations(draw):
    """A server's frames -> (the frames, the expected messages, the expected pongs)."""
    rng = random.Random(draw(st.integers(0, 2 ** 32)))
    frames, messages, pongs = [], [], []
    big_budget = 2  # at most two payloads over 64 KiB per example, to stay quick

    def payload(size):
        nonlocal big_budget
        if size > 65535:
            if big_budget == 0:
                size = 200
            big_budget -= 1
        return rng.randbytes(size)

    def control():
        kind = draw(st.sampled_from([OP_PING, OP_PONG]))
        body = payload(draw(st.integers(0, 125)))
        if kind == OP_PING:
            pongs.append(body)
        frames.append(frame(kind, body))

    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 3)) == 0:
            control()
            continue
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        parts = [payload(draw(SIZES)) for _ in range(draw(st.integers(1, 4)))]
        for i, part in enumerate(parts):
            frames.append(frame(opcode if i == 0 else OP_CONT, part, fin=i == len(parts) - 1))
            if i < len(parts) - 1 and draw(st.booleans()):
                control()  # between fragments
        messages.append((opcode, b"".join(parts)))
    if draw(st.booleans()):
        close = struct.pack("!H", 1000) + payload(draw(st.integers(0, 20)))
        frames.append(frame(OP_CLOSE, close))
        messages.append((OP_CLOSE, close))
    return Conversation((b"".join(frames), messages, pongs))


def chunked(data: bytes, cuts) -> list:
    """`data` cut at `cuts` (taken modulo its length) and wherever a chunk would be over what
    one recv() asks for; no empty chunks (an empty recv is the server closing)."""
    n = len(data) + 1
    points = {c % n for c in cuts} | set(range(0, n, connection.READ_BYTES)) | {len(data)}
    points = sorted(points)
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=200, deadline=None)
@given(conversations(), st.lists(st.integers(0, 1 << 20), max_size=30), st.data())
def test_valid_frames_in_any_chunking_give_exactly_the_messages(conversation, cuts, data):
    stream, messages, pongs = conversation
    chunks = chunked(stream, cuts)
    # a timeout now and then changes nothing
    timeouts = data.draw(st.lists(st.integers(0, len(chunks)), max_size=3))
    for at in sorted(timeouts, reverse=True):
        chunks.insert(at, TIMEOUT)
    reader, ws = reader_for(*chunks)
    got = []
    while ws.sock.chunks:
        timed_out = ws.sock.chunks[0] is TIMEOUT
        result = reader.read()
        assert (result is None) == timed_out
        got += result or []
    assert got == messages
    assert ws.pongs == pongs
    assert reader.buffer == bytearray() and reader.fragments is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10))
def test_random_bytes_raise_only_protocol_errors_or_resets(noise, cuts):
    reader, ws = reader_for(*chunked(noise, cuts), b"")
    while ws.sock.chunks:
        try:
            result = reader.read()
        except (ProtocolError, ConnectionResetError):
            return
        assert isinstance(result, list)
        for opcode, payload in result:
            assert opcode in (OP_TEXT, OP_BINARY, OP_CLOSE) and isinstance(payload, bytes)
    pytest.fail("the final empty recv must raise ConnectionResetError")


@settings(max_examples=200, deadline=None)
@given(conversations(), st.binary(min_size=1, max_size=50), st.integers(0, 1 << 20))
def test_garbage_after_valid_frames_never_raises_anything_else(conversation, noise, cut):
    stream, _messages, _pongs = conversation
    data = stream + noise
    reader, ws = reader_for(*chunked(data, [cut]), b"")
    with pytest.raises((ProtocolError, ConnectionResetError)):
        while True:
            result = reader.read()
            assert isinstance(result, list)

"""Opening the WebSocket: directly, or through a SOCKS5 proxy (Tor) with remote DNS.

A proxy is (host, port), or (host, port, name): the name goes as the SOCKS5 user name, and
tor (IsolateSOCKSAuth, its default) never puts streams with different names on one circuit,
so a new name means a fresh circuit.

websocket-client does not TLS-wrap a socket handed to it, so on the proxy path we wrap it
ourselves, with SNI and certificate checks.  After the SOCKS handshake the PySocks wrapper is
swapped for a plain socket on the same file descriptor: PySocks adds Python calls to every
read, and the proxy needs nothing more from it once the tunnel is up.

websocket-client does the handshake and sends our requests; incoming frames are read by
FrameReader, which takes many frames per recv() instead of three recv() calls per frame (the
collector's hot loop spent half its time in websocket-client's reader).

The REST request of the backfill (http_get) is one GET per connection, its answer read by
read_response: http.client parses headers with the email package, and running that once made
about 0.3 MiB of every forked collector's memory private (pages it shares with the supervisor).
"""
import functools
import mmap
import socket
import ssl
import struct
from typing import Optional, Tuple
from urllib.parse import urlsplit

import socks
import websocket


@functools.lru_cache(maxsize=None)
def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """One per CA file and process (loading the system's CA bundle costs about 1 MiB each
    time), made by the supervisor before it forks collectors: see share_tls()."""
    return ssl.create_default_context(cafile=ca_file or None)


def share_tls(exchange: dict) -> None:
    """Before forking collectors: make the TLS context of the [exchange] settings, and its
    first TLS object (OpenSSL builds state on the first one), in this process, so every
    collector forked later shares them.  Made in each collector instead, they cost it 4 MiB of
    private memory, the shared ones 0.4 MiB."""
    if exchange["url"].startswith("wss://") or exchange["rest_url"].startswith("https://"):
        tls_context(exchange["ca_file"]).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(),
                                                  server_hostname="localhost")


def open_websocket(url: str, timeout: float, ca_file: str = "",
                   socks_proxy: Optional[Tuple[str, int]] = None) -> websocket.WebSocket:
    """Connect and finish the WebSocket handshake; raises OSError or WebSocketException."""
    options = dict(timeout=timeout, skip_utf8_validation=True, enable_multithread=False,
                   suppress_origin=True)
    secure = url.startswith("wss://")
    if socks_proxy is None:
        sslopt = {"context": tls_context(ca_file)} if secure else None
        return websocket.create_connection(url, sslopt=sslopt, **options)
    sock = _socks_tunnel(url, timeout, socks_proxy)
    if secure:
        sock = tls_context(ca_file).wrap_socket(sock, server_hostname=urlsplit(url).hostname)
    return websocket.create_connection(url, socket=sock, **options)


def http_get(url: str, timeout: float, ca_file: str = "",
             socks_proxy: Optional[Tuple[str, int]] = None) -> Tuple[int, bytes]:
    """GET `url` (http:// or https://) along the same path as the WebSocket: directly or
    through the SOCKS5 proxy with remote DNS, our TLS with SNI.  Returns (status, body);
    raises OSError (ProtocolError for an answer that is not HTTP/1.x)."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    if socks_proxy is None:
        sock = socket.create_connection((parts.hostname, parts.port or (443 if secure else 80)),
                                        timeout)
    else:
        sock = _socks_tunnel(url, timeout, socks_proxy)
    try:
        if secure:
            sock = tls_context(ca_file).wrap_socket(sock, server_hostname=parts.hostname)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc.rpartition('@')[2]}\r\n"
                     "Accept: application/json\r\nAccept-Encoding: identity\r\n"
                     "Connection: close\r\n\r\n".encode())
        return read_response(sock.recv)
    finally:
        sock.close()


MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # a REST answer is a few KB


def read_response(recv) -> Tuple[int, bytes]:
    """The HTTP/1.x response that `recv` (a socket's recv) brings: (status, body), the body
    framed as its headers say (chunked, Content-Length) or else by the end of the connection.
    Interim (1xx) responses are skipped."""
    received = _Received(recv)
    status = 100
    while 100 <= status < 200:
        version, _, rest = received.line().partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {version + b' ' + rest!r:.80}")
        status, headers = int(rest[:3]), {}
        while line := received.line():
            name, colon, value = line.partition(b":")
            if not colon:
                raise ProtocolError(f"not an HTTP header: {line!r:.80}")
            headers[name.strip().lower()] = value.strip()
    try:
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return status, received.chunked()
        if b"content-length" in headers:
            return status, received.exactly(int(headers[b"content-length"]))
    except ValueError as e:  # a length that is not a number
        raise ProtocolError(f"bad length in an HTTP answer: {e}") from None
    return status, received.to_end()


class _Received:
    """What recv() brought so far, taken line by line or by length."""

    def __init__(self, recv):
        self.recv = recv
        self.data = bytearray()
        self.total = 0

    def _more(self, end_ok: bool = False) -> bool:
        chunk = self.recv(65536)
        if not chunk:
            if end_ok:
                return False
            raise ConnectionResetError("the server closed the connection inside its answer")
        self.total += len(chunk)
        if self.total > MAX_RESPONSE_BYTES:
            raise ProtocolError(f"an answer over {MAX_RESPONSE_BYTES} bytes")
        self.data += chunk
        return True

    def line(self) -> bytes:
        while (end := self.data.find(b"\n")) < 0:
            self._more()
        line = bytes(self.data[:end]).rstrip(b"\r")
        del self.data[:end + 1]
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.data) < n:
            self._more()
        taken = bytes(self.data[:n])
        del self.data[:n]
        return taken

    def to_end(self) -> bytes:
        while self._more(end_ok=True):
            pass
        return bytes(self.data)

    def chunked(self) -> bytes:
        chunks = []
        while size := int(self.line().partition(b";")[0], 16):  # ";...": chunk extensions
            chunks.append(self.exactly(size))
            if self.line():
                raise ProtocolError("a chunk longer than its size line says")
        while self.line():  # trailer fields, up to the empty line
            pass
        return b"".join(chunks)


MAX_MESSAGE_BYTES = 64 * 1024 * 1024
READ_BYTES = 256 * 1024  # the most one read takes: a burst of frames in few system calls
KEEP_BYTES = 16 * 1024  # of the read buffer kept in memory after a longer read
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ProtocolError(OSError):
    """The server broke the rules of WebSocket framing or of an HTTP answer; the connection
    cannot be trusted."""


class FrameReader:
    """Server-to-client WebSocket frames (RFC 6455), read in bulk from the socket.

    read() returns the complete messages that one recv() made available, as (opcode, payload)
    with opcode OP_TEXT, OP_BINARY or OP_CLOSE; pings are answered here, pongs count as
    traffic (an empty list when only control frames arrived).  A socket timeout returns None.
    Anything RFC 6455 forbids (masked or reserved bits, a new message inside a fragmented
    one, a fragmented or long control frame, an unknown opcode) raises ProtocolError.
    """

    def __init__(self, ws):
        self.ws = ws  # websocket-client's WebSocket: we send through it
        self.sock = ws.sock
        self.buffer = bytearray()
        self.fragments = None  # (opcode, [payloads]) of a fragmented message
        self.fragment_bytes = 0  # their total length, kept as they arrive
        # Read into one buffer, not recv(READ_BYTES): that makes a new bytes object of
        # READ_BYTES per read and shrinks it to what came, and C's malloc, asked 16 times a
        # second for 256 KiB, took fresh memory each time and left the rest in holes (a
        # collector grew by about 160 KiB a minute, without end).  Mapped, not allocated: only
        # the pages a read reached are memory, and after a burst all but KEEP_BYTES go back.
        self.chunk = mmap.mmap(-1, READ_BYTES)
        self.view = memoryview(self.chunk)

    def read(self):
        try:
            size = self.sock.recv_into(self.view)
        except socket.timeout:
            return None
        if not size:
            raise ConnectionResetError("the server closed the TCP connection")
        buffer = self.buffer
        buffer += self.view[:size]
        if size > KEEP_BYTES:
            self.chunk.madvise(mmap.MADV_DONTNEED, KEEP_BYTES)
        messages, pos, end = [], 0, len(buffer)
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            length, header = second & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, header = struct.unpack_from("!H", buffer, pos + 2)[0], 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, header = struct.unpack_from("!Q", buffer, pos + 2)[0], 10
            if second & 0x80:
                raise ProtocolError("the server sent a masked frame")
            if length > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"a frame of {length} bytes is over {MAX_MESSAGE_BYTES}")
            if end - pos < header + length:
                break
            payload = bytes(buffer[pos + header:pos + header + length])
            pos += header + length
            self._frame(first, payload, messages)
        del buffer[:pos]
        return messages

    def _frame(self, first: int, payload: bytes, messages: list) -> None:
        fin, opcode = first & 0x80, first & 0x0F
        if first & 0x70:
            raise ProtocolError("reserved bits set, but no extension was negotiated")
        if opcode in (OP_TEXT, OP_BINARY):
            if self.fragments is not None:
                raise ProtocolError("a new message began inside a fragmented one")
            if fin:
                messages.append((opcode, payload))
            else:
                self.fragments, self.fragment_bytes = (opcode, [payload]), len(payload)
        elif opcode == OP_CONT:
            if self.fragments is None:
                raise ProtocolError("a continuation frame outside a fragmented message")
            self.fragments[1].append(payload)
            self.fragment_bytes += len(payload)
            if self.fragment_bytes > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"a message over {MAX_MESSAGE_BYTES} bytes")
            if fin:
                messages.append((self.fragments[0], b"".join(self.fragments[1])))
                self.fragments = None
        elif opcode in (OP_PING, OP_PONG, OP_CLOSE):
            if not fin or len(payload) > 125:
                raise ProtocolError("a control frame fragmented or over 125 bytes")
            if opcode == OP_PING:
                self.ws.pong(payload)
            elif opcode == OP_CLOSE:
                messages.append((OP_CLOSE, payload))
        else:
            raise ProtocolError(f"unexpected opcode {opcode:#x}")


def _socks_tunnel(url: str, timeout: float, proxy: tuple) -> socket.socket:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
    tunnel = socks.socksocket()
    name = proxy[2] if len(proxy) > 2 else None
    tunnel.set_proxy(socks.SOCKS5, proxy[0], proxy[1], rdns=True, username=name,
                     password="mexc" if name else None)
    tunnel.settimeout(timeout)
    try:
        tunnel.connect((parts.hostname, port))
    except Exception:
        tunnel.close()
        raise
    plain = socket.socket(fileno=tunnel.detach())
    plain.settimeout(timeout)
    plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return plain

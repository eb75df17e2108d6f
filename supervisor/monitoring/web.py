"""The supervisor's HTTP side ([http] listen): the dashboard at /, /api/status (what
`mexc status --json` prints), /api/dashboard (the page's history, timeline and export
calendar) and /metrics (Prometheus).

The standard library's ThreadingHTTPServer in threads of its own: a slow client never holds
up the supervisor's loop.  Everything served comes from the Monitor's last sample.  With
[http] token set, every request needs it, as `Authorization: Bearer TOKEN` (Prometheus'
`authorization`) or as the password of HTTP Basic auth (a browser asks for it); the token
itself is never sent back.
"""
import base64
import hmac
import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from core.config import listen_address
from supervisor.monitoring import metrics

log = logging.getLogger(__name__)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html")


class WebServer:
    """start() binds and serves; stop() shuts it down.  Raises OSError when it cannot bind."""

    def __init__(self, listen: str, token: str, monitor):
        self.listen = listen  # as the config says it (port 0 stays 0 here)
        self.host, self.port = listen_address(listen)
        self.token, self.monitor = token, monitor
        with open(PAGE, "rb") as f:
            self.page = f.read()
        self.server = None

    def start(self) -> "WebServer":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family,
                                                               "daemon_threads": True})
        self.server = server_class((self.host, self.port), _handler(self))
        self.port = self.server.server_address[1]  # the one the kernel chose for port 0
        # forked children (collectors) must not keep the port open after the supervisor dies
        os.register_at_fork(after_in_child=self.server.socket.close)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                         name="http", daemon=True).start()
        log.info("dashboard on %s (metrics at /metrics)%s", self.url,
                 ", token required" if self.token else "")
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def authorized(self, header: str) -> bool:
        if not self.token:
            return True
        scheme, _, credentials = (header or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                credentials = base64.b64decode(credentials).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.encode(), self.token.encode())

    def route(self, path: str):
        """(status code, content type, body) for a GET of `path`."""
        if path == "/":
            return 200, "text/html; charset=utf-8", self.page
        if path == "/metrics":
            return 200, metrics.CONTENT_TYPE, metrics.render(self.monitor)
        if path == "/api/status":
            status = self.monitor.snapshot()
            if status is None:
                return 503, "application/json", b'{"error": "starting"}'
            return 200, "application/json", json.dumps(status).encode()
        if path == "/api/dashboard":
            return 200, "application/json", json.dumps(self.monitor.dashboard()).encode()
        return 404, "text/plain", b"not found: try / /api/status /api/dashboard /metrics\n"


def _handler(web: WebServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "mexc"

        def do_GET(self):
            if not web.authorized(self.headers.get("Authorization")):
                self._send(401, "text/plain", b"token required\n",
                           {"WWW-Authenticate": 'Basic realm="mexc"'})
                return
            try:
                self._send(*web.route(self.path.split("?", 1)[0]))
            except Exception:
                log.exception("http: %s failed", self.path)
                self._send(500, "text/plain", b"internal error; see the daemon's log\n")

        def _send(self, code: int, content_type: str, body: bytes, headers=None):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # one debug line, not stderr per request
            log.debug("http %s %s", self.address_string(), format % args)

    return Handler

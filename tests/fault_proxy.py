"""A fault-injecting HTTP proxy on loopback, in front of the test S3 server (moto).

Clients point ``AWS_ENDPOINT_URL`` at the proxy. Every request is relayed to the upstream server
unchanged (headers included, so request signatures still hold), except those a fault rule
claims: a rule matches requests by method and a regular expression on the path, and answers the
next ``count`` of them itself with

- ``"503"``: 503 SlowDown, S3's "reduce your request rate" (throttling),
- ``"500"``: 500 InternalError,
- ``"reset"``: no answer at all; the connection is closed with a TCP reset.

``count=None`` makes a rule fail every match (an outage). Tests read what happened from
``faults`` (each fault served) and ``relayed`` (each request that reached the server).

Only what the S3 protocol over HTTP/1.1 needs is handled: bodies framed by Content-Length or by
chunked transfer encoding, keep-alive connections, HEAD responses without a body.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

KINDS = ("503", "500", "reset")
_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Connection-level headers that belong to one hop, not to the request or response.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection"}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError):
            return  # a client that went away (a killed trainer) is no error of the proxy's
        super().handle_error(request, client_address)


@dataclass
class Rule:
    kind: str
    count: int | None  # faults left to serve; None: every match
    method: str | None
    path: re.Pattern[str]
    served: int = 0

    def claims(self, method: str, path: str) -> bool:
        if self.count is not None and self.served >= self.count:
            return False
        return (self.method is None or self.method == method) and bool(self.path.search(path))


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # path and query, as sent
    kind: str  # the fault served, or the upstream status for a relayed request


@dataclass
class FaultProxy:
    """``FaultProxy(upstream_url)``; ``start()`` binds 127.0.0.1 and returns the proxy's URL."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    faults: list[Seen] = field(default_factory=list)
    relayed: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def inject(self, kind: str, count: int | None = 1, *, method: str | None = None,
               path: str = "") -> Rule:
        """Serve fault ``kind`` to the next ``count`` requests whose method is ``method`` (any
        if None) and whose path matches the regular expression ``path``; rules apply in the
        order they were added."""
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r} is not one of {KINDS}")
        rule = Rule(kind, count, method, re.compile(path))
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _claim(self, method: str, path: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule.claims(method, path):
                    rule.served += 1
                    self.faults.append(Seen(method, path, rule.kind))
                    return rule.kind
        return None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> str:
        proxy = self
        target = urlsplit(self.upstream)
        host, port = target.hostname or "127.0.0.1", target.port or 80

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the tests read ``faults`` and ``relayed``

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()  # read in full either way: the connection stays in sync
                kind = proxy._claim(self.command, self.path)
                if kind == "reset":
                    # SO_LINGER with a zero timeout: close() sends RST, not FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind is not None:
                    status, code, message = _ERRORS[kind]
                    self._answer(status, [("Content-Type", "application/xml")],
                                 f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}'
                                 f"</Code><Message>{message}</Message></Error>".encode())
                    return
                upstream = http.client.HTTPConnection(host, port, timeout=60)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True,
                                        skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            upstream.putheader(name, value)
                    upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body)
                    response = upstream.getresponse()
                    payload = response.read()
                    headers = [(k, v) for k, v in response.getheaders()
                               if k.lower() not in _HOP_BY_HOP]
                finally:
                    upstream.close()
                with proxy._lock:
                    proxy.relayed.append(Seen(self.command, self.path, str(response.status)))
                self._answer(response.status, headers, payload)

            def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response_only(status)
                for name, value in headers:
                    if name.lower() != "content-length" or self.command == "HEAD":
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                self.wfile.flush()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

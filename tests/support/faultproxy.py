"""A fault-injecting HTTP/1.1 proxy between the node mirror and a registry.

Tests point the mirror's ``--upstream`` at a :class:`FaultProxy` and set
:class:`Fault` rules while it runs: cut a blob body short, answer a
``Range`` resume with a full ``200`` or a wrong ``Content-Range``, flip one
byte, stall before or after the headers, answer an error status (``500``,
``429`` with ``Retry-After``), answer bytes that are not HTTP, close at
once, or redirect to a second "storage" listener. Every request is recorded
as ``(method, path, Range, headers)`` so a test can count what reached the
upstream; the storage listener records the headers it was sent, so a test
can assert that no ``Authorization`` travelled to it.

Bodies are relayed in chunks, never held whole. Each connection is served
by its own thread; :meth:`FaultProxy.stop` wakes stalled handlers, shuts
every open connection and joins the threads.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import json
import secrets
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import EllipsisType
from urllib.parse import urlsplit

from .tls import TlsFiles

__all__ = ["Fault", "FaultKind", "FaultProxy", "ProxyRequest"]

_CHUNK = 64 * 1024
_UPSTREAM_TIMEOUT = 30.0
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
_GARBAGE = b"\x00\xff\x13garbage, not an HTTP response\r\n\r\n\x7f\x80"


class FaultKind(enum.Enum):
    """What a fault does to the request it applies to."""

    # Before the upstream is asked.
    STALL_HEAD = "stall_head"  # read the request, answer nothing for `seconds`
    CLOSE = "close"  # close the connection without a byte
    GARBAGE = "garbage"  # answer bytes that are not HTTP, then close
    STATUS = "status"  # answer `status` (with `headers`) and an OCI error body
    IGNORE_RANGE = "ignore_range"  # drop the Range: the full blob comes as 200
    # Once the upstream answered 200 or 206.
    CUT = "cut"  # send the headers and `after` body bytes, then close
    STALL_BODY = "stall_body"  # send the headers and `after` bytes, then stall
    CORRUPT = "corrupt"  # flip the body byte at `offset` (default: the middle)
    WRONG_RANGE = "wrong_range"  # a 206 whose Content-Range starts elsewhere
    REDIRECT = "redirect"  # 307 to the storage listener instead of the body


_BEFORE_UPSTREAM = frozenset(
    {
        FaultKind.STALL_HEAD,
        FaultKind.CLOSE,
        FaultKind.GARBAGE,
        FaultKind.STATUS,
        FaultKind.IGNORE_RANGE,
    }
)
_RESUME_ONLY = frozenset({FaultKind.IGNORE_RANGE, FaultKind.WRONG_RANGE})


@dataclass
class Fault:
    """A rule: what to do to the matching requests, and how many times.

    Args:
        kind: What to do.
        times: Apply to the first ``times`` matching requests; None: all.
        methods: Request methods it matches.
        path_contains: A substring of the request path it matches (blob
            requests by default).
        after: Body bytes sent before a ``CUT`` or ``STALL_BODY``.
        offset: Body offset of the byte ``CORRUPT`` flips; None: the middle
            of the response body.
        status: The status a ``STATUS`` fault answers.
        headers: Extra headers a ``STATUS`` fault answers.
        seconds: How long a stall lasts (cut short by ``stop()``).
    """

    kind: FaultKind
    times: int | None = None
    methods: frozenset[str] = frozenset({"GET"})
    path_contains: str = "/blobs/"
    after: int = 0
    offset: int | None = None
    status: int = 500
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 60.0
    applied: int = field(default=0, init=False)

    def matches(self, request: ProxyRequest, upstream_answered: bool) -> bool:
        if self.times is not None and self.applied >= self.times:
            return False
        if (self.kind not in _BEFORE_UPSTREAM) != upstream_answered:
            return False
        if self.kind in _RESUME_ONLY and request.range is None:
            return False
        return request.method in self.methods and self.path_contains in request.path


@dataclass(frozen=True)
class ProxyRequest:
    """A request as the proxy (or its storage listener) received it.

    ``headers`` has lower-case names.
    """

    method: str
    path: str
    range: str | None
    headers: dict[str, str]


class FaultProxy:
    """A proxy to ``target_url`` with fault rules; a context manager.

    Args:
        target_url: ``http://host:port`` of the registry behind it.
        tls: Serve HTTPS with these files (``support.tls``): the faults
            then reach the mirror inside TLS, as they would from TCR.
    """

    def __init__(self, target_url: str, tls: TlsFiles | None = None) -> None:
        parts = urlsplit(target_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"FaultProxy needs an http:// target, got {target_url}")
        self.target = (parts.hostname, parts.port or 80)
        self.tls = tls
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._requests: list[ProxyRequest] = []
        self._storage_requests: list[ProxyRequest] = []
        # Redirect token -> (registry path, Authorization the proxy got), the
        # storage listener's stand-in for a signed URL.
        self._grants: dict[str, tuple[str, str | None]] = {}
        self._connections: set[socket.socket] = set()
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    # Lifecycle.

    def start(self) -> FaultProxy:
        for handler in (_ProxyHandler, _StorageHandler):
            server = _Server(("127.0.0.1", 0), handler, self, self.tls)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"faultproxy-{handler.__name__}",
                daemon=True,
            )
            thread.start()
            self._servers.append((server, thread))
        return self

    def stop(self) -> None:
        """Wake stalls, stop listening, shut open connections, join threads."""
        self.stopping.set()
        for server, _ in self._servers:
            server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for server, thread in self._servers:
            server.server_close()
            thread.join(timeout=5)
        self._servers.clear()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # What tests use.

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._port(0)}"

    @property
    def storage_url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._port(1)}"

    @property
    def _scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def add_fault(self, fault: Fault) -> Fault:
        """Add a rule after the existing ones (the first match applies)."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[ProxyRequest]:
        """Every request the proxy received, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def storage_requests(self) -> list[ProxyRequest]:
        """Every request the storage listener received (a copy)."""
        with self._lock:
            return list(self._storage_requests)

    def count(
        self, method: str, path: str, range: str | None | EllipsisType = ...
    ) -> int:
        """Requests received with this method and path, and this Range
        header (None: without one; ``...``: whatever it was)."""
        return sum(
            1
            for r in self.requests
            if r.method == method
            and r.path == path
            and (range is ... or r.range == range)
        )

    # Internals the handlers use.

    def _port(self, index: int) -> int:
        return int(self._servers[index][0].server_address[1])

    def _record(self, request: ProxyRequest, *, storage: bool = False) -> None:
        with self._lock:
            (self._storage_requests if storage else self._requests).append(request)

    def _take(self, request: ProxyRequest, upstream_answered: bool) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(request, upstream_answered):
                    fault.applied += 1
                    return fault
        return None

    def _grant(self, path: str, authorization: str | None) -> str:
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._grants[token] = (path, authorization)
        return f"{self.storage_url}/storage/{token}"

    def _granted(self, token: str) -> tuple[str, str | None] | None:
        with self._lock:
            return self._grants.get(token)

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        proxy: FaultProxy,
        tls: TlsFiles | None = None,
    ) -> None:
        self.proxy = proxy
        super().__init__(address, handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.certificate, tls.key)
            # The handshake happens in the connection's own thread, on its
            # first read, so a stalled client cannot hold up accepting.
            self.socket = context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )


class _Handler(BaseHTTPRequestHandler):
    """What the proxy and storage handlers share: bookkeeping and relaying."""

    protocol_version = "HTTP/1.1"
    server: _Server

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    def setup(self) -> None:
        super().setup()
        self.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.proxy._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        # Requests are recorded; stderr noise would only clutter test output.
        pass

    def _received(self) -> ProxyRequest:
        headers = {name.lower(): value for name, value in self.headers.items()}
        path = self.path.partition("?")[0]
        return ProxyRequest(self.command, path, headers.get("range"), headers)

    def _drain_request_body(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        while length > 0:
            chunk = self.rfile.read(min(length, _CHUNK))
            if not chunk:
                break
            length -= len(chunk)

    def _open_upstream(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        host, port = self.proxy.target
        upstream = http.client.HTTPConnection(host, port, timeout=_UPSTREAM_TIMEOUT)
        try:
            upstream.request(method, path, headers=headers)
            return upstream, upstream.getresponse()
        except BaseException:
            upstream.close()
            raise

    def _write_head(
        self, status: int, reason: str, headers: list[tuple[str, str]]
    ) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _relay(
        self,
        response: http.client.HTTPResponse,
        fault: Fault | None = None,
        content_range: str | None = None,
    ) -> None:
        """Send the upstream's answer on, with ``fault`` done to its body."""
        headers = _forwardable(response.getheaders())
        if content_range is not None:
            headers = [(n, v) for n, v in headers if n.lower() != "content-range"]
            headers.append(("Content-Range", content_range))
        if self.command == "HEAD":
            self._write_head(response.status, response.reason, headers)
            return
        if response.getheader("content-length") is None:
            # Small answers only (errors, JSON): blobs always have a length.
            body = response.read()
            headers.append(("Content-Length", str(len(body))))
            self._write_head(response.status, response.reason, headers)
            self.wfile.write(body)
            return
        self._write_head(response.status, response.reason, headers)
        length = int(response.getheader("content-length") or 0)
        self._relay_body(response, length, fault)

    def _relay_body(
        self, response: http.client.HTTPResponse, length: int, fault: Fault | None
    ) -> None:
        kind = fault.kind if fault else None
        stop_at = flip_at = None
        if fault is not None and kind in (FaultKind.CUT, FaultKind.STALL_BODY):
            stop_at = fault.after
        if fault is not None and kind is FaultKind.CORRUPT:
            flip_at = length // 2 if fault.offset is None else fault.offset
        sent = 0
        for chunk in _chunks(response):
            if stop_at is not None and sent + len(chunk) >= stop_at:
                chunk = chunk[: stop_at - sent]
            if flip_at is not None and sent <= flip_at < sent + len(chunk):
                mutable = bytearray(chunk)
                mutable[flip_at - sent] ^= 0xFF
                chunk = bytes(mutable)
            self.wfile.write(chunk)
            sent += len(chunk)
            if stop_at is not None and sent >= stop_at:
                break
        if fault is not None and kind is FaultKind.STALL_BODY:
            self.proxy.stopping.wait(fault.seconds)
        if stop_at is not None:
            self.close_connection = True


class _ProxyHandler(_Handler):
    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        request = self._received()
        self._drain_request_body()
        self.proxy._record(request)
        try:
            fault = self.proxy._take(request, upstream_answered=False)
            if fault is not None and fault.kind is not FaultKind.IGNORE_RANGE:
                self._fail_early(fault)
                return
            self._forward(request, drop_range=fault is not None)
        except OSError:
            # The mirror hung up (or stop() shut the connection).
            self.close_connection = True

    def _fail_early(self, fault: Fault) -> None:
        self.close_connection = True
        if fault.kind is FaultKind.STALL_HEAD:
            self.proxy.stopping.wait(fault.seconds)
        elif fault.kind is FaultKind.GARBAGE:
            self.wfile.write(_GARBAGE)
        elif fault.kind is FaultKind.STATUS:
            self.close_connection = False
            body = _error_body(fault.status)
            headers = [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                *fault.headers,
            ]
            self._write_head(fault.status, "Injected Fault", headers)
            self.wfile.write(body)

    def _forward(self, request: ProxyRequest, *, drop_range: bool) -> None:
        headers = _forwardable(list(self.headers.items()))
        if drop_range:
            headers = [(n, v) for n, v in headers if n.lower() != "range"]
        upstream, response = self._open_upstream(
            request.method, self.path, dict(headers)
        )
        try:
            fault = None
            if response.status in (200, 206):
                fault = self.proxy._take(request, upstream_answered=True)
            if fault is not None and fault.kind is FaultKind.REDIRECT:
                location = self.proxy._grant(
                    request.path, request.headers.get("authorization")
                )
                self._write_head(
                    307,
                    "Temporary Redirect",
                    [("Location", location), ("Content-Length", "0")],
                )
                return
            content_range = None
            if fault is not None and fault.kind is FaultKind.WRONG_RANGE:
                content_range = _shifted(response.getheader("content-range", ""))
            self._relay(response, fault, content_range)
        finally:
            upstream.close()


class _StorageHandler(_Handler):
    """Serves ``/storage/<token>`` from the registry, like a signed URL."""

    def do_GET(self) -> None:
        request = self._received()
        self._drain_request_body()
        self.proxy._record(request, storage=True)
        granted = self.proxy._granted(request.path.rpartition("/")[2])
        try:
            if granted is None:
                body = _error_body(404)
                self._write_head(404, "Not Found", [("Content-Length", str(len(body)))])
                self.wfile.write(body)
                return
            path, authorization = granted
            headers = {}
            if authorization:
                headers["Authorization"] = authorization
            if request.range:
                headers["Range"] = request.range
            upstream, response = self._open_upstream("GET", path, headers)
            try:
                self._relay(response)
            finally:
                upstream.close()
        except OSError:
            self.close_connection = True


def _forwardable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP]


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while True:
        chunk = response.read(_CHUNK)
        if not chunk:
            return
        yield chunk


def _shifted(content_range: str) -> str:
    """``bytes 100-199/200`` -> ``bytes 99-198/200``: off by one byte."""
    unit, _, rest = content_range.partition(" ")
    span, _, size = rest.partition("/")
    first, _, last = span.partition("-")
    if not (first.isdigit() and last.isdigit()):
        return "bytes 0-0/1"
    return f"{unit} {max(int(first) - 1, 0)}-{max(int(last) - 1, 0)}/{size}"


def _error_body(status: int) -> bytes:
    code = "TOOMANYREQUESTS" if status == 429 else "UNKNOWN"
    error = {"code": code, "message": f"fault injected: {status}", "detail": None}
    return json.dumps({"errors": [error]}).encode()

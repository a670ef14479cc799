"""The HTTP/1.1 layer of the node mirror: h11 on trio, blobs by sendfile.

h11 makes every parsing and framing decision; this module only moves bytes.
Responses with a file body are framed by h11 (``Content-Length``) but their
bytes go from the page cache to the socket with ``sendfile``, never through
Python (see ``_sendfile``: stored blobs are sent from worker threads, so the
kernel's work runs on every core). A file body may belong to a blob still
being fetched: then the sender waits for the fetch's progress, and if the
fetch fails it closes the connection, so the client sees a body shorter
than its declared length.

A server can be drained (:meth:`HttpServer.drain`), for a stop that loses
no body: it stops accepting, closes the connections waiting for a request
and lets the responses in flight finish, each connection closing after its
own. Waiting for a request is the only point at which a connection can be
closed without cutting anything: a client whose request crosses the close
sees the connection end before any byte of an answer, which HTTP clients
retry for idempotent requests (RFC 9112, 9.3.1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import trio

from tcr_mirror.proxy._errors import (
    HeadTooLarge,
    RegistryError,
    RequestTooLarge,
    UpstreamUnavailable,
)
from tcr_mirror.proxy._fetch import BlobFetch, FetchAborted
from tcr_mirror.proxy._pacing import same_host, unpace_if_same_host
from tcr_mirror.proxy._sendfile import SendStalled, send_stored, sendfile_on_loop

__all__ = [
    "FileBody",
    "HttpServer",
    "Request",
    "Response",
    "origin_form",
    "same_host",
]

logger = logging.getLogger(__name__)

_MAX_HEAD = 16 * 1024
_MAX_REQUEST_BODY = 64 * 1024
_RECEIVE_SIZE = 64 * 1024
# A client has this long to send a request head, and a keep-alive
# connection is closed after this long idle before its next head begins.
_HEAD_TIMEOUT = 30.0
_IDLE_TIMEOUT = 120.0
# A client that takes no bytes at all for this long is dropped, so a reader
# that stopped reading cannot hold a connection and a blob file forever.
_SEND_STALL_TIMEOUT = 60.0
# Nor can one that reads a little now and then: a body's client must take
# this much (or the rest of the body) in every stall period spent sending
# to it, 256 KiB/s, far below what containerd writes even to a slow disk.
_MIN_PROGRESS = 15 << 20
# How long a closing connection reads what the client still sends (see
# _linger), and how often refused connections are logged at most.
_LINGER_TIMEOUT = 2.0
_REFUSAL_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Request:
    """A request head; header names are lower-case, repeats joined by commas."""

    method: str
    target: str
    headers: dict[str, str]


@dataclass
class FileBody:
    """A response body sent from a file descriptor, which the server closes.

    ``fetch`` is set when the file is a blob still being fetched;
    ``release`` is called once the body is done with (sent or not).
    """

    fd: int
    offset: int
    length: int
    fetch: BlobFetch | None = None
    release: Callable[[], None] | None = None

    def __len__(self) -> int:
        # h11 counts the bytes of a Data event with len().
        return self.length


@dataclass
class Response:
    """One answer. ``source`` names where a ``bytes`` body came from
    (``store``, ``upstream``) for the server's ``on_sent``, which counts
    it once it went out; a file body's source is its fetch."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | FileBody = b""
    source: str | None = None


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Serves a handler on trio listeners, many requests per connection.

    Args:
        handler: Answers one request; a :class:`RegistryError` it raises is
            answered as OCI error JSON.
        on_sent: Called with ``(source, bytes)`` as file bodies go out
            (the source is ``upstream`` for a blob still being fetched and
            ``store`` otherwise), and once a ``bytes`` body with a source
            went out whole.
        log_requests: Log each request at debug level (off for probes).
        quiet_paths: Paths (without query) whose requests are never logged:
            the probes, asked every few seconds.
        max_connections: Connections served at once; one more is closed as
            soon as it is accepted, so that a crowd of clients cannot take
            the descriptors the store's files and the upstreams need.
        on_refused: Called with ``(method, status)`` for each request the
            server answers itself, without the handler: a malformed one
            (400), a head or body past the limits (431, 413). The method
            is ``""`` when the request line could not be read.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        on_sent: Callable[[str, int], None] | None = None,
        log_requests: bool = True,
        quiet_paths: Collection[str] = (),
        max_connections: int = 4096,
        on_refused: Callable[[str, int], None] | None = None,
    ) -> None:
        self._handler = handler
        self._on_refused = on_refused or _ignore
        self._max_connections = max_connections
        self._refused = 0
        self._refusal_logged_at = -math.inf
        self._on_sent = on_sent or _ignore
        self._log_requests = log_requests
        self._quiet_paths = frozenset(quiet_paths)
        self._draining = False
        self._accepting = trio.CancelScope()
        # One cancel scope per connection waiting for its next request.
        self._waiting: set[trio.CancelScope] = set()
        self._connections = 0
        self._responding = 0

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = (
            trio.TASK_STATUS_IGNORED
        ),
    ) -> None:
        """Serve until cancelled, or until a :meth:`drain` has finished.

        A server serves once. Reports the listeners through ``task_status``.
        """
        async with trio.open_nursery() as connections:
            with self._accepting:
                await trio.serve_listeners(
                    self._serve_connection,
                    listeners,
                    handler_nursery=connections,
                    task_status=task_status,
                )
            # Closed, so that connections are refused rather than left in
            # the backlog of a server that will never accept them.
            for listener in listeners:
                await listener.aclose()

    def drain(self) -> None:
        """Stop accepting, close idle connections, finish the responses.

        :meth:`serve` returns once the last response in flight is sent.
        """
        self._draining = True
        self._accepting.cancel()
        for waiting in self._waiting:
            waiting.cancel()

    def statistics(self) -> dict[str, int]:
        """Open connections, responses being made or sent, connections
        refused for being past ``max_connections``, and that limit."""
        return {
            "connections": self._connections,
            "responses_in_flight": self._responding,
            "connections_refused": self._refused,
            "max_connections": self._max_connections,
        }

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        if self._connections >= self._max_connections:
            await self._refuse(stream)
            return
        # The send buffer is left to the kernel's autotuning, as nginx does:
        # a fixed 4 MiB one measured no faster for one client or for 32.
        unpace_if_same_host(stream.socket)
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self._connections += 1
        try:
            async with stream:
                await self._serve_requests(connection, stream)
                await _linger(connection, stream)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
            FetchAborted,
        ):
            # The client broke the protocol mid-body, stalled, or the blob's
            # fetch failed after its head went out: only closing is left.
            pass
        except OSError as exc:
            logger.debug("connection_failed", extra={"error": str(exc)})
        except Exception:
            # A bug met by one connection must not end the server and every
            # other connection with it.
            logger.exception("connection_crashed")
        finally:
            self._connections -= 1

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Close a connection past the limit at once: containerd then goes
        to the registry itself instead of waiting on a crowded mirror."""
        self._refused += 1
        now = trio.current_time()
        if now - self._refusal_logged_at >= _REFUSAL_LOG_INTERVAL:
            self._refusal_logged_at = now
            logger.warning(
                "connections_refused",
                extra={"limit": self._max_connections, "refused": self._refused},
            )
        await stream.aclose()

    async def _serve_requests(
        self, connection: h11.Connection, stream: trio.SocketStream
    ) -> None:
        idle = 0.0
        while True:
            try:
                event = await self._next_request(connection, stream, idle)
            except h11.RemoteProtocolError as exc:
                self._on_refused("", exc.error_status_hint)
                await _send_protocol_error(connection, stream, exc)
                return
            if not isinstance(event, h11.Request):
                return
            self._responding += 1
            try:
                await self._answer(connection, stream, _to_request(event))
            finally:
                self._responding -= 1
            if connection.our_state is not h11.DONE or self._draining:
                return
            if connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
            idle = _IDLE_TIMEOUT

    async def _next_request(
        self, connection: h11.Connection, stream: trio.SocketStream, idle: float
    ) -> h11.Event | type[h11.PAUSED] | None:
        """The next request head, or None when the connection is to close.

        A connection that served a request may stay idle for ``idle``
        seconds before the next head begins; from then on, as from the
        accept of a new connection, the head must arrive within
        ``_HEAD_TIMEOUT``.
        """
        if self._draining:
            return None
        with trio.CancelScope() as waiting:
            self._waiting.add(waiting)
            try:
                if idle and not await _head_begun(connection, stream, idle):
                    return None
                return await _next_event_within(connection, stream, _HEAD_TIMEOUT)
            finally:
                self._waiting.discard(waiting)
        return None

    async def _answer(
        self, connection: h11.Connection, stream: trio.SocketStream, request: Request
    ) -> None:
        started = trio.current_time()
        try:
            _check_head_size(request)
            _check_declared_body_size(request)
            with trio.fail_after(_HEAD_TIMEOUT):
                await _drain_body(connection, stream)
        except RegistryError as exc:
            self._on_refused(request.method, exc.status)
            response = error_response(exc)
        else:
            response = _sendable(await self._respond(request))
        try:
            await _send_response(
                connection, stream, request, response, self._on_sent, self._draining
            )
        finally:
            path = request.target.partition("?")[0]
            if self._log_requests and path not in self._quiet_paths:
                _log_request(request, response, trio.current_time() - started)

    async def _respond(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except RegistryError as exc:
            return error_response(exc)
        except Exception:
            logger.exception(
                "request_crashed",
                extra={"method": request.method, "target": request.target},
            )
            body = b'{"errors":[{"code":"UNKNOWN","message":"internal error"}]}'
            return Response(500, [("Content-Type", "application/json")], body)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _check_head_size(request: Request) -> None:
    """h11 bounds a head only while it is incomplete: one that arrived in a
    single read is measured here.

    Raises:
        HeadTooLarge: The head is past the limit.
    """
    size = len(request.target) + sum(
        len(name) + len(value) + 4 for name, value in request.headers.items()
    )
    if size > _MAX_HEAD:
        raise HeadTooLarge(f"request head of {size} bytes, at most {_MAX_HEAD}")


def _check_declared_body_size(request: Request) -> None:
    """Refuse a body by its ``Content-Length`` before reading any of it.

    A client that expects ``100 Continue`` is then never invited to send
    it (RFC 9110, 10.1.1), and one that announced a body it never sends is
    answered at once rather than at the end of the body's timeout.

    Raises:
        RequestTooLarge: The declared length is past the limit.
    """
    # h11 has checked the value is one decimal number; a chunked body has
    # no declared length and is measured as it is read.
    declared = request.headers.get("content-length", "")
    if "transfer-encoding" in request.headers or not declared.isdigit():
        return
    if int(declared) > _MAX_REQUEST_BODY:
        raise RequestTooLarge(
            f"request body of {declared} bytes, at most {_MAX_REQUEST_BODY}; "
            "pulls send none"
        )


def _sendable(response: Response) -> Response:
    """``response``, or a 503 in its place if its head cannot go on the wire.

    Header values come from upstreams too (a manifest's media type, a tag
    list's ``Link``): one that is not printable ASCII would make h11 fail
    mid-send.
    """
    if all(_is_field(n) and _is_field(v) for n, v in response.headers):
        return response
    names = [n for n, v in response.headers if not (_is_field(n) and _is_field(v))]
    logger.error("response_head_invalid", extra={"headers": names[:10]})
    if isinstance(response.body, FileBody):
        os.close(response.body.fd)
        if response.body.release is not None:
            response.body.release()
    return error_response(
        UpstreamUnavailable("the upstream's answer carries a header that is not ASCII")
    )


def _is_field(text: str) -> bool:
    return text.isascii() and text.isprintable()


def error_response(exc: RegistryError) -> Response:
    headers = [("Content-Type", "application/json"), *exc.headers]
    return Response(exc.status, headers, exc.body())


async def _head_begun(
    connection: h11.Connection, stream: trio.SocketStream, timeout: float
) -> bool:
    """Wait up to ``timeout`` for the first bytes of the next request (or
    the client's close); False if none came.

    A pipelined request already read counts as begun.
    """
    if any(connection.trailing_data):
        return True
    with trio.move_on_after(timeout):
        connection.receive_data(await stream.receive_some(_RECEIVE_SIZE))
        return True
    return False


async def _next_event_within(
    connection: h11.Connection, stream: trio.SocketStream, timeout: float
) -> h11.Event | type[h11.PAUSED] | None:
    with trio.move_on_after(timeout):
        return await _next_event(connection, stream)
    return None


async def _next_event(
    connection: h11.Connection, stream: trio.SocketStream
) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        connection.receive_data(await stream.receive_some(_RECEIVE_SIZE))


def _to_request(event: h11.Request) -> Request:
    headers: dict[str, str] = {}
    for raw_name, raw_value in event.headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        # RFC 9110 §5.3: repeated fields are one comma-separated list (skopeo
        # sends one Accept line per media type).
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    target = event.target.decode("latin-1")
    return Request(event.method.decode("ascii"), origin_form(target), headers)


def origin_form(target: str) -> str:
    """The path and query of a request target.

    A server must accept the absolute form, ``http://host/v2/...``, which
    proxies send (RFC 9112, 3.2.2); the mirror only needs its path.
    """
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme.isalpha() or scheme.lower() not in ("http", "https"):
        return target
    slash = rest.find("/")
    query = rest.find("?")
    if slash == -1 or (query != -1 and query < slash):
        return "/" + (rest[query:] if query != -1 else "")
    return rest[slash:]


async def _drain_body(connection: h11.Connection, stream: trio.SocketStream) -> None:
    """Pull requests carry no body; read and drop whatever a client sent so
    the connection stays in step, up to a limit.

    Raises:
        RequestTooLarge: The body is past the limit; the connection must
            close after the answer.
    """
    if connection.they_are_waiting_for_100_continue:
        # The client holds its body back until it hears this, while the
        # mirror reads the body before it answers: both would wait.
        await stream.send_all(
            connection.send(h11.InformationalResponse(status_code=100, headers=[]))
        )
    received = 0
    while connection.their_state is h11.SEND_BODY:
        event = await _next_event(connection, stream)
        if isinstance(event, h11.Data):
            received += len(event.data)
            if received > _MAX_REQUEST_BODY:
                raise RequestTooLarge(
                    f"request body past {_MAX_REQUEST_BODY} bytes; pulls send none"
                )
        elif not isinstance(event, h11.EndOfMessage):
            return


async def _linger(connection: h11.Connection, stream: trio.SocketStream) -> None:
    """Half-close, then read and drop what the client still sends, briefly.

    Closing a socket that holds unread bytes (a pipelined request, the rest
    of a refused body) makes the kernel answer with a reset, which destroys
    whatever of the last response is still queued for the client (RFC
    9112, 9.6). A client that already hung up costs nothing here.
    """
    # A client that broke the protocol (ERROR) may still be sending the
    # rest of its head, which the answer to it (a 431, a 400) must outlive.
    if connection.their_state is h11.CLOSED:
        return
    with trio.move_on_after(_LINGER_TIMEOUT):
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_eof()
            while await stream.receive_some(_RECEIVE_SIZE):
                pass


async def _send_protocol_error(
    connection: h11.Connection, stream: trio.SocketStream, exc: h11.RemoteProtocolError
) -> None:
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = b'{"errors":[{"code":"UNSUPPORTED","message":"malformed HTTP request"}]}'
    head = h11.Response(
        status_code=exc.error_status_hint,
        reason=_reason(exc.error_status_hint),
        headers=[
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    try:
        await stream.send_all(connection.send(head) + connection.send(h11.Data(body)))
    except h11.LocalProtocolError:
        return


def _ignore(source: str, sent: int) -> None:
    pass


def _log_request(request: Request, response: Response, seconds: float) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    # The target holds no secret (credentials travel in headers, which are
    # never logged).
    logger.debug(
        "request",
        extra={
            "method": request.method,
            "target": request.target[:300],
            "status": response.status,
            "bytes": len(response.body),
            "seconds": round(seconds, 6),
        },
    )


async def _send_response(
    connection: h11.Connection,
    stream: trio.SocketStream,
    request: Request,
    response: Response,
    on_sent: Callable[[str, int], None],
    last: bool = False,
) -> None:
    body = response.body
    try:
        headers = list(response.headers)
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        if last:
            # The client learns it must not send another request here.
            headers.append(("Connection", "close"))
        head = connection.send(
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=_reason(response.status),
            )
        )
        if request.method == "HEAD" or not len(body):
            await _send_all(stream, head + connection.send(h11.EndOfMessage()))
        elif isinstance(body, bytes):
            data = connection.send(h11.Data(data=body))
            await _send_all(stream, head + data + connection.send(h11.EndOfMessage()))
            if response.source is not None:
                on_sent(response.source, len(body))
        else:
            await _send_all(stream, head)
            # Passthrough lets h11 frame bytes it never sees: it only takes
            # len() of the body, and sendfile moves them.
            connection.send_with_data_passthrough(h11.Data(data=body))  # type: ignore[arg-type]
            await _send_file(stream, body, on_sent)
            await _send_all(stream, connection.send(h11.EndOfMessage()))
    finally:
        if isinstance(body, FileBody):
            os.close(body.fd)
            if body.release is not None:
                body.release()


async def _send_all(stream: trio.SocketStream, data: bytes) -> None:
    with trio.fail_after(_SEND_STALL_TIMEOUT):
        await stream.send_all(data)


async def _send_file(
    stream: trio.SocketStream, body: FileBody, on_sent: Callable[[str, int], None]
) -> None:
    sock = stream.socket
    progress = _Progress()
    with progress.scope:
        if body.fetch is None:
            await send_stored(
                sock,
                body.fd,
                body.offset,
                body.length,
                _SEND_STALL_TIMEOUT,
                lambda sent: on_sent("store", progress.sent(sent)),
            )
            return
        position, end = body.offset, body.offset + body.length
        while position < end:
            # Waiting for the upstream is no fault of the client's.
            with progress.paused():
                limit = min(end, await body.fetch.wait_available(position, end))
            sent = await sendfile_on_loop(
                sock, body.fd, position, limit - position, _SEND_STALL_TIMEOUT
            )
            on_sent("upstream", progress.sent(sent))
            position += sent
    if progress.scope.cancelled_caught:
        raise SendStalled(f"the client took less than {_MIN_PROGRESS} bytes in time")


class _Progress:
    """The deadline by which a body's client must have taken
    :data:`_MIN_PROGRESS` more bytes, moved on each time it has."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope(
            deadline=trio.current_time() + _SEND_STALL_TIMEOUT
        )
        self._taken = 0

    def sent(self, count: int) -> int:
        self._taken += count
        if self._taken >= _MIN_PROGRESS:
            self._taken = 0
            self.scope.deadline = trio.current_time() + _SEND_STALL_TIMEOUT
        return count

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        left = self.scope.deadline - trio.current_time()
        self.scope.deadline = math.inf
        try:
            yield
        finally:
            self.scope.deadline = trio.current_time() + left

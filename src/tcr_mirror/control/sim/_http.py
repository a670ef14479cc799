"""A small HTTP/1.1 server on trio and h11, for the simulator and its kin.

It serves one request at a time per connection (keep-alive, no
pipelining concurrency), reads bodies with a ``Content-Length`` or chunked
encoding up to ``max_body`` bytes, and hands each request whole to an async
handler ``(method, target, headers, body) -> (status, headers, body)``.
Header names reach the handler lower-cased. A connection idle longer than
``idle_timeout`` is closed, so abandoned keep-alive connections do not pile
up. Request lines are logged at debug level, without query or headers (the
query of an API GET can carry parameters, the headers carry credentials).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import h11
import trio

__all__ = ["DropConnection", "Handler", "serve_http", "serve_listeners_http"]

logger = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
Handler = Callable[[str, str, Headers, bytes], Awaitable[tuple[int, Headers, bytes]]]

_MAX_HEAD = 64 * 1024
_RECEIVE = 64 * 1024


class _TooLarge(Exception):
    pass


class DropConnection(Exception):  # noqa: N818 (an instruction, not a failure)
    """Raised by a handler to close the connection without an answer."""


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body: int = 1 << 20,
    idle_timeout: float = 60.0,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and serve until cancelled.

    ``task_status.started`` receives the listeners, so a caller that
    passed port 0 can read the bound port from
    ``listeners[0].socket.getsockname()``.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    await serve_listeners_http(
        handler,
        listeners,
        max_body=max_body,
        idle_timeout=idle_timeout,
        task_status=task_status,
    )


async def serve_listeners_http(
    handler: Handler,
    listeners: Sequence[trio.SocketListener],
    *,
    max_body: int = 1 << 20,
    idle_timeout: float = 60.0,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on listeners that are already open, until cancelled."""

    async def connection(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, handler, max_body, idle_timeout)

    await trio.serve_listeners(connection, list(listeners), task_status=task_status)


async def _serve_connection(
    stream: trio.abc.Stream, handler: Handler, max_body: int, idle_timeout: float
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
    try:
        async with stream:
            while await _serve_one(conn, stream, handler, max_body, idle_timeout):
                conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        # The peer went away or broke HTTP mid-answer: nothing left to tell it.
        return


async def _serve_one(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    handler: Handler,
    max_body: int,
    idle_timeout: float,
) -> bool:
    try:
        with trio.fail_after(idle_timeout):
            received = await _read_request(conn, stream, max_body)
    except trio.TooSlowError:
        return False
    except _TooLarge:
        await _send(conn, stream, 413, [], b'{"error": "request too large"}', "")
        return False
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _send(conn, stream, exc.error_status_hint, [], b"", "")
        return False
    if received is None:
        return False

    request, body = received
    method = request.method.decode("ascii")
    target = request.target.decode("ascii", "replace")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
    _log(logging.DEBUG, "http_request", method=method, path=target.partition("?")[0])
    try:
        status, out_headers, out_body = await handler(method, target, headers, body)
    except DropConnection:
        return False
    except Exception:
        logger.exception("%s", json.dumps({"event": "http_handler_failed"}))
        status, out_headers, out_body = 500, [], b'{"error": "internal error"}'
    await _send(conn, stream, status, out_headers, out_body, method)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, max_body: int
) -> tuple[h11.Request, bytes] | None:
    request: h11.Request | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_RECEIVE)))
        elif isinstance(event, h11.Request):
            request = event
            length = dict(event.headers).get(b"content-length", b"0")
            if length.isdigit() and int(length) > max_body:
                raise _TooLarge
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_body:
                raise _TooLarge
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, b"".join(chunks)
        else:  # ConnectionClosed (or PAUSED, which cannot happen here)
            return None


async def _send(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    headers: Headers,
    body: bytes,
    method: str,
) -> None:
    head = [
        (name, value) for name, value in headers if name.lower() != "content-length"
    ]
    head.append(("content-length", str(len(body))))
    if conn.their_state is not h11.DONE:
        head.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=head))
    if method != "HEAD":
        data += conn.send(h11.Data(data=body)) if body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


def _log(level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s", json.dumps({"event": event, **fields}))

"""A lean HTTP/1.1 GET for blob bodies, read straight off the socket.

httpx reads a body 64 KiB at a time and copies each piece twice through
h11, which caps a blob fetch far below what loopback and sha256 allow. A
blob fetch needs none of httpx's generality: one GET, one response, a
``Content-Length`` body, the connection closed afterwards. So h11 parses
the response head (and a chunked body, which registries do not send for
blobs), and the body's bytes are then read from the socket in large
pieces with no copy of ours.

Authentication, redirects and ``429`` handling stay in
:class:`~tcr_mirror.proxy._upstream.Upstream`, which sends blob GETs
through :func:`raw_get` and everything else through httpx.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import h11
import httpx
import trio

__all__ = ["BodyBroken", "RawResponse", "raw_get"]

_HEAD_READ = 64 * 1024
_BODY_READ = 1 << 20
_LOW_WATER = 256 << 10
_LOW_WATER_WAIT = 0.02
_MAX_HEAD = 64 * 1024


class BodyBroken(Exception):
    """The body stopped short of its length: cut, stalled or garbled."""


class RawResponse:
    """A response whose body is read with :meth:`receive`.

    Attributes:
        status_code: The HTTP status.
        headers: The response headers.
        url: The URL asked.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: h11.Connection,
        head: h11.Response,
        url: str,
        read_timeout: float,
    ) -> None:
        self._stream = stream
        self._connection = connection
        self.status_code = head.status_code
        self.headers = httpx.Headers(list(head.headers))
        self.url = httpx.URL(url)
        self._read_timeout = read_timeout
        length = self.headers.get("content-length", "")
        self._remaining: int | None = int(length) if length.isdigit() else None
        self._buffered = _buffered_body(connection)
        self._low_water = 1

    async def receive(self) -> bytes | bytearray:
        """Return the next piece of the body; ``b""`` once it is complete.

        Raises:
            BodyBroken: The connection ended, stalled past the read timeout
                or broke the protocol before the body was complete.
        """
        if self._buffered:
            buffered, self._buffered = self._buffered, b""
            return self._count(buffered)
        if self._remaining == 0:
            return b""
        try:
            if self._remaining is None:
                with trio.fail_after(self._read_timeout):
                    return await self._receive_framed()
            piece = await self._receive_piece(min(self._remaining, _BODY_READ))
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            raise BodyBroken(type(exc).__name__) from exc
        if not piece:
            raise BodyBroken("connection closed before the end of the body")
        return self._count(piece)

    async def _receive_piece(self, size: int) -> bytes | bytearray:
        # Wake only once a good piece has queued up (SO_RCVLOWAT): each
        # wake-up costs the event loop more than copying the piece does.
        # An upstream too slow to fill the mark soon, and the end of the
        # body, are read with the mark back at one byte, so no byte waits
        # for long.
        if (self._remaining or 0) > _LOW_WATER:
            self._set_low_water_mark(_LOW_WATER)
            with trio.move_on_after(_LOW_WATER_WAIT):
                return await self._stream.receive_some(size)
        self._set_low_water_mark(1)
        with trio.fail_after(self._read_timeout):
            return await self._stream.receive_some(size)

    def _set_low_water_mark(self, mark: int) -> None:
        if mark != self._low_water and isinstance(self._stream, trio.SocketStream):
            self._stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            self._low_water = mark

    def _count(self, piece: bytes | bytearray) -> bytes | bytearray:
        if self._remaining is not None:
            self._remaining -= len(piece)
            if self._remaining < 0:
                raise BodyBroken("more bytes than Content-Length")
        return piece

    async def _receive_framed(self) -> bytes:
        # Chunked or close-delimited bodies go through h11.
        try:
            while True:
                event = self._connection.next_event()
                if event is h11.NEED_DATA:
                    data = await self._stream.receive_some(_HEAD_READ)
                    self._connection.receive_data(bytes(data))
                elif isinstance(event, h11.Data):
                    return bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return b""
                else:
                    raise BodyBroken("connection closed before the end of the body")
        except h11.RemoteProtocolError as exc:
            raise BodyBroken(str(exc)) from exc

    async def aread(self) -> bytes:
        pieces: list[bytes | bytearray] = []
        while piece := await self.receive():
            pieces.append(piece)
        return b"".join(pieces)

    async def aclose(self) -> None:
        await self._stream.aclose()


def _buffered_body(connection: h11.Connection) -> bytes:
    """Body bytes h11 already received along with the head."""
    pieces = []
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Data):
            pieces.append(bytes(event.data))
            continue
        if isinstance(event, h11.EndOfMessage):
            break
        # NEED_DATA: nothing more is buffered.
        break
    return b"".join(pieces)


async def raw_get(
    url: str,
    headers: dict[str, str],
    *,
    connect_timeout: float,
    read_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> RawResponse:
    """Send ``GET url`` on a new connection and read the response head.

    Raises:
        OSError: The connection could not be made.
        trio.TooSlowError: Connecting or reading the head took too long.
        h11.ProtocolError: The upstream did not answer in HTTP/1.1.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with trio.fail_after(connect_timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if parts.scheme == "https":
            context = ssl_context or ssl.create_default_context()
            # HTTPS servers may close without a TLS close_notify.
            stream = trio.SSLStream(
                stream, context, server_hostname=host, https_compatible=True
            )
            await stream.do_handshake()

    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = h11.Request(
        method="GET",
        target=target or "/",
        headers=[("Host", parts.netloc), ("Connection", "close"), *headers.items()],
    )
    try:
        await stream.send_all(
            connection.send(request) + connection.send(h11.EndOfMessage())
        )
        with trio.fail_after(read_timeout):
            head = await _read_head(stream, connection)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return RawResponse(stream, connection, head, url, read_timeout)


async def _read_head(
    stream: trio.abc.Stream, connection: h11.Connection
) -> h11.Response:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await stream.receive_some(_HEAD_READ)))
        elif isinstance(event, h11.Response):
            return event
        elif not isinstance(event, h11.InformationalResponse):
            raise h11.RemoteProtocolError("connection closed before a response")

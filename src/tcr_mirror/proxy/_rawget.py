"""A lean HTTP/1.1 GET for blob bodies, read straight off the socket.

httpx reads a body 64 KiB at a time and copies each piece twice through
h11, which caps a blob fetch far below what loopback and sha256 allow. A
blob fetch needs none of httpx's generality: one GET, one response, a
``Content-Length`` body, the connection closed afterwards. So h11 parses
the response head (and a chunked body, which registries do not send for
blobs), and the body's bytes are then read from the socket in large
pieces with no copy of ours.

Two transports carry it:

* Plain HTTP is read on the event loop, waking only once a good piece has
  queued up in the socket (``SO_RCVLOWAT``).
* HTTPS, which every real upstream speaks, is read in a worker thread from
  a blocking ``ssl`` socket. trio's ``SSLStream`` hands out one TLS record
  (16 KiB at most) per call, each a trip through the event loop: measured
  here it cost 3.5 s of CPU per GiB on its own and, with a piece per
  record going on to the writer and hasher threads, capped a fetch at
  about 50 MiB/s. A blocking socket decrypts at 1.6 s per GiB, and the
  thread hands the loop a piece per megabyte.

Authentication, redirects and ``429`` handling stay in
:class:`~tcr_mirror.proxy._upstream.Upstream`, which sends blob GETs
through :func:`raw_get` and everything else through httpx.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from typing import Protocol
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


class _Transport(Protocol):
    async def send_all(self, data: bytes) -> None: ...

    async def read_some(self) -> bytes | bytearray:
        """Whatever arrives next, ``b""`` at the end; for heads and chunks."""
        ...

    async def read_piece(self, size: int, remaining: int) -> bytes | bytearray:
        """Up to ``size`` body bytes of the ``remaining``, ``b""`` at the end."""
        ...

    async def aclose(self) -> None: ...


class _LoopSocket:
    """Plain TCP, read on the event loop."""

    def __init__(self, stream: trio.SocketStream, read_timeout: float) -> None:
        self._stream = stream
        self._read_timeout = read_timeout
        self._low_water = 1

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def read_some(self) -> bytes | bytearray:
        self._set_low_water_mark(1)
        with trio.fail_after(self._read_timeout):
            return await self._stream.receive_some(_HEAD_READ)

    async def read_piece(self, size: int, remaining: int) -> bytes | bytearray:
        # Wake only once a good piece has queued up (SO_RCVLOWAT): each
        # wake-up costs the event loop more than copying the piece does.
        # An upstream too slow to fill the mark soon, and the end of the
        # body, are read with the mark back at one byte, so no byte waits
        # for long.
        if remaining > _LOW_WATER:
            self._set_low_water_mark(_LOW_WATER)
            with trio.move_on_after(_LOW_WATER_WAIT):
                return await self._stream.receive_some(size)
        self._set_low_water_mark(1)
        with trio.fail_after(self._read_timeout):
            return await self._stream.receive_some(size)

    def _set_low_water_mark(self, mark: int) -> None:
        if mark != self._low_water:
            self._stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            self._low_water = mark

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


class _ThreadTls:
    """TLS over a blocking socket, read in worker threads.

    The socket's own timeout (the read timeout) bounds every call. A
    cancelled read abandons its thread; :meth:`aclose` then shuts the
    socket down, which ends the thread's ``recv`` at once.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        # What ended a read that still returned the bytes before it.
        self._error: OSError | None = None

    async def send_all(self, data: bytes) -> None:
        await trio.to_thread.run_sync(self._sock.sendall, data, abandon_on_cancel=True)

    async def read_some(self) -> bytes | bytearray:
        return await trio.to_thread.run_sync(
            self._sock.recv, _HEAD_READ, abandon_on_cancel=True
        )

    async def read_piece(self, size: int, remaining: int) -> bytes | bytearray:
        return await trio.to_thread.run_sync(self._fill, size, abandon_on_cancel=True)

    def _fill(self, size: int) -> bytearray:
        # Up to ``size`` bytes, returning early once a good piece is in and
        # nothing more is waiting, so a slow upstream's bytes still flow on.
        # Bytes that arrived before an error are returned first and the
        # error on the next call, so a resume starts right after them.
        if self._error is not None:
            raise self._error
        piece = bytearray(size)
        view = memoryview(piece)
        got = 0
        while got < size:
            try:
                count = self._sock.recv_into(view[got:])
            except OSError as exc:
                if not got:
                    raise
                self._error = exc
                break
            if not count:
                break
            got += count
            if got >= _LOW_WATER and not self._more_waiting():
                break
        view.release()
        del piece[got:]
        return piece

    def _more_waiting(self) -> bool:
        if self._sock.pending():
            return True
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    async def aclose(self) -> None:
        # Shutting down first wakes a thread still in recv on this socket.
        with contextlib.suppress(OSError):  # the other end closed it already
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


def _connect_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    connect_timeout: float,
    read_timeout: float,
) -> _ThreadTls:
    """Runs in a worker thread: connect and finish the TLS handshake."""
    raw = socket.create_connection((host, port), timeout=connect_timeout)
    try:
        sock = context.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    sock.settimeout(read_timeout)
    return _ThreadTls(sock)


class RawResponse:
    """A response whose body is read with :meth:`receive`.

    Attributes:
        status_code: The HTTP status.
        headers: The response headers.
        url: The URL asked.
    """

    def __init__(
        self,
        transport: _Transport,
        connection: h11.Connection,
        head: h11.Response,
        url: str,
    ) -> None:
        self._transport = transport
        self._connection = connection
        self.status_code = head.status_code
        self.headers = httpx.Headers(list(head.headers))
        self.url = httpx.URL(url)
        length = self.headers.get("content-length", "")
        self._remaining: int | None = int(length) if length.isdigit() else None
        self._buffered = _buffered_body(connection)

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
                return await self._receive_framed()
            size = min(self._remaining, _BODY_READ)
            piece = await self._transport.read_piece(size, self._remaining)
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            raise BodyBroken(type(exc).__name__) from exc
        if not piece:
            raise BodyBroken("connection closed before the end of the body")
        return self._count(piece)

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
                    data = await self._transport.read_some()
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
        await self._transport.aclose()


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
        OSError: The connection could not be made (``ssl.SSLError`` for a
            failed handshake, ``TimeoutError`` for one that took too long).
        trio.TooSlowError: Connecting or reading the head took too long.
        h11.ProtocolError: The upstream did not answer in HTTP/1.1.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    transport: _Transport
    if parts.scheme == "https":
        context = ssl_context or ssl.create_default_context()
        transport = await trio.to_thread.run_sync(
            _connect_tls, host, port, context, connect_timeout, read_timeout,
            abandon_on_cancel=True,
        )  # fmt: skip
    else:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
        transport = _LoopSocket(stream, read_timeout)

    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = h11.Request(
        method="GET",
        target=target or "/",
        headers=[("Host", parts.netloc), ("Connection", "close"), *headers.items()],
    )
    try:
        await transport.send_all(
            connection.send(request) + connection.send(h11.EndOfMessage())
        )
        with trio.fail_after(read_timeout):
            head = await _read_head(transport, connection)
    except BaseException:
        await transport.aclose()
        raise
    return RawResponse(transport, connection, head, url)


async def _read_head(transport: _Transport, connection: h11.Connection) -> h11.Response:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await transport.read_some()))
        elif isinstance(event, h11.Response):
            return event
        elif not isinstance(event, h11.InformationalResponse):
            raise h11.RemoteProtocolError("connection closed before a response")

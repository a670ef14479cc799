"""A lean HTTP/1.1 GET for blob bodies, read straight off the socket.

httpx reads a body 64 KiB at a time and copies each piece twice through
h11, which caps a blob fetch far below what loopback and sha256 allow. A
blob fetch needs none of httpx's generality: one GET, one response, a
``Content-Length`` body, the connection closed afterwards. So h11 parses
the response head (and a chunked body, which registries do not send for
blobs), and the body's bytes are then read from the socket in large
pieces into the caller's buffer.

The connection is a blocking socket (``ssl`` for HTTPS, which every real
upstream speaks) read in worker threads, never on the event loop:

* :meth:`RawResponse.read_into` is for a caller that is itself a worker
  thread: a blob fetch receives and hashes each piece in one thread of
  its own, while the piece is still in that core's cache, and writes it
  from a second (see :mod:`~tcr_mirror.proxy._fetch`). Measured here,
  receiving on the loop and handing pieces to a hasher thread cost 0.3 s
  of CPU more per GiB.
* trio's ``SSLStream`` would hand out one TLS record (16 KiB at most) per
  call, each a trip through the event loop: it cost 3.5 s of CPU per GiB
  on its own and capped a fetch at about 50 MiB/s.

Authentication, redirects and ``429`` handling stay in
:class:`~tcr_mirror.proxy._upstream.Upstream`, which sends blob GETs
through :func:`raw_get` and everything else through httpx.
"""

from __future__ import annotations

import contextlib
import functools
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import h11
import httpx
import outcome
import trio

from tcr_mirror.proxy._httpproxy import HttpProxy, TunnelOpening

__all__ = ["BodyBroken", "RawResponse", "raw_get"]

_HEAD_READ = 64 * 1024
_BODY_READ = 1 << 20
# A read returns once it holds this much and nothing more is waiting:
# fewer, larger pieces, while a slow upstream's bytes still flow on.
_LOW_WATER = 256 << 10
# How long a read holding less than that waits for more before returning:
# bytes before a stall must reach the file (and clients) soon.
_LOW_WATER_WAIT = 0.02
_MAX_HEAD = 64 * 1024


class BodyBroken(Exception):
    """The body stopped short of its length: cut, stalled or garbled."""


class _BlockingSocket:
    """A connected blocking socket, plain or TLS, used from worker threads.

    On a plain socket the read timeout is the kernel's (``SO_RCVTIMEO``,
    ``SO_SNDTIMEO``), not Python's: with a Python timeout every ``recv``
    costs a ``poll`` first. :meth:`abort` may be called from any thread;
    it ends a ``recv`` that another thread is blocked in at once.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send_all(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            raise TimeoutError(
                "the upstream took no bytes within the timeout"
            ) from None

    def read_some(self) -> bytes:
        try:
            return self._sock.recv(_HEAD_READ)
        except (BlockingIOError, ssl.SSLWantReadError):
            raise TimeoutError("no bytes came within the read timeout") from None

    def read_into(self, view: memoryview) -> tuple[int, OSError | None]:
        """Fill ``view`` while bytes keep coming.

        Returns once :data:`_LOW_WATER` bytes are in and no more are
        waiting, or fewer are in and none came for :data:`_LOW_WATER_WAIT`.

        Returns:
            The bytes read, ``0`` at the end of the stream, and the error
            that ended the read early, if one did after some bytes came.
        """
        got = 0
        while got < len(view):
            try:
                count = self._recv_into(view[got:], wait=not got)
            except OSError as exc:
                if not got:
                    raise
                return got, exc
            if count is None:
                if got >= _LOW_WATER or not self._readable(_LOW_WATER_WAIT):
                    break
                continue
            if not count:
                break
            got += count
        return got, None

    def _recv_into(self, view: memoryview, *, wait: bool) -> int | None:
        """Receive into ``view``; without ``wait``, None if nothing is waiting."""
        try:
            if wait:
                return self._sock.recv_into(view)
            if isinstance(self._sock, ssl.SSLSocket):
                if not self._sock.pending() and not self._readable(0):
                    return None
                return self._sock.recv_into(view)
            return self._sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, ssl.SSLWantReadError):
            if wait:
                raise TimeoutError("no bytes came within the read timeout") from None
            return None

    def _readable(self, wait: float) -> bool:
        # poll, not select: a busy node's descriptors go past select's 1024.
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        return bool(poller.poll(wait * 1000))

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the other end closed it already
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # Shutting down first wakes a thread still in recv on this socket.
        self.abort()
        self._sock.close()


class _Dial:
    """The socket a worker thread is connecting, which the loop may abort.

    Each step of a connect is bounded by the socket's timeout, but a proxy
    or a TLS server sending one byte just within it per read would hold a
    step for ever; the caller's deadline aborts the socket from outside.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def opened(self, sock: socket.socket) -> None:
        """Runs in the worker thread; raises if the dial was aborted."""
        with self._lock:
            self._sock = sock
            aborted = self._aborted
        if aborted:
            raise TimeoutError("connecting took too long")

    def abort(self) -> None:
        """Wake the worker thread's blocked send or receive. Any thread."""
        with self._lock:
            self._aborted = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _connect(
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    connect_timeout: float,
    read_timeout: float,
    proxy: HttpProxy | None = None,
    dial: _Dial | None = None,
) -> _BlockingSocket:
    """Runs in a worker thread: connect (through the proxy's tunnel for
    HTTPS) and finish the TLS handshake."""
    address = (host, port) if proxy is None else (proxy.host, proxy.port)
    raw = socket.create_connection(address, timeout=connect_timeout)
    try:
        if dial is not None:
            dial.opened(raw)
        if proxy is not None and context is not None:
            _open_tunnel(raw, TunnelOpening(proxy, host, port))
        if context is not None:
            # ssl retries a read the kernel timed out for ever, so TLS keeps
            # Python's timeout; its poll per read weighs little next to the
            # decryption.
            sock = context.wrap_socket(raw, server_hostname=host)
            sock.settimeout(read_timeout)
            return _BlockingSocket(sock)
        raw.settimeout(None)
        seconds = int(read_timeout)
        timeval = struct.pack("ll", seconds, int((read_timeout - seconds) * 1e6))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except BaseException:
        raw.close()
        raise
    return _BlockingSocket(raw)


def _open_tunnel(sock: socket.socket, opening: TunnelOpening) -> None:
    """Runs in a worker thread: ``CONNECT`` through the proxy on ``sock``.

    Reading in pieces takes nothing of the target's: a TLS server says
    nothing before the client's hello, which is sent only after this.
    """
    sock.sendall(opening.request())
    while not opening.receive(sock.recv(_HEAD_READ)):
        pass


async def _connect_in_thread(
    connect: Callable[[], _BlockingSocket], dial: _Dial | None = None
) -> _BlockingSocket:
    """Run ``connect`` in a worker thread, left behind if the caller is cancelled.

    The thread then closes the socket it made itself, so a cancelled
    connect leaks nothing; ``dial``, if given, is aborted so that the
    thread ends at once rather than at its next timeout.
    """
    lock = threading.Lock()
    abandoned = False
    result: list[outcome.Outcome[_BlockingSocket]] = []
    finished = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def deliver(connected: outcome.Outcome[_BlockingSocket]) -> None:
        with lock:
            if not abandoned:
                result.append(connected)
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(finished.set)
                return
        if isinstance(connected, outcome.Value):
            connected.value.close()

    trio.lowlevel.start_thread_soon(connect, deliver, name="upstream-connect")
    try:
        await finished.wait()
    except BaseException:
        with lock:
            abandoned = True
            if result and isinstance(result[0], outcome.Value):
                result[0].value.close()
        if dial is not None:
            dial.abort()
        raise
    return result[0].unwrap()


class RawResponse:
    """A response whose body is read with :meth:`read_into` or :meth:`receive`.

    Attributes:
        status_code: The HTTP status.
        headers: The response headers.
        url: The URL asked.
    """

    def __init__(
        self,
        transport: _BlockingSocket,
        connection: h11.Connection,
        head: h11.Response,
        url: str,
    ) -> None:
        self._transport = transport
        self._connection = connection
        self.status_code = head.status_code
        self.headers = httpx.Headers(list(head.headers))
        self.url = httpx.URL(url)
        # Transfer-Encoding overrides Content-Length (RFC 9112 6.3), as h11
        # frames the body: read by the length, a chunked body would keep
        # its framing.
        length = self.headers.get("content-length", "")
        if "transfer-encoding" in self.headers:
            length = ""
        self._remaining: int | None = int(length) if length.isdigit() else None
        # Body bytes received but not handed out yet: those that came with
        # the head, or the rest of a chunk larger than the caller's buffer.
        self._buffered, ended = _buffered_body(connection)
        if ended:
            self._remaining = len(self._buffered)
        # What ended a read that still returned the bytes before it.
        self._error: OSError | None = None

    def read_into(self, view: memoryview) -> int:
        """Read the next body bytes into ``view``; ``0`` once the body is complete.

        Blocks: call it from a worker thread, one call at a time. Bytes
        that arrived before the connection failed are returned first and
        the failure raised by the next call, so a resume can start right
        after them.

        Raises:
            BodyBroken: The connection ended, stalled past the read timeout
                or broke the protocol before the body was complete.
        """
        if self._buffered:
            count = min(len(view), len(self._buffered))
            view[:count] = self._buffered[:count]
            self._buffered = self._buffered[count:]
            return self._count(count)
        if self._remaining == 0:
            return 0
        if self._error is not None:
            raise BodyBroken(type(self._error).__name__) from self._error
        try:
            if self._remaining is None:
                return self._read_framed(view)
            count, self._error = self._transport.read_into(view[: self._remaining])
        except OSError as exc:
            raise BodyBroken(type(exc).__name__) from exc
        if not count:
            raise BodyBroken("connection closed before the end of the body")
        return self._count(count)

    def _count(self, count: int) -> int:
        if self._remaining is not None:
            self._remaining -= count
        return count

    def _read_framed(self, view: memoryview) -> int:
        # Chunked or close-delimited bodies go through h11.
        try:
            while True:
                event = self._connection.next_event()
                if event is h11.NEED_DATA:
                    self._connection.receive_data(self._transport.read_some())
                elif isinstance(event, h11.Data):
                    self._buffered = bytes(event.data)
                    if self._buffered:
                        return self.read_into(view)
                elif isinstance(event, h11.EndOfMessage):
                    self._remaining = 0
                    return 0
                else:
                    raise BodyBroken("connection closed before the end of the body")
        except h11.RemoteProtocolError as exc:
            raise BodyBroken(str(exc)) from exc

    async def receive(self) -> bytes:
        """Return the next piece of the body; ``b""`` once it is complete.

        Reads in a worker thread, abandoned if the caller is cancelled
        (:meth:`aclose` then ends it).

        Raises:
            BodyBroken: As :meth:`read_into`.
        """
        return await trio.to_thread.run_sync(self._read_piece, abandon_on_cancel=True)

    def _read_piece(self) -> bytes:
        piece = bytearray(_BODY_READ)
        with memoryview(piece) as view:
            count = self.read_into(view)
        return bytes(piece[:count])

    async def aread(self) -> bytes:
        pieces: list[bytes] = []
        while piece := await self.receive():
            pieces.append(piece)
        return b"".join(pieces)

    def abort(self) -> None:
        """End the connection now; a thread blocked reading it returns. Any thread."""
        self._transport.abort()

    async def aclose(self) -> None:
        self._transport.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


def _buffered_body(connection: h11.Connection) -> tuple[bytes, bool]:
    """Body bytes h11 already received along with the head, and whether
    they are the whole body."""
    pieces = []
    while isinstance(event := connection.next_event(), h11.Data):
        pieces.append(bytes(event.data))
    return b"".join(pieces), isinstance(event, h11.EndOfMessage)


async def raw_get(
    url: str,
    headers: dict[str, str],
    *,
    connect_timeout: float,
    read_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    proxy: HttpProxy | None = None,
) -> RawResponse:
    """Send ``GET url`` on a new connection and read the response head.

    With ``proxy``, an ``https`` URL is fetched through a ``CONNECT``
    tunnel, an ``http`` one by sending the proxy the absolute URL.

    Opening the connection (TCP, the proxy's ``CONNECT``, TLS) takes at
    most twice ``connect_timeout`` in all; reading the head at most
    ``read_timeout``.

    Raises:
        OSError: The connection could not be made (``ssl.SSLError`` for a
            failed handshake, ``TimeoutError`` for one that took too long).
        trio.TooSlowError: Opening the connection or reading the head took
            too long.
        h11.ProtocolError: The upstream did not answer in HTTP/1.1.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = None
    if parts.scheme == "https":
        context = ssl_context or ssl.create_default_context()
    dial = _Dial()
    connect = functools.partial(
        _connect, host, port, context, connect_timeout, read_timeout, proxy, dial
    )
    with trio.fail_after(2 * connect_timeout):
        transport = await _connect_in_thread(connect, dial)

    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Host is host[:port] alone (RFC 9110 7.2): user info in a URL is no
    # credential, and servers log their Host header.
    authority = parts.netloc.rpartition("@")[2]
    fields = [("Host", authority), ("Connection", "close"), *headers.items()]
    if proxy is not None and context is None:
        # Plain HTTP through a proxy: the proxy is told where to go.
        target = f"{parts.scheme}://{authority}{target}"
        fields += proxy.headers()
    # Whatever fails from here on (a request h11 refuses to send, a body
    # garbled right behind the head) must not leave the connection open
    # for as long as someone keeps the error.
    try:
        request = h11.Request(method="GET", target=target, headers=fields)
        data = connection.send(request) + connection.send(h11.EndOfMessage())
        with trio.fail_after(read_timeout):
            head = await trio.to_thread.run_sync(
                _exchange_head, transport, connection, data, abandon_on_cancel=True
            )
        return RawResponse(transport, connection, head, url)
    except BaseException:
        # Also ends the abandoned thread's read.
        transport.close()
        raise


def _exchange_head(
    transport: _BlockingSocket, connection: h11.Connection, request: bytes
) -> h11.Response:
    """Runs in a worker thread: send the request, read the response head."""
    transport.send_all(request)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(transport.read_some())
        elif isinstance(event, h11.Response):
            return event
        elif not isinstance(event, h11.InformationalResponse):
            raise h11.RemoteProtocolError("connection closed before a response")

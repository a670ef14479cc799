"""One client GET as the fault tests see it: what arrived, and whether all did.

A pull through a mirror that fails mid-fetch may end with an error status,
with no answer at all, or with a ``200`` whose body stops short of its
declared length. Tests tell these apart from a complete body, so
:func:`pull` never raises for a transport error it was told to expect: it
records what arrived and ``complete=False``. A :class:`HeldReader` is a
GET whose client stops reading after the head, until the test lets it go on.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import httpx

from support.layers import digest_of
from support.node import NodeProcess

__all__ = ["TIMEOUT", "HeldReader", "Pulled", "assert_got_blob", "pull"]

# Generous: the tests assert outcomes, never timings.
TIMEOUT = 30.0


@dataclass(frozen=True)
class Pulled:
    """What a client got: status, headers, the bytes that arrived, and
    whether the body ended cleanly at its declared length.

    ``status`` is 0 (and ``headers`` empty) when no response head arrived.
    """

    status: int
    headers: httpx.Headers
    body: bytes
    complete: bool

    def error_code(self) -> str:
        """The first OCI error code of a JSON error body.

        Raises:
            AssertionError: The body is not JSON.
        """
        assert self.headers.get("content-type", "").startswith("application/json")
        errors = httpx.Response(200, content=self.body).json()["errors"]
        return str(errors[0]["code"])


def pull(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = TIMEOUT,
    cut_by: tuple[type[httpx.TransportError], ...] = (httpx.TransportError,),
) -> Pulled:
    """GET ``url`` and read the body raw, as it came off the socket.

    Args:
        url: The whole URL.
        headers: Request headers.
        timeout: The httpx timeout, for connect and each read.
        cut_by: The transport errors that end a pull as cut short (before
            the head: status 0); any other error is raised.

    Returns:
        What arrived.
    """
    chunks: list[bytes] = []
    status, head, complete = 0, httpx.Headers(), False
    try:
        with (
            httpx.Client(timeout=timeout) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            status, head = response.status_code, response.headers
            for chunk in response.iter_raw():
                chunks.append(chunk)
            complete = True
    except cut_by:
        pass
    return Pulled(status, head, b"".join(chunks), complete)


def assert_got_blob(pulled: Pulled, digest: str) -> None:
    """The pull got the whole blob ``digest``, right."""
    assert pulled.status == 200, pulled.body[:300]
    assert pulled.complete
    assert digest_of(pulled.body) == digest


class HeldReader:
    """A GET of ``path`` whose client reads the head, then nothing until
    :meth:`finish`.

    A tiny receive buffer keeps the node's send of the body waiting on it.
    """

    def __init__(self, node: NodeProcess, path: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((node.host, node.port))
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {node.address}\r\nConnection: close\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        # One byte at a time, so that no body byte is taken off the socket.
        while not head.endswith(b"\r\n\r\n") and len(head) < 16384:
            byte = self.sock.recv(1)
            assert byte, "the node closed before the head"
            head += byte
        self.status = int(head.split(b" ", 2)[1])
        lines = head.split(b"\r\n")[1:]
        fields = (line.split(b":", 1) for line in lines if b":" in line)
        self.headers = httpx.Headers([(name, value.strip()) for name, value in fields])
        self.length = int(self.headers["Content-Length"])

    def finish(self) -> Pulled:
        """Read the rest of the body; ``complete`` if all ``Content-Length``
        came."""
        chunks: list[bytes] = []
        received = 0
        with self.sock:
            while received < self.length:
                try:
                    chunk = self.sock.recv(1 << 20)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
        body = b"".join(chunks)
        return Pulled(self.status, self.headers, body, received == self.length)

    def close(self) -> None:
        self.sock.close()

"""One client GET as the fault tests see it: what arrived, and whether all did.

A pull through a mirror that fails mid-fetch may end with an error status,
with no answer at all, or with a ``200`` whose body stops short of its
declared length. Tests tell these apart from a complete body, so
:func:`pull` never raises for a transport error it was told to expect: it
records what arrived and ``complete=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

__all__ = ["TIMEOUT", "Pulled", "pull"]

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

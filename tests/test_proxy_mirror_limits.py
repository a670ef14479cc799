"""How the mirror reads the small answers it keeps whole (manifests,
tag lists) from a real socket: past the limit, refused and not read."""

from __future__ import annotations

import h11
import httpx
import pytest
import trio

from tcr_mirror.proxy._errors import UpstreamUnavailable
from tcr_mirror.proxy._mirror import _read_limited

LIMIT = 1 << 20
PIECE = 64 << 10


class LargeAnswer:
    """Answers every request with ``size`` bytes, declared or chunked,
    and counts the bytes the client's socket took."""

    def __init__(self, size: int, *, declared: bool) -> None:
        self.size = size
        self.declared = declared
        self.sent = 0

    async def answer(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while not isinstance(connection.next_event(), h11.Request):
            connection.receive_data(await stream.receive_some(PIECE))
        framing = (
            ("Content-Length", str(self.size))
            if self.declared
            else ("Transfer-Encoding", "chunked")
        )
        head = h11.Response(status_code=200, headers=[framing])
        try:
            await stream.send_all(connection.send(head))
            for _ in range(self.size // PIECE):
                await stream.send_all(connection.send(h11.Data(b"x" * PIECE)))
                self.sent += PIECE
            await stream.send_all(connection.send(h11.EndOfMessage()))
        except trio.BrokenResourceError:
            pass


async def read_from(answer: LargeAnswer) -> bytes | UpstreamUnavailable:
    """What ``_read_limited`` returned, or the error it raised."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, answer.answer, 0)
        port = listeners[0].socket.getsockname()[1]
        try:
            async with (
                httpx.AsyncClient() as client,
                client.stream("GET", f"http://127.0.0.1:{port}/") as response,
            ):
                return await _read_limited(response, LIMIT, "upstream")
        except UpstreamUnavailable as exc:
            return exc
        finally:
            nursery.cancel_scope.cancel()


async def test_an_answer_declared_past_the_limit_is_refused_unread() -> None:
    """Read half-way, httpx's body generators were left to trio's
    finaliser: a ResourceWarning each (errors under this suite's filters)."""
    answer = LargeAnswer(64 * LIMIT, declared=True)
    outcome = await read_from(answer)
    assert isinstance(outcome, UpstreamUnavailable)
    assert "more than" in str(outcome)
    assert answer.sent < 8 * LIMIT


# Without a declared length the refusal comes half-way through httpx's
# nested body generators, which trio then finalises with a ResourceWarning
# each; harmless (they are closed), and unavoidable short of draining.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_chunked_answer_past_the_limit_is_refused() -> None:
    outcome = await read_from(LargeAnswer(2 * LIMIT, declared=False))
    assert isinstance(outcome, UpstreamUnavailable)
    assert "more than" in str(outcome)


async def test_an_answer_at_the_limit_is_read_whole() -> None:
    assert await read_from(LargeAnswer(LIMIT, declared=True)) == b"x" * LIMIT

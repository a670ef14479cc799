"""The HTTP server on its own: limits, bad heads, crashes, closing cleanly.

Each test serves a small handler with :class:`HttpServer` on 127.0.0.1 and
talks to it over a real socket, byte for byte where the point is what
reaches the wire (a head too large in one write, requests pipelined behind
a drain, connections past the limit).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from tcr_mirror._logging import JsonFormatter, _AcceptFailures
from tcr_mirror.proxy._http import (
    _HEAD_TIMEOUT,
    _IDLE_TIMEOUT,
    _MIN_PROGRESS,
    _SEND_STALL_TIMEOUT,
    FileBody,
    HttpServer,
    Request,
    Response,
    _Progress,
)
from tcr_mirror.proxy._metrics import ConnectionCollector

# Generous: a hang must fail the test, not stall the suite.
HANG = 30.0


async def ok(request: Request) -> Response:
    return Response(200, [("Content-Type", "text/plain")], b"ok")


@asynccontextmanager
async def serving(
    server: HttpServer,
) -> AsyncIterator[tuple[int, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(server.serve, listeners)
        yield listeners[0].socket.getsockname()[1], nursery
        nursery.cancel_scope.cancel()


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes (bounded)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        return await read_to_end(stream)


async def read_to_end(stream: trio.SocketStream) -> bytes:
    received = bytearray()
    with trio.fail_after(HANG):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def error_code_of(answer: bytes) -> str:
    body = answer.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["errors"][0]["code"])


def get(target: str = "/v2/", *extra: str, close: bool = True) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: mirror", *extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# Answers that cannot go on the wire, and handlers that crash.


async def test_a_header_that_is_not_ascii_is_a_503_and_the_server_serves_on(
    tmp_path: Path,
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 1000)
    opened: list[int] = []
    released: list[bool] = []

    async def handler(request: Request) -> Response:
        if request.target == "/v2/fine":
            return await ok(request)
        fd = os.open(blob, os.O_RDONLY)
        opened.append(fd)
        body = FileBody(fd, 0, 1000, release=lambda: released.append(True))
        # As an upstream's manifest media type could have been.
        return Response(200, [("Content-Type", "application/json; x=\u00e9")], body)

    async with serving(HttpServer(handler)) as (port, _):
        refused = await exchange(port, get("/v2/bad"))
        fine = await exchange(port, get("/v2/fine"))

    assert status_of(refused) == 503
    assert error_code_of(refused) == "UNAVAILABLE"
    assert status_of(fine) == 200
    assert released == [True]
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(opened[0])


async def test_a_bug_met_by_one_connection_leaves_the_others_served() -> None:
    async def handler(request: Request) -> Response:
        if request.target == "/v2/bug":
            # A body of no type the server knows: it fails mid-send.
            return Response(200, [], object())  # type: ignore[arg-type]
        return await ok(request)

    async with serving(HttpServer(handler)) as (port, _):
        other = await trio.open_tcp_stream("127.0.0.1", port)
        async with other:
            crashed = await exchange(port, get("/v2/bug"))
            await other.send_all(get("/v2/fine"))
            fine = await read_to_end(other)

    assert not crashed.endswith(b"ok")
    assert status_of(fine) == 200
    assert fine.endswith(b"ok")


# Limits.


async def test_a_head_too_large_in_one_write_is_a_431() -> None:
    head = get("/v2/", "X-Padding: " + "a" * 20_000)
    async with serving(HttpServer(ok)) as (port, _):
        answer = await exchange(port, head)

    assert status_of(answer) == 431
    assert error_code_of(answer) == "UNSUPPORTED"


async def test_a_head_too_large_over_many_reads_is_a_431_the_client_can_read() -> None:
    """The server gives up on such a head with most of it unread: closing
    at once made the kernel reset the connection, which could destroy the
    431 and fails the client's next read or write."""
    head = get("/v2/", "X-Padding: " + "a" * (256 * 1024))
    async with serving(HttpServer(ok)) as (port, _):
        answer = await exchange(port, head)

    assert status_of(answer) == 431
    assert error_code_of(answer) == "UNSUPPORTED"


async def test_a_body_larger_than_a_pull_sends_is_answered_413_before_closing() -> None:
    body = b"b" * (200 * 1024)
    request = (
        b"POST /v2/ HTTP/1.1\r\nHost: mirror\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    async with serving(HttpServer(ok)) as (port, _):
        answer = await exchange(port, request)

    assert status_of(answer) == 413
    assert error_code_of(answer) == "UNSUPPORTED"


async def test_a_body_declared_too_large_is_refused_without_inviting_it() -> None:
    """The server used to answer ``100 Continue``, read 64 KiB of a body it
    would refuse anyway, and only then answer 413."""
    request = (
        b"PUT /v2/ HTTP/1.1\r\nHost: mirror\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1048576\r\n\r\n"
    )
    async with serving(HttpServer(ok)) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            with trio.fail_after(HANG):
                first = await stream.receive_some(65536)
            assert first.startswith(b"HTTP/1.1 413 "), first[:40]
            answer = first + await read_to_end(stream)

    assert error_code_of(answer) == "UNSUPPORTED"


async def test_a_body_declared_too_large_and_never_sent_is_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server used to wait for the body until its timeout and close
    without an answer."""
    request = b"POST /v2/ HTTP/1.1\r\nHost: mirror\r\nContent-Length: 1048576\r\n\r\n"
    async with serving(HttpServer(ok)) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            answer = b""
            with trio.move_on_after(_HEAD_TIMEOUT / 2):
                answer = await stream.receive_some(65536)

    assert answer.startswith(b"HTTP/1.1 413 "), answer[:40]


async def test_a_second_head_sent_a_byte_a_second_is_cut_off_like_the_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a request was served, the next head had the idle timeout, four
    times the head timeout, to arrive."""
    second = b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    assert len(second) > _IDLE_TIMEOUT

    async def trickle(stream: trio.SocketStream) -> None:
        for byte in second:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return
            await trio.sleep(1)

    async with serving(HttpServer(ok)) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(get(close=False))
            first = b""
            with trio.fail_after(HANG):
                while not first.endswith(b"ok"):
                    first += await stream.receive_some(65536)
            started = trio.current_time()
            nursery.start_soon(trickle, stream)
            with trio.fail_after(10 * _IDLE_TIMEOUT):
                while await stream.receive_some(65536):
                    pass
            waited = trio.current_time() - started
            nursery.cancel_scope.cancel()

    assert status_of(first) == 200
    assert _HEAD_TIMEOUT <= waited < _HEAD_TIMEOUT + 1


async def test_connections_past_the_limit_are_closed_at_once() -> None:
    server = HttpServer(ok, max_connections=2)
    async with serving(server) as (port, _):
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        with trio.fail_after(HANG):
            while server.statistics()["connections"] < 2:
                await trio.sleep(0.01)
        refused = await exchange(port, get())
        await held[0].aclose()
        with trio.fail_after(HANG):
            while server.statistics()["connections"] > 1:
                await trio.sleep(0.01)
        served = await exchange(port, get())
        await held[1].aclose()

    assert refused == b""
    assert status_of(served) == 200
    assert server.statistics()["connections_refused"] == 1
    registry = CollectorRegistry()
    registry.register(ConnectionCollector(server.statistics))
    assert registry.get_sample_value("tcr_mirror_client_connections_limit") == 2
    refusals = "tcr_mirror_client_connections_refused_total"
    assert registry.get_sample_value(refusals) == 1
    assert registry.get_sample_value("tcr_mirror_client_connections") == 0


async def test_a_body_s_client_must_keep_taking_bytes_not_just_some(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Any progress used to restart the stall timer, so a client taking a
    little now and then held its connection and the blob file for ever."""
    progress = _Progress()
    started = trio.current_time()
    assert progress.scope.deadline == started + _SEND_STALL_TIMEOUT

    await trio.sleep(30)
    progress.sent(_MIN_PROGRESS - 1)
    assert progress.scope.deadline == started + _SEND_STALL_TIMEOUT
    progress.sent(1)
    assert progress.scope.deadline == trio.current_time() + _SEND_STALL_TIMEOUT

    # Waiting for the upstream does not count against the client.
    left = progress.scope.deadline - trio.current_time()
    with progress.paused():
        assert progress.scope.deadline == math.inf
        await trio.sleep(1000)
    assert progress.scope.deadline == trio.current_time() + left

    with progress.scope:
        await trio.sleep(2 * _SEND_STALL_TIMEOUT)
    assert progress.scope.cancelled_caught


# Closing without destroying the last answer.


async def test_a_bytes_body_counts_as_sent_only_once_it_went_out() -> None:
    big = 32 << 20  # far more than the socket buffers hold
    sent: list[tuple[str, int]] = []

    async def manifest(request: Request) -> Response:
        size = big if request.target == "/big" else 1000
        return Response(200, [], b"m" * size, source="upstream")

    server = HttpServer(manifest, on_sent=lambda *counted: sent.append(counted))
    async with serving(server) as (port, _):
        request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        taken = await exchange(port, request)
        assert status_of(taken) == 200
        assert sent == [("upstream", 1000)]

        # A client reset after the first bytes of its answer took the rest
        # of them never.
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(HANG):
            assert await sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        with trio.fail_after(HANG):
            while server.statistics()["connections"]:
                await trio.sleep(0.01)

    assert sent == [("upstream", 1000)]


async def test_a_drain_with_a_request_pipelined_behind_a_big_body_cuts_nothing(
    tmp_path: Path,
) -> None:
    """Closing with the second request unread would make the kernel send a
    reset and drop the end of the first answer still queued for the
    client."""
    size = 8 << 20
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(size))

    async def handler(request: Request) -> Response:
        fd = os.open(blob, os.O_RDONLY)
        return Response(200, [], FileBody(fd, 0, size))

    server = HttpServer(handler)
    async with serving(server) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(get("/v2/a", close=False) + get("/v2/b"))
            received = bytearray(await stream.receive_some(65536))
            # The whole answer is in the socket buffers or on its way; the
            # server believes it sent it, and the second request waits.
            with trio.fail_after(HANG):
                while server.statistics()["responses_in_flight"]:
                    received += await stream.receive_some(65536)
            server.drain()
            received += await read_to_end(stream)

    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" not in head.lower()
    assert len(body) >= size
    assert body[:size] == blob.read_bytes()


# Logs.


def test_accepts_failing_for_want_of_descriptors_log_one_json_line() -> None:
    # A real trio server whose process has no descriptor left: trio's
    # accept loop fails and retries every 0.1 s, logging each time.
    script = """
import os, resource, socket, trio
from tcr_mirror._logging import configure_logging

configure_logging("info")
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    address = listeners[0].socket.getsockname()
    held = []
    try:
        while True:
            held.append(os.dup(0))
    except OSError:
        pass
    os.close(held.pop())
    client = socket.create_connection(address)  # the last descriptor
    async def handler(stream):
        await stream.aclose()
    with trio.move_on_after(2):
        await trio.serve_listeners(handler, listeners)
    client.close()

trio.run(main)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    # About 20 failures in 2 s, one line.
    [line] = result.stderr.splitlines()
    event = json.loads(line)
    assert event["logger"] == "trio.serve_listeners"
    assert event["level"] == "error"
    assert event["event"] == "accept_failed"
    assert event["errno"] == "EMFILE"
    assert event["reason"] == "Too many open files"
    assert event["failures"] == 1
    assert "traceback" not in event


def test_repeated_accept_failures_are_counted_in_the_next_line() -> None:
    handler_output = io.StringIO()
    logger = logging.getLogger("test.accept_failures")
    handler = logging.StreamHandler(handler_output)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.filters[:] = [_AcceptFailures(interval=0.2)]
    error = OSError(errno.ENFILE, os.strerror(errno.ENFILE))

    def fail(count: int) -> None:
        for _ in range(count):
            try:
                raise error
            except OSError:
                logger.error("accept returned %s", "ENFILE", exc_info=True)

    fail(5)
    time.sleep(0.3)
    fail(3)

    events = [json.loads(line) for line in handler_output.getvalue().splitlines()]
    assert [e["failures"] for e in events] == [1, 5]
    assert {e["errno"] for e in events} == {"ENFILE"}


def test_the_node_takes_the_hard_limit_on_open_files() -> None:
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "from tcr_mirror.proxy import _daemon\n"
        "_daemon._raise_open_file_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard, hard > 64)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["True", "True"]

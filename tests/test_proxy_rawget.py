"""The raw blob GET on its own: framed bodies, and a connect given up midway.

Small servers of the test's own on 127.0.0.1 play the upstream, so each
can misbehave in exactly one way.
"""

from __future__ import annotations

import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h11
import pytest
import trio

from support.tls import make_tls_files
from tcr_mirror.proxy._rawget import BodyBroken, raw_get

TIMEOUTS = {"connect_timeout": 5.0, "read_timeout": 5.0}


@contextmanager
def one_answer(*parts: bytes) -> Iterator[str]:
    """A plain server that reads one request and sends ``parts`` raw.

    It pauses a moment between parts, so a reader sees them apart.
    """
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            for index, part in enumerate(parts):
                if index:
                    time.sleep(0.1)
                connection.sendall(part)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v2/app/blobs/x"
    finally:
        thread.join(timeout=10)
        listener.close()


def chunked(*chunks: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + body + b"0\r\n\r\n"


async def test_the_host_header_carries_no_user_info() -> None:
    """RFC 9110 7.2: Host is host[:port]; servers log it, passwords included."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    request = bytearray()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            while b"\r\n\r\n" not in request:
                request.extend(connection.recv(65536))
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"http://user:s3cret@127.0.0.1:{port}/v2/app/blobs/x"
        response = await raw_get(url, {}, **TIMEOUTS)
        await response.aclose()
    finally:
        thread.join(timeout=10)
        listener.close()

    assert f"\r\nhost: 127.0.0.1:{port}\r\n".encode() in bytes(request).lower()
    assert b"s3cret" not in request


async def test_a_chunked_body_larger_than_a_read_is_read_whole() -> None:
    big = bytes(range(256)) * 12288  # 3 MiB in one chunk: more than one read
    with one_answer(chunked(b"abc", big, b"xyz")) as url:
        response = await raw_get(url, {}, **TIMEOUTS)
        try:
            assert await response.aread() == b"abc" + big + b"xyz"
        finally:
            await response.aclose()


async def test_a_chunked_body_that_came_with_the_head_ends() -> None:
    with one_answer(chunked(b"small")) as url:
        response = await raw_get(url, {}, **TIMEOUTS)
        try:
            assert await response.aread() == b"small"
        finally:
            await response.aclose()


async def test_a_chunked_body_beside_a_content_length_is_read_as_chunks() -> None:
    """RFC 9112 6.3: Transfer-Encoding overrides Content-Length, as h11
    reads it; the chunks' framing must not end up in the blob."""
    answer = chunked(b"abc", b"defg")
    head, _, body = answer.partition(b"\r\n\r\n")
    head += b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    with one_answer(head, body) as url:
        response = await raw_get(url, {}, **TIMEOUTS)
        try:
            with trio.fail_after(30):
                assert await response.aread() == b"abcdefg"
        finally:
            await response.aclose()


async def test_a_chunked_body_cut_off_is_broken() -> None:
    answer = chunked(b"abc", b"defg")[: -len(b"0\r\n\r\n") - 3]
    with one_answer(answer) as url:
        response = await raw_get(url, {}, **TIMEOUTS)
        try:
            with pytest.raises(BodyBroken):
                await response.aread()
        finally:
            await response.aclose()


async def test_a_connect_given_up_midway_closes_its_socket(tmp_path: Path) -> None:
    # The server finishes the TLS handshake only after the client gave up,
    # so the worker thread ends with a connected socket nobody waits for.
    # It must close it: the server then reads the end of the stream (and a
    # socket left to the garbage collector would fail this test with a
    # ResourceWarning).
    files = make_tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.certificate, files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    client_gave_up = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        client_gave_up.wait(timeout=10)
        with context.wrap_socket(connection, server_side=True) as tls:
            tls.settimeout(10)
            seen.append(tls.recv(1))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(files.ca))
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/v2/app/blobs/x"
    with trio.move_on_after(0.1) as gave_up:
        await raw_get(url, {}, ssl_context=client_context, **TIMEOUTS)
    client_gave_up.set()
    assert gave_up.cancelled_caught
    await trio.to_thread.run_sync(thread.join, 10)
    listener.close()
    assert seen == [b""], "the abandoned connection was left open"


async def test_a_body_is_read_on_a_descriptor_past_select_s_limit() -> None:
    # A busy node holds more than 1024 descriptors; select() cannot wait on
    # one past that, and the reader waits whenever a piece arrives short.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"cannot open 2048 descriptors (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        first, second = b"a" * 100_000, b"b" * 100_000
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n"
        with one_answer(head + first, second) as url:
            response = await raw_get(url, {}, **TIMEOUTS)
            try:
                assert await response.aread() == first + second
            finally:
                await response.aclose()
    finally:
        for filler in fillers:
            os.close(filler)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_body_garbled_right_behind_the_head_closes_the_connection() -> None:
    # The garbled chunk comes with the head, so it is found while the
    # response is made. The error (kept, say, as a fetch's outcome) must
    # not hold the connection open: the server must read its end.
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            connection.sendall(head + b"not a chunk size\r\n")
            connection.settimeout(5)
            try:
                seen.append(connection.recv(1))
            except TimeoutError:
                seen.append(b"still open")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v2/app/blobs/x"
    with pytest.raises(h11.RemoteProtocolError) as raised:
        await raw_get(url, {}, **TIMEOUTS)
    await trio.to_thread.run_sync(thread.join, 10)
    listener.close()

    assert seen == [b""], "the connection was left open"
    assert raised.value is not None  # kept until now, as a fetch keeps its error

"""Many slow, idle and stuck clients: the node mirror keeps serving, then cleans up.

The crowd test runs ``tcr-mirror node`` as a real process in front of a real
docker-registry: hundreds of connections that send nothing, send a request
head a byte a second, or ask for a blob and never read it. Meanwhile an
ordinary client must still pull, and once the crowd hangs up the mirror's
open file descriptors must come back to where they were.

The server's own timeouts (30 s for a request head, 120 s for an idle
keep-alive connection) are too long for wall-clock tests, so those run
in-process against ``run_node`` on pytest-trio's virtual clock.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trio.testing

from support.images import push_image
from support.node import NodeProcess
from support.registry import Registry
from tcr_mirror.proxy._config import NodeConfig, make_upstream
from tcr_mirror.proxy._daemon import run_node
from tcr_mirror.proxy._http import _HEAD_TIMEOUT, _IDLE_TIMEOUT

IDLE = 150
SLOWLORIS = 100
STUCK_READERS = 50
ALL_MANIFESTS = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.oci.image.index.v1+json"
)
# Generous bounds: they catch a mirror that stopped serving, not a slow one.
PULL_TIMEOUT = 30.0
FD_SETTLE_TIMEOUT = 20.0
FD_SLACK = 8


def _raise_fd_limit(wanted: int) -> None:
    """Let this process (and the node it starts) hold ``wanted`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def node(tmp_path: Path, registry: Registry) -> Iterator[NodeProcess]:
    _raise_fd_limit(4096)
    process = NodeProcess(
        tmp_path / "node", ["--upstream", registry.url], log_path=tmp_path / "node.log"
    )
    process.start()
    yield process
    process.kill()


async def _settled_fds(pid: int, ceiling: int) -> int:
    """Wait (bounded) for the node's descriptor count to fall to ``ceiling``."""
    count = _open_fds(pid)
    with trio.move_on_after(FD_SETTLE_TIMEOUT):
        while count > ceiling:
            await trio.sleep(0.1)
            count = _open_fds(pid)
    return count


async def _connect(
    address: tuple[str, int], rcvbuf: int | None = None
) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        # Set before connecting so the window stays small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(address)
    return sock


async def _slowloris(
    sock: trio.socket.SocketType, head: bytes, stop: trio.Event
) -> None:
    for byte in head:
        if stop.is_set():
            return
        try:
            await sock.send(bytes([byte]))
        except OSError:
            return
        with trio.move_on_after(1.0):
            await stop.wait()


async def _pull(url: str, image_repo: str, tag: str, digests: list[str]) -> list[bytes]:
    async with httpx.AsyncClient(base_url=url, timeout=PULL_TIMEOUT) as client:
        bodies = []
        manifest = await client.get(
            f"/v2/{image_repo}/manifests/{tag}", headers={"Accept": ALL_MANIFESTS}
        )
        assert manifest.status_code == 200
        bodies.append(manifest.content)
        for digest in digests:
            blob = await client.get(f"/v2/{image_repo}/blobs/{digest}")
            assert blob.status_code == 200
            bodies.append(blob.content)
        return bodies


@pytest.mark.slow
async def test_a_crowd_of_stuck_clients_does_not_stop_pulls(
    registry: Registry, node: NodeProcess
) -> None:
    image = push_image(registry, "crowd/app", "v1", layer_sizes=(1024, 4 << 20))
    small, large = (digest for digest, _ in image.layers)
    assert node.process is not None
    pid = node.process.pid
    address = (node.host, node.port)

    # Warm up: the blobs are in the store and the upstream pool is open.
    expected = [image.manifest_bytes, *(data for _, data in image.layers)]
    assert await _pull(node.url, "crowd/app", "v1", [small, large]) == expected
    baseline = _open_fds(pid)

    stop = trio.Event()
    sockets: list[trio.socket.SocketType] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(IDLE):
                sockets.append(await _connect(address))
            head = f"GET /v2/crowd/app/blobs/{small} HTTP/1.1\r\nHost: m\r\n\r\n"
            for _ in range(SLOWLORIS):
                sock = await _connect(address)
                sockets.append(sock)
                nursery.start_soon(_slowloris, sock, head.encode(), stop)
            request = f"GET /v2/crowd/app/blobs/{large} HTTP/1.1\r\nHost: m\r\n\r\n"
            for _ in range(STUCK_READERS):
                sock = await _connect(address, rcvbuf=4096)
                sockets.append(sock)
                await sock.send(request.encode())
            # The node has taken every connection (bounded wait).
            crowd = baseline + IDLE + SLOWLORIS + STUCK_READERS
            with trio.fail_after(FD_SETTLE_TIMEOUT):
                while _open_fds(pid) < crowd:
                    await trio.sleep(0.1)

            # While they hang on, an ordinary client pulls everything.
            for repeat in range(3):
                got = await _pull(node.url, "crowd/app", "v1", [small, large])
                assert got == expected, f"pull {repeat} differs"
            stop.set()
    finally:
        for sock in sockets:
            sock.close()

    count = await _settled_fds(pid, baseline + FD_SLACK)
    assert count <= baseline + FD_SLACK, f"{count} fds open, {baseline} before"
    assert node.process.poll() is None
    assert await _pull(node.url, "crowd/app", "v1", [small]) == expected[:2]


# -- the server's timeouts, in virtual time -------------------------------------

BLOB = bytes(range(256)) * 16384  # 4 MiB: more than the socket buffers hold
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


async def _serve_blob(stream: trio.SocketStream) -> None:
    """A one-request upstream that answers BLOB to anything."""
    connection = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                connection.receive_data(data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return
        head = h11.Response(
            status_code=200, headers=[("Content-Length", str(len(BLOB)))]
        )
        await stream.send_all(
            connection.send(head)
            + connection.send(h11.Data(BLOB))
            + connection.send(h11.EndOfMessage())
        )


@asynccontextmanager
async def in_process_mirror(data_dir: Path) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        upstream = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.start_soon(trio.serve_listeners, _serve_blob, listeners)
        config = NodeConfig(
            listen=("127.0.0.1", 0),
            data_dir=data_dir,
            upstreams=(make_upstream(None, upstream, default=True),),
        )
        address = await nursery.start(run_node, config)
        yield address
        nursery.cancel_scope.cancel()


async def _closed_after(stream: trio.SocketStream, limit: float) -> float | None:
    """Seconds (virtual) until the mirror closes ``stream``, or None."""
    start = trio.current_time()
    with trio.move_on_after(limit):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return trio.current_time() - start
    return None


async def test_a_connection_that_sends_nothing_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with in_process_mirror(tmp_path) as (host, port):
        stream = await trio.open_tcp_stream(host, port)
        waited = await _closed_after(stream, 10 * _HEAD_TIMEOUT)
        await stream.aclose()
    assert waited is not None
    assert _HEAD_TIMEOUT <= waited < _HEAD_TIMEOUT + 1


async def test_a_head_sent_a_byte_a_second_is_cut_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    head = b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n"
    assert len(head) > 2 * _HEAD_TIMEOUT

    async def trickle(stream: trio.SocketStream) -> None:
        for byte in head:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return
            await trio.sleep(1)

    async with in_process_mirror(tmp_path) as (host, port):
        stream = await trio.open_tcp_stream(host, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle, stream)
            waited = await _closed_after(stream, 10 * _HEAD_TIMEOUT)
            nursery.cancel_scope.cancel()
        await stream.aclose()
    assert waited is not None
    assert _HEAD_TIMEOUT <= waited < _HEAD_TIMEOUT + 1


async def test_an_idle_keep_alive_connection_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with in_process_mirror(tmp_path) as (host, port):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/v2/", headers=[("Host", "m")]))
        client.send(h11.EndOfMessage())
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.Response):
                assert event.status_code == 200
        waited = await _closed_after(stream, 10 * _IDLE_TIMEOUT)
        await stream.aclose()
    assert waited is not None
    assert _IDLE_TIMEOUT <= waited < _IDLE_TIMEOUT + 1


async def test_a_body_announced_and_never_sent_is_given_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with in_process_mirror(tmp_path) as (host, port):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(
            b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 10\r\n\r\n"
        )
        waited = await _closed_after(stream, 10 * _IDLE_TIMEOUT)
        await stream.aclose()
    assert waited is not None, "the mirror waits forever for a request body"


async def test_a_client_that_never_reads_its_blob_is_given_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with in_process_mirror(tmp_path) as (host, port):
        # The fetch reads the upstream in worker threads, which the clock
        # cannot see: it would jump past the read timeout while they work.
        # So the blob is fetched with the clock stopped, and the client
        # below is served it from the store.
        autojump_clock.autojump_threshold = math.inf
        url = f"http://{host}:{port}/v2/app/blobs/{BLOB_DIGEST}"
        async with httpx.AsyncClient() as client:
            assert (await client.get(url)).content == BLOB
        autojump_clock.autojump_threshold = 0
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        request = f"GET /v2/app/blobs/{BLOB_DIGEST} HTTP/1.1\r\nHost: m\r\n\r\n"
        await stream.send_all(request.encode())
        await trio.sleep(10 * _IDLE_TIMEOUT)
        # Only now read: a mirror that gave up has closed before the end.
        received = b""
        with trio.move_on_after(60):
            while chunk := await stream.receive_some(1 << 20):
                received += chunk
        await stream.aclose()
    assert received.startswith(b"HTTP/1.1 200 "), received[:100]
    assert len(received) < len(BLOB), "the mirror waited forever for a reader"

"""Clients reading a blob while its one fetch is still running.

The upstream here is a small trio server whose pace the test controls, so
the test can hold the blob half-sent and look at what clients get then.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import httpx
import pytest
import trio

from support.loopback import LoopbackServer
from tcr_mirror.proxy import _fetch
from tcr_mirror.proxy._config import NodeConfig, make_upstream
from tcr_mirror.proxy._daemon import run_node
from tcr_mirror.proxy._errors import StoreFull
from tcr_mirror.proxy._oci import parse_digest

BLOB = bytes(range(256)) * 8192  # 2 MiB
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HALF = len(BLOB) // 2


class PacedUpstream(LoopbackServer):
    """Serves BLOB: the first half at once, the rest when released."""

    def __init__(self, body: bytes = BLOB) -> None:
        self.body = body
        self.release = trio.Event()
        self.blob_gets = 0

    async def _connection(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await self._answer(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        connection = await read_request(stream)
        if connection is None:
            return
        self.blob_gets += 1
        head = h11.Response(
            status_code=200, headers=[("Content-Length", str(len(self.body)))]
        )
        await stream.send_all(connection.send(head))
        await stream.send_all(connection.send(h11.Data(self.body[:HALF])))
        await self.release.wait()
        await stream.send_all(connection.send(h11.Data(self.body[HALF:])))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        await stream.aclose()


@asynccontextmanager
async def mirror_of(
    upstream: LoopbackServer, data_dir: Path, **by_namespace: LoopbackServer
) -> AsyncIterator[tuple[str, trio.Nursery]]:
    """A node in front of ``upstream`` (the default) and of each upstream
    given by namespace (``?ns=<namespace>``)."""
    async with trio.open_nursery() as nursery:
        upstreams = []
        for namespace, each in [(None, upstream), *by_namespace.items()]:
            await nursery.start(each.serve)
            url = f"http://127.0.0.1:{each.port}"
            upstreams.append(make_upstream(namespace, url, default=not namespace))
        config = NodeConfig(
            listen=("127.0.0.1", 0),
            metrics_listen=("127.0.0.1", 0),
            data_dir=data_dir,
            upstreams=tuple(upstreams),
        )
        host, port = await nursery.start(run_node, config)
        yield f"http://{host}:{port}", nursery
        nursery.cancel_scope.cancel()


async def wait_joined(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Wait (bounded) until the node counts a client that joined a blob's
    fetch in flight, from its /metrics."""
    (address,) = [
        r.__dict__["address"]
        for r in caplog.records
        if r.getMessage() == "metrics_listening"
    ]
    joined = 'tcr_mirror_cache_results_total{kind="blob",result="joined"} 1.0'
    with trio.fail_after(20):
        while joined not in (await client.get(f"http://{address}/metrics")).text:
            await trio.sleep(0.01)


async def read_request(stream: trio.SocketStream) -> h11.Connection | None:
    """Read one request's head; the connection to answer it on, or None."""
    connection = h11.Connection(h11.SERVER)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
            continue
        return connection if isinstance(event, h11.Request) else None


async def test_clients_stream_a_blob_before_the_fetch_ends(tmp_path: Path) -> None:
    upstream = PacedUpstream()
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        blob_url = f"/v2/app/blobs/{DIGEST}"
        whole = await client.send(client.build_request("GET", blob_url), stream=True)
        ranged = await client.send(
            client.build_request("GET", blob_url, headers={"Range": "bytes=1000-1999"}),
            stream=True,
        )
        late = await client.send(
            client.build_request("GET", blob_url, headers={"Range": f"bytes={HALF}-"}),
            stream=True,
        )
        head = await client.head(blob_url)

        # Half the blob is upstream's and nothing more: the first client
        # still gets those bytes now, and the range inside them all but its
        # last byte, which waits for the digest as every body's last does.
        body = whole.aiter_raw()
        first = b""
        while len(first) < HALF - 1:
            first += await body.__anext__()
        assert first == BLOB[: len(first)]
        ranged_body = ranged.aiter_raw()
        in_range = b""
        while len(in_range) < 999:
            in_range += await ranged_body.__anext__()
        assert in_range == BLOB[1000:1999]
        assert ranged.headers["content-range"] == f"bytes 1000-1999/{len(BLOB)}"
        assert head.headers["content-length"] == str(len(BLOB))
        assert whole.headers["content-length"] == str(len(BLOB))

        upstream.release.set()
        rest = b"".join([chunk async for chunk in body])
        assert first + rest == BLOB
        in_range += b"".join([chunk async for chunk in ranged_body])
        assert in_range == BLOB[1000:2000]
        assert await late.aread() == BLOB[HALF:]
        assert late.status_code == 206
        assert upstream.blob_gets == 1

        again = await client.get(blob_url)
        assert again.content == BLOB
        assert upstream.blob_gets == 1
    assert (tmp_path / "blobs" / "sha256" / DIGEST[7:9] / DIGEST[7:]).exists()


async def test_wrong_bytes_never_complete_a_body(tmp_path: Path) -> None:
    wrong = bytearray(BLOB)
    wrong[-1] ^= 0xFF
    upstream = PacedUpstream(bytes(wrong))
    upstream.release.set()
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        received = b""
        broke_off = False
        try:
            async with client.stream("GET", f"/v2/app/blobs/{DIGEST}") as response:
                async for chunk in response.aiter_raw():
                    received += chunk
        except httpx.RemoteProtocolError:
            broke_off = True
        assert broke_off
        assert len(received) < len(BLOB)

        # Nothing was stored: the next request fetches again, and even its
        # one-byte range waits for the digest, which fails again.
        async with client.stream(
            "GET", f"/v2/app/blobs/{DIGEST}", headers={"Range": "bytes=0-0"}
        ) as with_error:
            received, cut = await read_until_cut(with_error.aiter_raw())
        assert (with_error.status_code, cut) in ((206, True), (503, False))
        assert received == b""
    assert upstream.blob_gets == 2
    assert not list((tmp_path / "blobs").rglob(DIGEST[7:]))
    assert not list((tmp_path / "tmp").iterdir())


async def read_until_cut(chunks: AsyncIterator[bytes]) -> tuple[bytes, bool]:
    """The body's bytes, and whether the connection broke off before its end."""
    received = b""
    try:
        async for chunk in chunks:
            received += chunk
    except httpx.RemoteProtocolError:
        return received, True
    return received, False


async def test_a_range_of_wrong_bytes_never_completes(tmp_path: Path) -> None:
    wrong = bytearray(BLOB)
    wrong[1500] ^= 0xFF  # inside the range, and in the half sent at once
    upstream = PacedUpstream(bytes(wrong))
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        request = client.build_request(
            "GET", f"/v2/app/blobs/{DIGEST}", headers={"Range": "bytes=1000-1999"}
        )
        ranged = await client.send(request, stream=True)
        assert ranged.status_code == 206
        body = ranged.aiter_raw()
        first = b""
        while len(first) < 999:
            first += await body.__anext__()
        # The range's bytes are all there but the last, which waits for
        # the digest; it never comes, because the digest fails.
        upstream.release.set()
        rest, cut = await read_until_cut(body)
        assert cut
        assert len(first + rest) < 1000


async def test_an_empty_body_for_a_blob_that_is_not_empty_is_an_error(
    tmp_path: Path,
) -> None:
    upstream = PacedUpstream(b"")
    upstream.release.set()
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        response = await client.get(f"/v2/app/blobs/{DIGEST}")
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert not list((tmp_path / "blobs").rglob(DIGEST[7:]))


class ResizingUpstream(LoopbackServer):
    """Announces BLOB 10 bytes longer and closes, then serves it right."""

    def __init__(self) -> None:
        self.blob_gets = 0

    async def _connection(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await self._answer(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        connection = await read_request(stream)
        if connection is None:
            return
        self.blob_gets += 1
        if self.blob_gets == 1:
            length = str(len(BLOB) + 10)
            head = h11.Response(status_code=200, headers=[("Content-Length", length)])
            await stream.send_all(connection.send(head))
        else:
            head = h11.Response(
                status_code=200, headers=[("Content-Length", str(len(BLOB)))]
            )
            await stream.send_all(connection.send(head))
            await stream.send_all(connection.send(h11.Data(BLOB)))
            await stream.send_all(connection.send(h11.EndOfMessage()))
        await stream.aclose()


async def test_a_size_that_changes_between_attempts_cuts_clients_off(
    tmp_path: Path,
) -> None:
    upstream = ResizingUpstream()
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        with trio.fail_after(20):  # not for ever, one byte short of 10 more
            async with client.stream("GET", f"/v2/app/blobs/{DIGEST}") as response:
                assert response.headers["content-length"] == str(len(BLOB) + 10)
                received, cut = await read_until_cut(response.aiter_raw())
        assert cut
        assert len(received) <= len(BLOB)
        assert upstream.blob_gets == 2

        again = await client.get(f"/v2/app/blobs/{DIGEST}")
        assert again.status_code == 200
        assert again.content == BLOB


class RefusingUpstream(LoopbackServer):
    """Holds each request until released, then answers 404."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.asked = trio.Event()

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = await read_request(stream)
        if connection is None:
            return
        self.asked.set()
        await self.release.wait()
        body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}'
        head = h11.Response(
            status_code=404,
            headers=[("Content-Length", str(len(body))), ("Connection", "close")],
        )
        await stream.send_all(connection.send(head) + connection.send(h11.Data(body)))
        await stream.aclose()


async def test_a_client_that_joined_another_upstreams_refused_fetch_asks_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tcr_mirror")
    refusing = RefusingUpstream()
    holding = PacedUpstream()
    holding.release.set()
    async with (
        mirror_of(refusing, tmp_path, **{"b.example": holding}) as (url, nursery),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        path = f"/v2/app/blobs/{DIGEST}"
        answers: dict[str, httpx.Response] = {}

        async def get(name: str, params: dict[str, str]) -> None:
            answers[name] = await client.get(path, params=params)

        nursery.start_soon(get, "default", {})
        await refusing.asked.wait()
        nursery.start_soon(get, "b.example", {"ns": "b.example"})
        await wait_joined(client, caplog)  # the second joined the first fetch
        refusing.release.set()
        with trio.fail_after(20):
            while len(answers) < 2:
                await trio.sleep(0.01)
    assert answers["default"].status_code == 404
    assert answers["b.example"].status_code == 200
    assert answers["b.example"].content == BLOB
    assert holding.blob_gets == 1


async def test_clients_get_no_head_before_the_blobs_disk_space_is_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tcr_mirror")
    # The disk fills while the fetch claims its space: every client, also
    # one that came while the claim ran, must get the error, never a head.
    claiming = trio.Event()
    disk_full = trio.Event()

    async def allocate_on_a_full_disk(fd: int, size: int) -> None:
        claiming.set()
        await disk_full.wait()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_fetch, "_allocate", allocate_on_a_full_disk)
    upstream = PacedUpstream()
    upstream.release.set()
    async with (
        mirror_of(upstream, tmp_path) as (url, nursery),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        answers: list[httpx.Response] = []

        async def get() -> None:
            answers.append(await client.get(f"/v2/app/blobs/{DIGEST}"))

        nursery.start_soon(get)
        await claiming.wait()
        nursery.start_soon(get)
        await wait_joined(client, caplog)  # the second joined during the claim
        disk_full.set()
        with trio.fail_after(20):
            while len(answers) < 2:
                await trio.sleep(0.01)
    assert [answer.status_code for answer in answers] == [507, 507]
    assert not list((tmp_path / "tmp").iterdir())


class ManifestUpstream(LoopbackServer):
    """Answers every request with one OCI manifest."""

    body = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    )

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = await read_request(stream)
        if connection is None:
            return
        headers = [
            ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
            ("Content-Length", str(len(self.body))),
            ("Connection", "close"),
        ]
        data = connection.send(h11.Response(status_code=200, headers=headers))
        data += connection.send(h11.Data(self.body))
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data + connection.send(h11.EndOfMessage()))
            await stream.aclose()


async def test_a_manifest_by_sha512_digest(tmp_path: Path) -> None:
    upstream = ManifestUpstream()
    sha512 = "sha512:" + hashlib.sha512(upstream.body).hexdigest()
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        for _ in range(2):  # from upstream, then from the store
            got = await client.get(f"/v2/app/manifests/{sha512}")
            assert got.status_code == 200, got.text
            assert got.content == upstream.body
            assert got.headers["docker-content-digest"] == sha512


@asynccontextmanager
async def immutable(directory: Path) -> AsyncIterator[None]:
    """No file can be made, renamed or deleted in ``directory`` (chattr +i),
    as on a disk that went read-only; files open for writing stay writable."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root")
    made = await trio.run_process(
        ["chattr", "+i", str(directory)], capture_stderr=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"no immutable directories here: {made.stderr!r}")
    try:
        yield
    finally:
        # Shielded: a test cancelled by a crash must not leave it immutable.
        with trio.CancelScope(shield=True):
            await trio.run_process(["chattr", "-i", str(directory)])


async def test_a_temporary_file_that_cannot_be_deleted_does_not_end_the_node(
    tmp_path: Path,
) -> None:
    upstream = PacedUpstream()
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        blob_url = f"/v2/app/blobs/{DIGEST}"
        # The fetch's file exists once the head is out; it is written,
        # verified and fsynced, but then cannot be renamed nor deleted.
        async with (
            client.stream("GET", blob_url) as first,
            immutable(tmp_path / "tmp"),
        ):
            upstream.release.set()
            assert await first.aread() == BLOB
            refused = await client.get(blob_url)
            assert refused.status_code == 503
            assert refused.json()["errors"][0]["code"] == "UNAVAILABLE"

        again = await client.get(blob_url)
        assert again.content == BLOB
        assert (await client.get("/healthz")).status_code == 200
    assert upstream.blob_gets == 2
    assert len(list((tmp_path / "tmp").iterdir())) == 1


class SizedUpstream(LoopbackServer):
    """Announces a blob of ``length`` bytes, then closes without a byte."""

    def __init__(self, length: str) -> None:
        self.length = length

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = await read_request(stream)
        if connection is None:
            return
        head = h11.Response(status_code=200, headers=[("Content-Length", self.length)])
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(connection.send(head))
            await stream.aclose()


@pytest.mark.parametrize("length", ["9" * 20, str(1 << 62)])
async def test_a_blob_size_no_file_can_hold_is_refused_before_the_head(
    tmp_path: Path, length: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 20 digits (as many as h11 takes) overflow an off_t; 2**62 does not, but
    # is past ext4's largest file, and past the free space of any other.
    upstream = SizedUpstream(length)
    async with (
        mirror_of(upstream, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        with trio.fail_after(20):
            response = await client.get(f"/v2/app/blobs/{DIGEST}")
    assert response.status_code in (503, 507)
    assert response.json()["errors"][0]["code"]
    assert not [r for r in caplog.records if r.getMessage() == "blob_fetch_crashed"]
    assert not list((tmp_path / "tmp").iterdir())


async def store_bytes(client: httpx.AsyncClient, metrics: str) -> int:
    """What the node counts as stored plus reserved, from its /metrics."""
    text = (await client.get(f"http://{metrics}/metrics")).text
    (line,) = [x for x in text.splitlines() if x.startswith("tcr_mirror_store_bytes ")]
    return int(float(line.split()[1]))


async def test_a_fetch_that_lost_its_file_gives_its_room_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The fetch's file is deleted behind it, and the client that finds it
    # gone cannot start another fetch: the lost one must still give back
    # the room it holds when it ends, or the budget shrinks for good.
    caplog.set_level(logging.INFO, logger="tcr_mirror")
    upstream = PacedUpstream()
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(timeout=30) as client,
    ):
        await nursery.start(upstream.serve)
        up = make_upstream(None, f"http://127.0.0.1:{upstream.port}", default=True)
        config = NodeConfig(
            listen=("127.0.0.1", 0),
            metrics_listen=("127.0.0.1", 0),
            data_dir=tmp_path,
            upstreams=(up,),
        )
        host, port = await nursery.start(run_node, config)
        (metrics,) = [
            r.__dict__["address"]
            for r in caplog.records
            if r.getMessage() == "metrics_listening"
        ]
        blob_url = f"http://{host}:{port}/v2/app/blobs/{DIGEST}"

        async with client.stream("GET", blob_url) as first:
            assert await store_bytes(client, metrics) == len(BLOB)
            for temp in (tmp_path / "tmp").iterdir():
                temp.unlink()
            async with immutable(tmp_path / "tmp"):
                refused = await client.get(blob_url)
                assert refused.status_code == 503
                upstream.release.set()
                # Its client had the file open: it gets the verified bytes.
                assert await first.aread() == BLOB

            assert await store_bytes(client, metrics) == 0

        again = await client.get(blob_url)
        assert again.content == BLOB
        assert await store_bytes(client, metrics) == len(BLOB)
        nursery.cancel_scope.cancel()
    assert upstream.blob_gets == 2


async def test_a_verified_fetch_that_could_not_be_stored_still_serves_its_clients(
    tmp_path: Path,
) -> None:
    # Storing fails after the digest matched (the index cannot be written):
    # a client that joined before the size was known and runs only now has
    # the file open, and its bytes are good; it is served, not failed.
    fetch = _fetch.BlobFetch(parse_digest(DIGEST), tmp_path / "blob")
    fetch.size = fetch.written = len(BLOB)
    fetch.verified = True
    fetch.error = StoreFull("cannot index blob")

    assert await fetch.wait_size() == len(BLOB)
    assert await fetch.wait_available(0) == len(BLOB)
    await fetch.wait_verified()

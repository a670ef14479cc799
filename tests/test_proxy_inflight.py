"""Clients reading a blob while its one fetch is still running.

The upstream here is a small trio server whose pace the test controls, so
the test can hold the blob half-sent and look at what clients get then.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import httpx
import trio

from tcr_mirror.proxy._config import NodeConfig, make_upstream
from tcr_mirror.proxy._daemon import run_node

BLOB = bytes(range(256)) * 8192  # 2 MiB
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HALF = len(BLOB) // 2


class PacedUpstream:
    """Serves BLOB: the first half at once, the rest when released."""

    def __init__(self, body: bytes = BLOB) -> None:
        self.body = body
        self.release = trio.Event()
        self.blob_gets = 0
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Request):
                break
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
    upstream: PacedUpstream, data_dir: Path
) -> AsyncIterator[tuple[str, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        url = f"http://127.0.0.1:{upstream.port}"
        config = NodeConfig(
            listen=("127.0.0.1", 0),
            data_dir=data_dir,
            upstreams=(make_upstream(None, url, default=True),),
        )
        host, port = await nursery.start(run_node, config)
        yield f"http://{host}:{port}", nursery
        nursery.cancel_scope.cancel()


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
        # still gets those bytes now, and the range inside them completes.
        body = whole.aiter_raw()
        first = b""
        while len(first) < HALF - 1:
            first += await body.__anext__()
        assert first == BLOB[: len(first)]
        assert (await ranged.aread()) == BLOB[1000:2000]
        assert ranged.headers["content-range"] == f"bytes 1000-1999/{len(BLOB)}"
        assert head.headers["content-length"] == str(len(BLOB))
        assert whole.headers["content-length"] == str(len(BLOB))

        upstream.release.set()
        rest = b"".join([chunk async for chunk in body])
        assert first + rest == BLOB
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

        # Nothing was stored: the next request fetches again.
        with_error = await client.get(
            f"/v2/app/blobs/{DIGEST}", headers={"Range": "bytes=0-0"}
        )
        assert with_error.status_code in (206, 503)
    assert upstream.blob_gets == 2
    assert not list((tmp_path / "blobs").rglob(DIGEST[7:]))
    assert not list((tmp_path / "tmp").iterdir())

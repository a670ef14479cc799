"""The node mirror killed with SIGKILL mid-work, then started again (issue #3).

Each test runs a real ``tcr-mirror node`` whose upstream is a
:class:`FaultProxy` in front of a real docker-registry holding eight layers
of a few MiB. Several clients per layer pull through the node while some
fetches are held mid-body by a stall, and the node is killed at a chosen
moment. What must hold whatever the moment:

* no client ever got a complete wrong body: each saw the whole right
  blob, an error, or a body cut short that is a prefix of the blob;
* only verified bytes are under ``blobs/`` (every file hashes to its name);
* on restart ``tmp/`` is emptied, the ``store_recovered`` counts match what
  was on disk, nothing verified is dropped, and the index lists exactly the
  blob files;
* blobs that were stored are served without asking the upstream, and every
  pull succeeds with the right bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from support.faultproxy import Fault, FaultKind, FaultProxy
from support.images import PushedImage, push_image
from support.layers import digest_of
from support.node import NodeFactory, NodeProcess
from support.pull import Pulled, pull
from support.registry import Registry
from support.waiting import wait_until
from tcr_mirror.proxy._store import BlobStore

REPO = "crash/app"
MIB = 1 << 20
LAYERS = 8
CLIENTS_PER_BLOB = 3
# Body bytes a stalled fetch gets before the upstream goes quiet.
STALL_AFTER = MIB
# A generous bound on a client's waits; outcomes are asserted, not times.
CLIENT_TIMEOUT = 30.0


# Fixtures.


@pytest.fixture(scope="module")
def image(module_registry: Registry) -> PushedImage:
    """Eight layers of 2-3 MiB, each a distinct blob."""
    sizes = [2 * MIB + i * (MIB // 8) for i in range(LAYERS)]
    return push_image(module_registry, REPO, "v1", layer_sizes=sizes)


@pytest.fixture
def proxy(module_registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(module_registry.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def node(node_factory: NodeFactory, proxy: FaultProxy) -> NodeProcess:
    """A started node; the tests kill and restart it."""
    # Stalls must outlast the kill, not end the fetch first.
    config = "read_timeout = 60.0\nconnect_timeout = 2.0\n"
    return node_factory("--upstream", proxy.url, config=config)


# Clients.


@dataclass(frozen=True)
class BlobPulled(Pulled):
    """What one client got of one blob."""

    digest: str


def pull_blob(node_url: str, digest: str) -> BlobPulled:
    got = pull(f"{node_url}{blob_path(digest)}", timeout=CLIENT_TIMEOUT)
    return BlobPulled(got.status, got.headers, got.body, got.complete, digest)


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def assert_no_wrong_body(pulled: BlobPulled, blobs: dict[str, bytes]) -> None:
    """Whole and right, or an error, or a strict prefix of the blob."""
    data = blobs[pulled.digest]
    if pulled.status == 200 and pulled.complete:
        assert digest_of(pulled.body) == pulled.digest
    elif pulled.status == 200:
        assert len(pulled.body) < len(data)
        assert data.startswith(pulled.body), "a cut body held wrong bytes"
    else:
        assert pulled.status == 0 or pulled.status >= 500, pulled


# The data directory.


def files_under(node: NodeProcess, directory: str) -> dict[str, int]:
    """``{name: size}`` of the regular files under ``data/<directory>``.

    A file renamed away between listing and stat (a fetch completing while
    the node still runs) is left out.
    """
    sizes = {}
    for path in (node.data_dir / directory).rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                sizes[path.name] = path.stat().st_size
    return sizes


def assert_blob_files_verified(node: NodeProcess) -> dict[str, int]:
    blobs = files_under(node, "blobs")
    for path in (node.data_dir / "blobs").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
            assert path.parent.name == path.name[:2]
    return blobs


def index_of(node: NodeProcess) -> dict[str, int]:
    """The blob index as a stopped node left it: ``{hex: size}``."""
    store = BlobStore(node.data_dir)
    try:
        return {key.split(":", 1)[1]: entry.size for key, entry in store.blobs()}
    finally:
        store.close()


def recovered_event(node: NodeProcess, offset: int) -> dict[str, Any]:
    events = node.events_named("store_recovered", offset)
    assert len(events) == 1, events
    return events[0]


# The checks after a kill.


def restart_and_check(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> dict[str, int]:
    """Inspect the killed node's data dir, restart it, check the recovery.

    Returns:
        The verified blob files found after the kill, ``{hex: size}``.
    """
    assert node.process is not None
    assert node.process.poll() is not None
    temps = files_under(node, "tmp")
    blobs_before = assert_blob_files_verified(node)
    proxy.clear_faults()
    offset = node.log_path.stat().st_size

    node.start()

    recovered = recovered_event(node, offset)
    assert recovered["temp_removed"] == len(temps)
    assert recovered["entries_dropped"] == 0, "a verified blob was dropped"
    assert files_under(node, "tmp") == {}
    assert assert_blob_files_verified(node) == blobs_before

    # Stored blobs come from disk; the others are fetched again. All right.
    asked = {d: proxy.count("GET", blob_path(d)) for d, _ in image.layers}
    with ThreadPoolExecutor(max_workers=LAYERS) as pool:
        pulls = list(pool.map(lambda d: pull_blob(node.url, d), asked))
    for pulled in pulls:
        assert pulled.status == 200
        assert pulled.complete
        assert digest_of(pulled.body) == pulled.digest
    for digest, before in asked.items():
        refetched = proxy.count("GET", blob_path(digest)) - before
        stored = digest.split(":", 1)[1] in blobs_before
        assert refetched == (0 if stored else 1), (digest, stored, refetched)

    assert node.stop() == 0
    on_disk = assert_blob_files_verified(node)
    assert index_of(node) == on_disk
    assert len(on_disk) == LAYERS
    return blobs_before


def start_clients(
    pool: ThreadPoolExecutor, node: NodeProcess, image: PushedImage
) -> list[Future[BlobPulled]]:
    return [
        pool.submit(pull_blob, node.url, digest)
        for _ in range(CLIENTS_PER_BLOB)
        for digest, _ in image.layers
    ]


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


def stalled_at_the_stall(node: NodeProcess, held: dict[str, bytes]) -> int:
    """How many temporary files hold their blob's bytes up to the stall."""
    heads = node.temp_file_heads(STALL_AFTER)
    return sum(
        1 for hex_, blob in held.items() if heads.get(hex_) == blob[:STALL_AFTER]
    )


# Kills while blobs are fetched.

MOMENTS = ["all_stalled", "half_stalled", "first_done", "all_done"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_kill_while_fetching_then_restart_recovers(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, moment: str
) -> None:
    digests = [digest for digest, _ in image.layers]
    stalled = {"all_stalled": digests, "half_stalled": digests[: LAYERS // 2]}
    held = stalled.get(moment, [])
    for digest in held:
        hex_ = digest.split(":", 1)[1]
        proxy.add_fault(
            Fault(FaultKind.STALL_BODY, after=STALL_AFTER, path_contains=hex_)
        )
    free = [d for d in digests if d not in held]

    with ThreadPoolExecutor(max_workers=LAYERS * CLIENTS_PER_BLOB) as pool:
        futures = start_clients(pool, node, image)
        if moment in ("first_done", "all_done"):
            want = 1 if moment == "first_done" else LAYERS
            wait_until(
                lambda: len(node.events_named("blob_fetch_done")) >= want,
                f"{want} fetches to finish",
            )
        else:
            by_hex = {d.split(":", 1)[1]: blob for d, blob in image.layers}
            held_blobs = {hex_: by_hex[hex_] for hex_ in map(hex_of, held)}
            wait_until(
                lambda: stalled_at_the_stall(node, held_blobs) == len(held),
                "the stalled fetches to reach the stall",
            )
            # start_clients submits the layers in order, CLIENTS_PER_BLOB times.
            pairs = zip(futures, digests * CLIENTS_PER_BLOB, strict=True)
            for future, digest in pairs:
                if digest in free:
                    future.result(timeout=CLIENT_TIMEOUT)
        node.kill()
        pulled = [future.result(timeout=CLIENT_TIMEOUT) for future in futures]

    blobs = dict(image.layers)
    for one in pulled:
        assert_no_wrong_body(one, blobs)
    temps = files_under(node, "tmp")
    if held:
        # Each stalled fetch left its temporary file, of the blob's size
        # claimed up front; none is a blob.
        assert sorted(name.split(".", 1)[0] for name in temps) == sorted(
            map(hex_of, held)
        )
        sizes = {hex_of(d): len(blob) for d, blob in image.layers}
        assert all(size == sizes[name.split(".", 1)[0]] for name, size in temps.items())
    stored = restart_and_check(node, proxy, image)
    for digest in held:
        assert digest.split(":", 1)[1] not in stored
    if moment in ("half_stalled", "all_done"):
        assert {d.split(":", 1)[1] for d in free} <= set(stored)


# A kill during warm reads.


def test_kill_during_warm_reads_loses_nothing(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    for digest, _ in image.layers:
        warm = pull_blob(node.url, digest)
        assert warm.status == 200
        assert warm.complete
    stop = threading.Event()
    reads: list[BlobPulled] = []

    def read_forever(digest: str) -> None:
        # Bounded: the node is killed long before this many reads.
        for _ in range(10_000):
            reads.append(pull_blob(node.url, digest))
            if stop.is_set():
                return

    with ThreadPoolExecutor(max_workers=LAYERS) as pool:
        readers = [pool.submit(read_forever, d) for d, _ in image.layers]
        wait_until(lambda: len(reads) >= 2 * LAYERS, "warm reads")
        node.kill()
        stop.set()
        for reader in readers:
            reader.result(timeout=CLIENT_TIMEOUT)

    blobs = dict(image.layers)
    assert any(r.complete for r in reads)
    for one in reads:
        assert_no_wrong_body(one, blobs)
    assert files_under(node, "tmp") == {}
    fetched = sum(proxy.count("GET", blob_path(d)) for d in blobs)
    assert fetched == LAYERS, "a warm read went to the upstream"
    stored = restart_and_check(node, proxy, image)
    assert len(stored) == LAYERS

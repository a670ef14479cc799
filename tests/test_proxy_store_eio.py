"""Blob files that cannot be read or written: bad sectors under the store.

A real ``tcr-mirror node`` keeps its data directory on a FUSE filesystem
(:mod:`support.faultyfs`) whose reads of one blob file fail with ``EIO``
from 4 MiB on, once the test says so; its LMDB index stays on the normal
disk. What must hold: the client of the unreadable blob gets a body cut
short, never the declared length of wrong bytes; the node drops the blob
and stays up; the next client gets the whole blob, fetched again from the
upstream (a real docker-registry behind a :class:`FaultProxy` that counts).
A fetch whose writes fail the same way fails cleanly: its client's body is
cut, nothing is stored, and the next request fetches the blob again.

The same filesystem can also fill up behind a claim of space that
succeeded (a thin-provisioned disk): a fetch whose writes then fail with
``ENOSPC`` evicts idle blobs and goes on from the first byte not written;
with nothing to evict, it fails as cleanly as the bad sector's fetch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.faultproxy import FaultProxy
from support.faultyfs import FaultyFs, unavailable_reason
from support.images import PushedImage, push_image
from support.node import NodeFactory, NodeProcess
from support.pull import Pulled, assert_got_blob, pull
from support.registry import Registry
from support.waiting import wait_until

REPO = "storeeio/app"
MIB = 1 << 20
BAD_SECTOR = 4 * MIB
# Outcomes are asserted, never times: this only bounds the client's waits.
CLIENT_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def image(module_registry: Registry) -> PushedImage:
    """One layer of 8 MiB: more than the socket buffers hold."""
    return push_image(module_registry, REPO, "v1", layer_sizes=[8 * MIB])


@pytest.fixture(scope="module")
def other_image(module_registry: Registry) -> PushedImage:
    """One layer of 5 MiB, to be stored first and evicted."""
    return push_image(module_registry, REPO, "v2", layer_sizes=[5 * MIB])


@pytest.fixture
def proxy(module_registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(module_registry.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def faulty_fs(tmp_path: Path) -> Iterator[FaultyFs]:
    """The data directory's filesystem; ``index/`` links out of it, to disk."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"a FUSE filesystem cannot be mounted: {reason}")
    backing, mountpoint = tmp_path / "backing", tmp_path / "data"
    backing.mkdir()
    mountpoint.mkdir()
    (tmp_path / "index").mkdir()
    (backing / "index").symlink_to(tmp_path / "index")
    with FaultyFs(backing, mountpoint, tmp_path / "faults") as fs:
        yield fs


@pytest.fixture
def node(
    faulty_fs: FaultyFs, node_factory: NodeFactory, proxy: FaultProxy
) -> NodeProcess:
    # The filesystem first, so that it is unmounted after the node is killed.
    return node_factory("--upstream", proxy.url, data_dir=faulty_fs.mountpoint)


def pull_blob(node: NodeProcess, digest: str) -> Pulled:
    return pull(f"{node.url}{blob_path(digest)}", timeout=CLIENT_TIMEOUT)


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def blob_file(node: NodeProcess, digest: str) -> Path:
    hex_ = digest.split(":", 1)[1]
    return node.data_dir / "blobs" / "sha256" / hex_[:2] / hex_


def test_a_stored_blob_that_fails_to_read_is_cut_short_and_fetched_again(
    node: NodeProcess, proxy: FaultProxy, faulty_fs: FaultyFs, image: PushedImage
) -> None:
    digest, data = image.layers[0]
    assert_got_blob(pull_blob(node, digest), digest)
    asked = proxy.count("GET", blob_path(digest))
    faulty_fs.fail_reads(blob_file(node, digest).name, BAD_SECTOR)

    cut = pull_blob(node, digest)

    assert cut.status == 200
    assert int(cut.headers["content-length"]) == len(data)
    assert not cut.complete
    assert len(cut.body) <= BAD_SECTOR
    assert data.startswith(cut.body)
    # Dropped by the failed send itself, for the reason the disk gave.
    wait_until(lambda: node.events_named("blob_dropped"), "the blob to be dropped")
    (dropped,) = node.events_named("blob_dropped")
    assert dropped["digest"] == digest
    assert "Input/output error" in dropped["reason"], dropped
    assert not blob_file(node, digest).exists()
    assert "Traceback" not in node.log_text()
    health = httpx.get(f"{node.url}/healthz", timeout=CLIENT_TIMEOUT)
    assert health.status_code == 200
    assert proxy.count("GET", blob_path(digest)) == asked

    # The fetch again writes a new file, which the sector no longer spoils.
    faulty_fs.heal()
    assert_got_blob(pull_blob(node, digest), digest)
    assert proxy.count("GET", blob_path(digest)) == asked + 1
    assert blob_file(node, digest).stat().st_size == len(data)
    assert_got_blob(pull_blob(node, digest), digest)
    assert proxy.count("GET", blob_path(digest)) == asked + 1


def bad_sector(faulty_fs: FaultyFs, digest: str, size: int) -> tuple[int, str]:
    """Writes of the blob's temporary file fail from ``BAD_SECTOR`` on."""
    faulty_fs.fail_writes(digest.split(":", 1)[1], BAD_SECTOR)
    return BAD_SECTOR, "Input/output error"


def full_disk(faulty_fs: FaultyFs, digest: str, size: int) -> tuple[int, str]:
    """The disk takes the claim of space, then half the blob, nothing to evict."""
    faulty_fs.limit_to(size // 2)
    return size // 2, "No space left on device"


def stuck_disk(faulty_fs: FaultyFs, digest: str, size: int) -> tuple[int, str]:
    """Writes of the blob's temporary file take no byte from ``BAD_SECTOR`` on."""
    faulty_fs.take_nothing(digest.split(":", 1)[1], BAD_SECTOR)
    return BAD_SECTOR, "took none of the bytes"


@pytest.mark.parametrize("fault", [bad_sector, full_disk, stuck_disk])
def test_a_fetch_whose_writes_fail_is_cut_and_stores_nothing(
    node: NodeProcess,
    proxy: FaultProxy,
    faulty_fs: FaultyFs,
    image: PushedImage,
    fault: Callable[[FaultyFs, str, int], tuple[int, str]],
) -> None:
    digest, data = image.layers[0]
    written, reason = fault(faulty_fs, digest, len(data))

    failed = pull_blob(node, digest)

    assert not failed.complete
    assert data.startswith(failed.body)
    assert len(failed.body) <= written
    wait_until(lambda: node.events_named("blob_fetch_failed"), "the fetch to fail")
    (failure,) = node.events_named("blob_fetch_failed")
    assert failure["digest"] == digest
    assert reason in failure["reason"], failure
    assert not blob_file(node, digest).exists()
    wait_until(
        lambda: not any((node.data_dir / "tmp").iterdir()),
        "the temporary file to be deleted",
    )
    assert "Traceback" not in node.log_text()
    assert proxy.count("GET", blob_path(digest)) == 1

    faulty_fs.heal()
    assert_got_blob(pull_blob(node, digest), digest)
    assert proxy.count("GET", blob_path(digest)) == 2
    assert blob_file(node, digest).read_bytes() == data


def test_a_fetch_that_fills_the_disk_evicts_an_idle_blob_and_goes_on(
    node: NodeProcess,
    proxy: FaultProxy,
    faulty_fs: FaultyFs,
    image: PushedImage,
    other_image: PushedImage,
) -> None:
    idle_digest, idle_data = other_image.layers[0]
    assert_got_blob(pull_blob(node, idle_digest), idle_digest)
    digest, data = image.layers[0]
    # Room for the new blob only once half of the idle one is gone.
    faulty_fs.limit_to(len(data) + len(idle_data) // 2)

    assert_got_blob(pull_blob(node, digest), digest)

    (made,) = node.events_named("blob_space_made")
    assert made["digest"] == digest
    assert made["freed"] == len(idle_data)
    (resumed,) = node.events_named("blob_fetch_resumed")
    assert resumed["digest"] == digest
    # The writes failed once the two blobs no longer fitted, not before.
    assert resumed["offset"] >= len(data) - len(idle_data) // 2 - MIB
    assert proxy.count("GET", blob_path(digest), range=None) == 1
    assert (
        proxy.count("GET", blob_path(digest), range=f"bytes={resumed['offset']}-") == 1
    )
    assert blob_file(node, digest).read_bytes() == data
    assert not blob_file(node, idle_digest).exists()
    assert not node.events_named("blob_fetch_failed")
    assert "Traceback" not in node.log_text()

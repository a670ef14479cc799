"""The node's store when its files go wrong behind it, on real processes.

Each test runs a real ``tcr-mirror node`` in front of a real docker-registry
(through a :class:`FaultProxy` where a fetch must be held) and damages what
the node keeps for real: a stored blob file cut short before or while it is
sent, a fetch's temporary file deleted while a client waits on it, a second
node started on the same data directory, and a thin-provisioned disk that
runs out under a fetch, so that pages written and let go of read back as
zeros. What must hold: no client ever gets a complete body of wrong bytes,
a damaged blob is fetched again rather than served again, and nothing but
verified blobs is kept.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.faultproxy import Fault, FaultKind, FaultProxy
from support.images import PushedImage, push_image
from support.layers import digest_of
from support.node import NodeFactory, NodeProcess
from support.pull import HeldReader, Pulled, assert_got_blob, pull
from support.registry import Registry
from support.waiting import wait_until

REPO = "storefaults/app"
MIB = 1 << 20
# Outcomes are asserted, never times: these only bound the waits.
WAIT = 30.0
CLIENT_TIMEOUT = 30.0


# Fixtures.


@pytest.fixture(scope="module")
def image(module_registry: Registry) -> PushedImage:
    """Two layers of 8 MiB: more than the socket buffers hold."""
    return push_image(module_registry, REPO, "v1", layer_sizes=[8 * MIB] * 2)


@pytest.fixture
def proxy(module_registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(module_registry.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def node(node_factory: NodeFactory, proxy: FaultProxy) -> NodeProcess:
    return node_factory("--upstream", proxy.url)


# Clients.


def pull_blob(node: NodeProcess, digest: str) -> Pulled:
    return pull(f"{node.url}{blob_path(digest)}", timeout=CLIENT_TIMEOUT)


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


# The data directory.


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


def blob_file(node: NodeProcess, digest: str) -> Path:
    hex_ = hex_of(digest)
    return node.data_dir / "blobs" / "sha256" / hex_[:2] / hex_


def temp_files(node: NodeProcess) -> list[Path]:
    return list((node.data_dir / "tmp").iterdir())


# A stored blob damaged behind the store.


def test_a_blob_cut_short_on_disk_is_fetched_again_not_served(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, data = image.layers[0]
    assert_got_blob(pull_blob(node, digest), digest)
    with blob_file(node, digest).open("r+b") as file:
        file.truncate(len(data) // 2)
    asked = proxy.count("GET", blob_path(digest))

    again = pull_blob(node, digest)

    assert_got_blob(again, digest)
    assert proxy.count("GET", blob_path(digest)) == asked + 1
    (dropped,) = node.events_named("blob_dropped")
    assert dropped["digest"] == digest
    assert blob_file(node, digest).stat().st_size == len(data)
    assert_got_blob(pull_blob(node, digest), digest)
    assert proxy.count("GET", blob_path(digest)) == asked + 1


def test_a_blob_cut_short_while_it_is_sent_is_dropped_at_once(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, data = image.layers[1]
    assert_got_blob(pull_blob(node, digest), digest)
    reader = HeldReader(node, blob_path(digest))
    assert reader.status == 200
    with blob_file(node, digest).open("r+b") as file:
        file.truncate(MIB)

    got = reader.finish()

    assert not got.complete
    assert data.startswith(got.body)
    # Dropped by the failed send itself, before anyone asks again.
    wait_until(lambda: node.events_named("blob_dropped"), "the blob to be dropped")
    assert not blob_file(node, digest).exists()
    asked = proxy.count("GET", blob_path(digest))
    assert_got_blob(pull_blob(node, digest), digest)
    assert proxy.count("GET", blob_path(digest)) == asked + 1


# Fetches in flight and their files.


def hold_fetch(proxy: FaultProxy, node: NodeProcess, digest: str) -> HeldReader:
    """Start a fetch of ``digest`` whose upstream stalls after 1 MiB (once),
    with a client waiting on it; return the client."""
    proxy.add_fault(
        Fault(FaultKind.STALL_BODY, after=MIB, times=1, path_contains=hex_of(digest))
    )
    reader = HeldReader(node, blob_path(digest))
    assert reader.status == 200
    wait_until(lambda: temp_files(node), "the fetch's temporary file")
    return reader


def test_a_client_whose_fetch_lost_its_file_starts_another(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, _ = image.layers[0]
    first = hold_fetch(proxy, node, digest)
    for temp in temp_files(node):
        temp.unlink()

    try:
        second = pull_blob(node, digest)
    finally:
        first.close()

    assert_got_blob(second, digest)
    assert node.events_named("blob_fetch_abandoned")
    assert proxy.count("GET", blob_path(digest)) == 2
    assert blob_file(node, digest).exists()


def test_a_second_node_on_the_same_data_directory_refuses_to_start(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, _ = image.layers[0]
    reader = hold_fetch(proxy, node, digest)
    temps = temp_files(node)
    assert node.process is not None

    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "tcr_mirror",
                "node",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(node.data_dir),
                "--upstream",
                proxy.url,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    finally:
        reader.close()

    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(
        f"tcr-mirror: error: cannot use data directory {node.data_dir}:"
    )
    assert line.endswith(f"in use by another tcr-mirror (pid {node.process.pid})")
    # Nothing of the first node's was touched: its fetch's file is there.
    assert all(temp.exists() for temp in temps)
    assert httpx.get(f"{node.url}/healthz", timeout=CLIENT_TIMEOUT).status_code == 200


# A thin-provisioned disk that runs out.


@pytest.fixture(scope="module")
def big(module_registry: Registry) -> PushedImage:
    """One 160 MiB layer: the fetch lets go of the pages of its first 32 MiB
    (more than 128 MiB behind the writer) before it ends."""
    data = random.Random(20261204).randbytes(160 * MIB)
    return push_image(module_registry, REPO, "big", layers=[data])


@pytest.fixture
def thin_disk(tmp_path: Path) -> Iterator[Path]:
    """An ext4 of 1 GiB on a loop device whose file lives in a 16 MiB tmpfs:
    writes are taken, and their writeback fails once the tmpfs is full.

    Unmounted and detached at teardown (also after a failure).
    """
    tools = all(shutil.which(tool) for tool in ("losetup", "mkfs.ext4"))
    if os.geteuid() != 0 or not tools:
        pytest.skip("a loop device needs root, losetup and mkfs.ext4")
    backing, mountpoint = tmp_path / "backing", tmp_path / "thin"
    backing.mkdir()
    mountpoint.mkdir()
    with contextlib.ExitStack() as stack:
        run_or_skip(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(backing)])
        stack.callback(subprocess.run, ["umount", "-l", str(backing)], check=False)
        image_file = backing / "disk.img"
        image_file.touch()
        os.truncate(image_file, 1 << 30)
        # No journal: the journal's own failed writes would stop the
        # filesystem before the blob's data does.
        run_or_skip(["mkfs.ext4", "-q", "-O", "^has_journal", str(image_file)])
        device = run_or_skip(["losetup", "-f", "--show", str(image_file)]).strip()
        stack.callback(subprocess.run, ["losetup", "-d", device], check=False)
        run_or_skip(["mount", "-o", "errors=continue", device, str(mountpoint)])
        stack.callback(subprocess.run, ["umount", "-l", str(mountpoint)], check=False)
        yield mountpoint


def run_or_skip(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"{command[0]} failed: {result.stderr.strip()}")
    return result.stdout


@pytest.mark.slow
@pytest.mark.root
def test_bytes_lost_in_writeback_never_complete_a_body(
    thin_disk: Path,
    node_factory: NodeFactory,
    module_registry: Registry,
    big: PushedImage,
) -> None:
    node = node_factory("--upstream", module_registry.url, data_dir=thin_disk / "data")
    digest, data = big.layers[0]
    # Reads from the start, but only once the fetch has ended, when the
    # file's first pages come back from the disk.
    reader = HeldReader(node, blob_path(digest))
    assert reader.status == 200
    assert reader.length == len(data)

    wait_until(
        lambda: (
            node.events_named("blob_fetch_failed")
            or node.events_named("blob_fetch_done")
        ),
        "the fetch to end",
    )
    got = reader.finish()

    if got.complete:
        assert digest_of(got.body) == digest, "a complete body held bytes the disk lost"
    assert not got.complete, "the last byte went out before the bytes were on disk"
    (failed,) = node.events_named("blob_fetch_failed")
    assert "store blob" in failed["reason"], failed
    assert not blob_file(node, digest).exists()
    assert len(got.body) < len(data)

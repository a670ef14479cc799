"""The node mirror's store on a small real filesystem (issue #3).

Each test mounts a 24 MiB tmpfs as the node's data directory (so it needs
root) and pulls layers of several MiB through a real ``tcr-mirror node``
from a real docker-registry. Two limits are exercised:

* the byte budget (``--max-store-bytes`` with watermarks): least recently
  used blobs are evicted and fetched again when asked, the store never
  passes the budget, a blob being sent to a client is never evicted, and a
  blob larger than the budget is refused with an OCI error;
* the filesystem itself running out of space, with no budget set: a fetch
  whose space cannot be claimed evicts least recently used idle blobs to
  fit, and one that still cannot fit (the idle blobs are too few, or being
  read) fails cleanly (an OCI error, or a body cut short, never a complete
  wrong one), leaves no file behind and no index entry, and the same pull
  works once there is room again. A filesystem out of inodes evicts idle
  blobs too, and without any is a ``507`` as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.filesystems import mounted_tmpfs
from support.images import PushedImage, push_image
from support.layers import digest_of
from support.node import NodeFactory, NodeProcess
from support.pull import HeldReader, Pulled, assert_got_blob, pull
from support.registry import Registry
from tcr_mirror.proxy._store import BlobStore

REPO = "diskfull/app"
MIB = 1 << 20
FS_SIZE = 24 * MIB
BUDGET = 16 * MIB
# Bytes of the filesystem the index and directories may take beyond blobs.
OVERHEAD = 1 * MIB
CLIENT_TIMEOUT = 30.0


# Fixtures.


@pytest.fixture(scope="module")
def small(module_registry: Registry) -> PushedImage:
    """Five layers of 4.5 MiB: three fit under the high watermark, four not."""
    return push_image(module_registry, REPO, "small", layer_sizes=[9 * MIB // 2] * 5)


@pytest.fixture(scope="module")
def oversized(module_registry: Registry) -> PushedImage:
    """One layer of 17 MiB, more than the whole budget."""
    return push_image(module_registry, REPO, "oversized", layer_sizes=[17 * MIB])


@pytest.fixture(scope="module")
def large(module_registry: Registry) -> PushedImage:
    """Two layers of 10 MiB: both do not fit on the filesystem with a filler."""
    return push_image(module_registry, REPO, "large", layer_sizes=[10 * MIB] * 2)


@pytest.fixture
def filesystem(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh 24 MiB tmpfs, unmounted at teardown (also after a failure).

    Parametrized indirectly, the parameter adds mount options.
    """
    options = ",".join([f"size={FS_SIZE}", *getattr(request, "param", [])])
    with mounted_tmpfs(tmp_path / "fs", options) as mountpoint:
        yield mountpoint


@pytest.fixture
def node_factory(
    filesystem: Path, node_factory: NodeFactory, module_registry: Registry
) -> NodeFactory:
    """Starts a node on the tmpfs: ``node_factory(*extra_args)``.

    Asks for ``filesystem`` before the shared ``node_factory`` so that the
    nodes are stopped before the unmount.
    """

    def start(*extra: str) -> NodeProcess:
        args = ["--upstream", module_registry.url, "--tag-ttl", "0", *extra]
        return node_factory(*args, data_dir=filesystem / "data")

    return start


def budget_args() -> list[str]:
    return ["--max-store-bytes", "16MiB", "--store-watermarks", "0.9,0.5"]


# Clients.


def pull_blob(node: NodeProcess, digest: str) -> Pulled:
    return pull(f"{node.url}{blob_path(digest)}", timeout=CLIENT_TIMEOUT)


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def assert_clean_failure(pulled: Pulled, data: bytes) -> None:
    """An OCI error before the head, or a right body cut short after it."""
    if pulled.status == 200:
        assert not pulled.complete, "a failed fetch completed a body"
        assert len(pulled.body) < len(data)
        assert data.startswith(pulled.body)
    else:
        assert pulled.status >= 500, pulled.status
        assert pulled.error_code()


# The data directory.


def blob_files(node: NodeProcess) -> dict[str, int]:
    """``{hex: size}`` of the blob files, each checked against its name."""
    files = {}
    for path in (node.data_dir / "blobs").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
            files[path.name] = path.stat().st_size
    return files


def temp_files(node: NodeProcess) -> list[str]:
    return [path.name for path in (node.data_dir / "tmp").iterdir()]


def used_bytes(mountpoint: Path) -> int:
    """Bytes in use on the filesystem, read in one consistent snapshot."""
    stat = os.statvfs(mountpoint)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def free_bytes(mountpoint: Path) -> int:
    stat = os.statvfs(mountpoint)
    return stat.f_bavail * stat.f_frsize


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


def index_of(node: NodeProcess) -> dict[str, int]:
    """The blob index a stopped node left: ``{hex: size}``."""
    store = BlobStore(node.data_dir)
    try:
        return {hex_of(key): entry.size for key, entry in store.blobs()}
    finally:
        store.close()


class Counts(tuple[int, ...]):
    """Per-blob counts that subtract element-wise."""

    def __sub__(self, other: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(a - b for a, b in zip(self, other, strict=True))


def upstream_gets(upstream: Registry, *digests: str) -> Counts:
    """How many GETs of each blob the registry served so far (the registry
    is shared by the module's tests, so tests compare differences)."""
    return Counts(upstream.blob_gets(REPO, digest) for digest in digests)


class PeakSampler:
    """Samples the filesystem's bytes in use in a thread; keeps the peak."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.peak = used_bytes(mountpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, used_bytes(self.mountpoint))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# The byte budget.


def test_budget_evicts_least_recently_used_and_refetches(
    node_factory: NodeFactory,
    filesystem: Path,
    module_registry: Registry,
    small: PushedImage,
) -> None:
    node = node_factory(*budget_args())
    baseline = used_bytes(filesystem)
    digests = [digest for digest, _ in small.layers]
    asked = upstream_gets(module_registry, digests[0], digests[-1])

    with PeakSampler(filesystem) as sampler:
        for digest in digests:
            assert_got_blob(pull_blob(node, digest), digest)
            assert sum(blob_files(node).values()) <= BUDGET
            assert temp_files(node) == []
        first_again = pull_blob(node, digests[0])
        last_again = pull_blob(node, digests[-1])

    # Blobs plus fetches in flight stay within the budget at every moment.
    assert sampler.peak - baseline <= BUDGET + OVERHEAD
    evicted = {e["digest"] for e in node.events_named("blob_evicted")}
    assert digests[0] in evicted
    assert digests[-1] not in evicted
    assert_got_blob(first_again, digests[0])
    assert_got_blob(last_again, digests[-1])
    fetched = upstream_gets(module_registry, digests[0], digests[-1]) - asked
    assert fetched == (2, 1), "only the evicted blob is fetched again"
    assert sum(blob_files(node).values()) <= BUDGET


def test_blob_larger_than_the_budget_is_an_oci_error(
    node_factory: NodeFactory,
    module_registry: Registry,
    small: PushedImage,
    oversized: PushedImage,
) -> None:
    node = node_factory(*budget_args())
    kept, _ = small.layers[0]
    assert_got_blob(pull_blob(node, kept), kept)
    big, big_data = oversized.layers[0]

    refused = pull_blob(node, big)

    assert 500 <= refused.status < 600
    assert refused.complete
    assert refused.error_code() == "UNAVAILABLE"
    assert temp_files(node) == []
    assert hex_of(big) not in blob_files(node)
    # The daemon keeps serving, and the same request is refused again.
    assert_got_blob(pull_blob(node, kept), kept)
    assert pull_blob(node, big).status == refused.status
    assert len(big_data) > BUDGET


def test_blob_larger_than_the_budget_evicts_nothing(
    node_factory: NodeFactory,
    module_registry: Registry,
    small: PushedImage,
    oversized: PushedImage,
) -> None:
    node = node_factory(*budget_args())
    kept, _ = small.layers[0]
    asked = upstream_gets(module_registry, kept)
    assert_got_blob(pull_blob(node, kept), kept)

    assert pull_blob(node, oversized.layers[0][0]).status >= 500

    # A blob that can never fit is no reason to empty the store.
    assert node.events_named("blob_evicted") == []
    assert hex_of(kept) in blob_files(node)
    assert_got_blob(pull_blob(node, kept), kept)
    assert upstream_gets(module_registry, kept) - asked == (1,)


def test_blob_being_sent_to_a_slow_client_is_not_evicted(
    node_factory: NodeFactory, module_registry: Registry, small: PushedImage
) -> None:
    node = node_factory(*budget_args())
    (held, held_data), *others = small.layers
    asked = upstream_gets(module_registry, held)
    assert_got_blob(pull_blob(node, held), held)
    held_file = node.data_dir / "blobs" / "sha256" / hex_of(held)[:2] / hex_of(held)

    reader = HeldReader(node, blob_path(held))
    assert reader.status == 200
    assert reader.length == len(held_data)
    # Three more blobs pass the high watermark; the held one is the least
    # recently used, so only its reader keeps it.
    for digest, _ in others[:3]:
        assert_got_blob(pull_blob(node, digest), digest)
    evicted = {e["digest"] for e in node.events_named("blob_evicted")}
    assert others[0][0] in evicted, "the pulls did not force an eviction"
    assert held not in evicted
    assert held_file.exists()

    body = reader.finish().body

    assert len(body) == len(held_data)
    assert digest_of(body) == held
    assert_got_blob(pull_blob(node, held), held)
    assert upstream_gets(module_registry, held) - asked == (1,)


# The filesystem running out of space.


def fill(path: Path, size: int | None) -> None:
    """Write ``size`` bytes to ``path``, or until the filesystem is full."""
    block = b"\0" * MIB
    written = 0
    with path.open("wb") as filler:
        while size is None or written < size:
            chunk = block if size is None else block[: min(MIB, size - written)]
            try:
                filler.write(chunk)
                filler.flush()
            except OSError:
                return
            written += len(chunk)


def test_disk_full_evicts_idle_blobs_to_fit_the_next_one(
    node_factory: NodeFactory,
    filesystem: Path,
    module_registry: Registry,
    large: PushedImage,
) -> None:
    node = node_factory()
    (stored, _), (wanted, _) = large.layers
    asked = upstream_gets(module_registry, stored, wanted)
    assert_got_blob(pull_blob(node, stored), stored)
    # Leave room for part of the next blob only; no budget is set.
    fill(filesystem / "filler", free_bytes(filesystem) - 4 * MIB)

    assert_got_blob(pull_blob(node, wanted), wanted)

    assert [e["digest"] for e in node.events_named("blob_evicted")] == [stored]
    assert set(blob_files(node)) == {hex_of(wanted)}
    assert temp_files(node) == []
    # And back: the blob evicted is fetched again, in the room of the other.
    assert_got_blob(pull_blob(node, stored), stored)
    assert set(blob_files(node)) == {hex_of(stored)}
    assert upstream_gets(module_registry, stored, wanted) - asked == (2, 1)
    assert node.stop() == 0
    assert index_of(node) == blob_files(node)


def test_disk_full_fails_the_fetch_cleanly_and_recovers(
    node_factory: NodeFactory,
    filesystem: Path,
    module_registry: Registry,
    large: PushedImage,
) -> None:
    node = node_factory()
    (stored, stored_data), (wanted, wanted_data) = large.layers
    asked = upstream_gets(module_registry, stored)
    assert_got_blob(pull_blob(node, stored), stored)
    filler = filesystem / "filler"
    # Leave room for part of the next blob only, and keep the one blob
    # that could make room busy being read.
    fill(filler, free_bytes(filesystem) - 4 * MIB)
    reader = HeldReader(node, blob_path(stored))

    failed = pull_blob(node, wanted)

    assert_clean_failure(failed, wanted_data)
    # The fetch claims the blob's space before the client gets a head.
    assert failed.status == 507, failed.status
    reasons = [e.get("reason", "") for e in node.events_named("blob_fetch_failed")]
    assert any("no space" in reason for reason in reasons), reasons
    assert temp_files(node) == []
    assert set(blob_files(node)) == {hex_of(stored)}
    assert reader.finish().body == stored_data
    assert node.events_named("blob_evicted") == []

    assert_got_blob(pull_blob(node, stored), stored)

    # The index agrees with the files across a restart.
    assert node.stop() == 0
    assert index_of(node) == blob_files(node)
    offset = node.log_path.stat().st_size
    node.start()
    (recovered,) = node.events_named("store_recovered", offset)
    assert recovered["temp_removed"] == 0
    assert recovered["entries_dropped"] == 0
    assert recovered["files_indexed"] == 0

    filler.unlink()
    assert_got_blob(pull_blob(node, wanted), wanted)
    assert_got_blob(pull_blob(node, stored), stored)
    assert set(blob_files(node)) == {hex_of(stored), hex_of(wanted)}
    assert upstream_gets(module_registry, stored) - asked == (1,)


def test_stored_blobs_are_served_while_the_disk_is_full(
    node_factory: NodeFactory, filesystem: Path, large: PushedImage
) -> None:
    node = node_factory()
    (stored, _), (wanted, wanted_data) = large.layers
    assert_got_blob(pull_blob(node, stored), stored)

    fill(filesystem / "filler", None)

    # Reading a stored blob needs no new space; the missing one fails
    # cleanly (the stored one, being read, cannot make room), and neither
    # leaves a file behind.
    assert_got_blob(pull_blob(node, stored), stored)
    reader = HeldReader(node, blob_path(stored))
    assert_clean_failure(pull_blob(node, wanted), wanted_data)
    assert digest_of(reader.finish().body) == stored
    assert temp_files(node) == []
    assert set(blob_files(node)) == {hex_of(stored)}


@pytest.mark.parametrize("filesystem", [["nr_inodes=32"]], indirect=True)
def test_no_inode_left_for_a_fetch_is_a_507(
    node_factory: NodeFactory, filesystem: Path, large: PushedImage
) -> None:
    node = node_factory()
    (wanted, _), _ = large.layers
    fillers = filesystem / "fillers"
    fillers.mkdir()
    taken = 0
    with contextlib.suppress(OSError):
        for n in range(1000):
            (fillers / str(n)).touch()
            taken += 1
    assert 0 < taken < 1000

    refused = pull_blob(node, wanted)

    assert refused.status == 507, refused.body[:300]
    assert refused.error_code() == "UNAVAILABLE"
    assert temp_files(node) == []
    shutil.rmtree(fillers)
    assert_got_blob(pull_blob(node, wanted), wanted)


@pytest.mark.parametrize("filesystem", [["nr_inodes=32"]], indirect=True)
def test_no_inode_left_evicts_an_idle_blob_to_free_one(
    node_factory: NodeFactory, filesystem: Path, large: PushedImage
) -> None:
    node = node_factory()
    (stored, _), (wanted, _) = large.layers
    assert_got_blob(pull_blob(node, stored), stored)
    fillers = filesystem / "fillers"
    fillers.mkdir()
    with contextlib.suppress(OSError):
        for n in range(1000):
            (fillers / str(n)).touch()

    assert_got_blob(pull_blob(node, wanted), wanted)
    assert set(blob_files(node)) == {hex_of(wanted)}
    assert node.events_named("blob_inode_made")
    assert temp_files(node) == []

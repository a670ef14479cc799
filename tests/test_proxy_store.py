"""The blob store on real files and a real LMDB: index, budget, recovery."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio

from tcr_mirror.proxy._errors import StoreFull, StoreUnavailable
from tcr_mirror.proxy._fetch import BlobFetcher
from tcr_mirror.proxy._mirror import MANIFEST_MEDIA_TYPES
from tcr_mirror.proxy._oci import Digest, parse_digest
from tcr_mirror.proxy._store import (
    BlobStore,
    DataDirInUse,
    IndexLimits,
    StoreBudget,
    TagEntry,
)
from tcr_mirror.proxy._upstream import Upstream


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def put(store: BlobStore, data: bytes) -> Digest:
    """Store a blob the way a fetch does: reserve, temp file, commit."""
    digest = digest_of(data)
    reservation = store.reserve(digest, len(data))
    temp = store.new_temp_path(digest)
    temp.write_bytes(data)
    store.commit_blob(digest, temp, len(data))
    store.unreserve(reservation)
    return digest


def read(store: BlobStore, digest: Digest) -> bytes | None:
    opened = store.open_blob(digest)
    if opened is None:
        return None
    fd, size = opened
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def test_blobs_manifests_and_tags_survive_reopening(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blob = put(store, b"layer bytes")
    manifest = digest_of(b"{}")
    store.put_manifest(manifest, "application/vnd.oci.image.manifest.v1+json", b"{}")
    store.put_tag("reg", "app", "v1", TagEntry(str(manifest), "x/y", 12.5))
    store.close()

    again = BlobStore(tmp_path)
    assert read(again, blob) == b"layer bytes"
    assert again.get_manifest(manifest) == (
        "application/vnd.oci.image.manifest.v1+json",
        b"{}",
    )
    assert again.get_tag("reg", "app", "v1") == TagEntry(str(manifest), "x/y", 12.5)
    assert again.get_tag("other", "app", "v1") is None
    assert again.used_bytes == len(b"layer bytes")


def test_recover_makes_index_and_files_agree(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    kept = put(store, b"kept")
    vanished = put(store, b"vanished")
    truncated = put(store, b"truncated later")
    store.blob_path(vanished).unlink()
    store.blob_path(truncated).write_bytes(b"trunc")
    # A verified file renamed into place just before a crash, not indexed.
    orphan = digest_of(b"orphan")
    store.blob_path(orphan).parent.mkdir(parents=True, exist_ok=True)
    store.blob_path(orphan).write_bytes(b"orphan")
    (store.tmp_dir / "partial").write_bytes(b"half a blob")
    (tmp_path / "blobs" / "sha256" / "zz").mkdir()
    (tmp_path / "blobs" / "sha256" / "zz" / "not-a-digest").write_bytes(b"?")
    store.close()

    again = BlobStore(tmp_path)
    counts = again.recover()
    assert counts == {"temp_removed": 1, "entries_dropped": 2, "files_indexed": 1}
    assert read(again, kept) == b"kept"
    assert read(again, orphan) == b"orphan"
    assert read(again, vanished) is None
    assert read(again, truncated) is None
    assert not list(again.tmp_dir.iterdir())
    assert again.used_bytes == len(b"kept") + len(b"orphan")


def test_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, StoreBudget(max_bytes=1000, high=0.9, low=0.5))
    first = put(store, b"a" * 300)
    second = put(store, b"b" * 300)
    third = put(store, b"c" * 250)
    assert read(store, first) is not None  # first is now the most recent
    put(store, b"d" * 200)  # 1050 > 900: evict down to 500
    assert read(store, second) is None
    assert read(store, third) is None
    assert read(store, first) is not None
    assert store.used_bytes == 500
    assert store.evictions == 2
    assert store.evicted_bytes == 550


def test_blobs_being_read_or_fetched_are_never_evicted(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, StoreBudget(max_bytes=1000, high=0.9, low=0.1))
    busy = put(store, b"a" * 400)
    store.acquire_reader(busy)
    in_flight = digest_of(b"in flight")
    store.reserve(in_flight, 400)
    with pytest.raises(StoreFull):
        store.reserve(digest_of(b"too big"), 300)
    assert read(store, busy) is not None
    store.release_reader(busy)
    store.release_reader(busy)  # the read() above acquired once more
    store.reserve(digest_of(b"fits now"), 300)
    assert read(store, busy) is None
    assert store.used_bytes == 700


def test_a_blob_larger_than_the_budget_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, StoreBudget(max_bytes=100))
    with pytest.raises(StoreFull) as info:
        store.reserve(digest_of(b"x"), 101)
    assert info.value.status == 507
    assert store.used_bytes == 0


def test_an_unreadable_index_is_rebuilt_from_the_blob_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blob = put(store, b"survives")
    store.put_tag("reg", "app", "v1", TagEntry(str(blob), "x/y", 1.0))
    store.close()
    data = tmp_path / "index" / "data.mdb"
    data.write_bytes(b"\xff" * data.stat().st_size)

    again = BlobStore(tmp_path)
    counts = again.recover()
    assert counts["files_indexed"] == 1
    assert read(again, blob) == b"survives"
    assert again.get_tag("reg", "app", "v1") is None
    assert list(tmp_path.glob("index.broken-*"))


def test_a_blob_file_deleted_behind_the_store_stops_counting(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    kept = put(store, b"kept")
    gone = put(store, b"deleted by hand")
    store.blob_path(gone).unlink()

    assert read(store, gone) is None
    assert store.blob_entry(gone) is None
    assert store.used_bytes == len(b"kept")
    # Fetched again, it counts once.
    put(store, b"deleted by hand")
    assert store.used_bytes == len(b"kept") + len(b"deleted by hand")
    assert read(store, kept) == b"kept"


# Faults of the files behind the store.


def test_a_blob_file_cut_short_behind_the_store_is_fetched_again(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path)
    kept = put(store, b"kept")
    cut = put(store, b"cut short later")
    os.truncate(store.blob_path(cut), 3)

    assert read(store, cut) is None
    assert store.blob_entry(cut) is None
    assert not store.blob_path(cut).exists()
    assert store.used_bytes == len(b"kept")
    put(store, b"cut short later")
    assert read(store, cut) == b"cut short later"
    assert read(store, kept) == b"kept"


def test_a_blob_that_cannot_be_deleted_is_kept_and_skipped(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root")
    store = BlobStore(tmp_path, StoreBudget(max_bytes=1000, high=0.9, low=0.5))
    stuck = put(store, b"a" * 300)
    second = put(store, b"b" * 300)
    path = store.blob_path(stuck)
    chattr = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if chattr.returncode != 0:
        pytest.skip(f"no immutable files here: {chattr.stderr!r}")
    try:
        third = put(store, b"c" * 350)  # 950 > 900: evict down to 500
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)

    # The stuck blob stays, counted and served; the next one went instead.
    assert read(store, stuck) == b"a" * 300
    assert read(store, second) is None
    assert read(store, third) == b"c" * 350
    assert store.used_bytes == 650
    assert sum(entry.size for _, entry in store.blobs()) == 650


def test_the_order_of_use_outlives_a_restart(tmp_path: Path) -> None:
    budget = StoreBudget(max_bytes=1000, high=0.9, low=0.7)
    store = BlobStore(tmp_path, budget)
    first = put(store, b"a" * 300)
    second = put(store, b"b" * 300)
    assert read(store, first) is not None
    store.close()

    again = BlobStore(tmp_path, budget)
    put(again, b"c" * 350)
    assert read(again, second) is None
    assert read(again, first) is not None


def test_too_many_open_files_is_a_503_not_a_crash(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blob = put(store, b"stored")
    with open_files_exhausted(), pytest.raises(StoreUnavailable) as info:
        store.open_blob(blob)
    assert info.value.status == 503
    assert "Too many open files" in info.value.message
    assert read(store, blob) == b"stored"


async def test_a_fetch_without_a_file_descriptor_is_a_503(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    upstream = Upstream("reg", "http://127.0.0.1:9")  # never dialled
    async with trio.open_nursery() as nursery:
        fetcher = BlobFetcher(store, nursery)
        with open_files_exhausted(), pytest.raises(StoreUnavailable) as info:
            fetcher.fetch(upstream, "app", digest_of(b"missing"))
    assert info.value.status == 503
    assert fetcher.in_flight(digest_of(b"missing")) is None
    assert list(store.tmp_dir.iterdir()) == []


@contextlib.contextmanager
def open_files_exhausted() -> Iterator[None]:
    """Every file descriptor this process may have is taken, for real."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    taken: list[int] = []
    try:
        for _ in range(highest + 16):
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# One process per data directory.


def test_a_second_store_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blob = put(store, b"mine")
    (store.tmp_dir / "a-fetch-in-flight").write_bytes(b"half")

    with pytest.raises(DataDirInUse) as info:
        BlobStore(tmp_path)
    assert f"in use by another tcr-mirror (pid {os.getpid()})" in str(info.value)
    assert (store.tmp_dir / "a-fetch-in-flight").exists()
    assert read(store, blob) == b"mine"

    store.close()
    again = BlobStore(tmp_path)
    assert read(again, blob) == b"mine"


def test_temporary_names_differ_between_processes_of_one_pid(tmp_path: Path) -> None:
    # Two containers' nodes are each PID 1: the pid alone tells nothing.
    digest = digest_of(b"same blob")
    one = BlobStore(tmp_path / "one").new_temp_path(digest).name
    other = BlobStore(tmp_path / "other").new_temp_path(digest).name
    assert one != other
    assert one.split(".", 1)[0] == digest.hex


# The index.


def test_a_full_index_map_grows_instead_of_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 64 KiB holds about a hundred blob records.
    store = BlobStore(tmp_path, limits=IndexLimits(map_size=64 << 10))
    blobs = [put(store, b"blob %d" % n) for n in range(2000)]
    manifest = b'{"schemaVersion":2}'
    store.put_manifest(digest_of(manifest), "x/y", manifest)

    assert all(store.blob_entry(blob) is not None for blob in blobs)
    assert store.get_manifest(digest_of(manifest)) == ("x/y", manifest)
    assert any(r.getMessage() == "index_map_grown" for r in caplog.records)


def test_recover_indexes_every_file_however_small_the_map(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for n in range(2000):
        data = b"orphan %d" % n
        path = store.blob_path(digest_of(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    store.close()

    again = BlobStore(tmp_path, limits=IndexLimits(map_size=64 << 10))
    assert again.recover()["files_indexed"] == 2000
    assert read(again, digest_of(b"orphan 1999")) == b"orphan 1999"


def test_manifests_and_tags_are_bounded_least_recently_used_first(
    tmp_path: Path,
) -> None:
    limits = IndexLimits(manifests=3, tags=2)
    store = BlobStore(tmp_path, limits=limits)
    bodies = [b'{"n":%d}' % n for n in range(4)]
    for body in bodies[:3]:
        store.put_manifest(digest_of(body), "x/y", body)
    assert store.get_manifest(digest_of(bodies[0])) is not None
    store.put_manifest(digest_of(bodies[3]), "x/y", bodies[3])
    for tag in ("a", "b", "c"):
        store.put_tag("reg", "app", tag, TagEntry(f"sha256:{tag}", "x/y", 1.0))

    kept = [store.get_manifest(digest_of(body)) is not None for body in bodies]
    assert kept == [True, False, True, True]
    assert store.get_tag("reg", "app", "a") is None
    assert store.get_tag("reg", "app", "c") is not None
    store.close()
    # What was dropped is gone from the database too, not just forgotten.
    counts = lmdb_counts(tmp_path)
    assert counts == {b"manifests": 3, b"tags": 2}


def test_a_tag_past_lmdbs_key_limit_is_cached_too(tmp_path: Path) -> None:
    # Every manifest type accepted, a long repository name and tag: 582 bytes.
    variant = ",".join(sorted(MANIFEST_MEDIA_TYPES))
    name, tag = "team/" + "a" * 120, "v" * 128
    entry = TagEntry("sha256:" + "0" * 64, "x/y", 12.5)
    store = BlobStore(tmp_path)
    store.put_tag("ccr.ccs.tencentyun.com", name, tag, entry, variant)
    store.close()

    again = BlobStore(tmp_path)
    assert again.get_tag("ccr.ccs.tencentyun.com", name, tag, variant) == entry
    assert again.get_tag("ccr.ccs.tencentyun.com", name, "w" * 128, variant) is None
    assert again.get_tag("ccr.ccs.tencentyun.com", name, tag) is None


def test_a_manifest_that_does_not_match_its_digest_is_a_miss(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    body = b'{"schemaVersion":2}'
    store.put_manifest(digest_of(body), "x/y", body)
    store.put_tag("reg", "app", "v1", TagEntry(str(digest_of(body)), "x/y", 1.0))
    store.close()
    with lmdb_of(tmp_path) as (env, dbs), env.begin(write=True) as txn:
        # As a power cut could leave them: other bytes, and half a record.
        txn.put(str(digest_of(body)).encode(), b"x/y\n" + body[:-1] + b"]", db=dbs[0])
        txn.put(b"reg\0app\0v1\0", b'{"digest": "sha2', db=dbs[1])

    again = BlobStore(tmp_path)
    assert again.get_manifest(digest_of(body)) is None
    assert again.get_tag("reg", "app", "v1") is None
    again.put_manifest(digest_of(body), "x/y", body)
    assert again.get_manifest(digest_of(body)) == ("x/y", body)


def test_an_index_that_cannot_be_read_is_a_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = BlobStore(tmp_path)
    blob = put(store, b"served from memory")
    body = b'{"schemaVersion":2}'
    store.put_manifest(digest_of(body), "x/y", body)
    store.put_tag("reg", "app", "v1", TagEntry(str(digest_of(body)), "x/y", 1.0))

    with readers_held(tmp_path / "index"):
        for _ in range(3):
            assert store.get_manifest(digest_of(body)) is None
            assert store.get_tag("reg", "app", "v1") is None
        assert read(store, blob) == b"served from memory"

    failures = [r for r in caplog.records if r.getMessage() == "index_read_failed"]
    assert len(failures) == 3, "logged once for each of manifest, tag, blob"
    assert store.get_manifest(digest_of(body)) == ("x/y", body)


async def test_the_index_is_flushed_to_disk_soon_after_a_write(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path)
    data = tmp_path / "index" / "data.mdb"
    store.put_tag("reg", "app", "v1", TagEntry("sha256:00", "x/y", 1.0))
    assert dirty_pages(data) > 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store._index.keep_synced, 0.01)
        with trio.fail_after(30):
            while dirty_pages(data):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    store.close()


@contextlib.contextmanager
def lmdb_of(root: Path) -> Iterator[tuple[Any, list[Any]]]:
    """The index opened by hand, as another program could: (env, [manifests,
    tags])."""
    env = lmdb.open(str(root / "index"), max_dbs=4)
    try:
        yield env, [env.open_db(b"manifests"), env.open_db(b"tags")]
    finally:
        env.close()


def lmdb_counts(root: Path) -> dict[bytes, int]:
    with lmdb_of(root) as (env, dbs), env.begin() as txn:
        return {
            name: txn.stat(db)["entries"]
            for name, db in zip([b"manifests", b"tags"], dbs, strict=True)
        }


@contextlib.contextmanager
def readers_held(index: Path) -> Iterator[None]:
    """Another process takes every LMDB reader slot of the index."""
    holder = (
        "import sys, lmdb\n"
        "env = lmdb.open(sys.argv[1], max_dbs=4)\n"
        "txns = []\n"
        "try:\n"
        "    for _ in range(10_000):\n"
        "        txns.append(env.begin())\n"
        "except lmdb.ReadersFullError:\n"
        "    pass\n"
        "print(len(txns), flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder, str(index)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        try:
            assert int(process.stdout.readline()) > 0
            yield
        finally:
            process.stdin.close()
            process.wait(timeout=10)


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


class _CacheRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


def dirty_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache not yet written to disk
    (Linux ``cachestat``, 6.5 and later)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _CacheStat()
        whole = _CacheRange(0, 0)
        if libc.syscall(451, fd, ctypes.byref(whole), ctypes.byref(stat), 0):
            pytest.skip(f"no cachestat: {os.strerror(ctypes.get_errno())}")
        return int(stat.dirty + stat.writeback)
    finally:
        os.close(fd)

"""The blob store on real files and a real LMDB: index, budget, recovery."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tcr_mirror.proxy._errors import StoreFull
from tcr_mirror.proxy._oci import Digest, parse_digest
from tcr_mirror.proxy._store import BlobStore, StoreBudget, TagEntry


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def put(store: BlobStore, data: bytes) -> Digest:
    """Store a blob the way a fetch does: reserve, temp file, commit."""
    digest = digest_of(data)
    store.reserve(digest, len(data))
    temp = store.new_temp_path(digest)
    temp.write_bytes(data)
    store.commit_blob(digest, temp, len(data))
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

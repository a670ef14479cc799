"""The node's blob store: blob files on disk, everything small in LMDB.

Layout under the data directory::

    blobs/sha256/<first two hex>/<hex>   verified blobs, served with sendfile
    tmp/                                 fetches in flight (never served once
                                         the process that wrote them is gone)
    index/                               LMDB: blob sizes and last access,
                                         manifests by digest, the tag cache

The store keeps to a byte budget with two watermarks: when the blobs held
plus those being fetched pass the high watermark, least recently used blobs
are evicted until they are under the low one. A blob with a reader or a
fetch in flight is never evicted; when no room can be made the fetch is
refused with :class:`StoreFull`.

A blob file appears under ``blobs/`` only by ``rename`` after its bytes were
verified and fsynced, and its index entry is written after the rename. So a
crash can leave a verified file without an index entry (re-indexed on
start) or a temporary file (deleted on start), never an index entry for
bytes that were not verified. The LMDB environment is opened without fsync:
a killed process loses nothing (the pages are in the kernel), and what a
power cut may lose is rebuilt by :meth:`BlobStore.recover` or fetched again.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from tcr_mirror.proxy._errors import RegistryError, StoreFull
from tcr_mirror.proxy._oci import Digest, parse_digest

__all__ = ["BlobEntry", "BlobStore", "StoreBudget", "TagEntry"]

logger = logging.getLogger(__name__)

# size, last access, time stored
_BLOB_RECORD = struct.Struct("<Qdd")
_MAP_SIZE = 1 << 32


@dataclass(frozen=True)
class StoreBudget:
    """How many bytes of blobs the store may hold.

    Attributes:
        max_bytes: The hard limit; None for no limit.
        high: Fraction of ``max_bytes`` that starts eviction.
        low: Fraction of ``max_bytes`` eviction brings the store down to.
    """

    max_bytes: int | None = None
    high: float = 0.90
    low: float = 0.80


@dataclass(frozen=True)
class BlobEntry:
    """What the index knows of a stored blob."""

    size: int
    last_access: float
    stored_at: float


@dataclass(frozen=True)
class TagEntry:
    """A cached tag: the digest it pointed at when last asked upstream."""

    digest: str
    media_type: str
    fetched_at: float


class BlobStore:
    """Blob files and the LMDB index, for one data directory.

    Not thread-safe for writers: the daemon uses it from its one trio
    thread, and hands only file descriptors to worker threads.
    """

    def __init__(self, root: Path, budget: StoreBudget | None = None) -> None:
        self.root = Path(root)
        self.budget = budget or StoreBudget()
        self.tmp_dir = self.root / "tmp"
        for directory in (self.root / "blobs", self.tmp_dir, self.root / "index"):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            self._open_index()
        except lmdb.Error as exc:
            # The index can be rebuilt: blob files are named by their
            # digest and recover() indexes them; manifests and tags are
            # fetched again. Keep the broken one for a post-mortem.
            broken = self.root / f"index.broken-{int(time.time())}"
            logger.error(
                "index_unreadable", extra={"reason": str(exc), "moved_to": str(broken)}
            )
            if getattr(self, "_env", None) is not None:
                self._env.close()
            os.rename(self.root / "index", broken)
            (self.root / "index").mkdir()
            self._open_index()
        self._temp_serial = 0
        self._used = sum(entry.size for _, entry in self.blobs())
        self._reserved: dict[Digest, int] = {}
        self._readers: collections.Counter[Digest] = collections.Counter()
        self.evictions = 0
        self.evicted_bytes = 0

    def _open_index(self) -> None:
        self._env = lmdb.open(
            str(self.root / "index"),
            map_size=_MAP_SIZE,
            max_dbs=4,
            sync=False,
            metasync=False,
        )
        self._blobs = self._env.open_db(b"blobs")
        self._manifests = self._env.open_db(b"manifests")
        self._tags = self._env.open_db(b"tags")
        # Read once: a damaged file can open and fail on first use.
        sum(1 for _ in self.blobs())

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()

    # -- blobs ------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_entry(self, digest: Digest) -> BlobEntry | None:
        with self._env.begin(db=self._blobs) as txn:
            raw = txn.get(str(digest).encode())
        return None if raw is None else BlobEntry(*_BLOB_RECORD.unpack(raw))

    def open_blob(self, digest: Digest) -> tuple[int, int] | None:
        """Open a stored blob for reading and mark it used.

        Returns:
            ``(fd, size)``, the caller closing the descriptor; or None when
            the blob is not stored (or its file vanished, which drops the
            stale index entry).
        """
        entry = self.blob_entry(digest)
        if entry is None:
            return None
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Deleted behind the store's back: its bytes no longer count.
            self._forget_blob(digest)
            self._used -= entry.size
            return None
        try:
            self._put_blob(digest, BlobEntry(entry.size, time.time(), entry.stored_at))
        except lmdb.Error as exc:
            # Only the eviction order suffers: a full disk must not stop
            # the node serving what it already has.
            logger.warning("access_time_not_saved", extra={"reason": str(exc)})
        return fd, entry.size

    def new_temp_path(self, digest: Digest) -> Path:
        self._temp_serial += 1
        return self.tmp_dir / f"{digest.hex}.{os.getpid()}.{self._temp_serial}"

    def commit_blob(self, digest: Digest, temp_path: Path, size: int) -> Path:
        """Move a verified, fsynced temporary file into the store and index it.

        Returns:
            The blob's final path.
        """
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(temp_path, final)
        now = time.time()
        try:
            self._put_blob(digest, BlobEntry(size, now, now))
        except lmdb.Error as exc:
            final.unlink(missing_ok=True)
            raise StoreFull(f"cannot index blob {digest}: {exc}") from exc
        self._reserved.pop(digest, None)
        self._used += size
        return final

    # -- budget -------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of stored blobs plus those reserved by fetches in flight."""
        return self._used + sum(self._reserved.values())

    def reserve(self, digest: Digest, size: int) -> None:
        """Make room for a blob about to be fetched, evicting if needed.

        Raises:
            StoreFull: The blob cannot fit even after evicting every blob
                not in use.
        """
        limit = self.budget.max_bytes
        if limit is not None and self.used_bytes + size - self._idle_bytes() > limit:
            # Checked before evicting anything: a blob that cannot fit must
            # not flush the cache on its way to failing.
            raise StoreFull(
                f"no room for blob {digest} ({size} bytes) in a store of "
                f"{limit} bytes with {self.used_bytes} bytes in use"
            )
        self._reserved[digest] = size
        if limit is not None and self.used_bytes > limit * self.budget.high:
            self.evict_to(int(limit * self.budget.low))

    def _idle_bytes(self) -> int:
        """Bytes of stored blobs that could be evicted now.

        All stored bytes but those of blobs being read: a look-up per blob
        in use, not a scan of the index, so a reservation stays cheap in a
        store of many thousand blobs. (Blobs being fetched are not stored
        yet, so their look-up finds nothing.)
        """
        busy = 0
        with self._env.begin(db=self._blobs) as txn:
            for digest in self._readers:
                raw = txn.get(str(digest).encode())
                if raw is not None:
                    busy += BlobEntry(*_BLOB_RECORD.unpack(raw)).size
        return self._used - busy

    def _busy(self, digest: Digest) -> bool:
        return bool(self._readers[digest]) or digest in self._reserved

    def unreserve(self, digest: Digest) -> None:
        """Give back the room of a fetch that failed."""
        self._reserved.pop(digest, None)

    def acquire_reader(self, digest: Digest) -> None:
        self._readers[digest] += 1

    def release_reader(self, digest: Digest) -> None:
        self._readers[digest] -= 1
        if self._readers[digest] <= 0:
            del self._readers[digest]

    def evict_to(self, target: int) -> int:
        """Evict least recently used idle blobs until at most ``target`` bytes.

        Returns:
            The bytes freed.
        """
        freed = 0
        candidates = sorted(self.blobs(), key=lambda item: item[1].last_access)
        for key, entry in candidates:
            if self.used_bytes <= target:
                break
            digest = parse_digest(key)
            if self._busy(digest):
                continue
            self._forget_blob(digest)
            self.blob_path(digest).unlink(missing_ok=True)
            self._used -= entry.size
            freed += entry.size
            self.evictions += 1
            self.evicted_bytes += entry.size
            logger.info("blob_evicted", extra={"digest": key, "size": entry.size})
        return freed

    def blobs(self) -> Iterator[tuple[str, BlobEntry]]:
        with self._env.begin(db=self._blobs) as txn:
            for key, raw in txn.cursor():
                yield bytes(key).decode(), BlobEntry(*_BLOB_RECORD.unpack(raw))

    def _put_blob(self, digest: Digest, entry: BlobEntry) -> None:
        record = _BLOB_RECORD.pack(entry.size, entry.last_access, entry.stored_at)
        with self._env.begin(db=self._blobs, write=True) as txn:
            txn.put(str(digest).encode(), record)

    def _forget_blob(self, digest: Digest) -> None:
        with self._env.begin(db=self._blobs, write=True) as txn:
            txn.delete(str(digest).encode())

    # -- manifests and tags ---------------------------------------------------

    def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """Return ``(media_type, bytes)`` of a stored manifest, or None."""
        with self._env.begin(db=self._manifests) as txn:
            raw = txn.get(str(digest).encode())
        if raw is None:
            return None
        media_type, _, body = bytes(raw).partition(b"\n")
        return media_type.decode(), body

    def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        # Media types cannot hold a newline (RFC 6838), so it can separate.
        record = media_type.encode() + b"\n" + body
        self._write_best_effort(self._manifests, str(digest).encode(), record)

    def get_tag(
        self, upstream: str, name: str, tag: str, variant: str = ""
    ) -> TagEntry | None:
        """What ``tag`` resolved to for clients asking for ``variant``.

        A registry may resolve one tag to different manifests for clients
        that accept different manifest types (an index, or the image for
        the default platform): ``variant`` names the types asked for.
        """
        with self._env.begin(db=self._tags) as txn:
            raw = txn.get(_tag_key(upstream, name, tag, variant))
        return None if raw is None else TagEntry(**json.loads(bytes(raw)))

    def put_tag(
        self, upstream: str, name: str, tag: str, entry: TagEntry, variant: str = ""
    ) -> None:
        record = json.dumps(entry.__dict__).encode()
        key = _tag_key(upstream, name, tag, variant)
        self._write_best_effort(self._tags, key, record)

    def _write_best_effort(self, db: Any, key: bytes, value: bytes) -> None:
        # Manifests and tags are cheap to fetch again; a full disk only
        # costs their caching, never the answer to the client.
        try:
            with self._env.begin(db=db, write=True) as txn:
                txn.put(key, value)
        except lmdb.Error as exc:
            logger.warning("index_write_failed", extra={"reason": str(exc)})

    # -- recovery -------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Make the index and the files agree after an unclean stop.

        Deletes every temporary file (no fetch survives its process), drops
        index entries whose file is gone or has the wrong size, and indexes
        blob files that were renamed into place but not yet indexed (only
        verified bytes are ever renamed there).

        Returns:
            Counts of what was done, for the start-up log line.
        """
        counts = {"temp_removed": 0, "entries_dropped": 0, "files_indexed": 0}
        for temp in self.tmp_dir.iterdir():
            temp.unlink(missing_ok=True)
            counts["temp_removed"] += 1

        indexed: set[str] = set()
        for key, entry in list(self.blobs()):
            digest = Digest(*key.split(":", 1))
            try:
                size = self.blob_path(digest).stat().st_size
            except FileNotFoundError:
                size = -1
            if size != entry.size:
                self._forget_blob(digest)
                self.blob_path(digest).unlink(missing_ok=True)
                counts["entries_dropped"] += 1
            else:
                indexed.add(key)

        for path in (self.root / "blobs").glob("*/*/*"):
            key = f"{path.parent.parent.name}:{path.name}"
            if key in indexed:
                continue
            try:
                digest = parse_digest(key)
            except RegistryError:
                continue
            now = time.time()
            self._put_blob(digest, BlobEntry(path.stat().st_size, now, now))
            counts["files_indexed"] += 1
        self._used = sum(entry.size for _, entry in self.blobs())
        return counts


def _tag_key(upstream: str, name: str, tag: str, variant: str) -> bytes:
    return f"{upstream}\0{name}\0{tag}\0{variant}".encode()

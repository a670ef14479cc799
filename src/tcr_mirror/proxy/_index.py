"""The store's LMDB index: blob records, manifests by digest, the tag cache.

The environment is opened with ``sync=False, metasync=False``, so a commit
costs no disk flush, and :meth:`Index.keep_synced` flushes it every few
seconds when something was written (and :meth:`Index.close` once more).
What that leaves to a crash:

* A killed process loses nothing: its pages are in the kernel.
* A power cut or kernel crash loses the writes of the last seconds, and
  with both syncs off it can leave the database damaged (a meta page that
  points at pages which never reached the disk). A database that LMDB
  finds damaged when it is opened and read through at start is moved
  aside (the last one kept, as ``index.broken-*``) and started afresh:
  blob files are named by their digest and re-indexed, manifests and tags
  are fetched again. Any other failure to open it (permissions, memory,
  reader slots, I/O) stops the start instead: the index is not damaged,
  and throwing it away would lose every manifest and tag for a fault that
  passes. A record that turns out damaged later is a miss.
* No crash makes the mirror serve wrong bytes: a manifest is checked
  against its digest at every read and dropped when it does not match,
  and a blob record only says how long its file must be (the file's bytes
  were verified before it was renamed into place). A damaged tag record
  can at worst point a tag at another stored manifest until the tag's TTL
  sends it upstream again.

A read that fails (``lmdb.Error``) is a miss, never an error for the
client. The map starts at :attr:`IndexLimits.map_size` and is doubled
when a write finds it full. Blob records are bounded by the blob budget;
manifests and tags are bounded here, by count and bytes, the least
recently used going first (after a restart, tags start in the order they
were resolved and manifests in key order, until use reorders them).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import trio

from tcr_mirror.proxy._oci import Digest

__all__ = ["Index", "IndexLimits", "TagEntry"]

logger = logging.getLogger(__name__)

# Seconds between flushes of the index to disk, when it was written: what a
# power cut may lose.
SYNC_INTERVAL = 5.0
# Distinct read or write failures logged; past that, new ones are not.
_MAX_LOGGED = 64
# What LMDB reports only when the file's bytes are not a sound database
# (MDB_INVALID is also a file of another engine version, which this one
# cannot read either). Everything else, such as ENOMEM, EIO, EACCES (that
# py-lmdb calls ReadonlyError) or full reader slots, says nothing about
# the file. (Page checksums, LMDB 1.0's, are not enabled here.)
_DAMAGED = (
    lmdb.InvalidError,
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.VersionMismatchError,
    lmdb.IncompatibleError,
)
_BROKEN_PREFIX = "index.broken-"


class _CutShort(Exception):
    """The data file ends before the pages its meta page counts."""


_DAMAGED_OR_CUT = (*_DAMAGED, _CutShort)


# The caps are fixed rather than configured: a node runs tens or hundreds
# of images, each a few manifests, and one with more than 20,000 merely
# asks the upstream again for the least recently used (blobs, the bulk,
# are bounded by the byte budget or the disk, not by these).
@dataclass(frozen=True)
class IndexLimits:
    """How large the index may grow.

    Attributes:
        map_size: The LMDB map size to open with; doubled when a write
            finds the map full (the file grows only as pages are used).
        max_map_size: The map is never grown past this.
        manifests: Manifests kept at most.
        manifest_bytes: Bytes of manifests kept at most.
        tags: Tag-cache entries kept at most.
    """

    map_size: int = 1 << 32
    max_map_size: int = 1 << 40
    manifests: int = 20_000
    manifest_bytes: int = 256 << 20
    tags: int = 20_000


@dataclass(frozen=True)
class TagEntry:
    """A cached tag: the digest it pointed at when last asked upstream."""

    digest: str
    media_type: str
    fetched_at: float


class _Recent:
    """The keys of one database, least recently used first, with sizes.

    Says which keys to drop when an addition passes the count or the byte
    limit. Lives in memory only: reads would otherwise each cost a write.
    """

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self._sizes: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._bytes = 0
        self._max_count = max_count
        self._max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def touch(self, key: bytes) -> None:
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def add(self, key: bytes, size: int) -> list[bytes]:
        """Count ``key`` as just used; return the keys to drop for it."""
        self.remove(key)
        self._sizes[key] = size
        self._bytes += size
        over = []
        while len(self._sizes) > self._max_count or self._bytes > self._max_bytes:
            old, old_size = self._sizes.popitem(last=False)
            self._bytes -= old_size
            over.append(old)
        return over

    def remove(self, key: bytes) -> None:
        self._bytes -= self._sizes.pop(key, 0)


class Index:
    """The LMDB environment under ``root/index``, used from one thread.

    Args:
        root: The data directory.
        limits: How large the index may grow.

    Raises:
        lmdb.Error: The index cannot be opened for a reason other than
            damage (which rebuilds it), or not even afresh.
    """

    def __init__(self, root: Path, limits: IndexLimits | None = None) -> None:
        self._root = root
        self._path = root / "index"
        self.limits = limits or IndexLimits()
        self._written = False
        self._logged: set[tuple[str, str]] = set()
        try:
            try:
                self._open()
            except _DAMAGED_OR_CUT as exc:
                self._rebuild(exc)
        except BaseException:
            self._close_env()
            raise

    def _close_env(self) -> None:
        # Closing twice is harmless; never opened, there is nothing to close.
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()

    def _open(self) -> None:
        self._env = lmdb.open(
            str(self._path),
            map_size=self.limits.map_size,
            max_dbs=4,
            sync=False,
            metasync=False,
        )
        self._check_length()
        self._blobs = self._env.open_db(b"blobs")
        self._manifests = self._env.open_db(b"manifests")
        self._tags = self._env.open_db(b"tags")
        # Everything is read once: a damaged file can open and fail on
        # first use, and the orders of use start from the keys.
        self.blob_records()
        self._manifest_order = _Recent(
            self.limits.manifests, self.limits.manifest_bytes
        )
        for key, size in self._sizes(self._manifests):
            self._manifest_order.add(key, size)
        self._tag_order = _Recent(self.limits.tags, 1 << 62)
        for key, _ in sorted(self._items(self._tags), key=_resolved_at):
            self._tag_order.add(key, 0)

    def _check_length(self) -> None:
        """Raise :class:`_CutShort` if the data file lacks pages in use.

        A file cut short (a power cut before its growth reached the disk)
        is read through the map past its end, which kills the process with
        SIGBUS rather than raising: every start would die the same way.
        """
        pages = self._env.info()["last_pgno"] + 1
        needed = pages * self._env.stat()["psize"]
        actual = (self._path / "data.mdb").stat().st_size
        if actual < needed:
            raise _CutShort(
                f"{self._path}: data file has {actual} bytes, its pages {needed}"
            )

    def _rebuild(self, exc: Exception) -> None:
        # Blob files are named by their digest and recover() indexes them;
        # manifests and tags are fetched again. The broken one is kept for
        # a post-mortem, only the last: every damaged start would add one.
        # Nanoseconds, since a node restarted at once can break it twice
        # within a second.
        broken = self._root / f"{_BROKEN_PREFIX}{time.time_ns()}"
        logger.error(
            "index_unreadable", extra={"reason": str(exc), "moved_to": str(broken)}
        )
        self._close_env()
        self._path.rename(broken)
        self._remove_broken(keep=broken)
        self._path.mkdir()
        self._open()

    def _remove_broken(self, keep: Path) -> None:
        for old in self._root.glob(f"{_BROKEN_PREFIX}*"):
            if old == keep:
                continue
            try:
                shutil.rmtree(old)
            except OSError as exc:
                # Only disk space is at stake; the next rebuild tries again.
                logger.warning(
                    "index_broken_not_removed",
                    extra={"path": str(old), "reason": exc.strerror},
                )

    def close(self) -> None:
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            logger.error("index_sync_failed", extra={"reason": str(exc)})
        self._env.close()

    async def keep_synced(self, interval: float = SYNC_INTERVAL) -> None:
        """Flush what was written to disk every ``interval`` seconds, until
        cancelled; the flush runs in a worker thread."""
        while True:
            await trio.sleep(interval)
            if not self._written:
                continue
            self._written = False
            try:
                # Not abandoned on cancel: close() must not run beside it.
                await trio.to_thread.run_sync(self._env.sync, True)
            except lmdb.Error as exc:
                self._written = True
                self.log_once("index_sync_failed", "sync", exc)

    # -- blob records -------------------------------------------------------

    def blob_records(self) -> list[tuple[bytes, bytes]]:
        """Every ``(key, record)`` of the blob database, read in one go."""
        return self._items(self._blobs)

    def blob_record(self, key: bytes) -> bytes | None:
        return self._get(self._blobs, key, "blob")

    def put_blob_record(self, key: bytes, record: bytes) -> None:
        """Write one blob record.

        Raises:
            lmdb.Error: The write failed (a full disk); the map being full
                is not an error: it is grown.
        """
        self._write(lambda txn: txn.put(key, record, db=self._blobs))

    def delete_blob_record(self, key: bytes) -> None:
        """Forget a blob record; a failure is logged (``recover`` on the
        next start, or the next open of the blob, drops the stale entry)."""
        self._delete(self._blobs, [key], "blob")

    # -- manifests and tags -------------------------------------------------

    def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """Return ``(media_type, bytes)`` of a stored manifest, or None.

        A record whose bytes do not match the digest, or whose media type
        is not printable ASCII, is dropped and is a miss.
        """
        key = str(digest).encode()
        raw = self._get(self._manifests, key, "manifest")
        if raw is None:
            return None
        media_type, newline, body = raw.partition(b"\n")
        right = hashlib.new(digest.algorithm, body).hexdigest() == digest.hex
        if not (newline and right and _printable(media_type)):
            logger.warning(
                "manifest_dropped",
                extra={"digest": str(digest), "reason": "record does not match"},
            )
            self._manifest_order.remove(key)
            self._delete(self._manifests, [key], "manifest")
            return None
        self._manifest_order.touch(key)
        return media_type.decode("ascii"), body

    def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        # Media types cannot hold a newline (RFC 6838), so it can separate.
        record = media_type.encode() + b"\n" + body
        key = str(digest).encode()
        self._put_bounded(self._manifests, self._manifest_order, key, record)

    def get_tag(self, key: bytes) -> TagEntry | None:
        raw = self._get(self._tags, key, "tag")
        if raw is None:
            return None
        try:
            entry = TagEntry(**json.loads(raw))
        except (ValueError, TypeError):
            logger.warning("tag_dropped", extra={"reason": "record does not parse"})
            self._tag_order.remove(key)
            self._delete(self._tags, [key], "tag")
            return None
        self._tag_order.touch(key)
        return entry

    def put_tag(self, key: bytes, entry: TagEntry) -> None:
        record = json.dumps(entry.__dict__).encode()
        self._put_bounded(self._tags, self._tag_order, key, record)

    def entry_counts(self) -> dict[str, int]:
        """Manifests and tags held, as the in-memory orders count them."""
        return {"manifests": len(self._manifest_order), "tags": len(self._tag_order)}

    def _put_bounded(self, db: Any, order: _Recent, key: bytes, record: bytes) -> None:
        # Manifests and tags are cheap to fetch again; a full disk only
        # costs their caching, never the answer to the client.
        over = order.add(key, len(record))

        def change(txn: Any) -> None:
            txn.put(key, record, db=db)
            for old in over:
                txn.delete(old, db=db)

        try:
            self._write(change)
        except lmdb.Error as exc:
            # The keys it would have dropped stay in the database, out of
            # the order until the next start: a few, on a full disk only.
            order.remove(key)
            self.log_once("index_write_failed", "put", exc)
            return
        if over:
            logger.info("index_entries_evicted", extra={"count": len(over)})

    # -- LMDB ---------------------------------------------------------------

    def _items(self, db: Any) -> list[tuple[bytes, bytes]]:
        with self._env.begin(db=db) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]

    def _sizes(self, db: Any) -> list[tuple[bytes, int]]:
        # Buffers into the map: the values' lengths without copying them
        # (up to the manifests' byte limit) into memory.
        with self._env.begin(db=db, buffers=True) as txn:
            return [(bytes(k), len(v)) for k, v in txn.cursor()]

    def _get(self, db: Any, key: bytes, what: str) -> bytes | None:
        try:
            with self._env.begin(db=db) as txn:
                raw = txn.get(key)
                return None if raw is None else bytes(raw)
        except lmdb.Error as exc:
            # A miss: the caller fetches again rather than failing the client.
            self.log_once("index_read_failed", what, exc)
            return None

    def _delete(self, db: Any, keys: list[bytes], what: str) -> None:
        def change(txn: Any) -> None:
            for key in keys:
                txn.delete(key, db=db)

        try:
            self._write(change)
        except lmdb.Error as exc:
            self.log_once("index_write_failed", what, exc)

    def _write(self, change: Callable[[Any], object]) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    change(txn)
            except lmdb.MapFullError:
                if not self._grow():
                    raise
                continue
            self._written = True
            return

    def _grow(self) -> bool:
        """Double the map; False when it is at its limit already.

        Only valid with no transaction open in this process, which holds:
        every transaction here is a ``with`` block on the one thread.
        """
        size = self._env.info()["map_size"]
        if size >= self.limits.max_map_size:
            return False
        grown = min(size * 2, self.limits.max_map_size)
        self._env.set_mapsize(grown)
        logger.warning("index_map_grown", extra={"from": size, "to": grown})
        return True

    def log_once(self, event: str, what: str, exc: Exception) -> None:
        """Log a failure the first time it is seen; a broken index would
        otherwise log a line per request."""
        seen = (what, str(exc))
        if seen in self._logged or len(self._logged) >= _MAX_LOGGED:
            return
        self._logged.add(seen)
        logger.warning(event, extra={"record": what, "reason": str(exc)})


def _printable(media_type: bytes) -> bool:
    text = media_type.decode("ascii") if media_type.isascii() else ""
    return bool(text) and text.isprintable()


def _resolved_at(item: tuple[bytes, bytes]) -> float:
    try:
        return float(json.loads(item[1])["fetched_at"])
    except (ValueError, TypeError, KeyError):
        return 0.0

"""The node's blob store: blob files on disk, everything small in LMDB.

Layout under the data directory::

    lock                                 held (flock) by the one process
                                         using the directory; says its pid
    blobs/sha256/<first two hex>/<hex>   verified blobs, served with sendfile
    tmp/                                 fetches in flight (never served once
                                         the process that wrote them is gone)
    index/                               LMDB (:mod:`~tcr_mirror.proxy._index`):
                                         blob sizes and last access,
                                         manifests by digest, the tag cache

The store keeps to a byte budget with two watermarks: when the blobs held
plus those being fetched pass the high watermark, least recently used blobs
are evicted until they are under the low one. A filesystem that fills up
before the budget does (or with no budget) evicts too: a fetch whose space
cannot be claimed evicts idle blobs until it fits, once. A blob with a
reader or a fetch in flight is never evicted; when no room can be made the
fetch is refused with :class:`StoreFull`. The order of use is kept in
memory (loaded from the index's access times at start), so making room
never sorts the index.

A blob file appears under ``blobs/`` only by ``rename`` after its bytes were
verified and fsynced, and its index entry is written after the rename. So a
crash can leave a verified file without an index entry (re-indexed on
start) or a temporary file (deleted on start), never an index entry for
bytes that were not verified. A file damaged behind the store (cut short,
deleted, unreadable) is dropped when it is opened or when sending from it
fails, and fetched again. What a crash can do to the index itself is in
:mod:`~tcr_mirror.proxy._index`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from tcr_mirror.proxy._errors import RegistryError, StoreFull, StoreUnavailable
from tcr_mirror.proxy._index import Index, IndexLimits, TagEntry
from tcr_mirror.proxy._oci import Digest, parse_digest

__all__ = [
    "BlobEntry",
    "BlobStore",
    "DataDirInUse",
    "IndexLimits",
    "Reservation",
    "StoreBudget",
    "TagEntry",
    "disk_error",
]

logger = logging.getLogger(__name__)

# size, last access, time stored
_BLOB_RECORD = struct.Struct("<Qdd")
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# The longest key LMDB takes (its default build, which py-lmdb bundles).
_MAX_KEY = 511


class DataDirInUse(OSError):
    """Another process holds the data directory's lock."""

    def __init__(self, path: Path, holder: str) -> None:
        message = f"in use by another tcr-mirror (pid {holder})"
        super().__init__(errno.EBUSY, message, str(path))


def disk_error(exc: OSError, doing: str) -> RegistryError:
    """The client's answer to a disk operation that failed.

    Returns:
        :class:`StoreFull` (507) for a full disk or quota, else
        :class:`StoreUnavailable` (503), with ``doing`` in the message.
    """
    reason = exc.strerror or type(exc).__name__
    if exc.errno in NO_SPACE:
        return StoreFull(f"no space left on the node to {doing}: {reason}")
    return StoreUnavailable(f"cannot {doing} on the node: {reason}")


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


@dataclass(eq=False)
class Reservation:
    """Room one fetch holds in the budget until it ends, given back once.

    Each fetch has its own: a fetch abandoned for one started after it
    holds room beside it until it ends too.
    """

    digest: Digest
    size: int


@dataclass(frozen=True)
class BlobEntry:
    """What the index knows of a stored blob."""

    size: int
    last_access: float
    stored_at: float


class BlobStore:
    """Blob files and the LMDB index, for one data directory.

    Not thread-safe for writers: the daemon uses it from its one trio
    thread, and hands only file descriptors to worker threads.

    Raises:
        DataDirInUse: Another process uses the data directory.
        OSError: The directory cannot be made or written.
        lmdb.Error: The index cannot be opened for a reason other than
            damage (a damaged one is rebuilt), or not even afresh.
    """

    def __init__(
        self,
        root: Path,
        budget: StoreBudget | None = None,
        *,
        limits: IndexLimits | None = None,
    ) -> None:
        self.root = Path(root)
        self.budget = budget or StoreBudget()
        self.tmp_dir = self.root / "tmp"
        # Making the directories touches nothing another process holds.
        for directory in ("blobs", "tmp", "index"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        # Before anything else: a second process would delete this one's
        # fetches in recover() and evict the blobs it is sending.
        self._lock_fd = _lock(self.root / "lock")
        self._closed = False
        self._temp_serial = 0
        self._reservations: set[Reservation] = set()
        self._reserved_bytes = 0
        self._fetching: collections.Counter[Digest] = collections.Counter()
        self._readers: collections.Counter[Digest] = collections.Counter()
        self.evictions = 0
        self.evicted_bytes = 0
        try:
            self._index = Index(self.root, limits)
            self._load_order()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _load_order(self) -> None:
        entries = sorted(self.blobs(), key=lambda item: item[1].last_access)
        # Blob sizes in order of use, least recent first: what serving and
        # eviction go by; the index keeps them for the next start.
        self._lru: collections.OrderedDict[Digest, int] = collections.OrderedDict()
        for key, entry in entries:
            with contextlib.suppress(RegistryError):
                self._lru[parse_digest(key)] = entry.size
        self._used = sum(self._lru.values())

    def close(self) -> None:
        """Flush and close the index, then let go of the directory."""
        if self._closed:
            return
        self._closed = True
        try:
            self._index.close()
        finally:
            os.close(self._lock_fd)

    async def keep_synced(self) -> None:
        """Flush the index to disk every few seconds, until cancelled."""
        await self._index.keep_synced()

    # -- blobs ------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_entry(self, digest: Digest) -> BlobEntry | None:
        return _unpack(self._index.blob_record(str(digest).encode()))

    def open_blob(self, digest: Digest) -> tuple[int, int] | None:
        """Open a stored blob for reading and mark it used.

        Returns:
            ``(fd, size)``, the caller closing the descriptor; or None when
            the blob is not stored. A file that vanished or whose length is
            not the blob's is dropped and is None too, so it is fetched
            again.

        Raises:
            StoreUnavailable: The file cannot be opened (too many open
                files, permissions, an I/O error).
        """
        size = self._lru.get(digest)
        if size is None:
            return None
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._drop(digest, "file missing")
            return None
        except OSError as exc:
            raise disk_error(exc, f"open blob {digest}") from exc
        try:
            actual = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise disk_error(exc, f"open blob {digest}") from exc
        if actual != size:
            os.close(fd)
            self._drop(digest, f"file has {actual} bytes, not {size}")
            return None
        self._lru.move_to_end(digest)
        self._save_access(digest, size)
        return fd, size

    def _save_access(self, digest: Digest, size: int) -> None:
        now = time.time()
        entry = self.blob_entry(digest)
        record = _BLOB_RECORD.pack(size, now, entry.stored_at if entry else now)
        try:
            self._index.put_blob_record(str(digest).encode(), record)
        except lmdb.Error as exc:
            # Only the order after a restart suffers: a full disk must not
            # stop the node serving what it already has.
            self._index.log_once("access_time_not_saved", "blob", exc)

    def drop_damaged(self, digest: Digest, fd: int, reason: str) -> None:
        """Sending from ``fd``, a stored blob's file, failed: drop the blob.

        Only if ``fd`` is still the file stored for ``digest``: one fetched
        again meanwhile is left alone.
        """
        with contextlib.suppress(OSError):
            opened = os.fstat(fd)
            stored = os.stat(self.blob_path(digest))
            if (opened.st_dev, opened.st_ino) != (stored.st_dev, stored.st_ino):
                return
        if digest in self._lru:
            self._drop(digest, reason)

    def _drop(self, digest: Digest, reason: str) -> None:
        """Forget a stored blob whose file is wrong, and delete the file."""
        try:
            self.blob_path(digest).unlink(missing_ok=True)
        except OSError as exc:
            # Forgotten all the same: its entry is wrong, and a blob fetched
            # again is renamed over it.
            reason = f"{reason}; not deleted: {exc.strerror}"
        self._index.delete_blob_record(str(digest).encode())
        self._used -= self._lru.pop(digest, 0)
        logger.warning("blob_dropped", extra={"digest": str(digest), "reason": reason})

    def new_temp_path(self, digest: Digest) -> Path:
        # Random too: a pid is 1 in every container, and a data directory
        # may outlive its process's pid.
        self._temp_serial += 1
        unique = f"{os.getpid()}.{self._temp_serial}.{secrets.token_hex(4)}"
        return self.tmp_dir / f"{digest.hex}.{unique}"

    def commit_blob(self, digest: Digest, temp_path: Path, size: int) -> Path:
        """Move a verified, fsynced temporary file into the store and index it.

        Returns:
            The blob's final path.

        Raises:
            StoreFull: The index cannot be written; the file is deleted.
        """
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(temp_path, final)
        now = time.time()
        try:
            self._index.put_blob_record(
                str(digest).encode(), _BLOB_RECORD.pack(size, now, now)
            )
        except lmdb.Error as exc:
            final.unlink(missing_ok=True)
            raise StoreFull(f"cannot index blob {digest}: {exc}") from exc
        self._used += size - self._lru.pop(digest, 0)
        self._lru[digest] = size
        return final

    # -- budget -------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of stored blobs plus those reserved by fetches in flight."""
        return self._used + self._reserved_bytes

    def reserve(self, digest: Digest, size: int) -> Reservation:
        """Make room for a blob about to be fetched, evicting if needed.

        Returns:
            The room held, for :meth:`unreserve` when the fetch ends,
            stored or not.

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
        reservation = Reservation(digest, size)
        self._reservations.add(reservation)
        self._reserved_bytes += size
        self._fetching[digest] += 1
        if limit is not None and self.used_bytes > limit * self.budget.high:
            self.evict_to(int(limit * self.budget.low))
        return reservation

    def _idle_bytes(self) -> int:
        """Bytes of stored blobs that could be evicted now: all but those
        being read (blobs being fetched are not stored yet)."""
        return self._used - sum(self._lru.get(d, 0) for d in self._readers)

    def _busy(self, digest: Digest) -> bool:
        return bool(self._readers[digest] or self._fetching[digest])

    def unreserve(self, reservation: Reservation) -> None:
        """Give back the room of a fetch that ended; again is a no-op."""
        if reservation not in self._reservations:
            return
        self._reservations.remove(reservation)
        self._reserved_bytes -= reservation.size
        self._fetching[reservation.digest] -= 1
        if self._fetching[reservation.digest] <= 0:
            del self._fetching[reservation.digest]

    def acquire_reader(self, digest: Digest) -> None:
        self._readers[digest] += 1

    def release_reader(self, digest: Digest) -> None:
        self._readers[digest] -= 1
        if self._readers[digest] <= 0:
            del self._readers[digest]

    def evict_bytes(self, count: int) -> int:
        """Evict least recently used idle blobs to free ``count`` bytes.

        For a full filesystem, whatever the budget says.

        Returns:
            The bytes freed; less than ``count`` when not enough are idle.
        """
        return self.evict_to(self.used_bytes - count)

    def evict_to(self, target: int) -> int:
        """Evict least recently used idle blobs until at most ``target`` bytes.

        A blob whose file cannot be deleted is kept, and skipped.

        Returns:
            The bytes freed.
        """
        freed = 0
        kept: set[Digest] = set()
        while self.used_bytes > target:
            victims = self._victims(self.used_bytes - target, kept)
            if not victims:
                break
            for digest, size in victims:
                if self._evict(digest, size):
                    freed += size
                else:
                    kept.add(digest)
        return freed

    def _victims(self, count: int, kept: set[Digest]) -> list[tuple[Digest, int]]:
        """The least recently used idle blobs that add up to ``count`` bytes."""
        victims: list[tuple[Digest, int]] = []
        planned = 0
        for digest, size in self._lru.items():
            if planned >= count:
                break
            if digest not in kept and not self._busy(digest):
                victims.append((digest, size))
                planned += size
        return victims

    def _evict(self, digest: Digest, size: int) -> bool:
        # The file goes first: an entry forgotten for a file that stays
        # would leave its bytes on disk and out of the count for good.
        path = self.blob_path(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning(
                "blob_not_evicted",
                extra={"digest": str(digest), "reason": exc.strerror},
            )
            # Tried again only after every other blob.
            self._lru.move_to_end(digest)
            return False
        # An empty prefix directory goes too: on a disk out of inodes,
        # that is one more for the blob this eviction makes room for.
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        self._index.delete_blob_record(str(digest).encode())
        del self._lru[digest]
        self._used -= size
        self.evictions += 1
        self.evicted_bytes += size
        logger.info("blob_evicted", extra={"digest": str(digest), "size": size})
        return True

    def blobs(self) -> Iterator[tuple[str, BlobEntry]]:
        """Every blob entry of the index (read in one go); records that do
        not parse are left out."""
        for key, raw in self._index.blob_records():
            entry = _unpack(raw)
            if entry is not None:
                yield key.decode(errors="replace"), entry

    # -- manifests and tags ---------------------------------------------------

    def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """Return ``(media_type, bytes)`` of a stored manifest, or None.

        A record that does not match its digest, or cannot be read, is None.
        """
        return self._index.get_manifest(digest)

    def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        self._index.put_manifest(digest, media_type, body)

    def get_tag(
        self, upstream: str, name: str, tag: str, variant: str = ""
    ) -> TagEntry | None:
        """What ``tag`` resolved to for clients asking for ``variant``.

        A registry may resolve one tag to different manifests for clients
        that accept different manifest types (an index, or the image for
        the default platform): ``variant`` names the types asked for.
        """
        return self._index.get_tag(_tag_key(upstream, name, tag, variant))

    def put_tag(
        self, upstream: str, name: str, tag: str, entry: TagEntry, variant: str = ""
    ) -> None:
        self._index.put_tag(_tag_key(upstream, name, tag, variant), entry)

    # -- recovery -------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Make the index and the files agree after an unclean stop.

        Deletes every temporary file (no fetch survives its process), drops
        index entries whose file is gone or has the wrong size, and indexes
        blob files that were renamed into place but not yet indexed (only
        verified bytes are ever renamed there). A file that cannot be
        indexed (a full disk) is logged and left for the next start.

        Returns:
            Counts of what was done, for the start-up log line.
        """
        counts = {"temp_removed": 0, "entries_dropped": 0, "files_indexed": 0}
        for temp in self.tmp_dir.iterdir():
            temp.unlink(missing_ok=True)
            counts["temp_removed"] += 1
        indexed = self._check_entries(counts)
        for path in (self.root / "blobs").glob("*/*/*"):
            key = f"{path.parent.parent.name}:{path.name}"
            if key not in indexed and self._index_file(key, path):
                counts["files_indexed"] += 1
        self._load_order()
        return counts

    def _check_entries(self, counts: dict[str, int]) -> set[str]:
        """Drop the entries whose file is gone or of another size; return
        the keys of those kept."""
        indexed: set[str] = set()
        for key, entry in list(self.blobs()):
            try:
                digest = parse_digest(key)
            except RegistryError:
                self._index.delete_blob_record(key.encode())
                continue
            try:
                size = self.blob_path(digest).stat().st_size
            except FileNotFoundError:
                size = -1
            if size != entry.size:
                self._index.delete_blob_record(key.encode())
                self.blob_path(digest).unlink(missing_ok=True)
                counts["entries_dropped"] += 1
            else:
                indexed.add(key)
        return indexed

    def _index_file(self, key: str, path: Path) -> bool:
        try:
            parse_digest(key)
        except RegistryError:
            return False
        now = time.time()
        record = _BLOB_RECORD.pack(path.stat().st_size, now, now)
        try:
            self._index.put_blob_record(key.encode(), record)
        except lmdb.Error as exc:
            # Never a reason not to start: the file is served once indexed.
            self._index.log_once("blob_not_indexed", "blob", exc)
            return False
        return True


def _lock(path: Path) -> int:
    """Take the data directory's lock for this process; return its fd.

    ``flock`` ends with the process however it ends, so a killed node
    leaves no stale lock behind.

    Raises:
        DataDirInUse: Another process holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        raise DataDirInUse(path, holder or "unknown") from None
    except BaseException:
        os.close(fd)
        raise
    # For the message another process shows; the lock is what counts.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unpack(raw: bytes | None) -> BlobEntry | None:
    if raw is None or len(raw) != _BLOB_RECORD.size:
        return None
    return BlobEntry(*_BLOB_RECORD.unpack(raw))


def _tag_key(upstream: str, name: str, tag: str, variant: str) -> bytes:
    key = f"{upstream}\0{name}\0{tag}\0{variant}".encode()
    if len(key) <= _MAX_KEY:
        return key
    # A long repository name and tag, with every manifest type accepted, can
    # pass LMDB's limit, and the tag would then never be cached (nor served
    # stale when the upstream is down). No upstream key starts with 0x01.
    return b"\x01" + hashlib.sha256(key).hexdigest().encode()

"""One fetch per digest, shared by every client that wants the blob.

The first request for a blob that is not stored starts a :class:`BlobFetch`:
a task, owned by the daemon rather than by that request, that streams the
blob from the upstream into a temporary file and hashes it on the way.
Every request for the same digest while it runs opens the same temporary
file and sends from its own offset whatever has arrived, waiting for more,
so the first bytes reach all clients as soon as the upstream sends them.

Two rules keep a bad fetch from looking like a good blob:

* The last byte of every body, the blob's or a range's, is released only
  after the whole blob matched its digest and the file was fsynced (an
  empty blob's head waits for it too). A client that was streaming a blob
  whose bytes turn out wrong sees its connection end short of the declared
  length, never a complete body. The fsync is part of the check because
  clients read the file, not the bytes that were hashed: pages the writer
  let go of are read back from the disk, and if their writeback failed
  (a thin-provisioned disk that ran out, an I/O error) they read back as
  something else, zeros most often; only the fsync's error tells.
* The temporary file is renamed into the store only after that; a failed
  fetch deletes it.

A body cut off by the network is resumed with a ``Range`` request from the
first missing byte; an upstream that answers the resume with anything but
the asked ``206``, or that changes the blob's size between attempts, fails
the fetch. Clients get a head only once the blob's disk space is claimed,
so a full disk is an error for every one of them, not a cut body. A disk
that is full when the space is claimed gets least recently used idle
blobs evicted to make room, once, before the fetch is refused. So does a
disk that took the claim but fills up under the writes all the same (thin
provisioning, copy-on-write): the fetch then goes on from the first byte
not written, as after a cut body.

Fetches are shared by digest, whatever the upstream or repository. A client
that joined a fetch from another upstream or repository which is refused
asks its own (:meth:`~tcr_mirror.proxy._mirror.Mirror._blob`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from tcr_mirror.proxy._errors import (
    BlobUnknown,
    RegistryError,
    UpstreamUnavailable,
)
from tcr_mirror.proxy._oci import Digest
from tcr_mirror.proxy._rawget import BodyBroken, RawResponse
from tcr_mirror.proxy._store import NO_SPACE, BlobStore, Reservation, disk_error
from tcr_mirror.proxy._upstream import Upstream, status_error
from tcr_mirror.proxy._writebehind import WriteBehind

if TYPE_CHECKING:
    import outcome

__all__ = ["BlobFetch", "BlobFetcher", "FetchAborted"]

logger = logging.getLogger(__name__)

_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
# Resumes of one fetch (after a cut body or a disk that filled up) before
# giving up.
_MAX_RESUMES = 3
# Room made beyond a blob's own size when the disk is full, for the index
# and the directories that storing it writes.
_SPACE_SLACK = 1 << 20
# The largest file offset (off_t); a larger size would overflow the calls
# that take it.
_MAX_FILE_SIZE = (1 << 63) - 1


class FetchAborted(Exception):
    """The fetch failed after its client had started receiving the body."""


class BlobFetch:
    """A blob being fetched into a temporary file.

    Attributes:
        digest: The blob's digest.
        path: Where its bytes are: the temporary file, and the final blob
            file once :attr:`done`.
        origin: The upstream's key and the repository it is fetched from.
        size: The blob's size once the upstream told it, else None.
        written: Bytes written to the file so far.
        verified: The blob's bytes matched its digest and are on disk.
        reservation: The room it holds in the store's budget, once the
            size is known; given back when it ends.
        done: The blob is verified and in the store.
        error: Why the fetch failed, if it did.
    """

    def __init__(
        self, digest: Digest, path: Path, origin: tuple[str, str] = ("", "")
    ) -> None:
        self.digest = digest
        self.path = path
        self.origin = origin
        self.size: int | None = None
        self.written = 0
        self.verified = False
        self.reservation: Reservation | None = None
        self.done = False
        self.error: RegistryError | None = None
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return (
            f"BlobFetch({self.digest}, size={self.size}, written={self.written}, "
            f"done={self.done}, error={self.error!r})"
        )

    @property
    def finished(self) -> bool:
        return self.done or self.error is not None

    def notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_size(self) -> int:
        """Wait until the upstream told the blob's size.

        Raises:
            RegistryError: The fetch failed before its bytes were verified.
        """
        while self.size is None and self.error is None:
            await self._changed.wait()
        # As in wait_available: bytes verified stay good if storing them
        # failed after, and the caller's open file holds them.
        if self.error is not None and not self.verified:
            raise self.error
        assert self.size is not None
        return self.size

    def available(self, end: int | None = None) -> int:
        """Bytes a client whose body ends at offset ``end`` (default: the
        blob's end) may be sent now.

        The last byte of every body waits for the digest and the fsync,
        also a range's that ends early, so no complete response ever holds
        bytes that turn out wrong.
        """
        if self.verified:
            return self.written
        if self.size is None:
            return 0
        return min(self.written, (self.size if end is None else end) - 1)

    async def wait_available(self, offset: int, end: int | None = None) -> int:
        """Wait until bytes past ``offset`` may be sent to a body ending at ``end``.

        Returns:
            The number of bytes from the start that may be sent, greater
            than ``offset``.

        Raises:
            FetchAborted: The fetch failed, or ended short of ``offset``.
        """
        while True:
            if self.error is not None and not self.verified:
                raise FetchAborted(self.error.message)
            available = self.available(end)
            if available > offset:
                return available
            if self.finished:
                # Only a fetch whose size changed under its clients ends
                # here; they must see their bodies cut, not wait for ever.
                raise FetchAborted(f"the fetch of {self.digest} ended at {available}")
            await self._changed.wait()

    async def wait_verified(self) -> None:
        """Wait until the blob's bytes matched its digest and are on disk.

        Raises:
            RegistryError: The fetch failed.
        """
        while not self.verified and self.error is None:
            await self._changed.wait()
        if not self.verified:
            assert self.error is not None
            raise self.error


class BlobFetcher:
    """Starts fetches and lets later requests join the one in flight.

    Args:
        store: Where verified blobs go.
        nursery: Owns the fetch tasks, so a client that hangs up does not
            cancel the fetch other clients are reading.
    """

    def __init__(self, store: BlobStore, nursery: trio.Nursery) -> None:
        self._store = store
        self._nursery = nursery
        self._fetches: dict[Digest, BlobFetch] = {}

    def in_flight(self, digest: Digest) -> BlobFetch | None:
        return self._fetches.get(digest)

    def statistics(self) -> dict[str, int]:
        return {"in_flight": len(self._fetches)}

    def fetch(self, upstream: Upstream, repository: str, digest: Digest) -> BlobFetch:
        """Return the fetch of ``digest`` in flight, starting one if needed.

        The temporary file exists when this returns, so a caller can open
        it at once.

        Raises:
            StoreFull: No space (or no inode) for the temporary file.
            StoreUnavailable: It cannot be made otherwise (too many open
                files, a read-only disk).
        """
        existing = self._fetches.get(digest)
        if existing is not None:
            return existing
        path = self._store.new_temp_path(digest)
        fd = self._create(path, digest)
        fetch = BlobFetch(digest, path, (upstream.key, repository))
        self._fetches[digest] = fetch
        self._nursery.start_soon(self._run, fetch, fd, upstream, repository)
        return fetch

    def _create(self, path: Path, digest: Digest) -> int:
        """Create a fetch's temporary file; out of inodes (or a quota's),
        evict the two least recently used idle blobs first, since storing
        the blob may take a directory besides its file."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o644)
        except OSError as exc:
            evicted = exc.errno in NO_SPACE and self._store.evict_bytes(1)
            if not evicted:
                raise disk_error(exc, f"fetch blob {digest}") from exc
            self._store.evict_bytes(1)
        logger.info("blob_inode_made", extra={"digest": str(digest)})
        try:
            return os.open(path, flags, 0o644)
        except OSError as exc:
            raise disk_error(exc, f"fetch blob {digest}") from exc

    def abandon(self, fetch: BlobFetch) -> None:
        """Let the next request for the blob start a fetch of its own.

        For a fetch whose temporary file was deleted behind it: no new
        client can open it. The clients it has carry on, and it fails at
        its rename.
        """
        if self._fetches.get(fetch.digest) is fetch:
            del self._fetches[fetch.digest]
            logger.warning("blob_fetch_abandoned", extra={"digest": str(fetch.digest)})

    async def _run(
        self, fetch: BlobFetch, fd: int, upstream: Upstream, repository: str
    ) -> None:
        log = {"digest": str(fetch.digest), "upstream": upstream.key}
        logger.info("blob_fetch_started", extra=log)
        try:
            await self._download(fetch, fd, upstream, repository)
            # The hash was over what was received; the file holds it only
            # once its writeback succeeded (see the module's docstring).
            await trio.to_thread.run_sync(os.fsync, fd)
            fetch.verified = True
            fetch.notify()
            assert fetch.size is not None
            fetch.path = self._store.commit_blob(fetch.digest, fetch.path, fetch.size)
            fetch.done = True
            logger.info("blob_fetch_done", extra={**log, "size": fetch.size})
        except Exception as exc:
            fetch.error = _as_registry_error(exc, fetch.digest)
            if isinstance(exc, RegistryError | OSError):
                reason = fetch.error.message
                logger.warning("blob_fetch_failed", extra={**log, "reason": reason})
            else:
                logger.exception("blob_fetch_crashed", extra=log)
        finally:
            os.close(fd)
            if fetch.reservation is not None:
                # However it ended: stored, its bytes count as a blob now.
                self._store.unreserve(fetch.reservation)
            if not fetch.done:
                _remove_temp(fetch)
            # An abandoned fetch's digest may have a new fetch by now.
            if self._fetches.get(fetch.digest) is fetch:
                del self._fetches[fetch.digest]
            fetch.notify()

    async def _download(
        self, fetch: BlobFetch, fd: int, upstream: Upstream, repository: str
    ) -> None:
        hasher = hashlib.new(fetch.digest.algorithm)
        path = f"/v2/{repository}/blobs/{fetch.digest}"
        resumes = 0
        while True:
            headers = {"Range": f"bytes={fetch.written}-"} if fetch.written else {}
            try:
                async with upstream.open_blob(
                    path, repository=repository, headers=headers
                ) as response:
                    size = _check_response(response, fetch, upstream.key)
                    if fetch.size is None:
                        fetch.reservation = self._store.reserve(fetch.digest, size)
                        await self._claim_space(fetch, fd, size)
                        # Only now may clients have a head: a disk without
                        # room fails them all with an error instead.
                        fetch.size = size
                    fetch.notify()
                    await _absorb(response, fetch, fd, hasher)
            except BodyBroken as exc:
                resumes += 1
                if resumes > _MAX_RESUMES or fetch.size is None:
                    raise UpstreamUnavailable(
                        f"upstream {upstream.key} broke off the blob: {exc}"
                    ) from exc
            except OSError as exc:
                # Not the claim's failure (the size is not set then): a
                # write's, on a disk that took the claim without keeping
                # the room for it.
                resumes += 1
                if (
                    exc.errno not in NO_SPACE
                    or fetch.size is None
                    or resumes > _MAX_RESUMES
                ):
                    raise
                self._make_room(fetch, fetch.size - fetch.written, exc)
                # The hash ran ahead of the writes; it must cover just the
                # bytes the file holds, the ones the resume goes on from,
                # read back only once their writeback is known to have
                # succeeded (else a lost page would pass for the upstream's
                # wrong bytes).
                await trio.to_thread.run_sync(os.fsync, fd)
                hasher = await trio.to_thread.run_sync(
                    _hash_file, fetch.path, fetch.written, fetch.digest.algorithm
                )
            else:
                break
            logger.info(
                "blob_fetch_resumed",
                extra={"digest": str(fetch.digest), "offset": fetch.written},
            )

        if hasher.hexdigest() != fetch.digest.hex:
            raise UpstreamUnavailable(
                f"upstream {upstream.key} sent bytes that do not match {fetch.digest}"
            )

    async def _claim_space(self, fetch: BlobFetch, fd: int, size: int) -> None:
        """Claim the blob's disk space; a full disk first evicts idle blobs.

        Raises:
            OSError: The space cannot be claimed, even after evicting.
        """
        try:
            await _allocate(fd, size)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self._make_room(fetch, size, exc)
            await _allocate(fd, size)

    def _make_room(self, fetch: BlobFetch, count: int, full: OSError) -> None:
        """Evict idle blobs until the disk has room for ``count`` bytes more.

        Raises:
            OSError: ``full``, when no blob could be evicted.
        """
        # A quota is not in statvfs: then make room for all of it.
        free = 0 if full.errno == errno.EDQUOT else _free_bytes(fetch.path)
        needed = max(0, count - free) + _SPACE_SLACK
        freed = self._store.evict_bytes(needed)
        logger.info(
            "blob_space_made",
            extra={"digest": str(fetch.digest), "needed": needed, "freed": freed},
        )
        if not freed:
            raise full


def _remove_temp(fetch: BlobFetch) -> None:
    """Delete a failed fetch's temporary file, if the disk lets it."""
    try:
        fetch.path.unlink(missing_ok=True)
    except OSError as exc:
        # A disk gone read-only or failing must not end the node, which can
        # still serve what it stored; recover() deletes the file at start.
        logger.warning(
            "blob_temp_not_deleted",
            extra={"digest": str(fetch.digest), "reason": exc.strerror},
        )


def _hash_file(path: Path, length: int, algorithm: str) -> hashlib._Hash:
    """The hash of the file's first ``length`` bytes."""
    hasher = hashlib.new(algorithm)
    with path.open("rb", buffering=0) as file:
        while remaining := length - file.tell():
            piece = file.read(min(_PIECE, remaining))
            if not piece:
                raise OSError(errno.EIO, "blob file shorter than its bytes written")
            hasher.update(piece)
    return hasher


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


async def _allocate(fd: int, size: int) -> None:
    """Claim the blob's disk space before its first byte is written.

    A disk that cannot hold the blob fails the fetch now, before any client
    was sent a byte, not half-way through. It is cheaper too: ext4 then
    maps the file's blocks once, not block by block as the writer goes
    (cold 1 GiB fetch in ``loadtest/bench_node.py``: 0.35 s less system
    CPU per GiB, 401 to 464 MiB/s). The file's length says nothing about
    how much of it was written; clients go by ``BlobFetch.written``.
    """
    if not size:
        return
    try:
        # Waits for the thread if cancelled: the caller closes ``fd`` next.
        await trio.to_thread.run_sync(os.posix_fallocate, fd, 0, size)
    except OSError as exc:
        # A blob past the filesystem's largest file cannot be written
        # either: refused before any client gets a head.
        if exc.errno in NO_SPACE or exc.errno == errno.EFBIG:
            raise
        # A filesystem that cannot allocate ahead still takes the writes.
        logger.debug("blob_space_not_claimed", extra={"reason": exc.strerror})


def _as_registry_error(exc: Exception, digest: Digest) -> RegistryError:
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, OSError):
        # The upstream's socket errors are UpstreamUnavailable already.
        return disk_error(exc, f"store blob {digest}")
    return UpstreamUnavailable(f"fetch of {digest} failed: {type(exc).__name__}")


class _Pump:
    """Receives and hashes one response's body in a worker thread; a second
    thread writes it.

    The receiving thread hashes each piece right after ``recv`` put it in
    a buffer, while it is still in that core's cache, and hands the buffer
    to the writing thread, which writes it and lets go of the page cache
    far behind (:mod:`~tcr_mirror.proxy._writebehind`). ``recv``, sha256
    and ``pwrite`` all release the GIL, so the write of one piece overlaps
    the receiving and hashing of the next, and the event loop sends to
    clients beside both: a cold 1 GiB fetch in ``loadtest/bench_node.py``
    went from 694-731 to 752-782 MiB/s, for the same CPU per GiB, when the
    write left the receiving thread. A few buffers are enough: the writer
    keeps up, and more would only hold more memory per fetch.

    The writer tells the loop how far it got without waiting for it
    (``run_sync_soon``), at most one report in flight; clients may then
    read every byte reported.
    """

    def __init__(
        self, response: RawResponse, fetch: BlobFetch, fd: int, hasher: hashlib._Hash
    ) -> None:
        self._response = response
        self._fetch = fetch
        self._fd = fd
        self._hasher = hasher
        self._token = trio.lowlevel.current_trio_token()
        # Written by the writing thread only; read by the loop's reports.
        self._position = fetch.written
        self._report_due = False

    async def run(self) -> None:
        """Pump the body into the file until it ends, fails or is cancelled.

        Raises:
            BodyBroken: The body was cut; every byte before the cut is
                written, hashed and reported.
            UpstreamUnavailable: The body was longer than the blob.
            OSError: Writing failed (a full disk).
        """
        finished = trio.Event()
        result: list[outcome.Outcome[None]] = []

        def deliver(thread_result: outcome.Outcome[None]) -> None:
            result.append(thread_result)
            self._call_soon(finished.set)

        trio.lowlevel.start_thread_soon(self._pump, deliver, name="blob-pump")
        try:
            await finished.wait()
        except BaseException:
            # Cancelled: end the thread's read, and wait for the thread,
            # because the caller closes the file next and a descriptor
            # number reused while the thread still writes to it would send
            # the bytes into some other file.
            self._response.abort()
            with trio.CancelScope(shield=True):
                await finished.wait()
            raise
        finally:
            self._report()
        result[0].unwrap()

    def _pump(self) -> None:
        """Receive and hash; returns once the writer wrote all it was given.

        A writer's error wins over the receiver's: a cut body is resumed
        from the last byte written, which is the last byte hashed only if
        the writer wrote everything.
        """
        handoff = _Handoff()
        writer = threading.Thread(
            target=self._write, args=(handoff,), name="blob-writer"
        )
        writer.start()
        try:
            self._receive(handoff)
        finally:
            handoff.filled.put(None)
            writer.join()
            if handoff.failed:
                raise handoff.failed[0]

    def _receive(self, handoff: _Handoff) -> None:
        size = self._fetch.size
        assert size is not None
        received = self._position
        while received < size and not handoff.failed:
            index = handoff.free.get()
            if index is None:  # the writer failed
                return
            with memoryview(handoff.buffers[index]) as whole:
                # One byte more than the blob may still hold is asked for,
                # so that a body longer than the blob is noticed.
                view = whole[: min(_PIECE, size - received + 1)]
                count = self._response.read_into(view)
                if received + count > size:
                    raise UpstreamUnavailable(
                        "upstream sent more bytes than the blob's size"
                    )
                self._hasher.update(view[:count])
            if not count:
                return
            received += count
            handoff.filled.put((index, count))

    def _write(self, handoff: _Handoff) -> None:
        """The writing thread: every filled buffer, in order, until None."""
        write_behind = WriteBehind(self._position)
        try:
            while (item := handoff.filled.get()) is not None:
                index, count = item
                with memoryview(handoff.buffers[index]) as whole:
                    piece = whole[:count]
                    while piece:
                        written = os.pwrite(self._fd, piece, self._position)
                        if not written:
                            # Asking again would loop for ever.
                            raise OSError(
                                errno.EIO, "the disk took none of the bytes written"
                            )
                        self._position += written
                        piece = piece[written:]
                handoff.free.put(index)
                for advised in write_behind.advance(self._position).ranges():
                    # Advice only: a filesystem that refuses it loses nothing.
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(
                            self._fd,
                            advised.start,
                            len(advised),
                            os.POSIX_FADV_DONTNEED,
                        )
                if not self._report_due:
                    self._report_due = True
                    self._call_soon(self._report)
        except BaseException as exc:
            handoff.failed.append(exc)
            handoff.free.put(None)  # wakes a receiver waiting for a buffer

    def _call_soon(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(callback)

    def _report(self) -> None:
        # Runs on the loop.
        self._report_due = False
        if self._fetch.written != self._position:
            self._fetch.written = self._position
            self._fetch.notify()


# Bytes one read may bring: large pieces make the per-piece costs (a hash
# call, a write, a report to the loop) small next to the copying.
_PIECE = 1 << 20
# Buffers of one fetch: one being received into, one being written, one
# to spare.
_BUFFERS = 3


class _Handoff:
    """The buffers of one response, passed between its receiving thread
    and its writing thread.

    Attributes:
        buffers: :data:`_BUFFERS` pieces' worth of memory, reused.
        free: Indexes of buffers the receiver may fill; None once the
            writer failed.
        filled: ``(index, bytes)`` of buffers to write, in order; None
            once the receiver is done.
        failed: The writer's error, if it had one.
    """

    def __init__(self) -> None:
        self.buffers = [bytearray(_PIECE) for _ in range(_BUFFERS)]
        self.free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for index in range(_BUFFERS):
            self.free.put(index)
        self.filled: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.failed: list[BaseException] = []


async def _absorb(
    response: RawResponse, fetch: BlobFetch, fd: int, hasher: hashlib._Hash
) -> None:
    await _Pump(response, fetch, fd, hasher).run()
    if fetch.written != fetch.size:
        raise BodyBroken("upstream body ended early")


def _check_response(response: RawResponse, fetch: BlobFetch, key: str) -> int:
    """Check an answer to the fetch's GET, first or resumed.

    Returns:
        The blob's size as the upstream gives it.
    """
    status = response.status_code
    if fetch.written == 0 and status == 200:
        size = _content_length(response, key)
        if fetch.size is not None and size != fetch.size:
            # Clients were already told the first size.
            raise UpstreamUnavailable(
                f"upstream {key} changed the size of {fetch.digest} from "
                f"{fetch.size} to {size} between attempts"
            )
        return size
    if fetch.written and status == 206:
        assert fetch.size is not None
        match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", ""))
        if match and int(match[1]) == fetch.written and int(match[3]) == fetch.size:
            return fetch.size
        raise UpstreamUnavailable(f"upstream {key} answered a resume with a bad range")
    raise status_error(response, f"blob {fetch.digest}", key, not_found=BlobUnknown)


def _content_length(response: RawResponse, key: str) -> int:
    text = response.headers.get("content-length", "")
    if not text.isdigit():
        raise UpstreamUnavailable(f"upstream {key} sent a blob without Content-Length")
    # Its length first: a number of thousands of digits is slow to convert.
    if len(text) > len(str(_MAX_FILE_SIZE)) or int(text) > _MAX_FILE_SIZE:
        raise UpstreamUnavailable(
            f"upstream {key} sent a blob size larger than any file can be"
        )
    return int(text)

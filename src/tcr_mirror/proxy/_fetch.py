"""One fetch per digest, shared by every client that wants the blob.

The first request for a blob that is not stored starts a :class:`BlobFetch`:
a task, owned by the daemon rather than by that request, that streams the
blob from the upstream into a temporary file and hashes it on the way.
Every request for the same digest while it runs opens the same temporary
file and sends from its own offset whatever has arrived, waiting for more,
so the first bytes reach all clients as soon as the upstream sends them.

Two rules keep a bad fetch from looking like a good blob:

* The last byte of the blob is released to clients only after the whole
  blob matched its digest. A client that was streaming a blob whose bytes
  turn out wrong sees its connection end one byte short of the declared
  length, never a complete body.
* The temporary file is renamed into the store only after the digest and
  size matched and the file was fsynced; a failed fetch deletes it.

A body cut off by the network is resumed with a ``Range`` request from the
first missing byte; an upstream that answers the resume with anything but
the asked ``206`` fails the fetch.
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

import trio

from tcr_mirror.proxy._errors import (
    BlobUnknown,
    RegistryError,
    StoreFull,
    UpstreamUnavailable,
)
from tcr_mirror.proxy._oci import Digest
from tcr_mirror.proxy._rawget import BodyBroken, RawResponse
from tcr_mirror.proxy._store import BlobStore
from tcr_mirror.proxy._upstream import Upstream, status_error
from tcr_mirror.proxy._writebehind import WriteBehind

__all__ = ["BlobFetch", "BlobFetcher", "FetchAborted"]

logger = logging.getLogger(__name__)

_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
# Resumes of one fetch before giving up on the upstream.
_MAX_RESUMES = 3


class FetchAborted(Exception):
    """The fetch failed after its client had started receiving the body."""


class BlobFetch:
    """A blob being fetched into a temporary file.

    Attributes:
        digest: The blob's digest.
        path: Where its bytes are: the temporary file, and the final blob
            file once :attr:`done`.
        size: The blob's size once the upstream told it, else None.
        written: Bytes written to the file so far.
        verified: The blob's bytes matched its digest.
        done: The blob is verified and in the store.
        error: Why the fetch failed, if it did.
    """

    def __init__(self, digest: Digest, path: Path) -> None:
        self.digest = digest
        self.path = path
        self.size: int | None = None
        self.written = 0
        self.verified = False
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
            RegistryError: The fetch failed before that.
        """
        while self.size is None and self.error is None:
            await self._changed.wait()
        if self.error is not None:
            raise self.error
        assert self.size is not None
        return self.size

    def available(self) -> int:
        """Bytes a client may be sent now (the last waits for the digest)."""
        if self.verified:
            return self.written
        if self.size is None:
            return 0
        return min(self.written, self.size - 1)

    async def wait_available(self, offset: int) -> int:
        """Wait until bytes past ``offset`` may be sent.

        Returns:
            The number of bytes from the start that may be sent, greater
            than ``offset``.

        Raises:
            FetchAborted: The fetch failed.
        """
        while True:
            if self.error is not None and not self.verified:
                raise FetchAborted(self.error.message)
            available = self.available()
            if available > offset:
                return available
            await self._changed.wait()


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
        """
        existing = self._fetches.get(digest)
        if existing is not None:
            return existing
        path = self._store.new_temp_path(digest)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fetch = BlobFetch(digest, path)
        self._fetches[digest] = fetch
        self._nursery.start_soon(self._run, fetch, fd, upstream, repository)
        return fetch

    async def _run(
        self, fetch: BlobFetch, fd: int, upstream: Upstream, repository: str
    ) -> None:
        log = {"digest": str(fetch.digest), "upstream": upstream.key}
        logger.info("blob_fetch_started", extra=log)
        try:
            await self._download(fetch, fd, upstream, repository)
            # The bytes are right: clients may have the last one now, while
            # the file is made durable for the store.
            fetch.verified = True
            fetch.notify()
            await trio.to_thread.run_sync(os.fsync, fd)
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
            if not fetch.done:
                fetch.path.unlink(missing_ok=True)
                self._store.unreserve(fetch.digest)
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
                    first = fetch.size is None
                    _check_response(response, fetch, upstream.key)
                    if first:
                        assert fetch.size is not None
                        self._store.reserve(fetch.digest, fetch.size)
                        await _allocate(fd, fetch.size)
                    fetch.notify()
                    await _absorb(response, fetch, fd, hasher)
            except BodyBroken as exc:
                resumes += 1
                if resumes > _MAX_RESUMES or fetch.size is None:
                    raise UpstreamUnavailable(
                        f"upstream {upstream.key} broke off the blob: {exc}"
                    ) from exc
                logger.info(
                    "blob_fetch_resumed",
                    extra={"digest": str(fetch.digest), "offset": fetch.written},
                )
                continue
            break

        if hasher.hexdigest() != fetch.digest.hex:
            raise UpstreamUnavailable(
                f"upstream {upstream.key} sent bytes that do not match {fetch.digest}"
            )


async def _allocate(fd: int, size: int) -> None:
    """Claim the blob's disk space before its first byte is written.

    A disk that cannot hold the blob fails the fetch now, before any client
    was sent a byte, not half-way through. It is cheaper too: ext4 then
    maps the file's blocks once, not block by block as the writer goes
    (cold 1 GiB fetch in ``loadtest/bench_node.py``: 0.35 s less system
    CPU per GiB, 401 to 464 MiB/s). The file's length says nothing about
    how much of it was written; clients go by ``BlobFetch.written``.
    """
    if size:
        # Waits for the thread if cancelled: the caller closes ``fd`` next.
        await trio.to_thread.run_sync(os.posix_fallocate, fd, 0, size)


def _as_registry_error(exc: Exception, digest: Digest) -> RegistryError:
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"no space left on the node for blob {digest}")
    return UpstreamUnavailable(f"fetch of {digest} failed: {type(exc).__name__}")


class _Absorber:
    """Writes and hashes a blob's bytes on two threads of their own.

    The event loop only receives and queues. One thread writes each piece
    at its offset, the other feeds it to sha256; both calls release the
    GIL, so they run beside the loop and beside each other, and neither
    waits behind the other's slow moments. The writer lets go of the page
    cache far behind it (:mod:`~tcr_mirror.proxy._writebehind`): writing
    into fresh pages cost 2.9-3.4 s of CPU per GiB on this project's CI
    machines, three times the hash. Each thread reports its
    progress back to the loop without waiting for it (``run_sync_soon``),
    at most one report in flight per thread. A hop to a worker thread per
    piece cost more than the piece's hashing.
    """

    def __init__(self, fetch: BlobFetch, fd: int, hasher: hashlib._Hash) -> None:
        self._fetch = fetch
        self._token = trio.lowlevel.current_trio_token()
        self.error: OSError | None = None
        self._moved = trio.Event()
        self._fd = fd
        self._offset = fetch.written
        self._write_behind = WriteBehind(fetch.written)
        self._writer = _Worker(self, "blob-writer", self._write, fetch.written)
        self._hasher = _Worker(self, "blob-hasher", hasher.update, fetch.written)

    def add(self, chunk: bytes | bytearray) -> None:
        self._writer.add(chunk)
        self._hasher.add(chunk)

    @property
    def absorbed(self) -> int:
        """Bytes both written and hashed."""
        return min(self._writer.done, self._hasher.done)

    async def finish(self) -> None:
        """Wait until every piece added is written and hashed (or a write failed)."""
        with trio.CancelScope(shield=True):
            await self._writer.finish()
            await self._hasher.finish()

    def _write(self, piece: bytes | bytearray) -> None:
        view = memoryview(piece)
        while view:
            written = os.pwrite(self._fd, view, self._offset)
            self._offset += written
            view = view[written:]
        for advised in self._write_behind.advance(self._offset).ranges():
            os.posix_fadvise(
                self._fd, advised.start, len(advised), os.POSIX_FADV_DONTNEED
            )

    def call_soon(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(callback)

    async def wait_moved(self) -> None:
        """Wait until either thread has got further (or a write failed)."""
        await self._moved.wait()

    def progress(self) -> None:
        # Runs on the loop. Clients may read what is written, so only the
        # writer's progress wakes them; the hash only has to keep up, which
        # the receiver waits for with ``wait_moved``.
        moved, self._moved = self._moved, trio.Event()
        moved.set()
        if self._fetch.written != self._writer.done:
            self._fetch.written = self._writer.done
            self._fetch.notify()


class _Worker:
    """A thread that applies one step to each piece, in order."""

    def __init__(
        self,
        absorber: _Absorber,
        name: str,
        step: Callable[[bytes | bytearray], None],
        done: int,
    ) -> None:
        self.done = done
        self._absorber = absorber
        self._step = step
        self._queue: queue.SimpleQueue[bytes | bytearray | None] = queue.SimpleQueue()
        self._report_due = False
        self._finished = trio.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def add(self, piece: bytes | bytearray) -> None:
        self._queue.put(piece)

    async def finish(self) -> None:
        self._queue.put(None)
        await self._finished.wait()

    def _run(self) -> None:
        try:
            while (piece := self._queue.get()) is not None:
                if self._absorber.error is None:
                    self._apply(piece)
        finally:
            self._absorber.call_soon(self._done)

    def _apply(self, piece: bytes | bytearray) -> None:
        try:
            self._step(piece)
        except OSError as exc:
            # A full disk: raised by _absorb in the loop, after finish(); the
            # report wakes a loop waiting for progress.
            self._absorber.error = exc
            self._absorber.call_soon(self._absorber.progress)
            return
        self.done += len(piece)
        if not self._report_due:
            self._report_due = True
            self._absorber.call_soon(self._report)

    def _report(self) -> None:
        self._report_due = False
        self._absorber.progress()

    def _done(self) -> None:
        self._report()
        self._finished.set()


# Received bytes not yet written and hashed that make the loop wait.
_MAX_BACKLOG = 8 << 20


async def _absorb(
    response: RawResponse, fetch: BlobFetch, fd: int, hasher: hashlib._Hash
) -> None:
    assert fetch.size is not None
    received = fetch.written
    absorber = _Absorber(fetch, fd, hasher)
    # Every received byte is written before this returns, also when the
    # body is cut: the resume then starts right after them.
    try:
        while (chunk := await response.receive()) and absorber.error is None:
            received += len(chunk)
            if received > fetch.size:
                raise UpstreamUnavailable(
                    "upstream sent more bytes than the blob's size"
                )
            absorber.add(chunk)
            while (
                received - absorber.absorbed > _MAX_BACKLOG and absorber.error is None
            ):
                await absorber.wait_moved()
    finally:
        await absorber.finish()
    if absorber.error is not None:
        raise absorber.error
    if fetch.written != fetch.size:
        raise BodyBroken("upstream body ended early")


def _check_response(response: RawResponse, fetch: BlobFetch, key: str) -> None:
    status = response.status_code
    if fetch.written == 0 and status == 200:
        fetch.size = _content_length(response, key)
        return
    if fetch.written and status == 206:
        match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", ""))
        if match and int(match[1]) == fetch.written and int(match[3]) == fetch.size:
            return
        raise UpstreamUnavailable(f"upstream {key} answered a resume with a bad range")
    raise status_error(response, f"blob {fetch.digest}", key, not_found=BlobUnknown)


def _content_length(response: RawResponse, key: str) -> int:
    text = response.headers.get("content-length", "")
    if not text.isdigit():
        raise UpstreamUnavailable(f"upstream {key} sent a blob without Content-Length")
    return int(text)

"""Moving file bytes to a client socket with ``sendfile``.

Two ways, for two kinds of body:

* :func:`sendfile_on_loop` sends from the event loop and waits for the
  socket with trio. A blob still being fetched is sent this way, a few
  megabytes at a time as the fetch releases them.
* :func:`send_stored` sends a stored blob from worker threads, in turns.
  Once the file is in the page cache, serving it is all kernel work
  (attaching pages to socket buffers and, on loopback, the receiver's TCP
  processing too). From the event loop that work stays on one core, and
  every time a socket fills up the loop pays for a wakeup; threads that
  wait a moment in ``poll`` for a fast reader run it on every core. With
  32 clients reading a cached blob this went from 0.6x to 0.92-0.96x of
  nginx's two worker processes in ``loadtest/bench_node.py``.

A stored file can turn out shorter than its index says, or unreadable,
while it is being sent (cut or damaged behind the store). Whoever handed
out the descriptor can :func:`watch_file` it to hear of that, and drop the
blob so that the next request fetches it again.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Callable

import trio

__all__ = [
    "FileBroken",
    "SendStalled",
    "send_stored",
    "sendfile_on_loop",
    "unwatch_file",
    "watch_file",
]

# Bytes per sendfile call on the event loop, as nginx's sendfile_max_chunk:
# larger calls measured no faster there, and hold the loop longer.
_SENDFILE_CHUNK = 2 << 20
# Bytes one response may send on the loop before letting other connections
# have a turn.
_LOOP_SHARE = 16 << 20
# One turn of a thread at a response ends after this many bytes or seconds,
# so a big blob cannot keep small ones waiting; a client's socket that stays
# full for the grace ends the turn at once. Also bounds how long a cancelled
# request waits for its thread: the thread is never abandoned, because the
# caller closes the file after, and a descriptor number reused while a
# thread still sends from it would send some other file.
_TURN_BYTES = 64 << 20
_TURN = 0.05
# Tuned on 2 cores with interleaved rounds against nginx: the aggregate of
# 32 / 8 clients of a cached 256 MiB blob, as a share of nginx's, with
# every socket on reno (``loadtest/bench_node.py --congestion-control
# reno``, like non-pacing cubic on most nodes) and with the clients on
# this host's BBR:
#   senders  call   grace   reno          BBR clients
#   1 / core 2 MiB  5 ms    0.82 / 0.76   2.13x / 2.43x
#   4 / core 2 MiB  5 ms    0.87 / 0.93   1.25x / 1.61x
#   2 / core 8 MiB  20 ms   0.93 / 0.79   2.16x / 2.33x
#   3 / core 8 MiB  20 ms   0.95 / 0.84   1.79x / 1.74x
#   4 / core 8 MiB  20 ms   0.94 / 0.90   1.32x / 1.59x
#   4 / core 2 MiB  1 ms    0.73 / 0.78
# A sender spends much of its turn in ``poll`` for its one client, using no
# core, so one per core left the other clients' sockets empty; more than
# two per core cost up to 40% of the rate with BBR clients. A grace too
# short sends the connection back through the loop for every drained
# buffer. A client that stops reading holds a sender for the grace; one
# that reads slowly, for at most the turn.
_THREAD_CHUNK = 8 << 20
_FULL_GRACE_MS = 20
# At most this many stored blobs are being sent at the same moment; the
# others wait their turn.
_SENDERS = trio.CapacityLimiter(2 * max(2, os.cpu_count() or 2))


# Errors of sendfile that come from reading the file, not from the socket.
# EIO from a bad sector: tests/test_proxy_store_eio.py (a FUSE filesystem).
_FILE_ERRNOS = frozenset({errno.EIO, errno.EUCLEAN, errno.EBADMSG})
_watchers: dict[int, Callable[[str], None]] = {}


class SendStalled(trio.TooSlowError):
    """The client took no bytes for the whole stall timeout."""


class FileBroken(trio.BrokenResourceError):
    """The file ended before its declared length, or could not be read."""


def watch_file(fd: int, on_broken: Callable[[str], None]) -> None:
    """Call ``on_broken(reason)`` on the event loop, with ``fd`` still open,
    if :func:`send_stored` finds the file short or unreadable.

    Unwatch before closing ``fd``, or at once after (with no checkpoint
    between), so that a reused descriptor number is never mistaken for it.
    """
    _watchers[fd] = on_broken


def unwatch_file(fd: int) -> None:
    _watchers.pop(fd, None)


async def sendfile_on_loop(
    sock: trio.socket.SocketType, fd: int, offset: int, count: int, stall: float
) -> int:
    """Send up to ``count`` bytes of ``fd`` from ``offset``; return how many.

    Keeps calling ``sendfile`` while the socket takes bytes, and yields to
    other tasks only when it is full or after a fair share: a trip through
    the event loop per call would cost more than the call.

    Raises:
        SendStalled: The socket stayed full for ``stall`` seconds.
        trio.BrokenResourceError: The file is shorter than ``offset + count``.
    """
    total = 0
    while total < count:
        try:
            sent = os.sendfile(
                sock.fileno(), fd, offset + total, min(count - total, _SENDFILE_CHUNK)
            )
        except BlockingIOError:
            with trio.move_on_after(stall) as waited:
                await trio.lowlevel.wait_writable(sock)
            if waited.cancelled_caught:
                raise SendStalled from None
            if total:
                return total
            continue
        if sent == 0:
            raise trio.BrokenResourceError("file ended before its declared length")
        total += sent
        if total >= _LOOP_SHARE:
            break
    await trio.lowlevel.checkpoint()
    return total


async def send_stored(
    sock: trio.socket.SocketType,
    fd: int,
    offset: int,
    count: int,
    stall: float,
    on_sent: Callable[[int], None] | None = None,
) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset``, in turns on threads.

    A thread sends for one turn, and gives its turn back early when the
    client's socket stays full: a slow or stuck client waits on the event
    loop, not on one of the few threads.

    Raises:
        SendStalled: The client took no bytes for ``stall`` seconds.
        FileBroken: The file is shorter than declared, or reading it
            failed; its watcher was told.
        OSError: The client went away.
    """
    position, end = offset, offset + count
    out = sock.fileno()
    while position < end:
        try:
            sent, full = await trio.to_thread.run_sync(
                _send_turn, out, fd, position, end - position, limiter=_SENDERS
            )
        except FileBroken as exc:
            _tell_watcher(fd, str(exc))
            raise
        except OSError as exc:
            if exc.errno not in _FILE_ERRNOS:
                raise
            _tell_watcher(fd, f"reading the file failed: {exc.strerror}")
            raise FileBroken(f"reading the file failed: {exc.strerror}") from exc
        if sent and on_sent is not None:
            on_sent(sent)
        position += sent
        if full:
            with trio.move_on_after(stall) as waited:
                await trio.lowlevel.wait_writable(sock)
            if waited.cancelled_caught:
                raise SendStalled


def _send_turn(out: int, fd: int, offset: int, count: int) -> tuple[int, bool]:
    """Runs in a worker thread: send for one turn at most.

    Returns:
        The bytes sent, and whether the turn ended because the client's
        socket stayed full.
    """
    poller = select.poll()
    poller.register(out, select.POLLOUT)
    turn_ends = time.monotonic() + _TURN
    total = 0
    while total < count and total < _TURN_BYTES:
        try:
            sent = os.sendfile(
                out, fd, offset + total, min(count - total, _THREAD_CHUNK)
            )
        except BlockingIOError:
            # A closed connection polls ready too; the next sendfile then
            # raises the OSError that ends the request.
            if not poller.poll(_FULL_GRACE_MS):
                return total, True
            continue
        if sent == 0:
            raise FileBroken(f"file ended at {offset + total}, before its length")
        total += sent
        if time.monotonic() >= turn_ends:
            break
    return total, False


def _tell_watcher(fd: int, reason: str) -> None:
    on_broken = _watchers.pop(fd, None)
    if on_broken is not None:
        on_broken(reason)

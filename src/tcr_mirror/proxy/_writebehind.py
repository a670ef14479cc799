"""Which parts of a blob file being written to let go of from the page cache.

A cold fetch writes the blob front to back. Left alone, every byte of it
stays in the page cache as a new page until the kernel reclaims it, so a
fetch of a 1 GiB blob claims 1 GiB of fresh memory. Taking a fresh page is
far dearer than reusing one just freed where the node is a virtual machine
whose host takes free memory back (free page reporting): measured on this
project's CI machines, writing 1 GiB into a new file cost 2.9-3.4 s of
system CPU, but 0.4 s when the pages more than 64 MiB behind the writer
were written back and dropped as it went, because the writer's next pages
then come from the ones it just gave back. It also keeps a node's page
cache, and its cgroup's memory charge, from filling with blobs that
containerd already holds a copy of.

Both steps are one call, ``posix_fadvise(POSIX_FADV_DONTNEED)``: on dirty
pages it starts their writeback, on clean ones it drops them. So
:class:`WriteBehind` plans, as the writer moves on, the ranges to advise:
a range :data:`WRITEBACK_LAG` behind the writer, to start writing it back,
and everything :data:`DROP_LAG` behind, which its earlier writeback has
made clean by then. A client joined to the fetch reads close behind the
writer, in pages still cached; one that falls further back reads from the
disk, which is slower but the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DROP_LAG", "STEP", "WRITEBACK_LAG", "Advice", "WriteBehind"]

# Advice is given once per STEP bytes written, so the calls cost nothing
# next to the writes.
STEP = 8 << 20
WRITEBACK_LAG = 64 << 20
DROP_LAG = 128 << 20


@dataclass(frozen=True)
class Advice:
    """Ranges of the file to advise ``DONTNEED`` now, as ``range(start, stop)``."""

    writeback: range | None = None
    """Dirty pages far enough behind to start writing back."""
    drop: range | None = None
    """Pages far enough behind to be clean, to drop."""

    def ranges(self) -> list[range]:
        return [r for r in (self.writeback, self.drop) if r is not None]


class WriteBehind:
    """Plans the page cache advice for a file written front to back.

    Args:
        start: Where the writer starts (a resumed fetch starts past 0).
    """

    def __init__(self, start: int) -> None:
        self._boundary = start // STEP * STEP
        # The writer of a response cut before this one advised up to here.
        self._written_back = max(0, self._boundary - WRITEBACK_LAG)
        # Pages below this were advised to be dropped already. Starting at
        # 0 makes a resumed fetch's first drop also cover what the cut
        # response wrote, which is clean by then.
        self._dropped = 0

    def advance(self, position: int) -> Advice:
        """The writer has written everything below ``position``.

        Returns:
            What to advise; nothing until the writer crosses the next
            :data:`STEP` boundary.
        """
        boundary = position // STEP * STEP
        if boundary <= self._boundary:
            return Advice()
        self._boundary = boundary
        writeback = drop = None
        writeback_end = boundary - WRITEBACK_LAG
        if writeback_end > self._written_back:
            writeback = range(self._written_back, writeback_end)
            self._written_back = writeback_end
        drop_end = boundary - DROP_LAG
        if drop_end > self._dropped:
            # Pages still being written back when last advised were kept;
            # advising one step further back again lets them go now.
            drop = range(max(0, self._dropped - STEP), drop_end)
            self._dropped = drop_end
        return Advice(writeback, drop)

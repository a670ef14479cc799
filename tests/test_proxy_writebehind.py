"""A cold fetch lets go of the page cache behind its writer.

The planner is driven without files; one test fetches a real blob through
a real node from a real registry and asks the kernel (``fincore``) how
much of the stored file is still in the page cache.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from support.node import NodeFactory
from support.pushclient import Pusher
from support.registry import Registry
from tcr_mirror.proxy._writebehind import (
    DROP_LAG,
    STEP,
    WRITEBACK_LAG,
    Advice,
    WriteBehind,
)

MIB = 1 << 20
PIECE = MIB


def write_through(
    planner: WriteBehind, start: int, end: int
) -> list[tuple[int, Advice]]:
    """Advances ``planner`` a piece at a time; returns each advice with its position."""
    advised = []
    position = start
    while position < end:
        position = min(end, position + PIECE)
        advice = planner.advance(position)
        if advice.ranges():
            advised.append((position, advice))
    return advised


def writebacks(advised: list[tuple[int, Advice]]) -> list[range]:
    return [a.writeback for _, a in advised if a.writeback is not None]


def drops(advised: list[tuple[int, Advice]]) -> list[range]:
    return [a.drop for _, a in advised if a.drop is not None]


def covered(ranges: list[range]) -> int:
    """How far from 0 the ranges cover without a gap."""
    reach = 0
    for advised in sorted(ranges, key=lambda r: r.start):
        if advised.start > reach:
            break
        reach = max(reach, advised.stop)
    return reach


def test_nothing_is_advised_for_a_blob_shorter_than_the_lag() -> None:
    assert write_through(WriteBehind(0), 0, WRITEBACK_LAG + STEP - 1) == []


def test_advice_stays_behind_the_writer_and_covers_the_file() -> None:
    size = 1 << 30
    advised = write_through(WriteBehind(0), 0, size)
    # Once per step at most: the calls must not cost next to the writes.
    assert len(advised) <= size // STEP
    for position, advice in advised:
        if advice.writeback is not None:
            assert advice.writeback.stop <= position - WRITEBACK_LAG
        if advice.drop is not None:
            assert advice.drop.stop <= position - DROP_LAG
    assert covered(writebacks(advised)) == size - WRITEBACK_LAG
    assert covered(drops(advised)) == size - DROP_LAG
    # Each drop also covers the step before the last one dropped, for
    # pages that were still being written back then.
    dropped = drops(advised)
    for earlier, later in zip(dropped, dropped[1:], strict=False):
        assert later.start <= earlier.stop - STEP


def test_a_resumed_fetch_drops_what_the_cut_response_wrote() -> None:
    cut = 300 * MIB + 12345
    first = write_through(WriteBehind(0), 0, cut)
    second = write_through(WriteBehind(cut), cut, 600 * MIB)
    assert covered(writebacks(first + second)) == 600 * MIB - WRITEBACK_LAG
    assert drops(second)[0].start == 0


def filesystem_type(path: Path) -> str:
    result = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def resident_bytes(path: Path) -> int:
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip())


def test_a_big_cold_fetch_leaves_only_its_tail_in_the_page_cache(
    registry: Registry, node_factory: NodeFactory, tmp_path: Path
) -> None:
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")
    if filesystem_type(tmp_path) == "tmpfs":
        pytest.skip("tmpfs pages are the files themselves and cannot be dropped")
    size = DROP_LAG + 8 * STEP
    source = tmp_path / "layer"
    hasher = hashlib.sha256()
    with source.open("wb") as file:
        for index in range(size // MIB):
            piece = hashlib.sha256(index.to_bytes(8, "big")).digest() * (MIB // 32)
            hasher.update(piece)
            file.write(piece)
    digest = "sha256:" + hasher.hexdigest()
    with Pusher(registry) as pusher:
        pusher.blob_file("library/big", source, digest)
    source.unlink()

    node = node_factory("--upstream", registry.url)
    received = hashlib.sha256()
    url = f"{node.url}/v2/library/big/blobs/{digest}"
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes(MIB):
            received.update(chunk)
    assert "sha256:" + received.hexdigest() == digest

    stored = node.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert stored.stat().st_size == size
    # Without the advice every page of the file would still be cached; with
    # it, about the last DROP_LAG bytes are. Writeback that lags on a slow
    # disk keeps some pages longer, hence the margin.
    assert resident_bytes(stored) <= size - 4 * STEP

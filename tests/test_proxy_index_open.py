"""Opening the store's LMDB index after damage or a passing fault, on real files.

A damaged index is moved aside and rebuilt from the blob files (the last
damaged copy kept); any other failure to open it stops the start with one
line and touches nothing, since every manifest and tag would be lost for a
fault that passes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from tcr_mirror.proxy._store import BlobStore, TagEntry
from test_proxy_store import digest_of, put, read, readers_held

TAGS = 3000
WAIT = 60.0


def filled(root: Path) -> BlobStore:
    """A closed-and-reopened store with a blob and enough tags for the index
    to span many pages."""
    store = BlobStore(root)
    put(store, b"a stored layer")
    for n in range(TAGS):
        store.put_tag("reg", "app", f"v{n}", TagEntry(f"sha256:{n:064x}", "x/y", n))
    store.close()
    return store


def garbage(data: Path) -> None:
    data.write_bytes(b"\xff" * data.stat().st_size)


def pages_overwritten(data: Path) -> None:
    # The meta pages stay: LMDB opens it, and finds the trees wrong.
    with data.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(8192)
        file.write(random.Random(size).randbytes(size - 8192))


def cut_short(data: Path) -> None:
    os.truncate(data, data.stat().st_size // 2)


def open_in_child(root: Path) -> subprocess.CompletedProcess[str]:
    """Open the store and recover it in another process: a file read past
    its end through the map kills the process rather than raising."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tcr_mirror.proxy._store import BlobStore\n"
        "store = BlobStore(Path(sys.argv[1]))\n"
        "print(store.recover())\n"
        "store.close()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(root)],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


@pytest.mark.parametrize("damage", [garbage, pages_overwritten, cut_short])
def test_a_damaged_index_is_rebuilt_and_only_the_last_copy_kept(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    filled(tmp_path)
    for _ in range(3):
        # Damaged three times in a row, as fast as the store restarts.
        damage(tmp_path / "index" / "data.mdb")
        opened = open_in_child(tmp_path)
        assert opened.returncode == 0, opened.stderr[-2000:]
        assert "'files_indexed': 1" in opened.stdout
        store = BlobStore(tmp_path)
        for n in range(TAGS):
            store.put_tag("reg", "app", f"v{n}", TagEntry("sha256:00", "x/y", n))
        store.close()

    (broken,) = tmp_path.glob("index.broken-*")
    assert (broken / "data.mdb").exists()
    store = BlobStore(tmp_path)
    assert read(store, digest_of(b"a stored layer")) == b"a stored layer"
    assert store.get_tag("reg", "app", "v1") == TagEntry("sha256:00", "x/y", 1)


def assert_nothing_lost(root: Path) -> None:
    assert not list(root.glob("index.broken-*"))
    store = BlobStore(root)
    try:
        assert read(store, digest_of(b"a stored layer")) == b"a stored layer"
        assert store._index.entry_counts()["tags"] == TAGS
        assert store.get_tag("reg", "app", "v7") == TagEntry(
            f"sha256:{7:064x}", "x/y", 7
        )
    finally:
        store.close()


def test_an_index_out_of_reader_slots_stops_the_start_and_loses_nothing(
    tmp_path: Path,
) -> None:
    filled(tmp_path)

    with readers_held(tmp_path / "index"), pytest.raises(lmdb.ReadersFullError):
        BlobStore(tmp_path)

    assert_nothing_lost(tmp_path)


@contextlib.contextmanager
def unopenable(path: Path) -> Iterator[None]:
    """``path`` cannot be opened for writing: immutable (root ignores file
    modes), or mode 000 otherwise."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("as root only chattr +i stops a write")
        chattr = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if chattr.returncode != 0:
            pytest.skip(f"no immutable files here: {chattr.stderr!r}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0)
        try:
            yield
        finally:
            path.chmod(0o644)


def test_an_index_that_cannot_be_opened_stops_the_node_in_one_line(
    tmp_path: Path,
) -> None:
    filled(tmp_path)
    command = [
        sys.executable, "-m", "tcr_mirror", "node", "--listen", "127.0.0.1:0",
        "--data-dir", str(tmp_path), "--upstream", "http://127.0.0.1:9",
    ]  # fmt: skip

    with unopenable(tmp_path / "index" / "data.mdb"):
        node = subprocess.run(command, capture_output=True, text=True, timeout=WAIT)

    assert node.returncode == 2, node.stderr[-2000:]
    (line,) = node.stderr.strip().splitlines()
    assert line.startswith(f"tcr-mirror: error: cannot use data directory {tmp_path}:")
    assert line.endswith(("Operation not permitted", "Permission denied"))
    assert_nothing_lost(tmp_path)

"""Small filesystems the tests make, and fill, for real."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "mounted_tmpfs"]


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``mountpoint`` (made here) with ``options``
    (``size=1m``, ...), unmounted on exit; the test is skipped where it
    cannot be mounted (not root, no tmpfs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)]
    result = subprocess.run(mount, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmount = subprocess.run(["umount", str(mountpoint)], capture_output=True)
        if unmount.returncode != 0:
            # Something still holds it open; detach it rather than leak it.
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full.

    Raises:
        AssertionError: The filesystem never filled up (10,000 x 64 KiB).
    """
    with open(path, "wb", buffering=0) as filler:
        for _ in range(10_000):
            try:
                filler.write(b"\0" * 65536)
            except OSError:
                return
    raise AssertionError("the filesystem never filled up")

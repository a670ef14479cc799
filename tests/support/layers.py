"""Deterministic test content: layers that real clients can unpack.

containerd unpacks every layer it pulls and checks the image config's
``rootfs.diff_ids`` against the sha256 of each uncompressed tar, so test
layers are real gzip-compressed tarballs. Their file content is random bytes
from a seeded RNG, so a test can rebuild the same blob, and two seeds never
share a blob.

Layers are built by streaming through a chain of writers (tar -> hash of the
tar -> gzip -> hash of the blob -> sink), so a layer of hundreds of MiB can
go to a file without ever being held in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "Layer",
    "LayerFile",
    "build_layer",
    "diff_id_of",
    "digest_of",
    "make_targz",
    "write_layer_file",
]

_RNG_BLOCK = 1 << 20


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    """A layer blob held in memory."""

    data: bytes
    digest: str
    diff_id: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class LayerFile:
    """A layer blob written to a file (for blobs too big to hold)."""

    path: Path
    digest: str
    diff_id: str
    size: int


class _HashingWriter:
    """Passes writes on to ``sink`` while hashing and counting them."""

    def __init__(self, sink: BinaryIO | gzip.GzipFile) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


class _RandomReader:
    """A file-like source of ``size`` seeded random bytes."""

    def __init__(self, seed: int, size: int) -> None:
        self._rng = random.Random(seed)
        self._left = size
        self._buffer = b""

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._left + len(self._buffer)
        # Draw in fixed blocks so the bytes do not depend on read sizes.
        while len(self._buffer) < n and self._left > 0:
            block = min(_RNG_BLOCK, self._left)
            self._buffer += self._rng.randbytes(block)
            self._left -= block
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data


def _write_layer(sink: BinaryIO, payload_size: int, seed: int) -> tuple[str, str]:
    """Writes a tar.gz layer to ``sink``; returns (digest, diff_id)."""
    blob = _HashingWriter(sink)
    with gzip.GzipFile(fileobj=blob, mode="wb", mtime=0, compresslevel=1) as gz:
        tar_stream = _HashingWriter(gz)
        with tarfile.open(fileobj=tar_stream, mode="w|") as tar:
            note = f"test layer, seed {seed}\n".encode()
            _add_file(tar, f"layer-{seed}/README", io.BytesIO(note), len(note))
            source = _RandomReader(seed, payload_size)
            _add_file(tar, f"layer-{seed}/data.bin", source, payload_size)
    return blob.digest, tar_stream.digest


def _add_file(tar: tarfile.TarFile, name: str, source: object, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, source)


def build_layer(payload_size: int, seed: int) -> Layer:
    """Builds a tar.gz layer in memory holding ``payload_size`` random bytes.

    The blob is a little larger than ``payload_size`` (tar and gzip headers;
    random bytes do not compress).
    """
    sink = io.BytesIO()
    digest, diff_id = _write_layer(sink, payload_size, seed)
    return Layer(sink.getvalue(), digest, diff_id)


def write_layer_file(path: Path, payload_size: int, seed: int) -> LayerFile:
    """Like ``build_layer`` but streams the blob into ``path``."""
    with path.open("wb") as sink:
        digest, diff_id = _write_layer(sink, payload_size, seed)
    return LayerFile(path, digest, diff_id, path.stat().st_size)


def diff_id_of(blob: bytes) -> str:
    """The diff_id of a layer blob: sha256 of its tar, gunzipped if needed."""
    if blob[:2] == b"\x1f\x8b":
        return digest_of(gzip.decompress(blob))
    return digest_of(blob)


def make_targz(files: dict[str, bytes]) -> bytes:
    """A small deterministic tar.gz of ``files`` (name to content)."""
    sink = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=sink, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name, content in sorted(files.items()):
            _add_file(tar, name, io.BytesIO(content), len(content))
    return sink.getvalue()

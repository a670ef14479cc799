"""Copy images with skopeo, a real client other than containerd.

skopeo checks digests as it copies, but a test should not rely on the
client alone: ``copy`` re-hashes every blob it wrote (``oci:`` layouts and
``dir:`` directories name blobs by their sha256) and fails on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SKOPEO_USER_AGENT_PREFIX", "CopyResult", "SkopeoError", "copy"]

# skopeo 1.9 identifies itself as "skopeo/1.9.3".
SKOPEO_USER_AGENT_PREFIX = "skopeo/"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TIMEOUT = 300.0


class SkopeoError(RuntimeError):
    """skopeo failed, or a blob it wrote does not match its name."""


@dataclass(frozen=True)
class CopyResult:
    """What one ``skopeo copy`` did."""

    returncode: int
    stdout: str
    stderr: str
    blobs: dict[str, int]
    """Digest to size of every blob written under the destination."""
    manifest_digest: str | None
    """Digest of the top manifest written (or index, with ``all_images``)."""


def copy(
    src: str,
    dst: str,
    *,
    all_images: bool = False,
    src_creds: tuple[str, str] | None = None,
    src_tls_verify: bool = False,
    extra_args: Sequence[str] = (),
    check: bool = True,
) -> CopyResult:
    """Runs ``skopeo copy SRC DST`` and verifies the blobs written.

    ``src`` and ``dst`` are skopeo transports, e.g.
    ``docker://127.0.0.1:5000/lib/app:v1`` and ``oci:/tmp/out`` or
    ``dir:/tmp/out``. ``all_images`` copies every platform of an index.

    Raises:
        SkopeoError: when ``check`` and skopeo failed, or always when a
            written blob does not hash to its name.
    """
    command = ["skopeo", "--insecure-policy", "copy", "--retry-times", "0"]
    command.append(f"--src-tls-verify={str(src_tls_verify).lower()}")
    if all_images:
        command.append("--all")
    if src_creds is not None:
        command += ["--src-creds", ":".join(src_creds)]
    command += [*extra_args, src, dst]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=_TIMEOUT, check=False
    )
    if check and result.returncode != 0:
        raise SkopeoError(f"skopeo copy failed: {result.stderr.strip()}")

    blobs, top = _verify_blobs(dst) if result.returncode == 0 else ({}, None)
    return CopyResult(result.returncode, result.stdout, result.stderr, blobs, top)


def _verify_blobs(dst: str) -> tuple[dict[str, int], str | None]:
    """Hashes every blob under ``dst``; returns them and the top manifest."""
    transport, _, location = dst.partition(":")
    if transport == "oci":
        layout = Path(location.split(":")[0])
        root = layout / "blobs" / "sha256"
        index = json.loads((layout / "index.json").read_bytes())
        top = index["manifests"][-1]["digest"]
    elif transport == "dir":
        root = Path(location)
        manifest = (root / "manifest.json").read_bytes()
        top = "sha256:" + hashlib.sha256(manifest).hexdigest()
    else:
        return {}, None

    blobs = {}
    for path in sorted(root.iterdir()):
        if not _HEX64.match(path.name):
            continue
        actual = _sha256_file(path)
        if actual != path.name:
            raise SkopeoError(f"blob {path} hashes to sha256:{actual}")
        blobs[f"sha256:{actual}"] = path.stat().st_size
    return blobs, top


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()

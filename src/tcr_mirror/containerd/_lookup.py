"""Which directory containerd reads for a registry, and which hold ours."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ._errors import HostsConfigError
from ._files import _TMP_PREFIX, _has_leftovers, _HostDir
from ._render import is_ours

__all__ = ["host_dir_names"]


def host_dir_names(registry: str) -> tuple[str, ...]:
    """The directories containerd tries for ``registry``, in its order.

    containerd spells the last ``:`` as ``_`` and appends ``_``
    (``hostDirectory`` in remotes/docker/config/hosts.go), and tries that
    name first; the first one that exists is the one it reads. (It then
    tries ``_default``, but a registry named here gets its own directory,
    carrying over what ``_default`` gave it.)
    """
    colon = registry.rfind(":")
    if colon <= 0:
        return (registry,)
    return (f"{registry[:colon]}_{registry[colon + 1 :]}_", registry)


def _registry_dirs(certs_dir: Path, registry: str) -> tuple[Path, list[Path]]:
    """The directory containerd reads for ``registry``, and the ones it hides.

    Raises:
        HostsConfigError: the first name containerd finds is not a
            directory, so containerd fails every pull from the registry.
    """
    paths = [certs_dir / name for name in host_dir_names(registry)]
    index = next((i for i, p in enumerate(paths) if p.exists()), len(paths) - 1)
    active = paths[index]
    if active.exists() and not active.is_dir():
        raise HostsConfigError(
            f"{active} is not a directory, but containerd reads it for {registry}"
        )
    hidden = [
        path
        for path in paths[index + 1 :]
        if path.is_dir() and not os.path.samefile(path, active)
    ]
    return active, hidden


def _claim(claimed: dict[Path, str], registry: str, paths: Sequence[Path]) -> None:
    """Records that ``registry`` changes ``paths``, which no other one may.

    Raises:
        HostsConfigError: another registry reads or hides the same directory
            (through a symlink), so both would plan the same file from what
            is on disk before either changes it, and each would rewrite the
            other's file on every run.
    """
    for path in paths:
        for other, owner in claimed.items():
            if owner != registry and _same_dir(path, other):
                raise HostsConfigError(
                    f"{registry} and {owner} share the directory {path}; "
                    "name only one of them"
                )
        claimed[path] = registry


def _same_dir(a: Path, b: Path) -> bool:
    if a == b:
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _existing_dirs(certs_dir: Path, registry: str) -> list[Path]:
    paths = [certs_dir / name for name in host_dir_names(registry)]
    found: list[Path] = []
    for path in paths:
        if path.is_dir() and not any(os.path.samefile(path, f) for f in found):
            found.append(path)
    return found or paths[-1:]


def _managed_dirs(certs_dir: Path) -> list[Path]:
    """Directories under ``certs_dir`` with our file, a backup or leftovers."""
    if not certs_dir.is_dir():
        return []
    found = []
    for path in sorted(certs_dir.iterdir()):
        if path.name.startswith(_TMP_PREFIX) or not path.is_dir():
            continue
        host_dir = _HostDir(path)
        current = host_dir.read_hosts()
        ours = current is not None and is_ours(current)
        if ours or host_dir.backup.exists() or _has_leftovers(path):
            found.append(path)
    return found

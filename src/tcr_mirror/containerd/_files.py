"""The file-system steps, each one rename (or link) from the last.

Our files open with ``MARKER``. A directory we create is built under a
temporary name and renamed into place, and our file in it says so, because
an empty directory is not nothing to containerd (it hides ``_default``);
``--undo`` renames such a directory away before deleting it. Temporary
names start with ``.tcr-mirror-tmp-``, which containerd never reads, and
each run sweeps what a crashed one left, holding a lock on the certs
directory so that it never sweeps a live run's files.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ._errors import HostsConfigError
from ._steps import _HOSTS_NAME, BACKUP_NAME

_TMP_PREFIX = ".tcr-mirror-tmp-"
_FILE_MODE = 0o644
_DIR_MODE = 0o755


@dataclass(frozen=True)
class _HostDir:
    """One registry's directory under the certs dir."""

    path: Path

    @property
    def hosts(self) -> Path:
        return self.path / _HOSTS_NAME

    @property
    def backup(self) -> Path:
        return self.path / BACKUP_NAME

    def read_hosts(self) -> bytes | None:
        return _read(self.hosts)

    def read_backup(self) -> bytes | None:
        return _read(self.backup)

    def cert_files(self) -> list[str]:
        if not self.path.is_dir():
            return []
        # containerd skips directories but not symlinks to them (lstat).
        with os.scandir(self.path) as entries:
            names = [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
        return sorted(names)


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None if there is none.

    Raises:
        HostsConfigError: It is not a regular file (a FIFO would block the
            read for ever, a directory cannot be read); containerd could
            not read it either.
    """
    try:
        # Non-blocking, so that opening a FIFO with no writer returns.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise HostsConfigError(
            f"{path} is not a regular file; replace it with one or remove it"
        )
    with open(fd, "rb") as file:
        return file.read()


def _temp_path(directory: Path) -> Path:
    return directory / f"{_TMP_PREFIX}{secrets.token_hex(6)}"


def _write_file(
    path: Path, data: bytes, mode: int, owner: tuple[int, int] | None
) -> None:
    """Creates ``path`` with ``data``, durably; it must not exist."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as out:
        # chown first: it would clear set-id bits set by the chmod.
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        out.write(data)
        out.flush()
        os.fsync(fd)


def _write_atomic(
    path: Path, data: bytes, mode: int, owner: tuple[int, int] | None
) -> None:
    """Replaces ``path`` so that readers see the old file or the new one."""
    tmp = _temp_path(path.parent)
    try:
        _write_file(tmp, data, mode, owner)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _create_dir(path: Path, data: bytes) -> None:
    """Creates directory ``path`` holding hosts.toml; never one without it."""
    tmp = _temp_path(path.parent)
    try:
        os.mkdir(tmp)
        os.chmod(tmp, _DIR_MODE)
        _write_file(tmp / _HOSTS_NAME, data, _FILE_MODE, None)
        _fsync_dir(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _remove_dir(path: Path) -> None:
    """Removes a directory at once for containerd, then its contents."""
    tmp = _temp_path(path.parent)
    os.rename(path, tmp)
    _fsync_dir(path.parent)
    shutil.rmtree(tmp)


def _back_up(host_dir: _HostDir) -> None:
    """Makes the backup of the foreign hosts.toml, exactly as it is."""
    # Its writer may never have synced it, and soon the backup is its
    # only name.
    fd = os.open(host_dir.hosts, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # A second name for the same file keeps its mode, owner, times and
        # extended attributes, and a symlink stays a symlink.
        os.link(host_dir.hosts, host_dir.backup, follow_symlinks=False)
    except FileExistsError:
        # Never over an existing backup: it may be the only original left.
        raise
    except OSError:
        # No hard links on this file system, or fs.protected_hardlinks
        # refuses to link someone else's file.
        _copy_exact(host_dir.hosts, host_dir.backup)
    _fsync_dir(host_dir.path)


def _copy_exact(source: Path, target: Path) -> None:
    info = os.lstat(source)
    tmp = _temp_path(target.parent)
    try:
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(source), tmp)
        else:
            mode = stat.S_IMODE(info.st_mode)
            _write_file(tmp, source.read_bytes(), mode, _owner_of(info))
            os.utime(tmp, ns=(info.st_atime_ns, info.st_mtime_ns))
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _owner_of(info: os.stat_result) -> tuple[int, int] | None:
    # Only root may give a file away; anyone else writes their own files.
    return (info.st_uid, info.st_gid) if os.geteuid() == 0 else None


def _mode_and_owner(*paths: Path) -> tuple[int, tuple[int, int] | None]:
    """The mode and owner for a file that takes over from ``paths``.

    It may hold their headers, so it is no more open than any of them, and
    it keeps the owner of the first.
    """
    mode, owner = _FILE_MODE, None
    for path in paths:
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        mode &= info.st_mode
        owner = owner or _owner_of(info)
    return mode, owner


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(directory: Path) -> None:
    """Removes the temporary files and directories a crashed run left."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _has_leftovers(directory: Path) -> bool:
    return any(p.name.startswith(_TMP_PREFIX) for p in directory.iterdir())


@contextmanager
def _locked(certs_dir: Path, *, create: bool) -> Iterator[None]:
    """Holds an exclusive lock on ``certs_dir``, if it exists or ``create``."""
    if create:
        # A file in the way is reported by the open below, as ENOTDIR.
        with suppress(FileExistsError):
            certs_dir.mkdir(parents=True, exist_ok=True)
    elif not certs_dir.exists():
        yield
        return
    fd = os.open(certs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

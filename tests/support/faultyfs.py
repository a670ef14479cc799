"""A FUSE filesystem with bad sectors, for stored blobs that cannot be read.

It mirrors a backing directory, and a read of a chosen file that reaches
a chosen offset fails with ``EIO``, as a disk's bad sector does. Which
files and offsets is read from a control file on every read, so a test
turns the fault on only after the blob was stored, and off again.

The filesystem runs in a process of its own (``python -m support.faultyfs
BACKING MOUNTPOINT CONTROL`` in ``tests/``), through fusepy and libfuse2,
so that a stuck filesystem cannot hang pytest: :class:`FaultyFs` starts it,
and at exit unmounts (lazily, so a busy mount cannot stop that) and ends it.
It is mounted with ``direct_io``: no page cache stands between the node's
``sendfile`` and the bad sector.

A control file line is ``read <file name> <offset>``: reads of any file
of that name that reach ``offset`` fail; or ``write <name prefix>
<offset>``: writes reaching ``offset`` of any file whose name starts so
fail (a fetch's temporary file has a random name after the digest);
``stuck <name prefix> <offset>``: such writes take no byte and say so
(they return 0, as no sane disk does);
or ``quota - <bytes>``: the files may hold that many bytes in all, writes
past it fail with ``ENOSPC`` and ``statfs`` counts from it. A claim of
space ahead succeeds and reserves nothing, as on a thin-provisioned disk,
so a writer learns that the disk is full only from a write. (fusepy has
no ``fallocate``, so glibc's ``posix_fallocate`` claims the space by
writing one zero byte per block; with a quota, those writes are taken
and dropped.)
"""

from __future__ import annotations

import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from support.processes import stop_process

__all__ = ["FaultyFs", "unavailable_reason"]

_MOUNT_TIMEOUT = 20.0


def unavailable_reason() -> str | None:
    """Why a FUSE filesystem cannot be mounted here, or ``None``."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if ctypes.util.find_library("fuse") is None:
        return "libfuse2 is not installed (Debian package libfuse2)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"fusepy cannot be loaded: {exc}"
    if os.geteuid() != 0 and shutil.which("fusermount") is None:
        return "not root, and no fusermount to mount as a user"
    return None


class FaultyFs:
    """The filesystem, mounted at ``mountpoint`` over ``backing``.

    Args:
        backing: The directory whose files it shows.
        mountpoint: An empty directory.
        control: The fault control file (need not exist).
    """

    def __init__(self, backing: Path, mountpoint: Path, control: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.control = control
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = control.with_name(control.name + ".log")

    def __enter__(self) -> FaultyFs:
        self.heal()
        paths = (self.backing, self.mountpoint, self.control)
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "support.faultyfs", *map(str, paths)],
                cwd=Path(__file__).parent.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            self._wait_mounted()
        except BaseException:
            self._unmount()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._unmount()

    def fail_reads(self, name: str, offset: int) -> None:
        """From now on, reads of files named ``name`` reaching ``offset`` fail."""
        self.control.write_text(f"read {name} {offset}\n")

    def fail_writes(self, prefix: str, offset: int) -> None:
        """From now on, writes reaching ``offset`` of files whose name
        starts with ``prefix`` fail."""
        self.control.write_text(f"write {prefix} {offset}\n")

    def take_nothing(self, prefix: str, offset: int) -> None:
        """From now on, writes reaching ``offset`` of files whose name
        starts with ``prefix`` write nothing and return 0."""
        self.control.write_text(f"stuck {prefix} {offset}\n")

    def limit_to(self, quota: int) -> None:
        """From now on, the files may hold ``quota`` bytes in all."""
        self.control.write_text(f"quota - {quota}\n")

    def heal(self) -> None:
        """Every read and write succeeds again; no quota."""
        self.control.unlink(missing_ok=True)

    def log_text(self) -> str:
        return self._log_path.read_text(errors="replace")

    def _wait_mounted(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self._process.poll() is not None:
                raise RuntimeError(f"faultyfs exited: {self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("faultyfs did not mount in time")
            time.sleep(0.02)

    def _unmount(self) -> None:
        # Lazy: a node still holding files open must not keep it mounted.
        if os.geteuid() == 0:
            command = ["umount", "-l", str(self.mountpoint)]
        else:
            command = ["fusermount", "-u", "-z", str(self.mountpoint)]
        subprocess.run(command, capture_output=True, check=False, timeout=30)
        if self._process is not None:
            stop_process(self._process)


# The filesystem process.


class _Passthrough:
    """fusepy's operations: each done on the backing file, and reads may hit
    a bad sector. Those left out (locks among them) the kernel does itself.
    """

    use_ns = True

    def __init__(self, backing: Path, control: Path) -> None:
        self._backing = str(backing)
        self._control = control

    def __call__(self, op: str, *args: Any) -> Any:
        return getattr(self, op)(*args)

    def _real(self, path: str) -> str:
        return self._backing + path

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = os.lstat(self._real(path))
        keys = (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
            "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
        )  # fmt: skip
        return {key.removesuffix("_ns"): getattr(st, key) for key in keys}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail")
        more = ("f_files", "f_ffree", "f_favail", "f_namemax")
        answer = {key: getattr(st, key) for key in keys + more}
        quota = _quota(self._control)
        if quota is not None:
            free = max(0, quota - self._used_bytes())
            answer["f_blocks"] = quota // st.f_frsize
            answer["f_bfree"] = answer["f_bavail"] = free // st.f_frsize
        return answer

    def _used_bytes(self) -> int:
        # Symbolic links (to a directory on another disk) are not followed.
        return sum(
            os.lstat(os.path.join(directory, name)).st_size
            for directory, _, names in os.walk(self._backing)
            for name in names
        )

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._real(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        os.utime(self._real(path), ns=times)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        os.truncate(self._real(path), length)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), flags)

    def create(self, path: str, mode: int, fi: object = None) -> int:
        # Read and write: whatever the caller's open flags, the kernel
        # sends both through this one descriptor.
        return os.open(self._real(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        bad = _bad_offset(self._control, "read", os.path.basename(path))
        if bad is not None and offset + size > bad:
            raise OSError(errno.EIO, "bad sector")
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        bad = _bad_offset(self._control, "write", os.path.basename(path))
        if bad is not None and offset + len(data) > bad:
            raise OSError(errno.EIO, "bad sector")
        stuck = _bad_offset(self._control, "stuck", os.path.basename(path))
        if stuck is not None and offset + len(data) > stuck:
            return 0
        quota = _quota(self._control)
        if quota is not None and data == b"\0":
            return 1  # a claim of space ahead: over-committed
        if quota is not None:
            growth = offset + len(data) - os.fstat(fh).st_size
            if growth > 0 and self._used_bytes() + growth > quota:
                raise OSError(errno.ENOSPC, "no space left")
        return os.pwrite(fh, data, offset)

    def flush(self, path: str, fh: int) -> None:
        pass

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        os.fsync(fh)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)


def _serve(backing: Path, mountpoint: Path, control: Path) -> None:
    from fuse import FUSE

    FUSE(
        _Passthrough(backing, control),
        str(mountpoint),
        foreground=True,
        nothreads=True,
        direct_io=True,
        fsname="faultyfs",
    )


def _control_lines(control: Path) -> list[str]:
    try:
        return control.read_text().splitlines()
    except FileNotFoundError:
        return []


def _quota(control: Path) -> int | None:
    for line in _control_lines(control):
        operation, _, quota = line.split()
        if operation == "quota":
            return int(quota)
    return None


def _bad_offset(control: Path, operation: str, name: str) -> int | None:
    for line in _control_lines(control):
        bad_operation, bad_name, offset = line.split()
        if bad_operation != operation:
            continue
        matches = name == bad_name if operation == "read" else name.startswith(bad_name)
        if matches:
            return int(offset)
    return None


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))

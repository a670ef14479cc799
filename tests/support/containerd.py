"""A private containerd for tests, driven with ``ctr``.

Each ``Containerd`` is one daemon (Debian's containerd 1.6) with root, state
and sockets in its own work directory, so several can run beside the host's
and beside each other. Plugins that a pull does not need are disabled (CRI,
the snapshotters that probe kernel features, ``opt`` which writes to
/opt/containerd), which keeps start-up fast and offline. Layers are unpacked
with the ``native`` snapshotter, which works on any filesystem.

containerd needs root. ``pull`` runs ``ctr images pull --hosts-dir``, which
reads ``<dir>/<registry host>/hosts.toml`` the way the CRI plugin reads its
``config_path``, so a test sees the same mirror routing as a kubelet pull.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .processes import stop_process

__all__ = ["CONTAINERD_USER_AGENT_PREFIX", "Containerd", "ContainerdStartError"]

CONTAINERD_USER_AGENT_PREFIX = "containerd/"
_START_TIMEOUT = 20.0
_CTR_TIMEOUT = 120.0

_DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
]


class ContainerdStartError(RuntimeError):
    """containerd did not come up; the message carries its log tail."""


def unavailable_reason() -> str | None:
    """Why containerd tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "containerd needs root"
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _socket_path(workdir: Path) -> Path:
    # A unix socket path must fit in 108 bytes; pytest's tmp paths may not.
    socket = workdir / "containerd.sock"
    if len(f"{socket}.ttrpc") < 100:
        return socket
    return Path(tempfile.mkdtemp(prefix="ctd-")) / "containerd.sock"


class Containerd:
    """One containerd daemon; use as a context manager or start/stop."""

    snapshotter = "native"

    def __init__(self, workdir: Path, namespace: str = "tcr-mirror-test") -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.socket = _socket_path(workdir)
        self.log_path = workdir / "containerd.log"
        self._process: subprocess.Popen[bytes] | None = None

    # Lifecycle.

    def start(self) -> None:
        """Starts the daemon and waits until it answers on its socket.

        Raises:
            ContainerdStartError: it exited or did not answer in time.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(self._config())
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ContainerdStartError(self._failure_message())
            if self.socket.exists() and self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise ContainerdStartError(f"no answer in time; {self._failure_message()}")

    def stop(self) -> None:
        """Terminates the daemon (kills it if it lingers); safe to repeat."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)
        if self.socket.parent != self.workdir:
            shutil.rmtree(self.socket.parent, ignore_errors=True)

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # What tests use.

    def ctr(
        self, *args: str, timeout: float = _CTR_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``ctr`` against this daemon; never raises on a non-zero exit."""
        command = [
            "ctr",
            "--address",
            str(self.socket),
            "--namespace",
            self.namespace,
            *args,
        ]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )

    def pull(
        self,
        ref: str,
        hosts_dir: Path,
        *,
        plain_http: bool = True,
        platform: str | None = None,
        all_platforms: bool = False,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Pulls and unpacks ``ref`` using ``hosts_dir`` for registry hosts.

        ``user`` is ``name:password`` for the registry's own auth. The
        result's returncode says whether the pull worked; stderr says why not.
        """
        args = ["images", "pull", "--hosts-dir", str(hosts_dir)]
        args += ["--snapshotter", self.snapshotter]
        if plain_http:
            args.append("--plain-http")
        if platform is not None:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if user is not None:
            args += ["--user", user]
        return self.ctr(*args, ref)

    def images(self) -> dict[str, str]:
        """Image name to target digest, for every image in the namespace."""
        result = self._checked("images", "ls")
        images = {}
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            # REF TYPE DIGEST SIZE ... ; the type is a media type, no spaces.
            if len(fields) >= 3:
                images[fields[0]] = fields[2]
        return images

    def content_digests(self) -> set[str]:
        """Digests of every blob in the content store."""
        result = self._checked("content", "ls", "-q")
        return set(result.stdout.split())

    def read_content(self, digest: str) -> bytes:
        """The bytes of one blob in the content store."""
        command = [
            "ctr",
            "--address",
            str(self.socket),
            "--namespace",
            self.namespace,
            "content",
            "get",
            digest,
        ]
        result = subprocess.run(
            command, capture_output=True, timeout=_CTR_TIMEOUT, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"ctr content get {digest}: {result.stderr!r}")
        return result.stdout

    def forget(self, ref: str) -> None:
        """Removes an image and lets GC drop its content, for a fresh re-pull."""
        # --sync runs garbage collection before returning, so the image's
        # blobs are gone when this returns.
        self._checked("images", "rm", "--sync", ref)

    # Internals.

    def _checked(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.ctr(*args)
        if result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
        return result

    def _answers(self) -> bool:
        return self.ctr("version", timeout=5).returncode == 0

    def _config(self) -> str:
        disabled = ", ".join(f'"{name}"' for name in _DISABLED_PLUGINS)
        work = self.workdir
        return (
            "version = 2\n"
            f'root = "{work / "root"}"\n'
            f'state = "{work / "state"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "\n[grpc]\n"
            f'  address = "{self.socket}"\n'
            "\n[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n'
            "\n[debug]\n"
            '  address = ""\n'
            "\n[metrics]\n"
            '  address = ""\n'
        )

    def _failure_message(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        tail = " | ".join(text.strip().splitlines()[-5:])
        return f"containerd failed to start: {tail}"

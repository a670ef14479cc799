"""``tcr-mirror containerd-config``: point containerd at the node mirror.

containerd (1.5+) reads ``<certs dir>/<registry host>/hosts.toml`` for each
registry it pulls from, and ``<certs dir>/_default/hosts.toml`` for any
registry without a directory of its own. Each ``[host."URL"]`` table is a
mirror, tried in order; the top-level ``server`` is the registry itself,
tried last. When a host differs from the registry, containerd adds
``?ns=<registry>`` to its requests, which is how the node mirror knows the
upstream. Changes to these files take effect without restarting containerd.

So installing the mirror is writing one small file per registry, and
removing it is restoring what was there before. The rules that keep this
safe to run again and again (an init container runs it on every pod start):

- Our files open with ``MARKER``; a file without it is someone else's.
- Before replacing someone else's file we copy it to ``BACKUP_NAME`` beside
  it. A backup is never overwritten: if a foreign file shows up again while
  a backup exists, we stop rather than lose either.
- Writing the same content again changes nothing.
- ``--undo`` restores the backup, or removes our file when there was none,
  and leaves foreign files alone.

The decisions (what to write, which step to take given what is on disk) are
pure functions; the thin layer at the bottom reads and writes the files,
atomically (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tcr_mirror.cli import CliError

__all__ = [
    "BACKUP_NAME",
    "DEFAULT_NAMESPACE",
    "MARKER",
    "HostsConfigError",
    "InstallStep",
    "UndoStep",
    "check_mirror_url",
    "check_registry",
    "install_step",
    "register",
    "render_hosts_toml",
    "undo_step",
]

MARKER = "# Managed by tcr-mirror containerd-config."
BACKUP_NAME = "hosts.toml.tcr-mirror-backup"
HOSTS_NAME = "hosts.toml"
DEFAULT_NAMESPACE = "_default"
DEFAULT_CERTS_DIR = Path("/etc/containerd/certs.d")

# Docker Hub's references say docker.io, but its API lives elsewhere;
# containerd applies the same mapping when ``server`` is left out.
_SERVER_OVERRIDES = {"docker.io": "https://registry-1.docker.io"}
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class HostsConfigError(CliError):
    """Bad input or a state on disk we refuse to touch (one-line message)."""


# Validation (pure).


def check_registry(name: str) -> str:
    """Checks a registry host namespace: ``host[:port]`` or ``_default``.

    Returns:
        The name, unchanged.

    Raises:
        HostsConfigError: not a host, an IP address or ``[IPv6]``, with an
            optional port; such a name could escape the certs directory.
    """
    if name == DEFAULT_NAMESPACE:
        return name
    host, port = _split_port(name)
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise HostsConfigError(f"registry {name!r}: bad port {port!r}")
    if not _is_host(host):
        raise HostsConfigError(
            f"registry {name!r} is not host[:port] or {DEFAULT_NAMESPACE}"
        )
    return name


def _split_port(name: str) -> tuple[str, str | None]:
    if name.startswith("["):
        host, bracket, rest = name.partition("]")
        if rest and not rest.startswith(":"):
            return name, None
        return host + bracket, rest[1:] if rest else None
    host, sep, port = name.rpartition(":")
    return (host, port) if sep else (name, None)


def _is_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    labels = host.split(".")
    return len(host) <= 253 and all(_LABEL.match(label) for label in labels)


def check_mirror_url(url: str) -> str:
    """Checks the mirror URL and returns it as ``scheme://host[:port]``.

    Raises:
        HostsConfigError: not http(s), no host, or a path, query, fragment
            or user info (containerd would append ``/v2`` to a path, and the
            mirror serves the API at the root).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HostsConfigError(f"mirror URL {url!r}: {exc}") from None
    hostname = parts.hostname or ""
    valid_host = _is_host(hostname) or _is_ip(hostname)
    if parts.scheme not in ("http", "https") or not valid_host:
        raise HostsConfigError(f"mirror URL {url!r} must be http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise HostsConfigError(f"mirror URL {url!r} must have no path or query")
    if parts.username is not None or parts.password is not None:
        raise HostsConfigError(f"mirror URL {url!r} must not carry credentials")
    host = parts.netloc.rpartition("@")[2]
    if port is None and host.endswith(":"):
        host = host[:-1]
    return f"{parts.scheme}://{host}"


# Rendering (pure).


def _server_for(registry: str) -> str | None:
    """The ``server`` line's URL, or None to let containerd choose.

    ``_default`` has none: containerd then falls back to the registry the
    image names. Loopback registries have none either: containerd's own
    default for them is plain HTTP, which an ``https://`` server would lose.
    """
    if registry == DEFAULT_NAMESPACE:
        return None
    host, _ = _split_port(registry)
    if host == "localhost" or _is_loopback_ip(host.strip("[]")):
        return None
    return _SERVER_OVERRIDES.get(registry, f"https://{registry}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render_hosts_toml(
    registry: str, mirror_url: str, *, skip_verify: bool = False
) -> str:
    """Returns the hosts.toml that sends ``registry``'s pulls to the mirror.

    The mirror may pull and resolve tags (it is a private mirror that
    revalidates tags upstream); pushes go to the registry itself.

    Raises:
        HostsConfigError: ``registry`` or ``mirror_url`` is malformed.
    """
    check_registry(registry)
    mirror = check_mirror_url(mirror_url)
    lines = [
        MARKER,
        "# `tcr-mirror containerd-config --undo` restores what was here before.",
    ]
    server = _server_for(registry)
    if server is not None:
        lines.append(f"server = {_toml_string(server)}")
    lines += [
        "",
        f"[host.{_toml_string(mirror)}]",
        '  capabilities = ["pull", "resolve"]',
    ]
    if skip_verify:
        lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


def is_ours(content: str) -> bool:
    """Whether a hosts.toml was written by this command."""
    return content.startswith(MARKER)


# Decisions (pure).


class InstallStep(enum.Enum):
    """What installing does to one registry's hosts.toml."""

    UNCHANGED = "unchanged"
    CREATE = "create"
    REPLACE_OURS = "replace ours"
    BACKUP_AND_REPLACE = "back up and replace"


class UndoStep(enum.Enum):
    """What ``--undo`` does to one registry's hosts.toml."""

    NOTHING = "nothing to undo"
    REMOVE = "remove ours"
    RESTORE = "restore backup"
    LEAVE_FOREIGN = "leave foreign file"


def install_step(current: str | None, has_backup: bool, desired: str) -> InstallStep:
    """Decides how to install ``desired`` over ``current`` (None: no file).

    Raises:
        HostsConfigError: a foreign file is there and a backup of an earlier
            one already exists; replacing it would lose one of the two.
    """
    if current == desired:
        return InstallStep.UNCHANGED
    if current is None:
        return InstallStep.CREATE
    if is_ours(current):
        return InstallStep.REPLACE_OURS
    if has_backup:
        raise HostsConfigError(
            f"a foreign {HOSTS_NAME} appeared after {BACKUP_NAME} was made; "
            "move one of them away first"
        )
    return InstallStep.BACKUP_AND_REPLACE


def undo_step(current: str | None, has_backup: bool) -> UndoStep:
    """Decides how to undo, given the current file (None: no file)."""
    if current is not None and not is_ours(current):
        return UndoStep.LEAVE_FOREIGN
    if has_backup:
        return UndoStep.RESTORE
    if current is not None:
        return UndoStep.REMOVE
    return UndoStep.NOTHING


# Files.


@dataclass(frozen=True)
class _HostDir:
    """One registry's directory under the certs dir."""

    path: Path

    @property
    def hosts(self) -> Path:
        return self.path / HOSTS_NAME

    @property
    def backup(self) -> Path:
        return self.path / BACKUP_NAME

    def read_hosts(self) -> str | None:
        return _read_text(self.hosts)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostsConfigError(f"cannot read {path}: {exc.strerror}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` so readers see old or new, never half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise HostsConfigError(f"cannot write {path}: {exc.strerror}") from None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise HostsConfigError(f"cannot remove {path}: {exc.strerror}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(host_dir: _HostDir, desired: str, *, dry_run: bool) -> InstallStep:
    """Brings one registry's hosts.toml to ``desired``; returns the step."""
    current = host_dir.read_hosts()
    step = install_step(current, host_dir.backup.exists(), desired)
    if dry_run or step is InstallStep.UNCHANGED:
        return step

    # The backup is complete on disk before the original is replaced.
    if step is InstallStep.BACKUP_AND_REPLACE:
        _write_atomic(host_dir.backup, host_dir.hosts.read_bytes())
    _write_atomic(host_dir.hosts, desired.encode())
    return step


def undo(host_dir: _HostDir, *, dry_run: bool) -> UndoStep:
    """Restores or removes one registry's hosts.toml; returns the step."""
    step = undo_step(host_dir.read_hosts(), host_dir.backup.exists())
    if dry_run:
        return step
    if step is UndoStep.RESTORE:
        _write_atomic(host_dir.hosts, host_dir.backup.read_bytes())
        _remove(host_dir.backup)
    elif step is UndoStep.REMOVE:
        _remove(host_dir.hosts)
        # The directory was most likely ours too; keep it if anything is left.
        if not any(host_dir.path.iterdir()):
            host_dir.path.rmdir()
    return step


def _managed_registries(certs_dir: Path) -> list[str]:
    """Registries under ``certs_dir`` with our file or our backup."""
    if not certs_dir.is_dir():
        return []
    found = []
    for path in sorted(certs_dir.iterdir()):
        host_dir = _HostDir(path)
        current = _read_text(host_dir.hosts) if path.is_dir() else None
        if host_dir.backup.exists() or (current is not None and is_ours(current)):
            found.append(path.name)
    return found


# Command line.


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "containerd-config",
        help="write (or undo) containerd hosts.toml files that use the mirror",
        description="Write CERTS_DIR/REGISTRY/hosts.toml for each REGISTRY "
        "(host[:port], or _default for every registry without its own "
        "directory) so that containerd pulls through the node mirror and "
        "falls back to the registry itself. An existing foreign hosts.toml "
        f"is kept as {BACKUP_NAME}; --undo puts it back.",
    )
    parser.add_argument("registries", nargs="*", metavar="REGISTRY")
    parser.add_argument(
        "--certs-dir",
        type=Path,
        default=DEFAULT_CERTS_DIR,
        help=f"containerd's registry config_path ({DEFAULT_CERTS_DIR})",
    )
    parser.add_argument("--mirror", metavar="URL", help="e.g. http://127.0.0.1:5000")
    parser.add_argument(
        "--skip-verify",
        action="store_true",
        help="do not verify the mirror's TLS certificate (https mirrors)",
    )
    parser.add_argument(
        "--undo",
        action="store_true",
        help="restore the backups or remove our files (all of ours when no "
        "REGISTRY is given)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would change; change nothing"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand; returns the exit status."""
    certs_dir: Path = args.certs_dir
    registries = list(dict.fromkeys(check_registry(r) for r in args.registries))
    if args.undo:
        return _run_undo(certs_dir, registries, dry_run=args.dry_run)
    if args.mirror is None:
        raise HostsConfigError("--mirror URL is required (or use --undo)")
    if not registries:
        raise HostsConfigError("name at least one REGISTRY (or _default)")
    return _run_install(certs_dir, registries, args)


def _run_install(
    certs_dir: Path, registries: Sequence[str], args: argparse.Namespace
) -> int:
    # Render everything first so bad input changes nothing at all.
    planned = [
        (
            registry,
            render_hosts_toml(registry, args.mirror, skip_verify=args.skip_verify),
        )
        for registry in registries
    ]
    for registry, desired in planned:
        host_dir = _HostDir(certs_dir / registry)
        step = install(host_dir, desired, dry_run=args.dry_run)
        _report(step.value, host_dir.hosts, dry_run=args.dry_run)
        if args.dry_run and step is not InstallStep.UNCHANGED:
            sys.stdout.write(desired)
    return 0


def _run_undo(certs_dir: Path, registries: Sequence[str], *, dry_run: bool) -> int:
    for registry in registries or _managed_registries(certs_dir):
        host_dir = _HostDir(certs_dir / registry)
        step = undo(host_dir, dry_run=dry_run)
        _report(step.value, host_dir.hosts, dry_run=dry_run)
    return 0


def _report(step: str, path: Path, *, dry_run: bool) -> None:
    prefix = "dry run: " if dry_run else ""
    print(f"{prefix}{step}: {path}")

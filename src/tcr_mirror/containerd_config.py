"""``tcr-mirror containerd-config``: point containerd at the node mirror.

containerd (1.5+) finds a registry's configuration under its ``config_path``
by trying ``host_port_`` (the spelling of ``host:port`` for file systems
without colons), then ``host:port``, then ``_default``, and it takes the
first directory that exists, whatever is in it. There it reads
``hosts.toml``; only when that is missing, empty or invalid does it use the
Docker-style certificate files beside it instead (``*.crt`` CAs and
``*.cert``/``*.key`` client pairs). Each ``[host."URL"]`` table is a mirror,
tried in order; the top-level ``server`` and its settings are the registry
itself, tried last. For a host other than the registry containerd adds
``?ns=<registry>``, which is how the node mirror knows the upstream.
Changes take effect without restarting containerd.

So installing is writing one ``hosts.toml``, in the directory containerd
picks, that is the configuration it replaces with our mirror put first:
the server, its TLS and header settings, the other hosts and the
certificate files all carry over, so the fallback to the registry works as
it did. Removing is putting back what was there before.

An init container runs this on every pod start and may die at any point,
so every change is one rename (or link) and every state between two of
them is one the next run recognises (F and G are foreign files, B a
backup)::

    hosts.toml  backup   install               --undo
    none        none     create                nothing
    ours        none     replace ours          remove ours
    ours        B        replace ours          restore B (one rename)
    none        B        create, keep B        restore B
    F           none     back up, replace      leave F
    F           F        replace               drop the extra backup
    G           B        refuse: both matter   leave both

Our files open with ``MARKER``. A directory we create is built under a
temporary name and renamed into place, and our file in it says so, because
an empty directory is not nothing to containerd (it hides ``_default``);
``--undo`` renames such a directory away before deleting it. Temporary
names start with ``.tcr-mirror-tmp-``, which containerd never reads, and
each run sweeps what a crashed one left, holding a lock on the certs
directory so that it never sweeps a live run's files.

The decisions (what to write, which step to take given what is on disk)
are pure functions; the layer below them reads and writes the files.
"""

# TODO: Move the pure parts (carry-over, rendering, decisions) into a module
# of their own; this one grew past the 600 lines the style guide allows when
# the carry-over came in, in a change that had to stay within this file.

from __future__ import annotations

import argparse
import enum
import fcntl
import functools
import ipaddress
import os
import re
import secrets
import shutil
import stat
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tcr_mirror.cli import CliError

__all__ = [
    "BACKUP_NAME",
    "DEFAULT_NAMESPACE",
    "MARKER",
    "Carried",
    "HostsConfigError",
    "InstallStep",
    "UndoStep",
    "carry_over",
    "check_mirror_url",
    "check_registry",
    "host_dir_names",
    "install_step",
    "is_ours",
    "redact",
    "register",
    "render_hosts_toml",
    "undo_step",
]

MARKER = "# Managed by tcr-mirror containerd-config."
_UNDO_LINE = "# `tcr-mirror containerd-config --undo` restores what was here before."
_CREATED_LINE = "# tcr-mirror created this directory; --undo removes it."
BACKUP_NAME = "hosts.toml.tcr-mirror-backup"
HOSTS_NAME = "hosts.toml"
DEFAULT_NAMESPACE = "_default"
DEFAULT_CERTS_DIR = Path("/etc/containerd/certs.d")
_TMP_PREFIX = ".tcr-mirror-tmp-"
_FILE_MODE = 0o644
_DIR_MODE = 0o755

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
    shown = redact(name)
    # isdigit() alone lets through "¹", which int() refuses, and "١",
    # which int() reads as 1.
    ascii_digits = port is not None and port.isascii() and port.isdigit()
    if port is not None and not (ascii_digits and 0 < int(port) < 65536):
        raise HostsConfigError(f"registry {shown!r}: bad port {redact(port)!r}")
    if not _is_host(host):
        raise HostsConfigError(
            f"registry {shown!r} is not host[:port] or {DEFAULT_NAMESPACE}"
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
            mirror serves the API at the root). The message never shows
            the URL's user info.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        # urlsplit's messages may quote the netloc, user info and all.
        detail = "" if _user_info(url) else f" ({exc})"
        raise _bad_mirror(url, f"is not a URL{detail}") from None
    hostname = parts.hostname or ""
    valid_host = _is_host(hostname) or _is_ip(hostname)
    if parts.scheme not in ("http", "https") or not valid_host:
        raise _bad_mirror(url, "must be http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _bad_mirror(url, "must have no path or query")
    if parts.username is not None or parts.password is not None:
        raise _bad_mirror(url, "must not carry credentials")
    host = parts.netloc.rpartition("@")[2]
    if port is None and host.endswith(":"):
        host = host[:-1]
    return f"{parts.scheme}://{host}"


def _bad_mirror(url: str, problem: str) -> HostsConfigError:
    return HostsConfigError(f"mirror URL {redact(url)!r} {problem}")


def _user_info(text: str) -> str:
    _, sep, rest = text.partition("://")
    return (rest if sep else text).rpartition("@")[0]


def redact(text: str) -> str:
    """Returns a URL or host name with its user info replaced by ``***``.

    This works on strings that ``urlsplit`` rejects, which are the ones that
    end up in error messages: everything between ``://`` (or the start) and
    the last ``@`` goes, so a password with a stray ``/`` or ``#`` in it
    goes too.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if "@" not in rest:
        return text
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def host_dir_names(registry: str) -> tuple[str, ...]:
    """The directories containerd tries for ``registry``, in its order.

    containerd spells the last ``:`` as ``_`` and appends ``_``
    (``hostDirectory`` in remotes/docker/config/hosts.go), and tries that
    name first; the first one that exists is the one it reads. (It then
    tries ``_default``, but a registry named here gets its own directory.)
    """
    colon = registry.rfind(":")
    if colon <= 0:
        return (registry,)
    return (f"{registry[:colon]}_{registry[colon + 1 :]}_", registry)


# What the replaced configuration carries over (pure).

_CAPABILITIES = frozenset({"pull", "resolve", "push"})
# Go's time.ParseDuration, which containerd applies to dial_timeout ("" is
# left unset).
_GO_DURATION = re.compile(
    r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+|[-+]?0|"
)


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_capabilities(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, str) and item.lower() in _CAPABILITIES for item in value
    )


def _is_paths(value: object) -> bool:
    return isinstance(value, str) or _is_strings(value)


def _is_client(value: object) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(item, str) or (_is_strings(item) and len(item) == 2)
        for item in value
    )


def _is_header(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(item, str) or _is_strings(item) for item in value.values()
    )


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_duration(value: object) -> bool:
    return isinstance(value, str) and _GO_DURATION.fullmatch(value) is not None


# The per-host settings containerd reads, each with the check it applies;
# a value failing one makes containerd drop the whole file. It ignores
# other keys, and so do we.
_SETTINGS: dict[str, Callable[[object], bool]] = {
    "capabilities": _is_capabilities,
    "ca": _is_paths,
    "client": _is_client,
    "skip_verify": _is_bool,
    "header": _is_header,
    "override_path": _is_bool,
    "dial_timeout": _is_duration,
}


@dataclass(frozen=True)
class Carried:
    """What containerd used from the configuration about to be replaced.

    Attributes:
        server: the ``server`` URL, verbatim; None when there was none.
        settings: the server's own settings (the top-level keys).
        hosts: the ``[host."URL"]`` entries and their settings, in order.
    """

    server: str | None = None
    settings: Mapping[str, object] = field(default_factory=dict)
    hosts: tuple[tuple[str, Mapping[str, object]], ...] = ()


def carry_over(original: bytes | None, cert_files: Sequence[str] = ()) -> Carried:
    """Reads what containerd made of a registry's directory.

    Args:
        original: the foreign hosts.toml there, or None if there is none.
        cert_files: the sorted names of the directory's non-directories.

    Returns:
        The file's server, settings and hosts if containerd would use the
        file; otherwise the certificate files as the server's ``ca`` and
        ``client``, which is what containerd does then. Relative paths stay
        relative: containerd resolves them against the directory, which is
        the one we write to, and the init container may see it under
        another mount point than containerd does.
    """
    if original:
        carried = _parse_hosts_toml(original)
        if carried is not None:
            return carried
    return _from_cert_files(cert_files)


def _parse_hosts_toml(data: bytes) -> Carried | None:
    try:
        document = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    server = document.get("server", "")
    tables = document.get("host", {})
    settings = _settings(document)
    if settings is None or not isinstance(server, str) or not isinstance(tables, dict):
        return None
    # containerd 1.6 also gave up on a file without any [host] table and
    # used the certificate files; later versions read it, and so do we.
    # TODO: Skip host entries written as dotted keys or inline tables:
    # containerd 1.7+ lists hosts by their [host."URL"] headers only, so it
    # never used them, but we carry them over as if it had.
    hosts = []
    for url, table in tables.items():
        host = _settings(table)
        if host is None:
            return None
        hosts.append((url, host))
    if not server:
        # containerd ignores override_path without a server; beside the
        # server we write, it would cut /v2 off the registry's URL.
        settings.pop("override_path", None)
    return Carried(server or None, settings, tuple(hosts))


def _settings(table: object) -> dict[str, object] | None:
    if not isinstance(table, dict):
        return None
    found = {key: table[key] for key in _SETTINGS if key in table}
    if all(_SETTINGS[key](value) for key, value in found.items()):
        return found
    return None


def _from_cert_files(names: Sequence[str]) -> Carried:
    present = set(names)
    settings: dict[str, object] = {}
    cas = [name for name in names if name.endswith(".crt")]
    clients = [_client(name, present) for name in names if name.endswith(".cert")]
    if cas:
        settings["ca"] = cas
    if clients:
        settings["client"] = clients
    return Carried(settings=settings)


def _client(cert: str, present: set[str]) -> str | list[str]:
    # Without a .key beside it containerd reads the key from the .cert too,
    # which is what a lone string means in hosts.toml.
    key = cert.removesuffix(".cert") + ".key"
    return [cert, key] if key in present else cert


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


# TOML basic strings must escape quotes, backslashes and control characters.
_TOML_ESCAPES = {code: f"\\u{code:04x}" for code in (*range(0x20), 0x7F)}
_TOML_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n"})


def _toml_string(value: str) -> str:
    try:
        value.encode()
    except UnicodeEncodeError:
        # Only a file name can be undecodable; TOML has no way to spell it.
        raise HostsConfigError(
            "cannot carry over a file name that is not UTF-8 into hosts.toml"
        ) from None
    return f'"{value.translate(_TOML_ESCAPES)}"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _setting_lines(
    settings: Mapping[str, object], indent: str, *, redact_secrets: bool
) -> list[str]:
    lines = []
    for key, value in settings.items():
        if key == "header" and redact_secrets and isinstance(value, dict):
            value = dict.fromkeys(value, "***")
        lines.append(f"{indent}{key} = {_toml_value(value)}")
    return lines


def render_hosts_toml(
    registry: str,
    mirror_url: str,
    *,
    skip_verify: bool = False,
    carried: Carried | None = None,
    created_dir: bool = False,
    redact_secrets: bool = False,
) -> str:
    """Returns the hosts.toml that sends ``registry``'s pulls to the mirror.

    The mirror may pull and resolve tags (it is a private mirror that
    revalidates tags upstream); pushes go to the registry itself.

    Args:
        registry: ``host[:port]`` or ``_default``.
        mirror_url: the node mirror, ``http(s)://host[:port]``.
        skip_verify: do not verify the mirror's TLS certificate.
        carried: the configuration replaced (see ``carry_over``); it is
            kept whole, after the mirror.
        created_dir: say in the file that the directory is ours to remove.
        redact_secrets: write header values and the user info of URLs as
            ``***``, for showing the file.

    Raises:
        HostsConfigError: ``registry`` or ``mirror_url`` is malformed.
    """
    check_registry(registry)
    mirror = check_mirror_url(mirror_url)
    carried = carried or Carried()
    show = functools.partial(_setting_lines, redact_secrets=redact_secrets)
    url: Callable[[str], str] = redact if redact_secrets else str
    lines = [MARKER, _UNDO_LINE, *([_CREATED_LINE] if created_dir else [])]
    server = carried.server or _server_for(registry)
    if server is not None:
        lines.append(f"server = {_toml_string(url(server))}")
    lines += show(carried.settings, "")

    # The mirror gets none of the registry's TLS or header settings: its CA
    # and client certificates are the registry's identity and the node's
    # identity to the registry, and its headers often carry credentials that
    # should reach only the registry (the mirror pulls with its own).
    lines += ["", f"[host.{_toml_string(mirror)}]"]
    lines.append('  capabilities = ["pull", "resolve"]')
    if skip_verify:
        lines.append("  skip_verify = true")
    for host, settings in carried.hosts:
        if host != mirror:
            lines += ["", f"[host.{_toml_string(url(host))}]", *show(settings, "  ")]
    return "\n".join(lines) + "\n"


def is_ours(content: bytes) -> bool:
    """Whether a hosts.toml was written by this command."""
    return content.startswith(MARKER.encode())


def _says_created(content: bytes | None) -> bool:
    if content is None or not is_ours(content):
        return False
    return _CREATED_LINE.encode() in content.splitlines()[:3]


# Decisions (pure).


class InstallStep(enum.Enum):
    """What installing does to one registry's hosts.toml."""

    UNCHANGED = "unchanged"
    CREATE = "create"
    REPLACE_OURS = "replace ours"
    BACKUP_AND_REPLACE = "back up and replace"
    FINISH_REPLACE = "replace (backup already made)"


class UndoStep(enum.Enum):
    """What ``--undo`` does to one registry's hosts.toml."""

    NOTHING = "nothing to undo"
    REMOVE = "remove ours"
    RESTORE = "restore backup"
    DROP_BACKUP = "remove the backup of an unfinished install"
    LEAVE_FOREIGN = "leave foreign file"


def install_step(
    current: bytes | None, backup: bytes | None, desired: bytes
) -> InstallStep:
    """Decides how to install ``desired`` (None: no such file).

    Raises:
        HostsConfigError: a foreign file is there and a backup of another
            one already exists; replacing it would lose one of the two.
    """
    if current == desired:
        return InstallStep.UNCHANGED
    if current is None:
        return InstallStep.CREATE
    if is_ours(current):
        return InstallStep.REPLACE_OURS
    if backup is None:
        return InstallStep.BACKUP_AND_REPLACE
    if backup == current:
        return InstallStep.FINISH_REPLACE
    raise HostsConfigError(
        f"a foreign {HOSTS_NAME} appeared after {BACKUP_NAME} was made; "
        "move one of them away first"
    )


def undo_step(current: bytes | None, backup: bytes | None) -> UndoStep:
    """Decides how to undo, given the two files (None: no such file)."""
    if current is not None and not is_ours(current):
        return UndoStep.DROP_BACKUP if backup == current else UndoStep.LEAVE_FOREIGN
    if backup is not None:
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
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


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
        _write_file(tmp / HOSTS_NAME, data, _FILE_MODE, None)
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


# Plans: the decisions, taken on what is on disk.


@dataclass(frozen=True)
class _Install:
    host_dir: _HostDir
    step: InstallStep
    desired: bytes
    shown: str
    created_dir: bool


@dataclass(frozen=True)
class _Undo:
    host_dir: _HostDir
    step: UndoStep
    remove_dir: bool


def _plan_install(
    host_dir: _HostDir, registry: str, mirror: str, *, skip_verify: bool
) -> _Install:
    current, backup = host_dir.read_hosts(), host_dir.read_backup()
    ours = current is not None and is_ours(current)
    # What containerd read before our first install: the backup if we made
    # one, else a foreign file, else (None) the certificate files.
    original = backup if backup is not None or ours else current
    if ours:
        created = _says_created(current)
    else:
        created = current is None and backup is None and not host_dir.path.exists()
    render = functools.partial(
        render_hosts_toml,
        registry,
        mirror,
        skip_verify=skip_verify,
        carried=carry_over(original, host_dir.cert_files()),
        created_dir=created,
    )
    desired = render().encode()
    step = install_step(current, backup, desired)
    return _Install(host_dir, step, desired, render(redact_secrets=True), created)


def _apply_install(plan: _Install) -> None:
    host_dir = plan.host_dir
    if plan.step is InstallStep.UNCHANGED:
        return
    if plan.step is InstallStep.CREATE and plan.created_dir:
        _create_dir(host_dir.path, plan.desired)
        return
    if plan.step is InstallStep.BACKUP_AND_REPLACE:
        _back_up(host_dir)
    mode, owner = _mode_and_owner(host_dir.hosts, host_dir.backup)
    _write_atomic(host_dir.hosts, plan.desired, mode, owner)


def _plan_undo(host_dir: _HostDir) -> _Undo:
    current = host_dir.read_hosts()
    step = undo_step(current, host_dir.read_backup())
    # Our directory goes only if nothing else has moved in since.
    remove_dir = (
        step is UndoStep.REMOVE
        and _says_created(current)
        and [p.name for p in host_dir.path.iterdir()] == [HOSTS_NAME]
    )
    return _Undo(host_dir, step, remove_dir)


def _apply_undo(plan: _Undo) -> None:
    host_dir = plan.host_dir
    if plan.remove_dir:
        _remove_dir(host_dir.path)
        return
    if plan.step is UndoStep.RESTORE:
        # One rename: the original is back, inode, mode, owner and all, and
        # the backup is gone, with no state in between.
        os.rename(host_dir.backup, host_dir.hosts)
    elif plan.step is UndoStep.DROP_BACKUP:
        os.unlink(host_dir.backup)
    elif plan.step is UndoStep.REMOVE:
        os.unlink(host_dir.hosts)
    else:
        return
    _fsync_dir(host_dir.path)


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


# Command line.


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "containerd-config",
        help="write (or undo) containerd hosts.toml files that use the mirror",
        description="Write hosts.toml for each REGISTRY (host[:port], or "
        "_default for every registry without its own directory) in the "
        "directory of CERTS_DIR containerd reads for it, so that containerd "
        "pulls through the node mirror and falls back to the registry "
        "itself with the settings it had. An existing foreign hosts.toml "
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
    """Entry point of the subcommand; returns the exit status.

    Raises:
        HostsConfigError: bad input, a state on disk we refuse to touch, or
            a file system error, each as one line.
    """
    certs_dir: Path = args.certs_dir
    registries = list(dict.fromkeys(check_registry(r) for r in args.registries))
    try:
        if args.undo:
            return _run_undo(certs_dir, registries, dry_run=args.dry_run)
        if args.mirror is None:
            raise HostsConfigError("--mirror URL is required (or use --undo)")
        if not registries:
            raise HostsConfigError("name at least one REGISTRY (or _default)")
        check_mirror_url(args.mirror)
        return _run_install(certs_dir, registries, args)
    except OSError as exc:
        where = exc.filename or certs_dir
        reason = exc.strerror or str(exc)
        raise HostsConfigError(f"cannot update {where}: {reason}") from None


def _run_install(
    certs_dir: Path, registries: Sequence[str], args: argparse.Namespace
) -> int:
    dry_run: bool = args.dry_run
    with _locked(certs_dir, create=not dry_run):
        if not dry_run:
            _sweep(certs_dir)
        # Plan everything first, so that a refusal changes nothing at all.
        plans = []
        for registry in registries:
            active, hidden = _registry_dirs(certs_dir, registry)
            if not dry_run:
                for path in (active, *hidden):
                    _sweep(path)
            # A directory containerd does not read keeps none of our files,
            # so that none comes back to life if the one it reads goes.
            undos = [_plan_undo(_HostDir(path)) for path in hidden]
            install = _plan_install(
                _HostDir(active), registry, args.mirror, skip_verify=args.skip_verify
            )
            plans.append((install, undos))

        for install, undos in plans:
            if not dry_run:
                _apply_install(install)
            _report(install.step.value, install.host_dir.hosts, dry_run=dry_run)
            if dry_run and install.step is not InstallStep.UNCHANGED:
                sys.stdout.write(install.shown)
            for undo in undos:
                _undo_one(undo, dry_run=dry_run, quiet=True)
    return 0


def _run_undo(certs_dir: Path, registries: Sequence[str], *, dry_run: bool) -> int:
    with _locked(certs_dir, create=False):
        if not dry_run:
            _sweep(certs_dir)
        if registries:
            paths = [p for r in registries for p in _existing_dirs(certs_dir, r)]
        else:
            paths = _managed_dirs(certs_dir)
        for path in paths:
            if not dry_run:
                _sweep(path)
            plan = _plan_undo(_HostDir(path)) if path.is_dir() else None
            if plan is None:
                _report(UndoStep.NOTHING.value, path / HOSTS_NAME, dry_run=dry_run)
            else:
                _undo_one(plan, dry_run=dry_run, quiet=False)
    return 0


def _undo_one(plan: _Undo, *, dry_run: bool, quiet: bool) -> None:
    if not dry_run:
        _apply_undo(plan)
    idle = plan.step in (UndoStep.NOTHING, UndoStep.LEAVE_FOREIGN)
    if not (quiet and idle):
        _report(plan.step.value, plan.host_dir.hosts, dry_run=dry_run)


def _report(step: str, path: Path, *, dry_run: bool) -> None:
    prefix = "dry run: " if dry_run else ""
    print(f"{prefix}{step}: {path}")

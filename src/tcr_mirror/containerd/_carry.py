"""What a replaced configuration carries over: containerd's reading of it."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ._errors import HostsConfigError
from ._toml_headers import _header_keys

__all__ = ["Carried", "carry_over", "rebased"]


_CAPABILITIES = frozenset({"pull", "resolve", "push"})
# Go's time.ParseDuration, which containerd applies to dial_timeout ("" is
# left unset).
_GO_DURATION = re.compile(
    r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+|[-+]?0|"
)

_TOML_ERROR_AT = re.compile(r"\(at (line \d+, column \d+|end of document)\)$")


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
        hosts: the host entries named by a table header (``[host."URL"]``,
            or only a sub-table such as ``[host."URL".header]``) and their
            settings, in order; every containerd tries them.
        unlisted: the host entries written only as dotted keys or inline
            tables, in order; containerd 1.5 to 1.7 try them, 2.0+ does
            not.
    """

    server: str | None = None
    settings: Mapping[str, object] = field(default_factory=dict)
    hosts: tuple[tuple[str, Mapping[str, object]], ...] = ()
    unlisted: tuple[tuple[str, Mapping[str, object]], ...] = ()


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

    Raises:
        HostsConfigError: the file is not UTF-8 TOML that tomllib can read.
            containerd's parser accepts some such files (a byte order mark,
            for one), so what containerd made of it is unknown, and
            replacing it could silently change the fallback to the registry.
    """
    if original:
        carried = _parse_hosts_toml(original)
        if carried is not None:
            return carried
    return _from_cert_files(cert_files)


def _parse_hosts_toml(data: bytes) -> Carried | None:
    text, document = _decode(data)
    server = document.get("server", "")
    tables = document.get("host", {})
    settings = _settings(document)
    if settings is None or not isinstance(server, str) or not isinstance(tables, dict):
        return None
    # containerd 1.6 also gave up on a file without any [host] table and
    # used the certificate files; later versions read it, and so do we.

    # Which hosts containerd tries depends on its version: 2.0+ lists them
    # by their table headers (getSortedHosts in remotes/docker/config/
    # hosts.go), so it never sees an entry written as a dotted key or an
    # inline table, while 1.5 to 1.7 list every key of the host table. Those
    # entries are kept apart, to be written in a form that only the older
    # versions read. One that 1.x would refuse makes us refuse the file, as
    # 1.x does, although 2.0+ would not have looked at it.
    listed = _listed_hosts(text)
    hosts: list[tuple[str, Mapping[str, object]]] = []
    unlisted: list[tuple[str, Mapping[str, object]]] = []
    for url, table in tables.items():
        host = _settings(table)
        if host is None:
            return None
        (hosts if url in listed else unlisted).append((url, host))
    if not server:
        # Without a server containerd gives the registry the /v2 path and
        # every capability whatever the file says; beside the server we
        # write, override_path would cut /v2 off the registry's URL and
        # capabilities could take push (or pull) away from it.
        settings.pop("override_path", None)
        settings.pop("capabilities", None)
    return Carried(server or None, settings, tuple(hosts), tuple(unlisted))


def _decode(data: bytes) -> tuple[str, dict[str, object]]:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise HostsConfigError("not UTF-8") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Only the position: the rest of tomllib's message may quote a key,
        # and host keys are URLs that may hold a password.
        where = _TOML_ERROR_AT.search(str(exc))
        at = f" ({where[1]})" if where else ""
        raise HostsConfigError(f"not valid TOML{at}") from None
    except RecursionError:
        # tomllib recurses once for each array or inline table it opens.
        raise HostsConfigError("nested too deeply for tomllib") from None


def _listed_hosts(text: str) -> set[str]:
    """The hosts that containerd 2.0+ finds: each named in a table header."""
    keys = _header_keys(text)
    return {parts[1] for parts in keys if len(parts) > 1 and parts[0] == "host"}


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


def rebased(carried: Carried, base: str) -> Carried:
    """``carried`` read from another directory, for a file in this one.

    containerd resolves a relative ``ca`` or ``client`` path against the
    directory of the hosts.toml naming it, so each gets ``base`` (that
    directory, relative to this one) in front; absolute ones stay.
    """

    def move(settings: Mapping[str, object]) -> dict[str, object]:
        moved = dict(settings)
        for key in ("ca", "client"):
            if key in moved:
                moved[key] = _rebase_paths(moved[key], base)
        return moved

    return Carried(
        carried.server,
        move(carried.settings),
        tuple((url, move(host)) for url, host in carried.hosts),
        tuple((url, move(host)) for url, host in carried.unlisted),
    )


def _rebase_paths(value: object, base: str) -> object:
    if isinstance(value, list):
        return [_rebase_paths(item, base) for item in value]
    if isinstance(value, str) and not value.startswith("/"):
        return f"{base}/{value}"
    return value


def _client(cert: str, present: set[str]) -> str | list[str]:
    # Without a .key beside it containerd reads the key from the .cert too,
    # which is what a lone string means in hosts.toml.
    key = cert.removesuffix(".cert") + ".key"
    return [cert, key] if key in present else cert

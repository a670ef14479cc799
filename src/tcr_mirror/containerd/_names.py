"""Registry host namespaces and the mirror URL, checked before any use."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from tcr_mirror._redact import _user_info, redact

from ._errors import HostsConfigError

__all__ = ["DEFAULT_NAMESPACE", "check_mirror_url", "check_registry"]


DEFAULT_NAMESPACE = "_default"
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


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
    if port == 0:
        raise _bad_mirror(url, "has port 0, which no mirror listens on")
    host = parts.netloc.rpartition("@")[2]
    if port is None and host.endswith(":"):
        host = host[:-1]
    return f"{parts.scheme}://{host}"


def _bad_mirror(url: str, problem: str) -> HostsConfigError:
    return HostsConfigError(f"mirror URL {redact(url)!r} {problem}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

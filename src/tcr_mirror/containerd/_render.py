"""The hosts.toml we write: the mirror first, then what it replaces."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping, Sequence

from tcr_mirror._redact import redact

from ._carry import Carried
from ._errors import HostsConfigError
from ._names import DEFAULT_NAMESPACE, _split_port, check_mirror_url, check_registry

__all__ = ["MARKER", "is_ours", "render_hosts_toml"]


MARKER = "# Managed by tcr-mirror containerd-config."
_UNDO_LINE = "# `tcr-mirror containerd-config --undo` restores what was here before."
_CREATED_LINE = "# tcr-mirror created this directory; --undo removes it."


# Docker Hub's references say docker.io, but its API lives elsewhere;
# containerd applies the same mapping when ``server`` is left out.
_SERVER_OVERRIDES = {"docker.io": "https://registry-1.docker.io"}


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


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A host without settings, as containerd reads it; a dotted key needs a value.
_NO_SETTINGS = {"capabilities": ["pull", "resolve", "push"]}

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
    settings: Mapping[str, object], prefix: str, *, redact_secrets: bool
) -> list[str]:
    lines = []
    for key, value in settings.items():
        if key == "header" and redact_secrets and isinstance(value, dict):
            value = dict.fromkeys(value, "***")
        lines.append(f"{prefix}{key} = {_toml_value(value)}")
    return lines


def _unlisted_lines(
    hosts: Sequence[tuple[str, Mapping[str, object]]], *, redact_secrets: bool
) -> list[str]:
    """The hosts only containerd 1.5 to 1.7 tries, as they still read them.

    They go under ``[host]`` as dotted keys, which 2.0+ passes over as it did
    before. 1.x sorts hosts by line, so these come after the mirror; an
    inline table would not, as 1.x sorts it as if on line 0 (seen with 1.6).
    """
    url: Callable[[str], str] = redact if redact_secrets else str
    lines = []
    for host, settings in hosts:
        prefix = f"  {_toml_string(url(host))}."
        shown = settings or _NO_SETTINGS
        lines += _setting_lines(shown, prefix, redact_secrets=redact_secrets)
    return ["", "[host]", *lines] if lines else []


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
    unlisted = [(host, s) for host, s in carried.unlisted if host != mirror]
    lines += _unlisted_lines(unlisted, redact_secrets=redact_secrets)
    return "\n".join(lines) + "\n"


def is_ours(content: bytes) -> bool:
    """Whether a hosts.toml was written by this command."""
    return content.startswith(MARKER.encode())


def _says_created(content: bytes | None) -> bool:
    if content is None or not is_ours(content):
        return False
    return _CREATED_LINE.encode() in content.splitlines()[:3]

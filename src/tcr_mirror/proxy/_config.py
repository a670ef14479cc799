"""The node daemon's configuration: a TOML file, then flags over it.

Example ``node.toml``::

    listen = "127.0.0.1:5000"
    data_dir = "/var/lib/tcr-mirror"
    metrics_listen = "127.0.0.1:9500"
    tag_ttl = 5.0
    drain_timeout = 10.0          # on SIGTERM, let responses finish this long
    max_store_bytes = "50GiB"     # evict least recently used blobs past it
    store_high_watermark = 0.90   # start evicting at this share of the budget
    store_low_watermark = 0.80    # ...and stop at this one
    ca_file = "/etc/tcr-mirror/ca.pem"  # also trust these CAs for HTTPS
    proxy = "http://user:password@proxy.internal:3128"  # reach upstreams so
    no_proxy = ["internal.example", "10.0.0.0/8"]      # ...but not these

    [[upstreams]]
    url = "https://example.tencentcloudcr.com"
    default = true
    credentials_file = "/etc/tcr-mirror/example.credentials"

    [[upstreams]]
    namespace = "docker.io"
    url = "https://mirror.ccs.tencentyun.com"

An upstream's ``namespace`` is the ``ns`` value containerd sends for it (the
registry host it was asked to pull from); it defaults to the URL's
``host[:port]``. A credentials file holds ``username:password`` on its first
line, so that secrets never appear in a process listing.

Without ``proxy``, the environment's ``HTTPS_PROXY``, ``HTTP_PROXY`` and
``NO_PROXY`` apply, read as Go programs read them (see ``_httpproxy``).

The file is parsed into a :class:`NodeConfig` with each value checked for
its type; flags are merged over it, and only then is the whole checked once
(:meth:`NodeConfig.validated`), because a rule may span both: an upstream's
``credentials_url`` in the file needs the ``--node-secret-file`` flag.
"""

from __future__ import annotations

import math
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tcr_mirror._redact import redact
from tcr_mirror.proxy._auth import Credentials
from tcr_mirror.proxy._httpproxy import (
    HttpProxy,
    ProxyPolicy,
    parse_no_proxy,
    parse_proxy_url,
)

__all__ = [
    "LOG_LEVELS",
    "ConfigError",
    "NodeConfig",
    "UpstreamConfig",
    "parse_host_port",
    "parse_proxy",
    "parse_size",
    "tls_context",
]


LOG_LEVELS = ("debug", "info", "warning", "error")

# Durations in seconds, and whether 0 makes sense: a tag TTL of 0 asks
# upstream every time and a drain timeout of 0 stops at once, while a zero
# timeout fails every upstream request and a zero refresh spins.
_DURATIONS = {
    "tag_ttl": True,
    "drain_timeout": True,
    "connect_timeout": False,
    "read_timeout": False,
    "credentials_refresh": False,
}


class ConfigError(ValueError):
    """The configuration is unusable; the message is one line for the user."""


@dataclass(frozen=True)
class UpstreamConfig:
    namespace: str
    url: str
    default: bool = False
    credentials: Credentials | None = field(default=None, repr=False)
    credentials_url: str | None = None


@dataclass(frozen=True)
class NodeConfig:
    listen: tuple[str, int] = ("127.0.0.1", 5000)
    data_dir: Path = Path("/var/lib/tcr-mirror")
    upstreams: tuple[UpstreamConfig, ...] = ()
    metrics_listen: tuple[str, int] | None = None
    tag_ttl: float = 5.0
    drain_timeout: float = 10.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    log_level: str = "info"
    max_store_bytes: int | None = None
    store_high_watermark: float = 0.90
    store_low_watermark: float = 0.80
    node_secret: str | None = field(default=None, repr=False)
    credentials_refresh: float = 30.0
    ca_file: Path | None = None
    proxy: HttpProxy | None = None
    no_proxy: tuple[str, ...] = ()

    def proxy_policy(self, environ: Mapping[str, str]) -> ProxyPolicy:
        """Which HTTP proxy each upstream URL goes through.

        A proxy variable naming a proxy that is not HTTP (``https://``,
        ``socks5://``) is left out of the policy (see its ``ignored``) as
        long as no upstream would go through it.

        Raises:
            ConfigError: ``no_proxy`` holds an entry that exempts nothing,
                or the environment names a proxy that is no URL, or one
                that is not HTTP for an upstream it would apply to.
        """
        try:
            if self.proxy is not None:
                return ProxyPolicy.configured(self.proxy, self.no_proxy)
            policy = ProxyPolicy.from_environment(environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Go programs (containerd among them) speak https:// and socks5://
        # proxies, so for them such a variable is not a mistake to skip: it
        # is the road out. Going direct where containerd would take that
        # proxy could fail in a closed network or bypass the operator's
        # egress control, so that stops the start; a variable that none of
        # the upstreams would use (all on this host or in NO_PROXY) is only
        # a warning, as a machine-wide proxy setting should not keep a node
        # from starting.
        for up in self.upstreams:
            ignored = policy.ignored_for(up.url)
            if ignored is not None:
                raise ConfigError(
                    f"{ignored.variable} in the environment names a "
                    f"{ignored.scheme}:// proxy ({ignored.address}), which "
                    f"tcr-mirror cannot use, and upstream {up.namespace} would "
                    "go through it: give --proxy http://HOST:PORT, or add the "
                    "upstream to NO_PROXY"
                )
        return policy

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((up for up in self.upstreams if up.default), None)

    @classmethod
    def from_toml(cls, path: Path) -> NodeConfig:
        """Parse a config file; :meth:`validated` once flags are merged.

        Raises:
            ConfigError: The file is unreadable, no TOML, or has a key that
                is unknown or of the wrong type.
        """
        try:
            document = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"config {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
        return cls().with_document(document)

    def with_document(self, document: dict[str, Any]) -> NodeConfig:
        """Apply the keys of a parsed TOML document, each checked for type."""
        changes: dict[str, Any] = {}
        for key, value in document.items():
            if key == "upstreams":
                changes[key] = tuple(_upstream_from_table(t) for t in _tables(value))
            elif key in ("listen", "metrics_listen"):
                changes[key] = parse_host_port(_str(key, value))
            elif key in ("data_dir", "ca_file"):
                changes[key] = _path(key, value)
            elif key in _DURATIONS:
                changes[key] = _seconds(key, value)
            elif key == "log_level":
                changes[key] = _str(key, value).lower()
            elif key == "node_secret_file":
                changes["node_secret"] = read_secret_file(_path(key, value))
            elif key == "max_store_bytes":
                changes[key] = parse_size(value, key=key)
            elif key in ("store_high_watermark", "store_low_watermark"):
                changes[key] = _fraction(key, value)
            elif key == "proxy":
                changes[key] = parse_proxy(_str(key, value))
            elif key == "no_proxy":
                changes[key] = _no_proxy(value)
            else:
                raise ConfigError(f"unknown config key {key!r}")
        return replace(self, **changes)

    def validated(self) -> NodeConfig:
        """This config, once every value and every rule between them holds.

        Raises:
            ConfigError: The first value or rule that does not hold.
        """
        self._check_values()
        self._check_upstreams()
        if self.no_proxy and self.proxy is None:
            raise ConfigError("no_proxy needs proxy (or use NO_PROXY with HTTPS_PROXY)")
        return self

    def _check_values(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                f"got {self.log_level!r}"
            )
        for key, zero_allowed in _DURATIONS.items():
            _check_duration(key, getattr(self, key), zero_allowed=zero_allowed)
        if self.max_store_bytes is not None and self.max_store_bytes < 1:
            raise ConfigError("max_store_bytes must be at least 1 byte")
        # Written so that NaN, which compares false with everything, fails.
        if not 0 < self.store_low_watermark <= self.store_high_watermark <= 1:
            raise ConfigError("watermarks must satisfy 0 < low <= high <= 1")

    def _check_upstreams(self) -> None:
        defaults = [up for up in self.upstreams if up.default]
        if len(defaults) > 1:
            raise ConfigError("more than one default upstream")
        if any(up.credentials_url for up in self.upstreams) and not self.node_secret:
            raise ConfigError("credentials_url needs a node secret (node_secret_file)")
        for up in self.upstreams:
            if up.credentials_url is not None:
                _check_control_url(up.credentials_url)
        names = [up.namespace for up in self.upstreams]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ConfigError(
                f"upstream namespace given twice: {sorted(duplicates)[0]}"
            )


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}  # fmt: skip


def parse_size(value: Any, *, key: str = "max_store_bytes") -> int:
    """Parse a byte count: an integer, or a string such as ``"50GiB"``.

    Raises:
        ConfigError: Anything else, ``inf`` and ``nan`` too; the message
            names ``key``.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = _SIZE_UNITS.get(text[len(number) :])
        try:
            size = float(number) * unit if unit else 0.0
        except ValueError:
            size = 0.0
        # float() reads "inf" and "nan", and a long enough number overflows
        # to inf, which int() cannot take.
        if math.isfinite(size) and size >= 1:
            return int(size)
    raise ConfigError(f"{key} must be a size such as 50GiB, got {value!r}")


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    # isdigit() alone takes "²", and int() refuses thousands of digits.
    digits = port.isascii() and port.isdigit() and len(port) <= 5
    # A host that is not printable ASCII fails in getaddrinfo's IDNA step
    # or its NUL check with errors that are no OSError.
    if not sep or not _is_host(host) or not digits or int(port) > 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def parse_upstream_flag(text: str) -> UpstreamConfig:
    """Parse ``--upstream [NS=]URL``; the form without ``NS=`` is the default."""
    namespace, sep, url = text.partition("=")
    if not sep or "://" in namespace:
        return make_upstream(None, text, default=True)
    return make_upstream(namespace, url, default=False)


def make_upstream(
    namespace: str | None,
    url: str,
    *,
    default: bool,
    credentials: Credentials | None = None,
) -> UpstreamConfig:
    shape = f"upstream URL must be http(s)://host[:port], got {redact(url)!r}"
    try:
        parts = urlsplit(url)
        # Reading the port checks it: a number, at most 65535.
        _ = parts.port
    except ValueError:
        raise ConfigError(shape) from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not _is_host(host):
        raise ConfigError(shape)
    if parts.username or parts.password:
        raise ConfigError("put upstream credentials in a credentials file, not the URL")
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return UpstreamConfig(namespace or parts.netloc, base, default, credentials)


def _check_control_url(url: str) -> None:
    """Check a ``credentials_url`` as :func:`make_upstream` checks an
    upstream's: one that is not a URL would fail every renewal, or crash
    the node where httpx cannot even parse it.

    Raises:
        ConfigError: It is not ``http(s)://host[:port][/path]``.
    """
    shape = f"credentials_url must be http(s)://host[:port], got {redact(url)!r}"
    try:
        parts = urlsplit(url)
        # Reading the port checks it: a number, at most 65535.
        _ = parts.port
    except ValueError:
        raise ConfigError(shape) from None
    text = url.isascii() and url.isprintable() and " " not in url
    if not text or parts.scheme not in ("http", "https"):
        raise ConfigError(shape)
    if not _is_host(parts.hostname or ""):
        raise ConfigError(shape)


def _is_host(host: str) -> bool:
    """A host name or address a URL may carry: no spaces, no controls."""
    return bool(host) and host.isascii() and host.isprintable() and " " not in host


def parse_proxy(text: str) -> HttpProxy:
    """Parse an HTTP proxy URL (``proxy``, ``--proxy``)."""
    try:
        return parse_proxy_url(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The TLS settings for upstreams and the control plane.

    The system's trusted CAs, plus those in ``ca_file`` (PEM) if given: a
    registry or control plane behind a private CA, or a test's own.

    Raises:
        ConfigError: ``ca_file`` cannot be read or holds no certificate.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError:
            raise ConfigError(f"CA file {ca_file} holds no PEM certificate") from None
        except OSError as exc:
            raise ConfigError(
                f"cannot read CA file {ca_file}: {exc.strerror}"
            ) from None
    return context


def read_secret_file(path: Path) -> str:
    """Read a shared secret: the first line of a file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"secret file {path} is not UTF-8 text") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"secret file {path} is empty")
    return lines[0].strip()


def read_credentials_file(path: Path) -> Credentials:
    """Read ``username:password`` from the first line of a file."""
    try:
        line = (
            Path(path).read_text().splitlines()[0] if Path(path).stat().st_size else ""
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot read credentials file {path}: {exc.strerror}"
        ) from exc
    except UnicodeDecodeError:
        raise ConfigError(f"credentials file {path} is not UTF-8 text") from None
    username, sep, password = line.strip().partition(":")
    if not sep or not username:
        raise ConfigError(f"credentials file {path} must hold username:password")
    return Credentials(username, password)


def _upstream_from_table(table: dict[str, Any]) -> UpstreamConfig:
    unknown = set(table) - {
        "url",
        "namespace",
        "default",
        "credentials_file",
        "credentials_url",
        "username",
        "password",
    }
    if unknown:
        raise ConfigError(f"unknown upstream key {sorted(unknown)[0]!r}")
    credentials = None
    if "credentials_file" in table:
        credentials = read_credentials_file(
            _path("credentials_file", table["credentials_file"])
        )
    elif "username" in table:
        password = _str("password", table.get("password", ""))
        credentials = Credentials(_str("username", table["username"]), password)
    namespace = table.get("namespace")
    upstream = make_upstream(
        None if namespace is None else _str("namespace", namespace),
        _str("url", table.get("url")),
        default=_bool("default", table.get("default", False)),
        credentials=credentials,
    )
    if "credentials_url" in table:
        url = _str("credentials_url", table["credentials_url"])
        upstream = replace(upstream, credentials_url=url)
    return upstream


def _tables(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError("upstreams must be an array of tables ([[upstreams]])")
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string")
    return value


def _path(key: str, value: Any) -> Path:
    # TOML strings may hold NUL ("\u0000"), which no file name can: every
    # call that takes the path would fail with a ValueError, not an OSError.
    if "\0" in _str(key, value):
        raise ConfigError(f"{key} must be a path, got one with a NUL character")
    return Path(value)


def _no_proxy(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return parse_no_proxy(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return parse_no_proxy(value)
    raise ConfigError("no_proxy must be a list of hosts, domains or networks")


def _bool(key: str, value: Any) -> bool:
    # TOML has true and false; the string "false" would be truthy.
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number between 0 and 1")
    return float(value)


# A day: longer is a mistake, and far longer overflows the timeouts of the
# socket and ssl modules.
_MAX_SECONDS = 86400.0


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number of seconds, got {value!r}")
    return float(value)


def _check_duration(key: str, value: float, *, zero_allowed: bool) -> None:
    # The flag is named too: by now the value may have come from either.
    names = f"{key} (--{key.replace('_', '-')})"
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
        least = "0 or more" if zero_allowed else "more than 0"
        raise ConfigError(
            f"{names} must be a finite number of seconds, {least}, got {value!r}"
        )
    if value > _MAX_SECONDS:
        raise ConfigError(
            f"{names} must be at most {_MAX_SECONDS:.0f} seconds (a day), got {value!r}"
        )

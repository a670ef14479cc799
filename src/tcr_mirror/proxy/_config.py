"""The node daemon's configuration: a TOML file, then flags over it.

Example ``node.toml``::

    listen = "127.0.0.1:5000"
    data_dir = "/var/lib/tcr-mirror"
    metrics_listen = "127.0.0.1:9500"
    tag_ttl = 5.0
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
"""

from __future__ import annotations

import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tcr_mirror.proxy._auth import Credentials
from tcr_mirror.proxy._httpproxy import (
    HttpProxy,
    ProxyPolicy,
    parse_no_proxy,
    parse_proxy_url,
)

__all__ = [
    "ConfigError",
    "NodeConfig",
    "UpstreamConfig",
    "parse_host_port",
    "parse_proxy",
    "parse_size",
    "tls_context",
]


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

        Raises:
            ConfigError: The environment names a proxy that is no URL.
        """
        if self.proxy is not None:
            return ProxyPolicy.configured(self.proxy, self.no_proxy)
        try:
            return ProxyPolicy.from_environment(environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((up for up in self.upstreams if up.default), None)

    @classmethod
    def from_toml(cls, path: Path) -> NodeConfig:
        try:
            document = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
        return cls().with_document(document)

    def with_document(self, document: dict[str, Any]) -> NodeConfig:
        """Apply the keys of a parsed TOML document."""
        changes: dict[str, Any] = {}
        for key, value in document.items():
            if key == "upstreams":
                changes[key] = tuple(_upstream_from_table(t) for t in _tables(value))
            elif key in ("listen", "metrics_listen"):
                changes[key] = parse_host_port(_str(key, value))
            elif key in ("data_dir", "ca_file"):
                changes[key] = Path(_str(key, value))
            elif key in ("tag_ttl", "connect_timeout", "read_timeout"):
                changes[key] = _seconds(key, value)
            elif key == "log_level":
                changes[key] = _str(key, value)
            elif key == "node_secret_file":
                changes["node_secret"] = read_secret_file(Path(_str(key, value)))
            elif key == "credentials_refresh":
                changes[key] = _seconds(key, value)
            elif key == "max_store_bytes":
                changes[key] = parse_size(value)
            elif key in ("store_high_watermark", "store_low_watermark"):
                changes[key] = _fraction(key, value)
            elif key == "proxy":
                changes[key] = parse_proxy(_str(key, value))
            elif key == "no_proxy":
                changes[key] = _no_proxy(value)
            else:
                raise ConfigError(f"unknown config key {key!r}")
        return replace(self, **changes).validated()

    def validated(self) -> NodeConfig:
        if not 0 < self.store_low_watermark <= self.store_high_watermark <= 1:
            raise ConfigError("watermarks must satisfy 0 < low <= high <= 1")
        defaults = [up for up in self.upstreams if up.default]
        if len(defaults) > 1:
            raise ConfigError("more than one default upstream")
        if any(up.credentials_url for up in self.upstreams) and not self.node_secret:
            raise ConfigError("credentials_url needs a node secret (node_secret_file)")
        if self.no_proxy and self.proxy is None:
            raise ConfigError("no_proxy needs proxy (or use NO_PROXY with HTTPS_PROXY)")
        names = [up.namespace for up in self.upstreams]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ConfigError(
                f"upstream namespace given twice: {sorted(duplicates)[0]}"
            )
        return self


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}  # fmt: skip


def parse_size(value: Any) -> int:
    """Parse a byte count: an integer, or a string such as ``"50GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = _SIZE_UNITS.get(text[len(number) :])
        try:
            size = float(number) * unit if unit else 0
        except ValueError:
            size = 0
        if size >= 1:
            return int(size)
    raise ConfigError(f"expected a size such as 50GiB, got {value!r}")


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
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
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"upstream URL must be http(s)://host[:port], got {url!r}")
    if parts.username or parts.password:
        raise ConfigError("put upstream credentials in a credentials file, not the URL")
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return UpstreamConfig(namespace or parts.netloc, base, default, credentials)


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
            Path(_str("credentials_file", table["credentials_file"]))
        )
    elif "username" in table:
        password = _str("password", table.get("password", ""))
        credentials = Credentials(_str("username", table["username"]), password)
    namespace = table.get("namespace")
    upstream = make_upstream(
        None if namespace is None else _str("namespace", namespace),
        _str("url", table.get("url")),
        default=bool(table.get("default", False)),
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


def _no_proxy(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return parse_no_proxy(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return parse_no_proxy(value)
    raise ConfigError("no_proxy must be a list of hosts, domains or networks")


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number between 0 and 1")
    return float(value)


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key} must be a non-negative number of seconds")
    return float(value)

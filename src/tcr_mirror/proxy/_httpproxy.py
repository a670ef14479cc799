"""Reaching upstreams through an HTTP proxy: which URLs take one, and how.

Nodes in locked-down networks reach the registry only through an HTTP
proxy. Everything an :class:`~tcr_mirror.proxy._upstream.Upstream` sends
(manifests, tokens, blob bodies, redirects to blob storage) asks one
:class:`ProxyPolicy` which proxy a URL goes through, so manifests and
blobs never take different paths. An ``https`` URL goes through a
``CONNECT`` tunnel and TLS runs end to end inside it; an ``http`` URL is
sent to the proxy with its absolute URL as the request target.

The policy comes from the node's config (``proxy``, ``no_proxy``), or
else from the environment the way Go programs such as containerd and the
kubelet read it: ``HTTPS_PROXY`` / ``HTTP_PROXY`` by the URL's scheme
(upper case first, then lower case), ``NO_PROXY`` for exceptions, and
never a proxy for ``localhost`` or a loopback address. Go also speaks
``https://`` and ``socks5://`` proxies, which this module does not: such a
variable is set aside in the policy's ``ignored``, for the node to decide
whether it can start without it.

Sans-IO: the policy and the ``CONNECT`` handshake are plain objects the
tests drive without sockets; :mod:`~tcr_mirror.proxy._rawget` does the I/O.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11

__all__ = [
    "HttpProxy",
    "IgnoredProxy",
    "ProxyPolicy",
    "ProxyRefused",
    "TunnelOpening",
    "parse_no_proxy",
    "parse_proxy_url",
]

_MAX_HEAD = 64 * 1024
# Proxy schemes Go's net/http Transport speaks and this module does not.
_NOT_HTTP_SCHEMES = frozenset({"https", "socks5", "socks5h"})


class ProxyRefused(OSError):
    """The proxy would not carry the request (its status is in the message)."""


@dataclass(frozen=True)
class HttpProxy:
    """A forward proxy spoken to in plain HTTP.

    Attributes:
        host: The proxy's host name or address.
        port: Its port.
        authorization: The ``Proxy-Authorization`` value, if the proxy URL
            carried credentials; never logged.
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``host:port``, for logs and errors: never the credentials."""
        return f"{_bracketed(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def headers(self) -> list[tuple[str, str]]:
        """Headers every request to the proxy carries."""
        if self.authorization is None:
            return []
        return [("Proxy-Authorization", self.authorization)]


def parse_proxy_url(text: str) -> HttpProxy:
    """Parse ``[http://][user:password@]host[:port]``, as proxy variables hold.

    Raises:
        ValueError: Not such a URL; the message is one line for the user.
    """
    text = text.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme != "http":
        raise ValueError(
            f"proxy URL must be http://[user:password@]host[:port] "
            f"(no {parts.scheme}:// proxies), got {_without_credentials(text)!r}"
        )
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if not parts.hostname or not port or parts.path not in ("", "/") or parts.query:
        raise ValueError(
            "proxy URL must be http://[user:password@]host[:port], "
            f"got {_without_credentials(text)!r}"
        )
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return HttpProxy(parts.hostname, port, authorization)


@dataclass(frozen=True)
class IgnoredProxy:
    """A proxy variable left unused: it names a proxy that is not HTTP.

    Attributes:
        variable: The variable as it was set (``HTTPS_PROXY``, ``https_proxy``).
        applies_to: The URL scheme it names the proxy for.
        scheme: The proxy's own scheme (``socks5``, ``https``).
        address: ``host[:port]`` of the proxy, for logs: never credentials.
    """

    variable: str
    applies_to: str
    scheme: str
    address: str


def _not_http(variable: str, applies_to: str, value: str) -> IgnoredProxy | None:
    scheme, sep, rest = value.strip().partition("://")
    if not sep or scheme.lower() not in _NOT_HTTP_SCHEMES:
        return None
    # User info first: a password is often written unescaped, and one
    # holding '/' (base64 does) would otherwise end the address inside it.
    address = rest.rpartition("@")[2].partition("/")[0]
    return IgnoredProxy(variable, applies_to, scheme.lower(), address)


def _without_credentials(text: str) -> str:
    scheme, sep, rest = text.rpartition("://")
    return scheme + sep + rest.rpartition("@")[2]


@dataclass(frozen=True)
class _Exception:
    """One ``NO_PROXY`` entry."""

    everything: bool = False
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    domain: str = ""
    subdomains_only: bool = False
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        if self.port is not None and self.port != port:
            return False
        address = _ip(host)
        if self.network is not None:
            return address is not None and address in self.network
        if address is not None:
            return False
        if host.endswith("." + self.domain):
            return True
        return host == self.domain and not self.subdomains_only


def parse_no_proxy(text: str | Iterable[str]) -> tuple[str, ...]:
    """Split a ``NO_PROXY`` value (or list) into its entries, lower case."""
    items = text.split(",") if isinstance(text, str) else text
    return tuple(item.strip().lower() for item in items if item.strip())


def _parse_exception(entry: str) -> _Exception | None:
    """Read one ``NO_PROXY`` entry.

    Returns:
        What it exempts, or None for an entry that can exempt nothing: a
        port that is no number (``host:x``, ``host:²``), no host at all.
    """
    if entry == "*":
        return _Exception(everything=True)
    try:
        if "/" in entry:
            return _Exception(network=ipaddress.ip_network(entry, strict=False))
        return _Exception(network=ipaddress.ip_network(entry.strip("[]")))
    except ValueError:
        pass
    host, port = entry, None
    head, sep, tail = entry.rpartition(":")
    if sep:
        # As in Go, "host:" names the host on any port.
        port = _port(tail) if tail else None
        if tail and port is None:
            return None
        host = head
    if host.startswith("["):
        address = _ip(host[1:-1]) if host.endswith("]") else None
        if address is None:
            return None
        return _Exception(network=ipaddress.ip_network(address), port=port)
    address = _ip(host)
    if address is not None:
        return _Exception(network=ipaddress.ip_network(address), port=port)
    domain = host.lstrip("*").lstrip(".")
    if not domain:
        return None
    subdomains_only = host.startswith((".", "*."))
    return _Exception(domain=domain, subdomains_only=subdomains_only, port=port)


def _port(text: str) -> int | None:
    # str.isdigit() also takes "²", which int() refuses.
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        return None
    return int(text)


@dataclass(frozen=True)
class ProxyPolicy:
    """Which proxy, if any, each URL goes through.

    Attributes:
        http: The proxy for ``http`` URLs.
        https: The proxy for ``https`` URLs.
        no_proxy: Hosts, domains, addresses and networks reached directly.
        spare_loopback: Never proxy ``localhost`` and loopback addresses,
            as Go does with the environment's proxies: a node's own
            services are never behind its proxy.
        source: ``"config"`` or ``"environment"``, for the start-up log.
        ignored: Proxy variables set aside because their proxy is not HTTP.
    """

    http: HttpProxy | None = None
    https: HttpProxy | None = None
    no_proxy: tuple[str, ...] = ()
    spare_loopback: bool = True
    source: str = "environment"
    ignored: tuple[IgnoredProxy, ...] = ()
    _exceptions: tuple[_Exception, ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Go skips a NO_PROXY entry it cannot read; so does the environment's
        # policy (a configured one refuses it first).
        parsed = (_parse_exception(entry) for entry in self.no_proxy)
        exceptions = tuple(e for e in parsed if e is not None)
        object.__setattr__(self, "_exceptions", exceptions)

    @property
    def skipped_no_proxy(self) -> tuple[str, ...]:
        """The ``no_proxy`` entries that exempt nothing and are skipped."""
        return tuple(e for e in self.no_proxy if _parse_exception(e) is None)

    @classmethod
    def configured(cls, proxy: HttpProxy, no_proxy: Iterable[str] = ()) -> ProxyPolicy:
        """One proxy for every URL but those in ``no_proxy``, loopback too.

        Raises:
            ValueError: An entry of ``no_proxy`` can exempt nothing; the
                message is one line for the user.
        """
        entries = parse_no_proxy(no_proxy)
        for entry in entries:
            if _parse_exception(entry) is None:
                raise ValueError(
                    f"no_proxy entry {entry!r} is none of host[:port], .domain, "
                    "address[:port] or network"
                )
        return cls(proxy, proxy, entries, False, "config")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> ProxyPolicy:
        """The proxies the environment names, read as Go reads them.

        A variable naming an ``https://`` or ``socks5://`` proxy is not
        used; it is listed in ``ignored`` instead.

        Raises:
            ValueError: A proxy variable holds no proxy URL at all.
        """
        proxies: dict[str, HttpProxy | None] = {"http": None, "https": None}
        ignored = []
        for scheme in proxies:
            upper = f"{scheme.upper()}_PROXY"
            name = _first_set(environ, upper, upper.lower())
            if name is None:
                continue
            set_aside = _not_http(name, scheme, environ[name])
            if set_aside is not None:
                ignored.append(set_aside)
                continue
            try:
                proxies[scheme] = parse_proxy_url(environ[name])
            except ValueError as exc:
                raise ValueError(f"{upper} in the environment: {exc}") from None
        name = _first_set(environ, "NO_PROXY", "no_proxy")
        no_proxy = parse_no_proxy(environ[name]) if name else ()
        return cls(proxies["http"], proxies["https"], no_proxy, ignored=tuple(ignored))

    def for_url(self, url: str) -> HttpProxy | None:
        """The proxy that ``url`` goes through, or None to go directly."""
        parts = urlsplit(url)
        proxy = self.https if parts.scheme == "https" else self.http
        if proxy is None or self._exempt(url):
            return None
        return proxy

    def ignored_for(self, url: str) -> IgnoredProxy | None:
        """The ignored variable whose proxy Go would send ``url`` through."""
        scheme = urlsplit(url).scheme
        ignored = next((i for i in self.ignored if i.applies_to == scheme), None)
        if ignored is None or self._exempt(url):
            return None
        return ignored

    def _exempt(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if self.spare_loopback and _is_loopback(host):
            return True
        return any(exception.matches(host, port) for exception in self._exceptions)


def _first_set(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set to something, as Go skips empty ones."""
    return next((name for name in names if environ.get(name)), None)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    address = _ip(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class TunnelOpening:
    """The ``CONNECT`` handshake that opens a tunnel through a proxy.

    Send :meth:`request`, then feed what the proxy answers to
    :meth:`receive` until it returns True: the tunnel is open and the next
    bytes on the connection are the target's.

    Args:
        proxy: The proxy asked.
        host: The target's host.
        port: The target's port.
    """

    def __init__(self, proxy: HttpProxy, host: str, port: int) -> None:
        self._proxy = proxy
        self._authority = f"{_bracketed(host)}:{port}"
        self._connection = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=_MAX_HEAD
        )

    def request(self) -> bytes:
        headers = [("Host", self._authority), *self._proxy.headers()]
        head = h11.Request(method="CONNECT", target=self._authority, headers=headers)
        return self._connection.send(head) + self._connection.send(h11.EndOfMessage())

    def receive(self, data: bytes) -> bool:
        """Take bytes from the proxy; True once the tunnel is open.

        Raises:
            ProxyRefused: The proxy answered anything but 2xx, answered
                garbage, closed the connection, or sent bytes past its
                answer (the target cannot have spoken yet).
        """
        try:
            self._connection.receive_data(data)
            while True:
                event = self._connection.next_event()
                if event is h11.NEED_DATA:
                    return False
                if isinstance(event, h11.Response):
                    return self._answered(event.status_code)
                if isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError as exc:
            if data:
                raise ProxyRefused(
                    f"proxy {self._proxy.address} answered CONNECT with garbage: {exc}"
                ) from None
        raise ProxyRefused(
            f"proxy {self._proxy.address} closed the connection before answering "
            f"CONNECT {self._authority}"
        )

    def _answered(self, status: int) -> bool:
        if not 200 <= status < 300:
            why = " (proxy credentials refused)" if status in (401, 407) else ""
            raise ProxyRefused(
                f"proxy {self._proxy.address} answered {status} to CONNECT "
                f"{self._authority}{why}"
            )
        if self._connection.trailing_data[0]:
            raise ProxyRefused(
                f"proxy {self._proxy.address} sent bytes before the tunnel opened"
            )
        return True

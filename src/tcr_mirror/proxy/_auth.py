"""Sans-IO pieces of upstream authentication.

Registries answer an unauthenticated request with ``401`` and a
``WWW-Authenticate`` challenge. ``Basic`` means "send a username and a
password"; ``Bearer`` (the Docker token flow) names a token endpoint
(``realm``), a ``service`` and a ``scope``, and the client trades its
credentials there for a short-lived token. This module parses challenges and
token responses and keeps the tokens, one per scope, until they expire.

It also decides what a redirect may carry. A registry's credentials
belong to its origin (scheme, host and port, RFC 6454): a redirect to
blob storage, or to the same host on another scheme or port, travels
without them, and a redirect from HTTPS down to plain HTTP is refused,
since whatever the request carries would then cross the network in
clear. For the same reason a registry on HTTPS may not name a token
endpoint on plain HTTP: the credentials traded there, and the token
they buy, would cross in clear.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import json
import math
import re
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit

__all__ = [
    "Challenge",
    "Credentials",
    "RealmRefused",
    "RedirectRefused",
    "TokenCache",
    "basic_authorization",
    "origin",
    "parse_challenge",
    "parse_retry_after",
    "parse_token_response",
    "redirect_target",
    "token_realm",
]

_PARAM_RE = re.compile(
    r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?'
)
# The token spec: a token without expires_in lives 60 seconds.
_DEFAULT_TOKEN_LIFETIME = 60.0
# Renew a little before the registry would refuse the token.
_EXPIRY_MARGIN = 10.0
# The longest Retry-After believed. A registry or a proxy in front of it
# that names hours (or a date years ahead) would otherwise block the
# upstream for that long; a few minutes is long enough for a throttled
# registry to recover, short enough that a mistake heals by itself.
MAX_RETRY_AFTER = 300.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a header value may hold to go on the wire as it is: visible ASCII.
_VISIBLE_ASCII_RE = re.compile(r"[\x21-\x7e]+")
_VISIBLE_ASCII = "".join(map(chr, range(0x21, 0x7F)))


@dataclass(frozen=True)
class Credentials:
    """A username and password (or an instance token used as one)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` challenge."""

    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` header.

    Returns:
        The challenge with a lower-case scheme, or None when the header
        is empty or malformed.
    """
    scheme, _, rest = header.strip().partition(" ")
    if not scheme or not scheme.isalpha():
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if match is None or match.end() == pos:
            break
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value or ""
        pos = match.end()
    return Challenge(scheme.lower(), params)


def basic_authorization(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def parse_token_response(body: bytes, now: float) -> tuple[str, float]:
    """Read a token endpoint's answer.

    Returns:
        ``(token, renew_at)``: ``renew_at`` is on the same clock as ``now``,
        a little before the registry would refuse the token.

    Raises:
        ValueError: The body holds no token.
    """
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("token endpoint answered something other than JSON") from exc
    if not isinstance(document, dict):
        raise ValueError("token endpoint answered something other than an object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token:
        raise ValueError("token endpoint answered no token")
    if not _VISIBLE_ASCII_RE.fullmatch(token):
        raise ValueError("token endpoint answered a token no header can carry")
    lifetime = document.get("expires_in", _DEFAULT_TOKEN_LIFETIME)
    # JSON's NaN and Infinity would keep the token for ever.
    if (
        not isinstance(lifetime, int | float)
        or not math.isfinite(lifetime)
        or lifetime <= 0
    ):
        lifetime = _DEFAULT_TOKEN_LIFETIME
    lifetime = float(lifetime)
    return token, now + lifetime - min(_EXPIRY_MARGIN, lifetime / 4)


def parse_retry_after(header: str | None, now: float) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta or HTTP date).

    Returns:
        The delay, between 1 second and :data:`MAX_RETRY_AFTER`; 1 second
        when the header is absent or unreadable, so a 429 is never retried
        at once.
    """
    delay = 1.0
    text = (header or "").strip()
    # str.isdigit() alone takes "²", which float() refuses.
    if text.isascii() and text.isdigit():
        delay = float(text)
    elif text:
        try:
            date = email.utils.parsedate_to_datetime(text)
            # An HTTP-date is UTC whether it says so or not (asctime's and
            # "-0000" do not); a naive one would be read as local time.
            if date.tzinfo is None:
                date = date.replace(tzinfo=datetime.UTC)
            delay = date.timestamp() - now
        except (TypeError, ValueError, OverflowError):
            delay = 1.0
    return min(MAX_RETRY_AFTER, max(1.0, delay))


class RedirectRefused(ValueError):
    """A redirect the mirror will not follow (HTTPS down to HTTP, not HTTP)."""


class RealmRefused(ValueError):
    """A token endpoint the mirror will not send credentials to."""


def origin(url: str) -> tuple[str, str, int]:
    """The origin of ``url``: scheme, lower-case host and port (RFC 6454).

    Returns:
        ``(scheme, host, port)``, the port filled in from the scheme.

    Raises:
        RedirectRefused: The URL has no host or a port that is no number,
            or cannot be parsed at all.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError:
        # A port that is no number, or an IPv6 address never closed
        # ("http://[::1/"), which leaves no part of the URL to show.
        raise RedirectRefused("not an http(s) URL with a host") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or not port:
        raise RedirectRefused(f"not an http(s) URL with a host: {_redacted(url)}")
    return scheme, parts.hostname.lower().rstrip("."), port


def redirect_target(url: str, location: str) -> str:
    """The absolute URL a ``Location`` header sends a request for ``url`` to.

    Raises:
        RedirectRefused: It leads from HTTPS to plain HTTP, or nowhere a
            client can go.
    """
    try:
        target = urljoin(url, location.strip())
    except ValueError:  # as origin(): an IPv6 address never closed
        raise RedirectRefused("redirect to no URL a client can go to") from None
    scheme = origin(target)[0]
    if origin(url)[0] == "https" and scheme != "https":
        raise RedirectRefused(
            f"redirect from HTTPS to {scheme.upper()} refused: {_redacted(target)}"
        )
    # User info in a Location is no credential to send on (httpx would make
    # it Basic auth), and no part of the Host header (RFC 9110 7.2).
    parts = urlsplit(target)
    if "@" in parts.netloc:
        target = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return _percent_encoded(target)


def token_realm(registry_url: str, realm: str) -> str:
    """The token endpoint a registry's ``Bearer`` challenge names, checked.

    Returns:
        ``realm`` as it goes on the wire: an absolute URL the credentials
        may be sent to.

    Raises:
        RealmRefused: It is no http(s) URL with a host, or plain HTTP
            named by a registry on HTTPS.
    """
    try:
        scheme = origin(realm)[0]
    except RedirectRefused:
        raise RealmRefused("token realm is not an http(s) URL with a host") from None
    if origin(registry_url)[0] == "https" and scheme != "https":
        raise RealmRefused(
            f"token realm on plain HTTP refused for a registry on HTTPS: "
            f"{_redacted(realm)}"
        )
    return _percent_encoded(realm)


def _percent_encoded(url: str) -> str:
    """``url`` with what is not visible ASCII percent-encoded (as UTF-8).

    Servers put raw UTF-8 or spaces in a ``Location`` now and then; sent
    as they are, h11 would refuse the request line or fail to encode it.
    """
    return quote(url, safe=_VISIBLE_ASCII)


def _redacted(url: str) -> str:
    """``url`` without user info or query: signed storage URLs carry
    credentials in their query string."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


class TokenCache:
    """Bearer tokens by (realm, service, scope), kept until their renewal time."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}

    def get(self, key: tuple[str, str, str], now: float) -> str | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        token, renew_at = entry
        if now >= renew_at:
            del self._tokens[key]
            return None
        return token

    def put(self, key: tuple[str, str, str], token: str, renew_at: float) -> None:
        self._tokens[key] = (token, renew_at)

    def drop(self, key: tuple[str, str, str], token: str) -> None:
        """Forget ``token``, refused by the registry, if it is still the one kept.

        Requests sent with an old token are refused one by one; a late
        refusal must not drop the new token fetched since, or each one
        costs another token request.
        """
        entry = self._tokens.get(key)
        if entry is not None and entry[0] == token:
            del self._tokens[key]

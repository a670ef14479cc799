"""Sans-IO pieces of upstream authentication.

Registries answer an unauthenticated request with ``401`` and a
``WWW-Authenticate`` challenge. ``Basic`` means "send a username and a
password"; ``Bearer`` (the Docker token flow) names a token endpoint
(``realm``), a ``service`` and a ``scope``, and the client trades its
credentials there for a short-lived token. This module parses challenges and
token responses and keeps the tokens, one per scope, until they expire.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
from dataclasses import dataclass, field

__all__ = [
    "Challenge",
    "Credentials",
    "TokenCache",
    "basic_authorization",
    "parse_challenge",
    "parse_retry_after",
    "parse_token_response",
]

_PARAM_RE = re.compile(
    r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?'
)
# The token spec: a token without expires_in lives 60 seconds.
_DEFAULT_TOKEN_LIFETIME = 60.0
# Renew a little before the registry would refuse the token.
_EXPIRY_MARGIN = 10.0


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
    lifetime = document.get("expires_in", _DEFAULT_TOKEN_LIFETIME)
    if not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = _DEFAULT_TOKEN_LIFETIME
    lifetime = float(lifetime)
    return token, now + lifetime - min(_EXPIRY_MARGIN, lifetime / 4)


def parse_retry_after(header: str | None, now: float) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta or HTTP date).

    Returns:
        The delay, at least 1 second; 1 second when the header is absent
        or unreadable, so a 429 is never retried at once.
    """
    if header:
        text = header.strip()
        if text.isdigit():
            return max(1.0, float(text))
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return 1.0
        return max(1.0, when.timestamp() - now)
    return 1.0


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

    def drop(self, key: tuple[str, str, str]) -> None:
        self._tokens.pop(key, None)

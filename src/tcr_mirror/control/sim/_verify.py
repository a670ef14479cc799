"""Checks a simulated TCR request the way the API gateway does (sans-IO).

The order decides which error a broken request gets, so it is fixed here
and follows TCR-API.md §1.6, which is itself a proposal (UNCONFIRMED
against the real server):

0. Method ``POST`` (``application/json``) or ``GET`` → else
   ``UnsupportedProtocol``.
1. ``Authorization`` missing or not TC3-HMAC-SHA256 →
   ``AuthFailure.InvalidAuthorization``.
2. ``X-TC-Action`` missing → ``MissingParameter``; unknown →
   ``InvalidAction``. ``X-TC-Version`` missing → ``MissingParameter``;
   unknown → ``NoSuchVersion``. ``X-TC-Region`` missing →
   ``MissingParameter``; not a region this simulator serves →
   ``UnsupportedRegion``.
3. SecretId unknown → ``AuthFailure.SecretIdNotFound``.
4. ``X-TC-Timestamp`` missing → ``MissingParameter``, not an integer →
   ``InvalidParameter``, more than 300 s from now →
   ``AuthFailure.SignatureExpire``.
5. Scope date or service wrong, a signed header absent, ``content-type`` or
   ``host`` not signed, or the signature differs →
   ``AuthFailure.SignatureFailure``.
6. ``X-TC-Token`` not the one of a temporary key → ``AuthFailure.TokenFailure``.
7. The body (POST) or query (GET) decodes to parameters; the action's
   schema check happens later, in the action table.

The signature is recomputed over the raw body (or, with
``X-TC-Content-SHA256: UNSIGNED-PAYLOAD``, over those words) and the raw
query, as received.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from .. import _signing
from ._schema import SimError, unflatten

__all__ = ["MAX_SKEW", "SERVICE", "VERSION", "Key", "VerifiedRequest", "verify"]

SERVICE = "tcr"
VERSION = "2019-09-24"
MAX_SKEW = 300
_UNSIGNED = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Key:
    """A key the simulator accepts; ``token`` is set for temporary keys."""

    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:
        return "Key(<hidden>)"


@dataclass(frozen=True)
class VerifiedRequest:
    """A request that passed steps 0-7: who asked for what, with what."""

    action: str
    region: str
    secret_id: str
    timestamp: int
    params: dict[str, Any]
    from_query: bool  # GET form: all values are strings, coerce leniently
    request_client: str


def verify(
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    keys: Mapping[str, Key],
    actions: Collection[str],
    regions: Collection[str],
    now: float,
) -> VerifiedRequest:
    """Verify one API request.

    Args:
        method: The HTTP method.
        target: The request target (``/`` or ``/?query``).
        headers: Header values by lower-case name.
        body: The raw body.
        keys: Accepted keys by SecretId.
        actions: The known action names.
        regions: The regions served.
        now: Unix time, for the timestamp window.

    Returns:
        The verified request with decoded, not yet schema-checked, params.

    Raises:
        SimError: The first check that failed, with TCR's code.
    """
    _check_method(method, headers)
    authorization = _parse_authorization(headers)
    action = _required(headers, "x-tc-action", "X-TC-Action")
    if action not in actions:
        raise SimError("InvalidAction", "The request `Action` is invalid or not found.")
    if _required(headers, "x-tc-version", "X-TC-Version") != VERSION:
        raise SimError("NoSuchVersion", "The requested API version does not exist.")
    region = _required(headers, "x-tc-region", "X-TC-Region")
    if region not in regions:
        raise SimError("UnsupportedRegion", f"The region `{region}` is not supported.")

    key = keys.get(authorization.secret_id)
    if key is None:
        raise SimError(
            "AuthFailure.SecretIdNotFound",
            "The SecretId is not found, please ensure that your SecretId is correct.",
        )
    timestamp = _timestamp(headers, now)
    query = target.partition("?")[2]
    _check_signature(method, query, headers, body, authorization, key, timestamp)
    if not _same_token(headers.get("x-tc-token"), key.token):
        raise SimError("AuthFailure.TokenFailure", "The token is invalid.")

    params, from_query = _params(method, query, body)
    return VerifiedRequest(
        action=action,
        region=region,
        secret_id=authorization.secret_id,
        timestamp=timestamp,
        params=params,
        from_query=from_query,
        request_client=headers.get("x-tc-requestclient", ""),
    )


def _same_token(given: str | None, expected: str | None) -> bool:
    """Whether the request's token is the key's; neither may be missing
    alone. Compared in constant time, as a secret must be, and as bytes,
    since ``compare_digest`` refuses non-ASCII text."""
    if given is None or expected is None:
        return given is expected
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"),
        expected.encode("utf-8", "surrogateescape"),
    )


def _check_method(method: str, headers: Mapping[str, str]) -> None:
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if method == "POST" and content_type == "application/json":
        return
    if method == "GET":
        return
    raise SimError(
        "UnsupportedProtocol",
        f"{method} with Content-Type `{content_type}` is not supported; "
        "use POST application/json or GET.",
    )


def _parse_authorization(headers: Mapping[str, str]) -> _signing.Authorization:
    try:
        return _signing.parse_authorization(headers.get("authorization", ""))
    except ValueError:
        raise SimError(
            "AuthFailure.InvalidAuthorization",
            "The `Authorization` header does not meet the TC3-HMAC-SHA256 standard.",
        ) from None


def _required(headers: Mapping[str, str], name: str, display: str) -> str:
    value = headers.get(name, "").strip()
    if not value:
        raise SimError(
            "MissingParameter",
            f"The request is missing a required parameter `{display}`.",
        )
    return value


def _timestamp(headers: Mapping[str, str], now: float) -> int:
    raw = _required(headers, "x-tc-timestamp", "X-TC-Timestamp")
    # isdigit() alone passes "²" (a latin-1 header byte) and int() refuses
    # both that and a value of thousands of digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
        raise SimError("InvalidParameter", "Parameter `X-TC-Timestamp` type error.")
    timestamp = int(raw)
    if abs(now - timestamp) > MAX_SKEW:
        raise SimError(
            "AuthFailure.SignatureExpire",
            "The signature is expired, please request again.",
        )
    return timestamp


def _check_signature(
    method: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    authorization: _signing.Authorization,
    key: Key,
    timestamp: int,
) -> None:
    signed = authorization.signed_headers
    usable = (
        authorization.date == _signing.credential_date(timestamp)
        and authorization.service == SERVICE
        and {"content-type", "host"} <= set(signed)
        and all(name in headers for name in signed)
    )
    if usable:
        # A client that opted out of hashing the body (X-TC-Content-SHA256,
        # TCR-API.md §1.3) hashes these words in its place.
        unsigned = headers.get("x-tc-content-sha256", "").strip() == _UNSIGNED
        payload = _UNSIGNED.encode() if unsigned else body
        canonical = _signing.canonical_request(method, query, headers, signed, payload)
        to_sign = _signing.string_to_sign(timestamp, SERVICE, canonical)
        expected = _signing.signature(
            key.secret_key, authorization.date, SERVICE, to_sign
        )
        usable = hmac.compare_digest(expected, authorization.signature)
    if not usable:
        raise SimError(
            "AuthFailure.SignatureFailure",
            "The provided credentials could not be validated. "
            "Please check your signature is correct.",
        )


def _params(method: str, query: str, body: bytes) -> tuple[dict[str, Any], bool]:
    if method == "GET":
        pairs = parse_qsl(query, keep_blank_values=True)
        return unflatten(pairs), True
    try:
        params = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise SimError(
            "InvalidParameter", "The request body is not valid JSON."
        ) from None
    if not isinstance(params, dict):
        raise SimError("InvalidParameter", "The request body is not a JSON object.")
    return params, False

"""TC3-HMAC-SHA256, the request signature of Tencent Cloud API 3.0 (sans-IO).

Both sides use this module: the client signs, the simulator verifies. The
steps follow TCR-API.md §1.4:

1. CanonicalRequest: method, ``/``, query, the signed headers as
   ``name:value`` lines (a blank line follows them), their names, and the
   SHA-256 of the body.
2. StringToSign: algorithm, timestamp, credential scope
   ``<UTC date>/<service>/tc3_request`` and the SHA-256 of step 1.
3. A key derived from ``"TC3" + SecretKey`` through the date, the service
   and ``tc3_request``, then HMAC-SHA256 of step 2.

The body is hashed as raw bytes: a server must never re-serialise JSON,
because SDKs differ in spacing and escaping.

The newer official doc also signs ``x-tc-action`` with its value lower-cased;
the SDKs sign only ``content-type;host``. A verifier therefore rebuilds the
canonical headers from the ``SignedHeaders`` the request names, and lower-
cases ``x-tc-action`` wherever it is signed.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ALGORITHM",
    "Authorization",
    "canonical_request",
    "credential_date",
    "parse_authorization",
    "sign",
    "signature",
    "string_to_sign",
]

ALGORITHM = "TC3-HMAC-SHA256"
DEFAULT_SIGNED_HEADERS = ("content-type", "host")

_AUTHORIZATION = re.compile(
    r"TC3-HMAC-SHA256 Credential=(?P<id>[^/\s,]+)/(?P<date>\d{4}-\d{2}-\d{2})"
    r"/(?P<service>[^/\s,]+)/tc3_request, ?SignedHeaders=(?P<headers>[a-z0-9;-]+),"
    r" ?Signature=(?P<signature>[0-9a-f]{64})"
)


@dataclass(frozen=True)
class Authorization:
    """The parts of an ``Authorization: TC3-HMAC-SHA256 ...`` header."""

    secret_id: str
    date: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    def __repr__(self) -> str:
        # The signature is not a secret, but it is a bearer proof for five
        # minutes; keep it out of logs like the rest of the header.
        return (
            f"Authorization(secret_id={self.secret_id!r}, date={self.date!r}, "
            f"service={self.service!r}, signed_headers={self.signed_headers!r})"
        )


def credential_date(timestamp: int) -> str:
    """The ``YYYY-MM-DD`` UTC date of a unix timestamp, as the scope needs.

    The doc warns that a local (UTC+8) date breaks signatures near midnight.
    """
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d")


def canonical_request(
    method: str,
    query: str,
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    body: bytes,
) -> str:
    """Build step 1, the CanonicalRequest.

    Args:
        method: ``POST`` or ``GET``.
        query: The query string as sent, without ``?`` (``""`` for POST).
        headers: Header values by lower-case name; must hold every signed one.
        signed_headers: Lower-case names, in the order they are signed.
        body: The raw body bytes.

    Returns:
        The canonical request text.

    Raises:
        KeyError: A signed header is missing from ``headers``.
    """
    lines = []
    for name in signed_headers:
        value = headers[name].strip()
        if name == "x-tc-action":
            value = value.lower()
        lines.append(f"{name}:{value}\n")
    return "\n".join(
        [
            method,
            "/",
            query,
            "".join(lines),
            ";".join(signed_headers),
            hashlib.sha256(body).hexdigest(),
        ]
    )


def string_to_sign(timestamp: int, service: str, canonical: str) -> str:
    """Build step 2, the StringToSign, from a canonical request."""
    scope = f"{credential_date(timestamp)}/{service}/tc3_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def signature(secret_key: str, date: str, service: str, to_sign: str) -> str:
    """Step 3: derive the signing key and sign the StringToSign.

    Returns:
        The lower-case hex signature.
    """
    key = _hmac(("TC3" + secret_key).encode(), date)
    key = _hmac(key, service)
    key = _hmac(key, "tc3_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def sign(
    secret_id: str,
    secret_key: str,
    *,
    service: str,
    timestamp: int,
    headers: Mapping[str, str],
    body: bytes,
    method: str = "POST",
    query: str = "",
    signed_headers: Sequence[str] = DEFAULT_SIGNED_HEADERS,
) -> str:
    """Sign a request and return its ``Authorization`` header value.

    Args:
        secret_id: The SecretId named in the credential.
        secret_key: The SecretKey; used only to derive the signing key.
        service: The product, ``tcr`` for TCR.
        timestamp: The ``X-TC-Timestamp`` value (unix seconds).
        headers: Header values by lower-case name (at least the signed ones).
        body: The exact body bytes that will be sent.
        method: ``POST`` or ``GET``.
        query: The exact query string that will be sent (GET).
        signed_headers: Lower-case header names to sign.

    Returns:
        ``TC3-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``.
    """
    canonical = canonical_request(method, query, headers, signed_headers, body)
    date = credential_date(timestamp)
    proof = signature(
        secret_key, date, service, string_to_sign(timestamp, service, canonical)
    )
    return (
        f"{ALGORITHM} Credential={secret_id}/{date}/{service}/tc3_request, "
        f"SignedHeaders={';'.join(signed_headers)}, Signature={proof}"
    )


def parse_authorization(value: str) -> Authorization:
    """Split an ``Authorization`` header into its parts.

    Raises:
        ValueError: The value is not a TC3-HMAC-SHA256 authorization.
    """
    match = _AUTHORIZATION.fullmatch(value.strip())
    if match is None:
        raise ValueError("not a TC3-HMAC-SHA256 Authorization header")
    return Authorization(
        secret_id=match["id"],
        date=match["date"],
        service=match["service"],
        signed_headers=tuple(match["headers"].split(";")),
        signature=match["signature"],
    )


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()

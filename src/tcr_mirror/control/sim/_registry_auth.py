"""The Docker registry token service in front of simulated instances (sans-IO).

Flow (distribution's token authentication spec, TCR-API.md §3.3): a
registry configured with ``auth: token`` answers an anonymous request with
401 and ``WWW-Authenticate: Bearer realm=<us>``; the client asks us
``GET /service/token?service=...&scope=repository:ns/repo:pull,push``
with HTTP Basic ``<Username>:<instance token>``, as ``docker login`` does
with the answer of ``CreateInstanceToken`` (§3.2). We check the password is
an instance token we signed, unexpired, for an instance that still exists,
and, for a long-term token, that it is still listed and enabled, and that
the username is the token's ``operatorUin``. Then we hand back a registry
JWT (:mod:`._jwt`, with an ``x5c`` chain) granting what the scopes ask.

Disabling or deleting a long-term token stops new registry tokens at once;
a registry token already issued stays valid until it expires (``lifetime``,
five minutes), as with any bearer token.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import json
import logging
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from ._state import SimState

__all__ = ["RegistryTokenService"]

logger = logging.getLogger(__name__)

Answer = tuple[int, list[tuple[str, str]], bytes]

_ACTIONS = frozenset({"pull", "push", "delete", "*"})


class _Refused(Exception):
    """Credentials not accepted; the message is for the log, not the client."""


class RegistryTokenService:
    """Issues registry JWTs in exchange for simulated instance tokens.

    Args:
        state: The simulated account (instances, tokens, signing key).
        issuer: The ``iss`` claim; the registry's ``auth.token.issuer``.
        lifetime: Seconds a registry token lives (``expires_in``).
    """

    def __init__(self, state: SimState, *, issuer: str, lifetime: int = 300) -> None:
        self.state = state
        self.issuer = issuer
        self.lifetime = lifetime

    def handle(self, query: str, headers: Mapping[str, str]) -> Answer:
        """Answer ``GET /service/token?<query>``.

        Returns:
            200 with the token JSON, 400 without ``service``, or 401 with
            the registry error JSON when the credentials are refused.
        """
        pairs = parse_qsl(query, keep_blank_values=True)
        service = next((value for name, value in pairs if name == "service"), "")
        if not service:
            return _error(400, "UNSUPPORTED", "the service parameter is required")
        scopes = [
            scope for name, value in pairs if name == "scope" for scope in value.split()
        ]
        try:
            username = self._authenticate(headers.get("authorization", ""))
        except _Refused as exc:
            logger.info(
                "%s",
                json.dumps({"event": "registry_token_refused", "reason": str(exc)}),
            )
            return _error(401, "UNAUTHORIZED", "authentication required")
        access = [entry for entry in map(_access, scopes) if entry is not None]
        token, issued_at = self._issue(username, service, access)
        logger.info(
            "%s",
            json.dumps(
                {
                    "event": "registry_token_issued",
                    "username": username,
                    "scopes": scopes,
                }
            ),
        )
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.lifetime,
            "issued_at": issued_at,
        }
        return 200, [("content-type", "application/json")], json.dumps(body).encode()

    def _authenticate(self, authorization: str) -> str:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise _Refused("no basic credentials")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _Refused("malformed basic credentials") from None
        username, _, password = decoded.partition(":")
        try:
            claims = self.state.signing_key.decode(password)
        except ValueError as exc:
            raise _Refused(f"not an instance token: {exc}") from None
        self._check_claims(claims)
        if not hmac.compare_digest(
            username.encode(), str(claims["operatorUin"]).encode()
        ):
            raise _Refused("username is not the token's operator")
        return username

    def _check_claims(self, claims: dict[str, Any]) -> None:
        state = self.state
        state.settle()
        now = state.now()
        expires = claims.get("exp")
        if not isinstance(expires, int) or expires <= now:
            raise _Refused("instance token expired")
        if "operatorUin" not in claims:
            raise _Refused("instance token has no operator")
        instance = state.instances.get(str(claims.get("registryId")))
        if instance is None or instance.status in ("Deleting", "Pending"):
            raise _Refused("instance does not exist or is not ready")
        token_id = claims.get("tokenId")
        if token_id is None:
            return
        record = state.tokens.get(str(token_id))
        if record is None or record.registry_id != instance.registry_id:
            raise _Refused("long-term token was deleted")
        if not record.enabled:
            raise _Refused("long-term token is disabled")

    def _issue(
        self, username: str, service: str, access: list[dict[str, Any]]
    ) -> tuple[str, str]:
        now = int(self.state.now())
        claims = {
            "iss": self.issuer,
            "sub": username,
            "aud": service,
            "exp": now + self.lifetime,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = self.state.signing_key.encode(claims, with_chain=True)
        moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
        return token, moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _access(scope: str) -> dict[str, Any] | None:
    # "repository:ns/repo:pull,push"; the name may itself hold a colon
    # (a registry host with a port), so the type and actions are the ends.
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    granted = [action for action in actions.split(",") if action in _ACTIONS]
    return {"type": kind, "name": name, "actions": granted}


def _error(status: int, code: str, message: str) -> Answer:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    headers = [("content-type", "application/json")]
    if status == 401:
        headers.append(("www-authenticate", 'Basic realm="tcr-mirror simulator"'))
    return status, headers, body.encode()

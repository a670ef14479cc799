"""A Docker token server for tests: the auth half of a token-auth registry.

The registry (docker-registry 2.8) answers 401 with a ``Bearer`` challenge
naming our realm, service and scope; the client asks us for a token with
basic credentials; we sign a JWT that the registry checks against the
certificate in its ``rootcertbundle``.

docker-registry finds the signing key through the JWT header's ``kid``, which
it compares with the libtrust key ID of each public key in the bundle: the
base32 of the first 30 bytes of sha256(DER public key), in groups of four
characters joined by colons. The key ID, the certificate and base64url come
from the TCR simulator's token code; the signing does not: the simulator
signs RS256, and we sign with ES256 (P-256), whose JWS signature is the raw
``r || s`` pair, not DER.

Note that docker-registry accepts a token for 60 s past its ``exp`` (its
clock-skew leeway), so a short ``expires_in`` tests the client's renewal
logic, not the registry's refusal.

The server runs in a thread so that sync and async tests can both use it.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tcr_mirror.control.sim._jwt import b64url_encode, self_signed_ca
from tcr_mirror.control.sim._jwt import libtrust_kid as libtrust_key_id

__all__ = [
    "Grant",
    "TokenRequest",
    "TokenServer",
    "libtrust_key_id",
    "parse_scopes",
]


@dataclass(frozen=True)
class Grant:
    """One entry of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """What one request to the token endpoint asked for and what it got.

    ``status`` is the HTTP status we answered; ``granted`` is empty when no
    token was issued or when nothing asked for was allowed.
    """

    method: str
    account: str | None
    service: str | None
    scopes: tuple[str, ...]
    status: int
    granted: tuple[Grant, ...]
    user_agent: str


def parse_scopes(values: Iterable[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Splits ``type:name:action,action`` scopes (space-separated or repeated).

    Returns:
        ``(type, name, actions)`` triples; malformed scopes are skipped, as
        distribution's token servers do.
    """
    parsed = []
    for value in values:
        for scope in value.split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name and actions:
                parsed.append((kind, name, tuple(actions.split(","))))
    return parsed


class TokenServer:
    """Issues registry tokens to known users, counting every request.

    Args:
        users: account name to password.
        service: the service name the registry announces and checks as ``aud``.
        expires_in: token lifetime in seconds (may be changed while running).
        anonymous_actions: actions granted to requests without credentials;
            by default none, so the registry refuses anonymous pulls.
        allowed_actions: per account, the actions it may have; accounts not
            listed get every action they ask for.
    """

    def __init__(
        self,
        users: dict[str, str],
        *,
        service: str = "test-registry",
        issuer: str = "tcr-mirror-test-token-server",
        expires_in: int = 300,
        anonymous_actions: Iterable[str] = (),
        allowed_actions: dict[str, Iterable[str]] | None = None,
    ) -> None:
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.anonymous_actions = frozenset(anonymous_actions)
        self.allowed_actions = {
            account: frozenset(actions)
            for account, actions in (allowed_actions or {}).items()
        }
        # When set, every token request is answered with this status.
        self.fail_with: int | None = None
        self.rotate_key()
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def rotate_key(self) -> None:
        """Sign with a new key from now on, as a token service rotating its
        key does: a registry restarted with the new certificate refuses
        every token signed before."""
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._kid = libtrust_key_id(self._key.public_key())
        certificate = self_signed_ca(self._key, self.issuer, days=30)
        self.cert_pem = certificate.public_bytes(serialization.Encoding.PEM)

    # Lifecycle.

    def start(self) -> None:
        """Listens on a free 127.0.0.1 port and serves in a daemon thread."""
        handler = type("Handler", (_Handler,), {"token_server": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown() quick at teardown.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="token-server",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> TokenServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # What tests look at.

    @property
    def port(self) -> int:
        assert self._server is not None, "token server not started"
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def requests(self) -> list[TokenRequest]:
        """Every request served so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def tokens_issued(self) -> int:
        return sum(1 for request in self.requests if request.status == 200)

    def write_cert_bundle(self, path: Path) -> Path:
        """Writes the certificate the registry needs as ``rootcertbundle``."""
        path.write_bytes(self.cert_pem)
        return path

    # Token logic (called from the handler threads).

    def issue(
        self, account: str | None, service: str | None, scopes: list[str]
    ) -> tuple[str, tuple[Grant, ...]]:
        """Returns a signed token and what it grants."""
        grants = self._grants(account, scopes)
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": service or self.service,
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [grant.claim() for grant in grants],
        }
        return self._sign(claims), grants

    def _grants(self, account: str | None, scopes: list[str]) -> tuple[Grant, ...]:
        if account is None:
            allowed: frozenset[str] | None = self.anonymous_actions
        else:
            allowed = self.allowed_actions.get(account)
        grants = []
        for kind, name, actions in parse_scopes(scopes):
            kept = tuple(a for a in actions if allowed is None or a in allowed)
            if kept:
                grants.append(Grant(kind, name, kept))
        return tuple(grants)

    def _sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "ES256", "kid": self._kid}
        signing_input = ".".join(
            b64url_encode(json.dumps(part, separators=(",", ":")).encode())
            for part in (header, claims)
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{b64url_encode(signature)}"

    def check_password(self, account: str, password: str) -> bool:
        expected = self.users.get(account)
        return expected is not None and secrets.compare_digest(
            expected.encode(), password.encode()
        )

    def record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        # Requests are recorded in TokenServer.requests, not on stderr.
        pass

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        account = self._basic_credentials()
        self._answer("GET", account, query)

    def do_POST(self) -> None:
        # The OAuth2 password grant containerd tries before falling back to GET.
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if form.get("grant_type") != ["password"]:
            self._reply(400, {"error": "unsupported_grant_type"})
            return
        account: str | None | bool = None
        if "username" in form:
            user, password = form["username"][0], form.get("password", [""])[0]
            account = (
                user if self.token_server.check_password(user, password) else False
            )
        self._answer("POST", account, form)

    def _basic_credentials(self) -> str | None | bool:
        """Returns the account, None when anonymous, False when refused."""
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        return user if self.token_server.check_password(user, password) else False

    def _answer(
        self, method: str, account: str | None | bool, params: dict[str, list[str]]
    ) -> None:
        server = self.token_server
        service = params.get("service", [None])[0]
        scopes = params.get("scope", [])
        user = account if isinstance(account, str) else None

        # Decide the status first, then record the request with what it got.
        grants: tuple[Grant, ...] = ()
        if server.fail_with is not None:
            status, body = server.fail_with, {"error": "injected failure"}
        elif account is False:
            status, body = 401, {"error": "invalid credentials"}
        elif service is not None and service != server.service:
            status, body = 400, {"error": f"unknown service {service!r}"}
        else:
            token, grants = server.issue(user, service, scopes)
            status, body = 200, _token_body(token, server.expires_in)
        server.record(
            TokenRequest(
                method=method,
                account=user,
                service=service,
                scopes=tuple(scopes),
                status=status,
                granted=grants,
                user_agent=self.headers.get("User-Agent", ""),
            )
        )
        self._reply(status, body)

    def _reply(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="token"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _token_body(token: str, expires_in: int) -> dict[str, object]:
    issued_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "token": token,
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": issued_at,
    }

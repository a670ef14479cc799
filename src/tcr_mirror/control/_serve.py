"""``tcr-mirror control serve``: fresh pull credentials for the node daemons.

For every configured registry the server holds a temporary instance token
(``CreateInstanceToken`` with ``TokenType=temp``, valid one hour) and
renews it well before it expires: at ``renew_fraction`` (2/3) of its life,
and after a failure again and again with capped exponential backoff, so a
TCR hiccup of a few minutes never leaves the nodes without a valid token.

The node-credentials endpoint (the contract the node mirror consumes):
``GET /v1/credentials?registry=<host>`` with ``Authorization: Bearer <node
secret>`` answers 200 ``{"registry", "username", "password", "expires_at"}``,
401 ``{"error": "unauthorized"}`` on a bad secret (compared in constant
time, checked before anything else is revealed), 404 ``{"error": "unknown
registry"}``, 503 ``{"error": "no token yet"}`` before the first token and
503 ``{"error": "token expired", "expires_at"}`` once the token in hand has
expired (renewals keep failing), so the node tries again later instead of
logging in with a dead token. ``GET /healthz`` and
``GET /metrics`` (Prometheus) are served on the same port, or metrics on a
port of their own.

:class:`RenewalSchedule` is the sans-IO part: it is told when a token was
issued or a renewal failed, and says when to try next.
"""

from __future__ import annotations

import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import prometheus_client
import trio

from ._client import CallRecord, TcrClient
from ._errors import TcrError

__all__ = [
    "ControlMetrics",
    "Credential",
    "CredentialsServer",
    "RenewalSchedule",
    "TokenKeeper",
    "resolve_registries",
    "run",
    "tcr_issuer",
]

logger = logging.getLogger(__name__)

Issuer = Callable[[str], Awaitable["Credential"]]


# --- sans-IO schedule ----------------------------------------------------


class RenewalSchedule:
    """When to (re)issue one registry's token. Times are one monotonic clock.

    Starts due at once. After a token is issued with ``lifetime`` seconds to
    live, the next renewal is at ``renew_fraction`` of that life. After a
    failure the next try is ``min(backoff_cap, backoff_base * 2**(n-1))``
    later (n = failures in a row), shortened by up to ``jitter`` of itself.
    """

    def __init__(
        self,
        *,
        renew_fraction: float = 2 / 3,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise ValueError("renew_fraction must be between 0 and 1")
        self.renew_fraction = renew_fraction
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.next_at = float("-inf")
        self.failures = 0
        self.expires_at: float | None = None

    def issued(self, now: float, lifetime: float) -> float:
        """Record a token issued at ``now``; returns the next renewal time.

        A token already expired on arrival (clock skew) is a failed
        renewal: retrying at once would only get another such token.
        """
        if lifetime <= 0:
            return self.failed(now)
        self.failures = 0
        self.expires_at = now + lifetime
        self.next_at = now + lifetime * self.renew_fraction
        return self.next_at

    def failed(self, now: float) -> float:
        """Record a failed renewal at ``now``; returns the next try time."""
        self.failures += 1
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (self.failures - 1))
        delay -= delay * self.jitter * self._rng.random()
        self.next_at = now + delay
        return self.next_at

    def delay(self, now: float) -> float:
        """Seconds from ``now`` until the next try (0 when due)."""
        return max(0.0, self.next_at - now)


# --- tokens --------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """A registry login: username and token, and when it expires (unix s)."""

    registry: str
    username: str
    password: str
    expires_at: float

    def __repr__(self) -> str:
        return (
            f"Credential(registry={self.registry!r}, username={self.username!r}, "
            f"expires_at={self.expires_at!r})"
        )

    def as_json(self) -> dict[str, Any]:
        """The contract's response body."""
        return {
            "registry": self.registry,
            "username": self.username,
            "password": self.password,
            "expires_at": self.expires_at,
        }


def tcr_issuer(client: TcrClient, registries: Mapping[str, str]) -> Issuer:
    """Issue temporary instance tokens through TCR.

    Args:
        client: the TCR client.
        registries: registry host -> registry id.

    Returns:
        An async function from registry host to a fresh credential; it
        raises TcrError when TCR refuses or cannot be reached.
    """

    async def issue(host: str) -> Credential:
        answer = await client.call(
            "CreateInstanceToken",
            {"RegistryId": registries[host], "TokenType": "temp"},
        )
        try:
            expires_at = float(answer.data["ExpTime"]) / 1000  # epoch ms, §2.1
            username = str(answer.data["Username"])
            token = str(answer.data["Token"])
        except (KeyError, TypeError, ValueError):
            raise TcrError(
                "ClientError.BadResponse",
                "CreateInstanceToken answer lacks Username, Token or ExpTime",
                request_id=answer.request_id,
                action="CreateInstanceToken",
            ) from None
        return Credential(host, username, token, expires_at)

    return issue


class ControlMetrics:
    """The control plane's Prometheus metrics, in their own registry."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None):
        self.registry = registry or prometheus_client.CollectorRegistry()
        self.api_calls = prometheus_client.Counter(
            "tcr_mirror_control_api_calls",
            "TCR API calls by action and answer code (OK on success).",
            ["action", "code"],
            registry=self.registry,
        )
        self.token_expiry = prometheus_client.Gauge(
            "tcr_mirror_control_token_expiry_timestamp_seconds",
            "Unix time the current temporary token of a registry expires.",
            ["registry"],
            registry=self.registry,
        )
        self.token_renewal = prometheus_client.Gauge(
            "tcr_mirror_control_token_last_renewal_timestamp_seconds",
            "Unix time of the last successful token renewal of a registry.",
            ["registry"],
            registry=self.registry,
        )

    def on_call(self, call: CallRecord) -> None:
        """A ``TcrClient`` ``on_call`` hook counting calls."""
        code = call.error.code if call.error is not None else "OK"
        self.api_calls.labels(action=call.action, code=code).inc()

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return prometheus_client.generate_latest(self.registry)


class TokenKeeper:
    """Keeps one fresh temporary token per registry host.

    Args:
        hosts: the registry hosts to serve.
        issue: async function from host to a new credential.
        metrics: updated on every renewal.
        schedule: makes the :class:`RenewalSchedule` of each host.
    """

    def __init__(
        self,
        hosts: list[str],
        issue: Issuer,
        *,
        metrics: ControlMetrics | None = None,
        schedule: Callable[[], RenewalSchedule] = RenewalSchedule,
    ) -> None:
        self.hosts = list(hosts)
        self._issue = issue
        self.metrics = metrics or ControlMetrics()
        self.schedules = {host: schedule() for host in self.hosts}
        self._current: dict[str, Credential] = {}
        self.renewals = 0

    def get(self, host: str) -> Credential | None:
        """The current credential of ``host``; None before the first one."""
        return self._current.get(host)

    async def run(self) -> None:
        """Renew every host's token forever (until cancelled)."""
        async with trio.open_nursery() as nursery:
            for host in self.hosts:
                nursery.start_soon(self._keep, host)

    async def _keep(self, host: str) -> None:
        schedule = self.schedules[host]
        while True:
            await trio.sleep(schedule.delay(trio.current_time()))
            try:
                credential = await self._issue(host)
            except (TcrError, OSError) as exc:
                # OSError: the audit log could not take the event (a full
                # disk). A token nobody recorded is not handed out, and the
                # current one keeps serving while we retry.
                retry_in = schedule.failed(trio.current_time()) - trio.current_time()
                _log(
                    logging.WARNING,
                    "token_renewal_failed",
                    registry=host,
                    code=exc.code if isinstance(exc, TcrError) else "OSError",
                    message=None if isinstance(exc, TcrError) else exc.strerror,
                    request_id=getattr(exc, "request_id", None),
                    failures=schedule.failures,
                    retry_in=round(retry_in, 3),
                )
                continue
            self._store(host, credential, schedule)

    def _store(
        self, host: str, credential: Credential, schedule: RenewalSchedule
    ) -> None:
        now_unix = time.time()
        lifetime = credential.expires_at - now_unix
        schedule.issued(trio.current_time(), lifetime)
        if lifetime <= 0:
            _log(
                logging.WARNING,
                "token_renewal_failed",
                registry=host,
                code="ClientError.ExpiredToken",
                message="TCR answered a token that has already expired",
                failures=schedule.failures,
                retry_in=round(schedule.delay(trio.current_time()), 3),
            )
            return
        self._current[host] = credential
        self.renewals += 1
        self.metrics.token_expiry.labels(registry=host).set(credential.expires_at)
        self.metrics.token_renewal.labels(registry=host).set(now_unix)
        _log(
            logging.INFO,
            "token_renewed",
            registry=host,
            expires_at=credential.expires_at,
            lifetime=round(lifetime, 3),
        )


# --- HTTP ----------------------------------------------------------------

_MAX_REQUESTS_PER_CONNECTION = 1000
_READ_TIMEOUT = 30.0
# No request here has a body; this much is slack for clients that send one.
_MAX_BODY = 64 * 1024


class CredentialsServer:
    """The node-credentials endpoint, health and metrics over HTTP/1.1.

    Args:
        keeper: where the credentials come from.
        node_secret: the shared secret nodes present as a Bearer token.
        serve_metrics: answer ``/metrics`` on this server.
        serve_credentials: answer ``/v1/credentials`` (off for a server
            that exposes metrics only).
        clock: Unix time, to tell an expired token.
    """

    def __init__(
        self,
        keeper: TokenKeeper,
        node_secret: str,
        *,
        serve_metrics: bool = True,
        serve_credentials: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not node_secret:
            raise ValueError("the node secret is empty")
        self.keeper = keeper
        self._secret = node_secret.encode()
        self._clock = clock
        self.serve_metrics = serve_metrics
        self.serve_credentials = serve_credentials

    def __repr__(self) -> str:
        return f"CredentialsServer(hosts={self.keeper.hosts!r})"

    def respond(
        self, method: str, target: str, authorization: bytes | None
    ) -> tuple[int, str, bytes]:
        """Answer one request (sans-IO).

        Returns:
            (status, content type, body).
        """
        url = urlsplit(target)
        if url.path == "/healthz":
            return _json(200, {"status": "ok"})
        if url.path == "/metrics" and self.serve_metrics:
            return (
                200,
                prometheus_client.CONTENT_TYPE_LATEST,
                self.keeper.metrics.render(),
            )
        if url.path != "/v1/credentials" or not self.serve_credentials:
            return _json(404, {"error": "not found"})
        if method != "GET":
            return _json(405, {"error": "method not allowed"})
        if not hmac.compare_digest(_bearer_token(authorization), self._secret):
            return _json(401, {"error": "unauthorized"})
        host = (parse_qs(url.query).get("registry") or [""])[0]
        if host not in self.keeper.hosts:
            return _json(404, {"error": "unknown registry"})
        credential = self.keeper.get(host)
        if credential is None:
            return _json(503, {"error": "no token yet"})
        if credential.expires_at <= self._clock():
            error = {"error": "token expired", "expires_at": credential.expires_at}
            return _json(503, error)
        return _json(200, credential.as_json())

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it or errs."""
        conn = h11.Connection(h11.SERVER)
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                if not await self._one_request(conn, stream):
                    break
        except (h11.ProtocolError, trio.BrokenResourceError, trio.TooSlowError):
            pass
        finally:
            await stream.aclose()

    async def _one_request(self, conn: h11.Connection, stream: trio.abc.Stream) -> bool:
        # The timeout bounds the whole request, not each read: a client
        # sending a byte now and then, or a body without end, would hold
        # its connection (and descriptor) for ever.
        with trio.fail_after(_READ_TIMEOUT):
            request = await _next_event(conn, stream)
            if not isinstance(request, h11.Request):
                return False
            size = 0
            while not isinstance(
                event := await _next_event(conn, stream), h11.EndOfMessage
            ):
                size += len(event.data) if isinstance(event, h11.Data) else 0
                if size > _MAX_BODY:
                    error = _json(413, {"error": "request too large"})
                    await self._send(conn, stream, request, *error)
                    return False
        headers = dict(request.headers)
        status, content_type, body = self.respond(
            request.method.decode(),
            request.target.decode(),
            headers.get(b"authorization"),
        )
        await self._send(conn, stream, request, status, content_type, body)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        request: h11.Request,
        status: int,
        content_type: str,
        body: bytes,
    ) -> None:
        path = urlsplit(request.target.decode()).path
        if path != "/healthz":
            _log(logging.DEBUG, "http_request", path=path, status=status)
        response_headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
        ]
        if conn.their_state is not h11.DONE:
            response_headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=status, headers=response_headers))
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        # A client that never reads its answers must not hold us either.
        with trio.fail_after(_READ_TIMEOUT):
            await stream.send_all(data)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[
            list[trio.SocketListener]
        ] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 = any free port) until cancelled."""
        await trio.serve_tcp(self.handle, port, host=host, task_status=task_status)


def _bearer_token(authorization: bytes | None) -> bytes:
    """The token of a ``Bearer`` Authorization header; b"" for any other."""
    # RFC 9110 §11.1: the scheme is case-insensitive, then one or more spaces.
    scheme, _, token = (authorization or b"").partition(b" ")
    if scheme.lower() != b"bearer":
        return b""
    return token.strip(b" ")


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(65536)))


def _json(status: int, body: Mapping[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


def _log(level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s", json.dumps({"event": event, **fields}))


async def resolve_registries(client: TcrClient, specs: list[str]) -> dict[str, str]:
    """Turn ``HOST=REGISTRY_ID`` or bare ``REGISTRY_ID`` specs into host -> id.

    A bare id is looked up with DescribeInstances; its host is the
    instance's ``PublicDomain``.

    Raises:
        ValueError: a spec is empty or names an instance TCR does not know.
        TcrError: DescribeInstances failed.
    """
    registries: dict[str, str] = {}
    for spec in specs:
        host, sep, registry_id = spec.rpartition("=")
        if not sep:
            host = await _public_domain(client, registry_id)
        if not host or not registry_id:
            raise ValueError(f"bad registry {spec!r}: expected HOST=REGISTRY_ID")
        registries[host] = registry_id
    return registries


async def _public_domain(client: TcrClient, registry_id: str) -> str:
    answer = await client.call("DescribeInstances", {"Registryids": [registry_id]})
    for registry in answer.data.get("Registries") or []:
        if registry.get("RegistryId") == registry_id and registry.get("PublicDomain"):
            return str(registry["PublicDomain"])
    raise ValueError(f"registry {registry_id} not found in {client.region}")


async def run(
    keeper: TokenKeeper,
    node_secret: str,
    listen: tuple[str, int],
    *,
    metrics_listen: tuple[str, int] | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Keep tokens fresh and serve them until cancelled.

    Args:
        keeper: the token keeper (its renewals start at once).
        node_secret: the shared node secret.
        listen: host and port of the credentials endpoint (port 0: any).
        metrics_listen: a separate host and port for ``/metrics``.
        on_ready: called once with the bound addresses.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        main = CredentialsServer(
            keeper, node_secret, serve_metrics=metrics_listen is None
        )
        addresses = {"listen": await _start(nursery, main, listen)}
        if metrics_listen is not None:
            metrics = CredentialsServer(keeper, node_secret, serve_credentials=False)
            addresses["metrics"] = await _start(nursery, metrics, metrics_listen)
        if on_ready is not None:
            on_ready(addresses)


async def _start(
    nursery: trio.Nursery, server: CredentialsServer, where: tuple[str, int]
) -> str:
    try:
        listeners = await nursery.start(server.serve, where[0], where[1])
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot listen on {where[0]}:{where[1]}: {exc.strerror}"
        ) from None
    host, port = listeners[0].socket.getsockname()[:2]
    return f"{host}:{port}"

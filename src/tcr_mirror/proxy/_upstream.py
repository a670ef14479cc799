"""The client side: one :class:`Upstream` per registry on the allow-list.

It speaks the pull API to a real registry with whatever the registry asks
for: nothing, Basic credentials, or the Docker token flow (tokens cached per
scope). Redirects to blob storage are followed by hand so that the
``Authorization`` header never leaves the registry's origin, and only the
registry's own answers are taken as its word: a ``401`` from blob storage
is no challenge to send the registry's credentials to, and a ``429`` from
blob storage blocks nothing. A ``429`` from the registry is respected: a
short ``Retry-After`` is waited out once, a longer one (at most a few
minutes) blocks the upstream until then and is passed on to the client, so
a throttled registry is not hammered by every node's retries.

Concurrent first pulls of a repository share one token request, and a
token still valid is used without asking the credential source, so a
control plane that stalls costs nothing while the tokens it paid for last.

Opening a connection (TCP, a proxy's ``CONNECT``, TLS) is bounded as a
whole, and so is waiting for a response head: a peer that trickles one
byte at a time cannot hold a pull past its timeouts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import h11
import httpx
import trio

from tcr_mirror.proxy._auth import (
    Challenge,
    Credentials,
    RealmRefused,
    RedirectRefused,
    TokenCache,
    basic_authorization,
    origin,
    parse_challenge,
    parse_retry_after,
    parse_token_response,
    redirect_target,
    token_realm,
)
from tcr_mirror.proxy._config import tls_context
from tcr_mirror.proxy._errors import (
    Denied,
    ManifestUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamUnavailable,
)
from tcr_mirror.proxy._httpproxy import HttpProxy, ProxyPolicy, ProxyRefused
from tcr_mirror.proxy._metrics import MirrorMetrics
from tcr_mirror.proxy._rawget import RawResponse, raw_get
from tcr_mirror.proxy._singleflight import SingleFlight

__all__ = [
    "CredentialSource",
    "StaticCredentials",
    "Upstream",
    "UpstreamTimeouts",
    "status_error",
]

logger = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
# A Retry-After this short is waited out inside the request; a longer one is
# answered to the client at once.
_MAX_INLINE_RETRY_WAIT = 2.0
# A token endpoint's answer is a few KiB of JSON: a JWT and its lifetime.
_MAX_TOKEN_ANSWER = 1 << 20


class CredentialSource(Protocol):
    """Where an upstream's credentials come from.

    Static credentials, or the control plane's token service, which renews
    them while the daemon runs.
    """

    async def credentials(self) -> Credentials | None:
        """Return the current credentials, or None to stay anonymous."""
        ...

    async def keep_fresh(self) -> None:
        """Renew the credentials in the background until cancelled.

        Returns at once for a source with nothing to renew.
        """
        ...


class StaticCredentials:
    """Credentials fixed at start-up (config file or credentials file)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def credentials(self) -> Credentials | None:
        return self._credentials

    async def keep_fresh(self) -> None:
        await trio.lowlevel.checkpoint()


class UpstreamTimeouts:
    """Connect and read timeouts, in seconds.

    ``connect`` bounds each step of opening a connection (reaching the
    host or the proxy; then the ``CONNECT`` and TLS handshakes), and twice
    it bounds them together. ``read`` bounds each wait for bytes, and with
    the connection's bound, the whole wait for a response head.
    """

    def __init__(self, connect: float = 5.0, read: float = 30.0) -> None:
        self.connect = connect
        self.read = read

    @property
    def head(self) -> float:
        """The longest a request may take until its response head is in."""
        return 2 * self.connect + self.read

    def as_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(self.read, connect=self.connect, pool=self.connect)


class Upstream:
    """A registry the mirror may pull from.

    Args:
        key: The name clients select it by (containerd's ``ns``).
        base_url: ``scheme://host[:port]`` of the registry.
        credentials: Where credentials come from; None for anonymous.
        timeouts: Connect and read timeouts.
        user_agent: Sent with every request.
        http2: Offer HTTP/2 on TLS connections.
        metrics: Where to count requests and their latency.
        ca_file: CA certificates to trust on HTTPS besides the system's.
        proxies: Which HTTP proxy each URL goes through; None for none.
    """

    def __init__(
        self,
        key: str,
        base_url: str,
        *,
        credentials: CredentialSource | None = None,
        timeouts: UpstreamTimeouts | None = None,
        user_agent: str = "tcr-mirror",
        http2: bool = True,
        metrics: MirrorMetrics | None = None,
        ca_file: Path | None = None,
        proxies: ProxyPolicy | None = None,
    ) -> None:
        self.key = key
        # Two contexts: httpx offers HTTP/2 through ALPN on the context it is
        # given, while blob bodies are read raw as HTTP/1.1 and must not
        # have a server pick h2.
        self._tls = tls_context(ca_file)
        self._raw_tls = tls_context(ca_file)
        self._raw_tls.set_alpn_protocols(["http/1.1"])
        self._metrics = metrics
        self.base_url = base_url.rstrip("/")
        self._credentials = credentials
        self.timeouts = timeouts or UpstreamTimeouts()
        self._user_agent = user_agent
        self._http2 = http2
        self._proxies = proxies or ProxyPolicy()
        # One client per proxy (None: direct), made when a URL first needs
        # it. httpx never reads the environment itself: the policy decides
        # for every request, blob bodies included, so manifests and blobs
        # always take the same path.
        self._clients: dict[HttpProxy | None, httpx.AsyncClient] = {}
        self._tokens = TokenCache()
        self._token_requests: SingleFlight[str | None] = SingleFlight()
        self._challenge: Challenge | None = None
        self._blocked_until = 0.0
        self._origin = origin(self.base_url)

    def __repr__(self) -> str:
        return f"Upstream(key={self.key!r}, base_url={self.base_url!r})"

    def proxy_for(self, url: str) -> HttpProxy | None:
        """The HTTP proxy requests to ``url`` go through, if any.

        Raises:
            UpstreamUnavailable: The environment sends ``url`` through a
                proxy that is not HTTP (socks5, https), which this mirror
                cannot speak. Going direct instead could reach a host the
                operator meant to be reached only through it; a redirect to
                blob storage is where this can happen, since the node
                refuses to start when an upstream itself needs one.
        """
        ignored = self._proxies.ignored_for(url)
        if ignored is not None:
            host = urlsplit(url).hostname
            raise UpstreamUnavailable(
                f"upstream {self.key}: {ignored.variable} sends {host} through "
                f"a {ignored.scheme} proxy, and only http:// proxies are supported"
            )
        return self._proxies.for_url(url)

    def _client_for(self, url: str) -> httpx.AsyncClient:
        proxy = self.proxy_for(url)
        client = self._clients.get(proxy)
        if client is None:
            client = self._clients[proxy] = httpx.AsyncClient(
                timeout=self.timeouts.as_httpx(),
                follow_redirects=False,
                http2=self._http2,
                headers={"User-Agent": self._user_agent},
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                verify=self._tls,
                trust_env=False,
                proxy=None
                if proxy is None
                else httpx.Proxy(proxy.url, headers=proxy.headers()),
            )
        return client

    async def keep_credentials_fresh(self) -> None:
        """Renew this upstream's credentials in the background until
        cancelled; returns at once when they need no renewing."""
        if self._credentials is not None:
            await self._credentials.keep_fresh()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        closer = getattr(self._credentials, "aclose", None)
        if closer is not None:
            await closer()

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        repository: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send a pull request upstream and yield the streaming response.

        Authentication, redirects and short ``429`` waits happen inside;
        the response yielded is the final one, whatever its status.

        Raises:
            UpstreamUnavailable: The upstream could not be reached, timed
                out, or its token endpoint failed.
            TooManyRequests: The upstream asked to be left alone for a
                while.
        """
        response = await self._send(method, path, repository, headers, params)
        assert isinstance(response, httpx.Response)
        try:
            yield response
        finally:
            await response.aclose()

    @asynccontextmanager
    async def open_blob(
        self, path: str, *, repository: str, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[RawResponse]:
        """Like :meth:`request` for a blob ``GET``, with a body read raw.

        The body is read with :meth:`RawResponse.receive` in large pieces,
        on a connection of its own that is closed afterwards.
        """
        response = await self._send("GET", path, repository, headers, None, raw=True)
        assert isinstance(response, RawResponse)
        try:
            yield response
        finally:
            await response.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        repository: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        *,
        raw: bool = False,
    ) -> httpx.Response | RawResponse:
        self._check_not_blocked()
        scope = f"repository:{repository}:pull"
        answered_challenge = False
        waited = False
        while True:
            request_headers = dict(headers or {})
            authorization = await self._authorization(scope)
            if authorization:
                request_headers["Authorization"] = authorization
            url = self.base_url + path
            response = await self._follow(method, url, request_headers, params, raw)
            # Only the registry's own answers speak for it; blob storage
            # behind a redirect has its own signed URLs and its own limits.
            from_registry = origin(str(response.url)) == self._origin

            if response.status_code == 401 and from_registry and not answered_challenge:
                challenge = parse_challenge(
                    response.headers.get("www-authenticate", "")
                )
                if challenge is not None and challenge.scheme in ("basic", "bearer"):
                    await response.aclose()
                    if authorization:
                        self._drop_refused_token(scope, authorization)
                    self._challenge = challenge
                    answered_challenge = True
                    continue
            if response.status_code == 429:
                # An HTTP-date is wall-clock time; trio's clock is not.
                delay = parse_retry_after(
                    response.headers.get("retry-after"), time.time()
                )
                if delay <= _MAX_INLINE_RETRY_WAIT and not waited:
                    await response.aclose()
                    await trio.sleep(delay)
                    waited = True
                    continue
                if from_registry:
                    self._blocked_until = trio.current_time() + delay
            return response

    def _drop_refused_token(self, scope: str, authorization: str) -> None:
        # The token just refused (revoked, or signed with a rotated key)
        # must not be sent again.
        challenge = self._challenge
        token = authorization.removeprefix("Bearer ")
        if challenge is not None and challenge.scheme == "bearer":
            self._tokens.drop(self._token_key(challenge, scope), token)

    def _check_not_blocked(self) -> None:
        remaining = self._blocked_until - trio.current_time()
        if remaining > 0:
            raise TooManyRequests(
                f"upstream {self.key} asked to retry later",
                retry_after=math.ceil(remaining),
            )

    async def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
        raw: bool,
    ) -> httpx.Response | RawResponse:
        for _ in range(_MAX_REDIRECTS + 1):
            started = trio.current_time()
            response: httpx.Response | RawResponse
            try:
                if raw:
                    response = await self._raw_get(url, headers)
                else:
                    response = await self._httpx_send(method, url, headers, params)
            except UpstreamUnavailable:
                self._observe(None, started)
                raise
            self._observe(response.status_code, started)
            location = response.headers.get("location")
            if response.status_code not in (301, 302, 303, 307, 308) or not location:
                return response
            await response.aclose()
            try:
                url = redirect_target(str(response.url), location)
                leaves_origin = origin(url) != self._origin
            except RedirectRefused as exc:
                raise UpstreamUnavailable(f"upstream {self.key}: {exc}") from None
            params = None
            if leaves_origin:
                # Blob storage has its own signed URL; our credentials are
                # for the registry alone, and stay dropped for every later
                # hop of this chain.
                headers = {
                    k: v for k, v in headers.items() if k.lower() != "authorization"
                }
        raise UpstreamUnavailable(f"upstream {self.key} redirected too many times")

    async def _httpx_send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
    ) -> httpx.Response:
        client = self._client_for(url)
        request = client.build_request(method, url, headers=headers, params=params)
        try:
            # httpx bounds each read, so a proxy or registry that trickles
            # its head a byte at a time would hold the request for ever.
            with trio.fail_after(self.timeouts.head):
                return await client.send(request, stream=True)
        except (httpx.TimeoutException, trio.TooSlowError) as exc:
            raise UpstreamUnavailable(f"upstream {self.key} timed out") from exc
        except httpx.ProxyError as exc:
            # httpx says what the proxy answered: a status, never credentials.
            proxy = self.proxy_for(url)
            where = proxy.address if proxy is not None else "?"
            raise UpstreamUnavailable(
                f"upstream {self.key}: proxy {where} refused: {exc}"
            ) from exc
        except (httpx.HTTPError, UnicodeError) as exc:
            # UnicodeError: a host no IDNA encoding takes (an empty label,
            # one past 63 bytes), found only when it is resolved.
            raise UpstreamUnavailable(
                f"upstream {self.key} unreachable: {type(exc).__name__}"
            ) from exc

    async def _raw_get(self, url: str, headers: dict[str, str]) -> RawResponse:
        headers = {"User-Agent": self._user_agent, **headers}
        try:
            return await raw_get(
                url,
                headers,
                connect_timeout=self.timeouts.connect,
                read_timeout=self.timeouts.read,
                ssl_context=self._raw_tls,
                proxy=self.proxy_for(url),
            )
        except (trio.TooSlowError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"upstream {self.key} timed out") from exc
        except ProxyRefused as exc:
            raise UpstreamUnavailable(f"upstream {self.key}: {exc}") from exc
        except (OSError, h11.ProtocolError, UnicodeError) as exc:
            raise UpstreamUnavailable(
                f"upstream {self.key} unreachable: {type(exc).__name__}"
            ) from exc

    def _observe(self, status: int | None, started: float) -> None:
        if self._metrics is not None:
            elapsed = trio.current_time() - started
            self._metrics.observe_upstream(self.key, status, elapsed, time.time())

    async def _authorization(self, scope: str) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            credentials = await self._current_credentials()
            return basic_authorization(credentials) if credentials else None
        token = await self._bearer_token(challenge, scope)
        return f"Bearer {token}" if token else None

    async def _current_credentials(self) -> Credentials | None:
        if self._credentials is None:
            return None
        return await self._credentials.credentials()

    @staticmethod
    def _token_key(challenge: Challenge, scope: str) -> tuple[str, str, str]:
        return (challenge.realm, challenge.params.get("service", ""), scope)

    async def _bearer_token(self, challenge: Challenge, scope: str) -> str | None:
        # The cache is asked before the credential source, which may have
        # to ask the control plane: a valid token needs no credentials.
        key = self._token_key(challenge, scope)
        token = self._tokens.get(key, trio.current_time())
        if token is not None:
            return token
        fetch = partial(self._fetch_token, challenge, scope, key)
        return await self._token_requests.do(key, fetch)

    async def _fetch_token(
        self, challenge: Challenge, scope: str, key: tuple[str, str, str]
    ) -> str | None:
        """Trade the credentials for a token at the challenge's realm.

        Returns:
            The token, or None when the endpoint refused: the request then
            goes without one and the registry's own 401 or 403 is answered.

        Raises:
            UpstreamUnavailable: The endpoint is unreachable, failed,
                answered no token, or is no place to send credentials to.
            TooManyRequests: The endpoint is rate limiting.
        """
        try:
            realm = token_realm(self.base_url, challenge.realm)
        except RealmRefused as exc:
            raise UpstreamUnavailable(f"upstream {self.key}: {exc}") from None
        credentials = await self._current_credentials()
        params = {"scope": scope}
        service = challenge.params.get("service", "")
        if service:
            params["service"] = service
        headers = (
            {"Authorization": basic_authorization(credentials)} if credentials else {}
        )
        response, body = await self._ask_realm(realm, params, headers)
        if response.status_code != 200:
            self._token_refused(response)
            return None
        try:
            token, renew_at = parse_token_response(body, trio.current_time())
        except ValueError as exc:
            raise UpstreamUnavailable(
                f"token endpoint of upstream {self.key}: {exc}"
            ) from exc
        self._tokens.put(key, token, renew_at)
        return token

    async def _ask_realm(
        self, realm: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[httpx.Response, bytes]:
        """GET the token endpoint: its response, and the body of a 200.

        Raises:
            UpstreamUnavailable: The endpoint is unreachable, or its answer
                is larger than any token.
        """
        started, answered = trio.current_time(), False
        try:
            with trio.fail_after(self.timeouts.head):
                client = self._client_for(realm)
                request = client.build_request(
                    "GET", realm, params=params, headers=headers
                )
                response = await client.send(request, stream=True)
                # The token endpoint is part of the upstream: when it fails,
                # no pull reaches the registry at all.
                self._observe(response.status_code, started)
                answered = True
                try:
                    if response.status_code != 200:
                        return response, b""
                    return response, await self._token_body(response)
                finally:
                    await response.aclose()
        except (
            httpx.HTTPError,
            httpx.InvalidURL,
            UnicodeError,
            trio.TooSlowError,
        ) as exc:
            if not answered:
                self._observe(None, started)
            reason = type(exc).__name__
            raise UpstreamUnavailable(
                f"token endpoint of upstream {self.key} unreachable: {reason}"
            ) from exc

    async def _token_body(self, response: httpx.Response) -> bytes:
        # Kept whole, an endless answer would fill the node's memory. The
        # rest is drained rather than broken off (httpx's nested generators
        # must run to their end); the head timeout bounds the draining.
        body = bytearray()
        async for piece in response.aiter_bytes():
            if len(body) <= _MAX_TOKEN_ANSWER:
                body += piece
        if len(body) > _MAX_TOKEN_ANSWER:
            raise UpstreamUnavailable(
                f"token endpoint of upstream {self.key} answered more than "
                f"{_MAX_TOKEN_ANSWER // 1024} KiB"
            )
        return bytes(body)

    def _token_refused(self, response: httpx.Response) -> None:
        """Raise for a token endpoint that failed; log one that said no.

        A failing endpoint is the upstream being unavailable (tags are then
        served stale), not the client's credentials being wrong.
        """
        status = response.status_code
        if status == 429:
            raise status_error(response, "a token", self.key)
        if status >= 500:
            raise UpstreamUnavailable(
                f"token endpoint of upstream {self.key} answered {status}"
            )
        logger.info(
            "upstream_token_refused", extra={"upstream": self.key, "status": status}
        )


class ResponseHead(Protocol):
    """What :func:`status_error` reads of a response."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> httpx.Headers: ...


def status_error(
    response: ResponseHead,
    what: str,
    key: str,
    *,
    not_found: type[RegistryError] = ManifestUnknown,
) -> RegistryError:
    """Map an upstream's refusal to the error answered to the client."""
    status = response.status_code
    if status == 404:
        return not_found(f"{what} unknown to upstream {key}")
    if status == 401:
        return Unauthorized(f"upstream {key} refused the credentials for {what}")
    if status == 403:
        return Denied(f"upstream {key} denied access to {what}")
    if status == 407:
        return UpstreamUnavailable(
            f"the HTTP proxy of upstream {key} refused the proxy credentials"
        )
    if status == 429:
        delay = parse_retry_after(response.headers.get("retry-after"), time.time())
        return TooManyRequests(
            f"upstream {key} is rate limiting", retry_after=math.ceil(delay)
        )
    return UpstreamUnavailable(f"upstream {key} answered {status} for {what}")

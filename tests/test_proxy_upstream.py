"""The upstream client against registries, storage and proxies that misbehave.

Each test drives a real :class:`Upstream` over real 127.0.0.1 sockets to
small trio servers whose every answer the test scripts: a registry that
redirects its blobs to "storage" on another port (or to itself in clear
text), storage that answers 401 or 429 of its own, a token endpoint that
fails, a control plane that stalls, a proxy that trickles its answer to
``CONNECT`` one byte at a time. What must hold: credentials never leave
the registry's origin or travel in clear, only the registry's own answers
steer the client, and nothing hangs.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import httpx
import pytest
import trio

from support.images import OCI_MANIFEST, push_image
from support.loopback import LoopbackServer
from support.node import NodeFactory
from support.registry import Registry
from support.tls import TlsFiles, make_tls_files
from support.tokenserver import TokenServer
from tcr_mirror.proxy._auth import Credentials
from tcr_mirror.proxy._config import NodeConfig, make_upstream
from tcr_mirror.proxy._credentials import ControlPlaneCredentials
from tcr_mirror.proxy._daemon import run_node
from tcr_mirror.proxy._errors import TooManyRequests, UpstreamUnavailable
from tcr_mirror.proxy._httpproxy import HttpProxy, ProxyPolicy
from tcr_mirror.proxy._upstream import (
    CredentialSource,
    StaticCredentials,
    Upstream,
    UpstreamTimeouts,
)

CREDENTIALS = Credentials("alice", "s3cret-password")
STATIC_CREDENTIALS = StaticCredentials(CREDENTIALS)
BASIC = "Basic " + base64.b64encode(b"alice:s3cret-password").decode()
BLOB_PATH = "/v2/app/blobs/sha256:" + "ab" * 32
MANIFEST_PATH = "/v2/app/manifests/v1"
# Generous: a hang must fail the test, not stall the suite.
HANG = 60.0


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str | bytes], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Seen:
    """A request as a scripted server received it (header names lower case)."""

    method: str
    target: str
    headers: dict[str, str]


Script = Callable[[Seen], Answer]


@dataclass
class ScriptedServer(LoopbackServer):
    """Answers each request with ``script(request)``; records them all.

    With ``tls``, it speaks HTTPS, and also records the first bytes of
    any connection that arrives in clear text on its port (``plain``).
    """

    script: Script
    tls: TlsFiles | None = None
    seen: list[Seen] = field(default_factory=list)
    plain: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _connection(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if self.tls is None:
                await self._answer_all(stream)
                return
            first = await stream.receive_some(65536)
            if not first.startswith(b"\x16"):  # not a TLS handshake record
                self.plain.append(first)
                await stream.aclose()
                return
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.certificate, self.tls.key)
            tls = trio.SSLStream(_Prefixed(stream, first), context, server_side=True)
            await self._answer_all(tls)

    async def _answer_all(self, stream: trio.abc.Stream) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
                continue
            if not isinstance(event, h11.Request):
                await stream.aclose()
                return
            seen = Seen(
                event.method.decode(),
                event.target.decode(),
                {k.decode().lower(): v.decode() for k, v in event.headers},
            )
            self.seen.append(seen)
            await self.before_answer(seen)
            answer = self.script(seen)
            while not isinstance(connection.next_event(), h11.EndOfMessage):
                pass
            headers = [*answer.headers, ("Content-Length", str(len(answer.body)))]
            response = h11.Response(status_code=answer.status, headers=headers)
            await stream.send_all(connection.send(response))
            if seen.method != "HEAD":
                await stream.send_all(connection.send(h11.Data(answer.body)))
            await stream.send_all(connection.send(h11.EndOfMessage()))
            if connection.our_state is not h11.DONE:  # Connection: close
                await stream.aclose()
                return
            connection.start_next_cycle()

    async def before_answer(self, request: Seen) -> None:
        """Runs before each answer; a subclass may hold it back."""
        await trio.lowlevel.checkpoint()


class _Prefixed(trio.abc.Stream):
    """A stream whose first bytes were already read off it."""

    def __init__(self, stream: trio.abc.Stream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            await trio.lowlevel.checkpoint()
            return first
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


def basic_registry(then: Script) -> Script:
    """A registry behind Basic auth: 401 without credentials, else ``then``."""

    def script(request: Seen) -> Answer:
        if request.headers.get("authorization") != BASIC:
            return Answer(401, (("WWW-Authenticate", 'Basic realm="registry"'),))
        return then(request)

    return script


def redirect_blobs_to(location: Callable[[], str]) -> Script:
    def script(request: Seen) -> Answer:
        if request.target.startswith(BLOB_PATH):
            return Answer(307, (("Location", location()),))
        return Answer(200, (("Content-Type", "application/json"),), b"{}")

    return script


@asynccontextmanager
async def serving(*servers: LoopbackServer) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        for server in servers:
            await nursery.start(server.serve)
        yield nursery
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def upstream_of(
    url: str,
    *,
    credentials: CredentialSource | None = None,
    ca_file: Path | None = None,
    timeouts: UpstreamTimeouts | None = None,
    proxies: ProxyPolicy | None = None,
) -> AsyncIterator[Upstream]:
    upstream = Upstream(
        "test",
        url,
        credentials=credentials,
        ca_file=ca_file,
        timeouts=timeouts or UpstreamTimeouts(connect=2.0, read=5.0),
        proxies=proxies,
    )
    try:
        yield upstream
    finally:
        await upstream.aclose()


async def get(upstream: Upstream, path: str, *, raw: bool) -> int:
    """GET ``path`` through the raw blob reader or httpx; the final status."""
    if raw:
        async with upstream.open_blob(path, repository="app") as response:
            return response.status_code
    async with upstream.request("GET", path, repository="app") as response:
        return response.status_code


both_readers = pytest.mark.parametrize("raw", [True, False], ids=["raw", "httpx"])


# Redirects: credentials stay with the registry's origin.


@both_readers
async def test_a_redirect_from_https_down_to_http_is_refused(
    tmp_path: Path, raw: bool
) -> None:
    # The same host and port in clear text: comparing host:port alone
    # would have sent the credentials across the network unencrypted.
    server = ScriptedServer(lambda _: Answer(500), tls=make_tls_files(tmp_path))
    server.script = basic_registry(
        redirect_blobs_to(lambda: f"http://127.0.0.1:{server.port}{BLOB_PATH}")
    )
    async with (
        serving(server),
        upstream_of(
            server.url,
            credentials=STATIC_CREDENTIALS,
            ca_file=server.tls.ca if server.tls else None,
        ) as upstream,
    ):
        with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable) as raised:
            await get(upstream, BLOB_PATH, raw=raw)

    assert "HTTPS to HTTP" in raised.value.message
    assert server.plain == [], "a request went out in clear text"
    assert any(seen.headers.get("authorization") == BASIC for seen in server.seen)


@both_readers
async def test_a_redirect_to_another_port_of_the_same_host_drops_authorization(
    raw: bool,
) -> None:
    storage = ScriptedServer(lambda _: Answer(200, body=b"blob"))
    registry = ScriptedServer(
        basic_registry(redirect_blobs_to(lambda: storage.url + "/storage/1"))
    )
    async with (
        serving(registry, storage),
        upstream_of(registry.url, credentials=STATIC_CREDENTIALS) as upstream,
    ):
        assert await get(upstream, BLOB_PATH, raw=raw) == 200

    assert [seen.target for seen in storage.seen] == ["/storage/1"]
    assert "authorization" not in storage.seen[0].headers


@both_readers
async def test_a_redirect_carrying_user_info_sends_it_nowhere(raw: bool) -> None:
    """RFC 9110's Host holds no user info (storage logs its Host), and a
    password in a Location is no credential to send on."""
    storage = ScriptedServer(lambda _: Answer(200, body=b"blob"))
    registry = ScriptedServer(
        redirect_blobs_to(lambda: f"http://u:pass@127.0.0.1:{storage.port}/s/1")
    )
    async with serving(registry, storage), upstream_of(registry.url) as upstream:
        assert await get(upstream, BLOB_PATH, raw=raw) == 200

    assert storage.seen[0].headers["host"] == f"127.0.0.1:{storage.port}"
    assert "authorization" not in storage.seen[0].headers


@both_readers
async def test_a_challenge_from_storage_gets_none_of_the_registry_s_credentials(
    raw: bool,
) -> None:
    """Storage naming a token realm must not receive the registry's Basic
    credentials: only the registry's own 401 is a challenge to answer."""
    realm = ScriptedServer(lambda _: Answer(200, body=b'{"token": "t"}'))
    storage = ScriptedServer(
        lambda _: Answer(
            401,
            (("WWW-Authenticate", f'Bearer realm="{realm.url}/token",service=s'),),
        )
    )
    registry = ScriptedServer(
        basic_registry(redirect_blobs_to(lambda: storage.url + "/storage/1"))
    )
    async with (
        serving(registry, storage, realm),
        upstream_of(registry.url, credentials=STATIC_CREDENTIALS) as upstream,
    ):
        # The registry's challenge is known from an earlier request.
        assert await get(upstream, MANIFEST_PATH, raw=False) == 200
        with trio.fail_after(HANG):
            status = await get(upstream, BLOB_PATH, raw=raw)
        # The upstream still answers the registry's own challenge.
        assert await get(upstream, MANIFEST_PATH, raw=False) == 200

    assert status == 401
    assert realm.seen == [], "the storage's realm was asked for a token"
    assert registry.seen[-1].headers.get("authorization") == BASIC


@both_readers
async def test_a_429_from_storage_does_not_block_the_registry(raw: bool) -> None:
    storage = ScriptedServer(lambda _: Answer(429, (("Retry-After", "120"),)))
    registry = ScriptedServer(redirect_blobs_to(lambda: storage.url + "/storage/1"))
    async with serving(registry, storage), upstream_of(registry.url) as upstream:
        with trio.fail_after(HANG):
            assert await get(upstream, BLOB_PATH, raw=raw) == 429
        assert await get(upstream, MANIFEST_PATH, raw=False) == 200


@both_readers
async def test_a_redirect_the_environment_would_proxy_through_socks_is_refused(
    raw: bool,
) -> None:
    """Go (containerd) would take storage through the socks5 proxy; going
    direct instead could reach what the operator meant to be reached only
    through it."""
    storage = ScriptedServer(lambda _: Answer(200, body=b"blob"))
    registry = ScriptedServer(redirect_blobs_to(lambda: storage.url + "/storage/1"))
    async with serving(registry, storage):
        environment = ProxyPolicy.from_environment(
            {"HTTP_PROXY": "socks5://user:s3cret@127.0.0.9:1080"}
        )
        # Loopback stands in for remote hosts: only the registry is exempt.
        policy = dataclasses.replace(
            environment,
            spare_loopback=False,
            no_proxy=(f"127.0.0.1:{registry.port}",),
        )
        async with upstream_of(registry.url, proxies=policy) as upstream:
            with pytest.raises(UpstreamUnavailable) as raised:
                await get(upstream, BLOB_PATH, raw=raw)

    assert "HTTP_PROXY" in raised.value.message
    assert "s3cret" not in raised.value.message
    assert storage.seen == []


async def test_a_429_from_the_registry_blocks_it_for_at_most_five_minutes() -> None:
    registry = ScriptedServer(lambda _: Answer(429, (("Retry-After", "86400"),)))
    async with serving(registry), upstream_of(registry.url) as upstream:
        assert await get(upstream, MANIFEST_PATH, raw=False) == 429
        with pytest.raises(TooManyRequests) as raised:
            await get(upstream, MANIFEST_PATH, raw=False)

    assert 1 <= raised.value.retry_after <= 300
    assert len(registry.seen) == 1, "a blocked upstream was asked again"


# The token endpoint.


def bearer_registry(realm: ScriptedServer, token: str = "good-token") -> Script:
    def script(request: Seen) -> Answer:
        if request.headers.get("authorization") != f"Bearer {token}":
            challenge = f'Bearer realm="{realm.url}/token",service=registry'
            return Answer(401, (("WWW-Authenticate", challenge),))
        return Answer(200, (("Content-Type", "application/json"),), b"{}")

    return script


def token_answer(token: str = "good-token") -> Answer:
    body = json.dumps({"token": token, "expires_in": 300}).encode()
    return Answer(200, (("Content-Type", "application/json"),), body)


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, UpstreamUnavailable), (503, UpstreamUnavailable), (429, TooManyRequests)],
)
async def test_a_failing_token_endpoint_is_the_upstream_unavailable(
    status: int, error: type[Exception]
) -> None:
    """Not a 401 for the client: the credentials may be fine, and the
    mirror serves what it knows (stale tags) while the upstream is down."""
    realm = ScriptedServer(lambda _: Answer(status, (("Retry-After", "7"),)))
    registry = ScriptedServer(bearer_registry(realm))
    async with (
        serving(registry, realm),
        upstream_of(registry.url, credentials=STATIC_CREDENTIALS) as upstream,
    ):
        with pytest.raises(error):
            await get(upstream, MANIFEST_PATH, raw=False)

    assert len(realm.seen) == 1
    # The registry was not asked again without a token.
    assert len(registry.seen) == 1


def test_a_tag_is_served_stale_while_the_token_endpoint_fails(
    token_auth_registry: Registry,
    token_server: TokenServer,
    node_factory: NodeFactory,
    tmp_path: Path,
) -> None:
    """Through a node, against a real registry and token service."""
    assert token_auth_registry.credentials is not None
    image = push_image(token_auth_registry, "private/app", "v1", layer_sizes=[3000])
    credentials = tmp_path / "credentials"
    credentials.write_text(":".join(token_auth_registry.credentials) + "\n")
    node = node_factory(
        "--upstream", token_auth_registry.url, "--credentials-file", str(credentials),
        "--tag-ttl", "0",
    )  # fmt: skip
    url = "/v2/private/app/manifests/v1"
    accept = {"Accept": OCI_MANIFEST}
    with httpx.Client(base_url=node.url, timeout=30) as client:
        assert client.get(url, headers=accept).status_code == 200
        # The node's token stops being accepted, and the token service
        # that would issue the next one is failing.
        token_server.rotate_key()
        token_auth_registry.stop()
        token_auth_registry.start()
        token_server.fail_with = 503
        stale = client.get(url, headers=accept)

    assert stale.status_code == 200
    assert stale.content == image.manifest_bytes
    assert any(e.get("event") == "tag_served_stale" for e in node.events())
    assert token_server.requests[-1].status == 503


async def test_a_token_endpoint_saying_no_leaves_the_registry_s_401() -> None:
    realm = ScriptedServer(lambda _: Answer(401))
    registry = ScriptedServer(bearer_registry(realm))
    async with (
        serving(registry, realm),
        upstream_of(registry.url, credentials=STATIC_CREDENTIALS) as upstream,
    ):
        assert await get(upstream, MANIFEST_PATH, raw=False) == 401


async def test_concurrent_first_pulls_share_one_token_request() -> None:
    release = trio.Event()
    realm = ScriptedServer(lambda _: token_answer())
    registry = ScriptedServer(bearer_registry(realm))
    statuses: list[int] = []

    async def pull(upstream: Upstream) -> None:
        await release.wait()
        statuses.append(await get(upstream, MANIFEST_PATH, raw=False))

    async with (
        serving(registry, realm),
        upstream_of(registry.url, credentials=STATIC_CREDENTIALS) as upstream,
    ):
        with trio.fail_after(HANG):
            async with trio.open_nursery() as pulls:
                for _ in range(20):
                    pulls.start_soon(pull, upstream)
                await trio.testing.wait_all_tasks_blocked()
                release.set()

    assert statuses == [200] * 20
    assert len(realm.seen) == 1
    assert realm.seen[0].headers["authorization"] == BASIC


class RotatingRegistry(ScriptedServer):
    """Accepts only the realm's newest token.

    After :meth:`rotate`, the first refusal of the old token is answered
    at once and every later one only once the new token came in: late
    401s, as many nodes' pulls see them when a signing key rotates.
    """

    def __init__(self, realm: ScriptedServer) -> None:
        super().__init__(self._answer)
        self.realm = realm
        self.tokens = ["token-1"]
        self.refusals = 0
        self.new_token_seen = trio.Event()

    def rotate(self) -> None:
        self.tokens.append(f"token-{len(self.tokens) + 1}")
        self.refusals = 0
        self.new_token_seen = trio.Event()

    def _answer(self, request: Seen) -> Answer:
        if request.headers.get("authorization") == f"Bearer {self.tokens[-1]}":
            return Answer(200, (("Content-Type", "application/json"),), b"{}")
        challenge = f'Bearer realm="{self.realm.url}/token",service=registry'
        return Answer(401, (("WWW-Authenticate", challenge),))

    async def before_answer(self, request: Seen) -> None:
        sent = request.headers.get("authorization", "")
        if sent == f"Bearer {self.tokens[-1]}":
            self.new_token_seen.set()
        elif sent.startswith("Bearer "):
            self.refusals += 1
            if self.refusals > 1:
                await self.new_token_seen.wait()
        await trio.lowlevel.checkpoint()


async def test_late_401s_after_a_key_rotation_cost_one_token_request() -> None:
    """A pull refused with the old token must not drop the new one that
    another pull fetched meanwhile: each drop is one more token request,
    a storm when a thousand nodes pull at once."""
    realm = ScriptedServer(lambda _: token_answer(registry.tokens[-1]))
    registry = RotatingRegistry(realm)
    statuses: list[int] = []

    async def pull(upstream: Upstream) -> None:
        statuses.append(await get(upstream, MANIFEST_PATH, raw=False))

    async with (
        serving(registry, realm),
        upstream_of(registry.url, credentials=STATIC_CREDENTIALS) as upstream,
    ):
        assert await get(upstream, MANIFEST_PATH, raw=False) == 200
        registry.rotate()
        with trio.fail_after(HANG):
            async with trio.open_nursery() as pulls:
                for _ in range(20):
                    pulls.start_soon(pull, upstream)

    assert statuses == [200] * 20
    assert [r.headers["authorization"] for r in realm.seen] == [BASIC, BASIC]


# Credentials from a control plane that stalls.


class StallingControlPlane(ScriptedServer):
    """Answers credentials, then holds every later request unanswered."""

    def __init__(self) -> None:
        super().__init__(self._credentials)
        self.stalled = False
        self.password = "token-1"

    def _credentials(self, _: Seen) -> Answer:
        body = json.dumps(
            {
                "username": "alice",
                "password": self.password,
                "expires_at": time.time() + 3600,
            }
        ).encode()
        return Answer(200, (("Content-Type", "application/json"),), body)

    async def before_answer(self, request: Seen) -> None:
        if self.stalled:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()


async def test_a_stalled_control_plane_does_not_hold_a_request_with_a_token() -> None:
    control = StallingControlPlane()
    realm = ScriptedServer(lambda _: token_answer())
    registry = ScriptedServer(bearer_registry(realm))
    async with serving(registry, realm, control):
        source = ControlPlaneCredentials(
            control.url, "registry", "node-secret", refresh=0.05, timeout=3600
        )
        async with upstream_of(registry.url, credentials=source) as upstream:
            assert await get(upstream, MANIFEST_PATH, raw=False) == 200
            control.stalled = True
            await trio.sleep(0.1)  # the credentials are due for renewal
            with trio.fail_after(HANG):
                assert await get(upstream, MANIFEST_PATH, raw=False) == 200

    assert len(realm.seen) == 1


async def test_renewal_in_the_background_never_holds_a_basic_request() -> None:
    control = StallingControlPlane()

    def registry_script(request: Seen) -> Answer:
        if request.headers.get("authorization"):
            return Answer(200)
        return Answer(401, (("WWW-Authenticate", 'Basic realm="r"'),))

    registry = ScriptedServer(registry_script)
    async with serving(registry, control) as nursery:
        source = ControlPlaneCredentials(
            control.url, "registry", "node-secret", refresh=0.05, timeout=3600
        )
        async with upstream_of(registry.url, credentials=source) as upstream:
            nursery.start_soon(upstream.keep_credentials_fresh)
            with trio.fail_after(HANG):
                while len(control.seen) < 2:  # renewed once in the background
                    await trio.sleep(0.01)
            control.stalled = True
            with trio.fail_after(HANG):
                while len(control.seen) < 3:  # due again; the keeper is stuck
                    await trio.sleep(0.01)
            with trio.fail_after(HANG):
                assert await get(upstream, MANIFEST_PATH, raw=False) == 200

    assert registry.seen[-1].headers["authorization"].startswith("Basic ")


# Proxies that trickle.


class TricklingProxy(LoopbackServer):
    """Answers ``CONNECT`` with a head that never ends, a byte at a time."""

    def __init__(self) -> None:
        self.connects = 0

    async def _connection(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            request = await stream.receive_some(65536)
            if request.startswith(b"CONNECT "):
                self.connects += 1
            head = b"HTTP/1.1 200 Connection established\r\nX-Pad: " + b"a" * 2000
            for byte in range(len(head)):  # about 400 s in all: bounded
                await stream.send_all(head[byte : byte + 1])
                await trio.sleep(0.2)


@both_readers
async def test_a_proxy_trickling_its_connect_answer_cannot_hold_a_pull(
    raw: bool,
) -> None:
    proxy = TricklingProxy()
    async with serving(proxy):
        policy = ProxyPolicy.configured(HttpProxy("127.0.0.1", proxy.port))
        # Each byte comes within every per-read timeout.
        timeouts = UpstreamTimeouts(connect=0.5, read=0.5)
        async with upstream_of(
            "https://registry.example", timeouts=timeouts, proxies=policy
        ) as upstream:
            with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable):
                await get(upstream, BLOB_PATH, raw=raw)

    assert proxy.connects == 1


class RefusingProxy(TricklingProxy):
    """Refuses ``CONNECT`` with a reason phrase that is not ASCII."""

    async def _connection(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(65536)
            self.connects += 1
            head = "HTTP/1.1 403 Verboten – nur für Mitarbeiter\r\n\r\n"
            await stream.send_all(head.encode())
            await stream.aclose()


@both_readers
async def test_a_proxy_refusing_in_words_not_ascii_is_the_upstream_unavailable(
    raw: bool,
) -> None:
    """A guard on httpcore and h11, which read such a reason phrase today."""
    proxy = RefusingProxy()
    async with serving(proxy):
        policy = ProxyPolicy.configured(HttpProxy("127.0.0.1", proxy.port))
        async with upstream_of("https://registry.example", proxies=policy) as upstream:
            with pytest.raises(
                UpstreamUnavailable, match=f"proxy 127.0.0.1:{proxy.port}"
            ):
                await get(upstream, BLOB_PATH, raw=raw)

    assert proxy.connects == 1


# What the mirror keeps of an upstream's answer.


async def test_a_manifest_whose_media_type_is_not_ascii_is_refused_not_kept(
    tmp_path: Path,
) -> None:
    """Kept, it would be sent on as a header that cannot go on the wire."""
    body = b'{"schemaVersion": 2}'
    media_type = "application/vnd.oci.image.manifest.v1+json; x=\u00e9".encode(
        "latin-1"
    )
    registry = ScriptedServer(
        lambda _: Answer(200, (("Content-Type", media_type),), body)
    )
    async with serving(registry) as nursery:
        upstream = make_upstream(None, registry.url, default=True)
        config = NodeConfig(
            listen=("127.0.0.1", 0), data_dir=tmp_path, upstreams=(upstream,)
        )
        host, port = await nursery.start(run_node, config)
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            for _ in range(2):
                answer = await client.get(f"/v2/app/manifests/{digest}")
                assert answer.status_code == 400
                assert answer.json()["errors"][0]["code"] == "MANIFEST_INVALID"

    # Not kept: the second request asked the upstream again.
    assert len(registry.seen) == 2


# What an upstream may put in a header without crashing the request.


@both_readers
async def test_a_retry_after_of_digits_that_are_not_ascii_is_a_429(raw: bool) -> None:
    """Byte 0xB2 is "²" in Latin-1: str.isdigit() took it and float()
    refused it, so the client got a 500 and a traceback went to the log."""
    registry = ScriptedServer(lambda _: Answer(429, (("Retry-After", b"\xb2"),)))
    async with serving(registry), upstream_of(registry.url) as upstream:
        with trio.fail_after(HANG):
            status = await get(upstream, BLOB_PATH, raw=raw)

    assert status == 429


@both_readers
async def test_a_redirect_to_a_location_in_raw_utf8_is_followed(raw: bool) -> None:
    """The raw reader crashed putting the Location on its request line."""
    storage = ScriptedServer(lambda _: Answer(200, body=b"blob"))

    def registry_script(request: Seen) -> Answer:
        location = f"{storage.url}/storage/caf\u00e9".encode()
        return Answer(307, (("Location", location),))

    registry = ScriptedServer(registry_script)
    async with serving(registry, storage), upstream_of(registry.url) as upstream:
        with trio.fail_after(HANG):
            assert await get(upstream, BLOB_PATH, raw=raw) == 200

    assert [seen.target for seen in storage.seen] == ["/storage/caf%C3%A9"]


async def test_a_realm_only_httpx_finds_wrong_is_the_upstream_unavailable() -> None:
    """httpx.InvalidURL is no httpx.HTTPError: it went by every handler."""
    invalid = "http://999.0.0.1/token"  # never resolved: httpx refuses it first
    registry = ScriptedServer(
        lambda _: Answer(401, (("WWW-Authenticate", f'Bearer realm="{invalid}"'),))
    )
    async with serving(registry), upstream_of(registry.url) as upstream:
        with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable):
            await get(upstream, MANIFEST_PATH, raw=False)


# Hosts no client can name: past DNS's 63 bytes a label, an empty label,
# an IPv6 address never closed.
UNNAMEABLE_HOSTS = ["a" * 64 + ".example", "a..example", "[::1"]


@both_readers
@pytest.mark.parametrize("host", UNNAMEABLE_HOSTS)
async def test_a_redirect_to_a_host_no_client_can_name_is_the_upstream_unavailable(
    raw: bool, host: str
) -> None:
    """The encoding or parsing error went by every handler: a 500 for the
    client and a traceback in the log."""
    registry = ScriptedServer(redirect_blobs_to(lambda: f"http://{host}/s/1"))
    async with serving(registry), upstream_of(registry.url) as upstream:
        with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable):
            await get(upstream, BLOB_PATH, raw=raw)


@pytest.mark.parametrize("host", UNNAMEABLE_HOSTS)
async def test_a_realm_on_a_host_no_client_can_name_is_the_upstream_unavailable(
    host: str,
) -> None:
    challenge = f'Bearer realm="http://{host}/token"'
    registry = ScriptedServer(lambda _: Answer(401, (("WWW-Authenticate", challenge),)))
    async with serving(registry), upstream_of(registry.url) as upstream:
        with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable):
            await get(upstream, MANIFEST_PATH, raw=False)


async def test_a_registry_on_https_naming_a_realm_in_clear_gets_no_credentials(
    tmp_path: Path,
) -> None:
    """The Basic credentials traded for a token would cross in clear, and
    the token they buy with them."""
    realm = ScriptedServer(lambda _: token_answer())
    registry = ScriptedServer(bearer_registry(realm), tls=make_tls_files(tmp_path))
    assert registry.tls is not None
    async with (
        serving(registry, realm),
        upstream_of(
            registry.url,
            credentials=STATIC_CREDENTIALS,
            ca_file=registry.tls.ca,
        ) as upstream,
    ):
        with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable) as raised:
            await get(upstream, MANIFEST_PATH, raw=False)

    assert realm.seen == [], "the credentials went to a realm in clear text"
    assert "plain HTTP" in raised.value.message


@both_readers
async def test_a_token_no_header_can_carry_is_the_upstream_unavailable(
    raw: bool,
) -> None:
    """Sent on as ``Bearer caf\u00e9``, it crashed building the request."""
    realm = ScriptedServer(lambda _: token_answer("caf\u00e9"))
    registry = ScriptedServer(bearer_registry(realm))
    async with (
        serving(registry, realm),
        upstream_of(registry.url, credentials=STATIC_CREDENTIALS) as upstream,
    ):
        with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable) as raised:
            await get(upstream, BLOB_PATH, raw=raw)

    assert "caf" not in raised.value.message


async def test_a_token_answer_larger_than_any_token_is_not_read_whole() -> None:
    """Read whole, an endless answer would fill the node's memory."""
    padding = "x" * (2 << 20)
    body = json.dumps({"token": "good-token", "padding": padding}).encode()
    realm = ScriptedServer(lambda _: Answer(200, body=body))
    registry = ScriptedServer(bearer_registry(realm))
    async with serving(registry, realm), upstream_of(registry.url) as upstream:
        with trio.fail_after(HANG), pytest.raises(UpstreamUnavailable) as raised:
            await get(upstream, MANIFEST_PATH, raw=False)

    assert "more than" in raised.value.message
    assert len(registry.seen) == 1

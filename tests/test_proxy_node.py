"""The node mirror end to end: a real registry, a real daemon, real sockets."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.images import (
    PushedArtifact,
    push_helm_chart,
    push_image,
    push_index,
    push_signature,
)
from support.layers import digest_of
from support.node import NodeFactory, NodeProcess
from support.registry import Registry
from support.tokenserver import TokenServer
from tcr_mirror.proxy._http import origin_form
from tcr_mirror.proxy._store import BlobStore

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ALL_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


@pytest.fixture
def node(node_factory: NodeFactory, registry: Registry) -> NodeProcess:
    return node_factory("--upstream", registry.url)


def oci_error(response: httpx.Response) -> str:
    document = json.loads(response.content)
    return str(document["errors"][0]["code"])


# -- manifests --------------------------------------------------------------


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_manifest_by_tag_and_digest(
    registry: Registry, node: NodeProcess, media: str
) -> None:
    image = push_image(registry, "team/app", "v1", media=media)
    with httpx.Client(base_url=node.url) as client:
        for reference in ("v1", image.manifest_digest):
            url = f"/v2/team/app/manifests/{reference}"
            got = client.get(url, headers={"Accept": ALL_MANIFESTS})
            assert got.status_code == 200
            assert got.content == image.manifest_bytes
            assert got.headers["content-type"] == image.media_type
            assert got.headers["docker-content-digest"] == image.manifest_digest
            assert got.headers["content-length"] == str(len(image.manifest_bytes))
            assert got.headers["etag"] == f'"{image.manifest_digest}"'
            head = client.head(url, headers={"Accept": ALL_MANIFESTS})
            assert head.status_code == 200
            assert head.content == b""
            assert head.headers["content-length"] == str(len(image.manifest_bytes))
            assert head.headers["docker-content-digest"] == image.manifest_digest


def test_a_tag_resolves_per_manifest_types_the_client_accepts(
    registry: Registry, node_factory: NodeFactory
) -> None:
    # A client that cannot read manifest lists gets the default platform's
    # image for the same tag; that must not become what containerd, which
    # reads lists, is served from the mirror's tag cache.
    index = push_index(registry, "multi", "v1", media="docker")
    amd64 = dict(index.images)[("linux", "amd64")]
    node = node_factory("--upstream", registry.url, "--tag-ttl", "300")
    url = "/v2/multi/manifests/v1"
    with httpx.Client(base_url=node.url, timeout=30) as client:
        assert client.get(url, headers={"Accept": ALL_MANIFESTS}).content == (
            index.index_bytes
        )
        old_client = client.get(url, headers={"Accept": DOCKER_MANIFEST})
        assert old_client.headers["content-type"] == DOCKER_MANIFEST
        assert old_client.content == amd64.manifest_bytes
        for accept in (ALL_MANIFESTS, DOCKER_MANIFEST, ALL_MANIFESTS):
            again = client.get(url, headers={"Accept": accept})
            expected = index if accept == ALL_MANIFESTS else None
            if expected is not None:
                assert again.headers["content-type"] == DOCKER_LIST
                assert again.content == index.index_bytes
            else:
                assert again.content == amd64.manifest_bytes
    # Both answers came from the tag cache the second time.
    assert len(registry.requests_for("GET", url)) == 2


@pytest.mark.parametrize(
    ("media", "index_type"), [("oci", OCI_INDEX), ("docker", DOCKER_LIST)]
)
def test_multi_arch_index(
    registry: Registry, node: NodeProcess, media: str, index_type: str
) -> None:
    index = push_index(registry, "multi", "v1", media=media)
    with httpx.Client(base_url=node.url) as client:
        got = client.get("/v2/multi/manifests/v1", headers={"Accept": ALL_MANIFESTS})
        assert got.status_code == 200
        assert got.headers["content-type"] == index_type
        assert got.content == index.index_bytes
        for _platform, image in index.images:
            child = client.get(
                f"/v2/multi/manifests/{image.manifest_digest}",
                headers={"Accept": ALL_MANIFESTS},
            )
            assert child.content == image.manifest_bytes


def test_artifacts_pass_through_byte_for_byte(
    registry: Registry, node: NodeProcess
) -> None:
    chart = push_helm_chart(registry, "charts/web", "1.2.3")
    signature = push_signature_for(registry)
    with httpx.Client(base_url=node.url) as client:
        for artifact in (chart, signature):
            got = client.get(
                f"/v2/{artifact.repo}/manifests/{artifact.manifest_digest}",
                headers={"Accept": OCI_MANIFEST},
            )
            assert got.status_code == 200
            assert got.content == artifact.manifest_bytes
            for digest, data in artifact.layers:
                blob = client.get(f"/v2/{artifact.repo}/blobs/{digest}")
                assert blob.content == data


def push_signature_for(registry: Registry) -> PushedArtifact:
    image = push_image(registry, "signed", "v1")
    return push_signature(registry, "signed", image.descriptor)


def test_missing_manifest_is_404(registry: Registry, node: NodeProcess) -> None:
    push_image(registry, "app", "v1")
    with httpx.Client(base_url=node.url) as client:
        tag = client.get("/v2/app/manifests/nope")
        digest = client.get(f"/v2/app/manifests/{digest_of(b'none')}")
        repo = client.get("/v2/nothing/here/manifests/v1")
    for response in (tag, digest, repo):
        assert response.status_code == 404
        assert oci_error(response) == "MANIFEST_UNKNOWN"


# -- blobs --------------------------------------------------------------------


def test_blob_get_head_and_ranges(registry: Registry, node: NodeProcess) -> None:
    layer = bytes(range(256)) * 4096
    image = push_image(registry, "app", "v1", layers=[layer])
    digest = image.layers[0][0]
    url = f"/v2/app/blobs/{digest}"
    size = len(layer)
    with httpx.Client(base_url=node.url) as client:
        head = client.head(url)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(size)
        full = client.get(url)
        assert full.content == layer
        assert full.headers["docker-content-digest"] == digest
        cases = {
            "bytes=0-9": (0, 9),
            "bytes=100-": (100, size - 1),
            "bytes=-10": (size - 10, size - 1),
            f"bytes=5-{size * 2}": (5, size - 1),
        }
        for header, (first, last) in cases.items():
            part = client.get(url, headers={"Range": header})
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
            assert part.content == layer[first : last + 1]
        for header in (f"bytes={size}-", "bytes=9-1", "bytes=x-y", "bytes=-0"):
            bad = client.get(url, headers={"Range": header})
            assert bad.status_code == 416
            assert bad.headers["content-range"] == f"bytes */{size}"
        cached_head = client.head(url)
        assert cached_head.headers["content-length"] == str(size)


def test_a_head_with_a_range_is_answered_as_its_get_whether_stored_or_not(
    registry: Registry, node: NodeProcess
) -> None:
    layer = bytes(range(256)) * 64
    image = push_image(registry, "ranged", "v1", layers=[layer])
    url = f"/v2/ranged/blobs/{image.layers[0][0]}"
    size = len(layer)
    ranges = ("bytes=10-19", "bytes=-5", f"bytes={size}-")

    def head_of(response: httpx.Response) -> tuple[int, str | None, str | None]:
        headers = response.headers
        return (
            response.status_code,
            headers.get("content-range"),
            headers.get("content-length"),
        )

    with httpx.Client(base_url=node.url) as client:
        # Not stored yet: the mirror asks the upstream for the size only.
        before = {r: head_of(client.head(url, headers={"Range": r})) for r in ranges}
        gets = {r: head_of(client.get(url, headers={"Range": r})) for r in ranges}
        stored = {r: head_of(client.head(url, headers={"Range": r})) for r in ranges}
    assert gets["bytes=10-19"] == (206, f"bytes 10-19/{size}", "10")
    assert gets["bytes=-5"] == (206, f"bytes {size - 5}-{size - 1}/{size}", "5")
    assert gets[f"bytes={size}-"][:2] == (416, f"bytes */{size}")
    assert before == gets
    assert stored == gets


def test_missing_blob_is_404(registry: Registry, node: NodeProcess) -> None:
    push_image(registry, "app", "v1")
    with httpx.Client(base_url=node.url) as client:
        for method in ("GET", "HEAD"):
            response = client.request(method, f"/v2/app/blobs/{digest_of(b'none')}")
            assert response.status_code == 404
            if method == "GET":
                assert oci_error(response) == "BLOB_UNKNOWN"


def test_concurrent_clients_cause_one_upstream_get(
    registry: Registry, node: NodeProcess
) -> None:
    layer = hashlib.sha256(b"seed").digest() * ((8 << 20) // 32)
    image = push_image(registry, "big", "v1", layers=[layer])
    digest = image.layers[0][0]

    def pull(index: int) -> tuple[int, str]:
        headers = {"Range": "bytes=1000-"} if index % 4 == 3 else {}
        response = httpx.get(
            f"{node.url}/v2/big/blobs/{digest}", headers=headers, timeout=60
        )
        return response.status_code, hashlib.sha256(response.content).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(pull, range(16)))
    whole = hashlib.sha256(layer).hexdigest()
    tail = hashlib.sha256(layer[1000:]).hexdigest()
    for index, (status, got) in enumerate(results):
        assert (status, got) == ((206, tail) if index % 4 == 3 else (200, whole))
    assert registry.blob_gets("big", digest) == 1


# -- tags list, referrers, base ----------------------------------------------


def test_tags_list_passes_query_through(registry: Registry, node: NodeProcess) -> None:
    for tag in ("a", "b", "c"):
        push_image(registry, "paged", tag)
    with httpx.Client(base_url=node.url) as client:
        listed = client.get("/v2/paged/tags/list", params={"n": "2", "last": "a"})
        assert listed.status_code == 200
        assert listed.json()["name"] == "paged"
        assert set(listed.json()["tags"]) <= {"a", "b", "c"}
        missing = client.get("/v2/unknown/tags/list")
        assert missing.status_code == 404
        assert oci_error(missing) == "NAME_UNKNOWN"
    # docker-registry 2.8 ignores n and last, so what is checked here is
    # that the mirror forwards them; Link rewriting is tested on its own.
    sent = registry.requests_for(
        "GET", "/v2/paged/tags/list", user_agent_prefix="tcr-mirror"
    )
    assert [entry.query for entry in sent] == ["n=2&last=a"]


def test_referrers_404_stays_404(registry: Registry, node: NodeProcess) -> None:
    image = push_image(registry, "app", "v1")
    with httpx.Client(base_url=node.url) as client:
        response = client.get(f"/v2/app/referrers/{image.manifest_digest}")
    assert response.status_code == 404


def test_base_and_keep_alive(registry: Registry, node: NodeProcess) -> None:
    image = push_image(registry, "app", "v1")
    requests = b"".join(
        f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for path in (
            "/v2/",
            "/v2/app/manifests/v1",
            f"/v2/app/blobs/{image.config_digest}",
        )
    )
    with socket.create_connection((node.host, node.port), timeout=10) as sock:
        sock.sendall(requests)
        received = b""
        while received.count(b"HTTP/1.1 200") < 3 or not received.endswith(
            image.config_bytes
        ):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed early: {received!r}"
            received += chunk
    assert b"Docker-Distribution-API-Version: registry/2.0" in received


# -- routing ------------------------------------------------------------------


def test_ns_routing_and_allow_list(
    registry_factory: Callable[..., Registry], node_factory: NodeFactory
) -> None:
    first, second = registry_factory(), registry_factory()
    one = push_image(first, "app", "v1", layer_sizes=[100])
    two = push_image(second, "app", "v1", layer_sizes=[200])
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.setblocking(False)
        trap_host = f"127.0.0.1:{trap.getsockname()[1]}"
        node = node_factory(
            "--upstream", first.url, "--upstream", f"second.example={second.url}"
        )
        with httpx.Client(base_url=node.url) as client:
            plain = client.get("/v2/app/manifests/v1")
            by_host = client.get("/v2/app/manifests/v1", params={"ns": first.host})
            by_name = client.get(
                "/v2/app/manifests/v1", params={"ns": "second.example"}
            )
            refused = client.get("/v2/app/manifests/v1", params={"ns": trap_host})
        with pytest.raises(BlockingIOError):
            trap.accept()
    assert plain.content == by_host.content == one.manifest_bytes
    assert by_name.content == two.manifest_bytes
    assert refused.status_code == 403
    assert oci_error(refused) == "DENIED"


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "status", "code"),
    [
        ("GET /v2/UPPER/manifests/v1", 400, "NAME_INVALID"),
        ("GET /v2/../../etc/passwd/manifests/v1", 400, "NAME_INVALID"),
        ("GET /v2/a%2F..%2Fb/manifests/v1", 400, "NAME_INVALID"),
        ("GET /v2/app/manifests/-bad", 400, "TAG_INVALID"),
        ("GET /v2/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("GET /v2/app/blobs/../../../etc/passwd", 404, "NAME_UNKNOWN"),
        ("PUT /v2/app/manifests/v1", 405, "UNSUPPORTED"),
        ("POST /v2/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("DELETE /v2/app/manifests/v1", 405, "UNSUPPORTED"),
        ("GET /v2/app/tags/list?n=x", 400, "PAGINATION_NUMBER_INVALID"),
    ],
)
def test_bad_input_gets_oci_errors(
    node: NodeProcess, request_line: str, status: int, code: str
) -> None:
    with socket.create_connection((node.host, node.port), timeout=10) as sock:
        sock.sendall(
            f"{request_line} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        )
        response = _read_response(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert json.loads(body)["errors"][0]["code"] == code
    if status == 405:
        lines = (line.partition(b": ") for line in head.split(b"\r\n")[1:])
        fields = {name.lower(): value for name, _, value in lines}
        assert fields[b"allow"] == b"GET, HEAD"
    assert httpx.get(f"{node.url}/v2/").status_code == 200


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v2/app/manifests/v1", "/v2/app/manifests/v1"),
        ("http://127.0.0.1:5000/v2/app/manifests/v1?ns=x", "/v2/app/manifests/v1?ns=x"),
        ("HTTPS://mirror/v2/", "/v2/"),
        ("http://mirror", "/"),
        ("http://mirror?ns=x", "/?ns=x"),
        ("ftp://mirror/v2/", "ftp://mirror/v2/"),
        ("/v2/a://b/manifests/v1", "/v2/a://b/manifests/v1"),
    ],
)
def test_absolute_form_targets_are_taken_by_their_path(
    target: str, expected: str
) -> None:
    assert origin_form(target) == expected


def test_absolute_form_and_expect_100_continue_over_a_socket(
    node: NodeProcess,
) -> None:
    with socket.create_connection((node.host, node.port), timeout=10) as sock:
        sock.sendall(
            f"GET http://{node.address}/v2/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        # The go-ahead comes before the body is sent, then the answer.
        assert sock.recv(64).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"body")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_garbage_http_is_answered_400_and_daemon_lives(node: NodeProcess) -> None:
    for garbage in (
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"A" * 70000,
    ):
        with socket.create_connection((node.host, node.port), timeout=10) as sock:
            sock.sendall(garbage)
            response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 4"), response[:100]
    assert httpx.get(f"{node.url}/v2/").status_code == 200


def _read_response(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
        head, sep, body = received.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is not None and len(body) >= length:
                break
    return received


# -- credentials and lifecycle ------------------------------------------------


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_authenticated_upstream_and_no_secret_in_logs(
    request: pytest.FixtureRequest, node_factory: NodeFactory, tmp_path: Path, auth: str
) -> None:
    upstream: Registry = request.getfixturevalue(f"{auth}_auth_registry")
    assert upstream.credentials is not None
    user, password = upstream.credentials
    image = push_image(upstream, "private/app", "v1", layer_sizes=[5000, 7000])
    credentials = tmp_path / "credentials"
    credentials.write_text(f"{user}:{password}\n")
    node = node_factory(
        "--upstream", upstream.url, "--credentials-file", str(credentials)
    )
    tokens_before = _tokens_issued(request, auth)
    with httpx.Client(base_url=node.url) as client:
        manifest = client.get(
            "/v2/private/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
        )
        assert manifest.content == image.manifest_bytes
        for digest, data in image.layers:
            assert client.get(f"/v2/private/app/blobs/{digest}").content == data
    if auth == "token":
        # One token for the repository's pull scope, reused for every request.
        assert _tokens_issued(request, auth) - tokens_before == 1
    log = node.log_text()
    assert password not in log
    assert "Authorization" not in log
    assert "Bearer" not in log


def test_a_token_the_upstream_stops_accepting_is_replaced(
    token_auth_registry: Registry,
    token_server: TokenServer,
    node_factory: NodeFactory,
    tmp_path: Path,
) -> None:
    assert token_auth_registry.credentials is not None
    user, password = token_auth_registry.credentials
    image = push_image(token_auth_registry, "private/app", "v1", layer_sizes=[3000])
    credentials = tmp_path / "credentials"
    credentials.write_text(f"{user}:{password}\n")
    node = node_factory(
        "--upstream", token_auth_registry.url, "--credentials-file", str(credentials),
        "--tag-ttl", "0",
    )  # fmt: skip
    with httpx.Client(base_url=node.url, timeout=30) as client:
        url = "/v2/private/app/manifests/v1"
        assert client.get(url, headers={"Accept": OCI_MANIFEST}).status_code == 200
        issued = token_server.tokens_issued
        # The token service rotates its key: the token the node holds, still
        # within its lifetime, is refused from now on.
        token_server.rotate_key()
        token_auth_registry.stop()
        token_auth_registry.start()
        again = client.get(url, headers={"Accept": OCI_MANIFEST})
        assert again.status_code == 200
        assert again.content == image.manifest_bytes
        digest, data = image.layers[0]
        assert client.get(f"/v2/private/app/blobs/{digest}").content == data
    assert token_server.tokens_issued == issued + 1


def _tokens_issued(request: pytest.FixtureRequest, auth: str) -> int:
    if auth != "token":
        return 0
    return int(request.getfixturevalue("token_server").tokens_issued)


def test_wrong_credentials_are_unauthorized(
    basic_auth_registry: Registry, node_factory: NodeFactory, tmp_path: Path
) -> None:
    push_image(basic_auth_registry, "private/app", "v1")
    credentials = tmp_path / "credentials"
    credentials.write_text("alice:wrong\n")
    node = node_factory(
        "--upstream", basic_auth_registry.url, "--credentials-file", str(credentials)
    )
    response = httpx.get(f"{node.url}/v2/private/app/manifests/v1")
    assert response.status_code == 401
    assert oci_error(response) == "UNAUTHORIZED"


def test_digests_served_from_store_and_tags_stale_if_error(
    registry: Registry, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "app", "v1")
    node = node_factory("--upstream", registry.url, "--tag-ttl", "0")
    with httpx.Client(base_url=node.url) as client:
        assert client.get("/v2/app/manifests/v1").status_code == 200
        for digest in image.blobs:
            assert client.get(f"/v2/app/blobs/{digest}").status_code == 200
        registry.stop()
        stale = client.get("/v2/app/manifests/v1")
        by_digest = client.get(f"/v2/app/manifests/{image.manifest_digest}")
        blobs = [client.get(f"/v2/app/blobs/{d}") for d in image.blobs]
        unknown = client.get("/v2/app/manifests/never-seen")
    assert stale.content == image.manifest_bytes
    assert by_digest.content == image.manifest_bytes
    assert all(blob.status_code == 200 for blob in blobs)
    assert unknown.status_code == 503
    assert oci_error(unknown) == "UNAVAILABLE"
    assert any(e.get("event") == "tag_served_stale" for e in node.events())


def test_tag_is_revalidated_after_ttl(
    registry: Registry, node_factory: NodeFactory
) -> None:
    push_image(registry, "app", "v1", layer_sizes=[10])
    node = node_factory("--upstream", registry.url, "--tag-ttl", "0")
    first = httpx.get(
        f"{node.url}/v2/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    moved = push_image(registry, "app", "v1", layer_sizes=[20])
    second = httpx.get(
        f"{node.url}/v2/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert first.content != moved.manifest_bytes
    assert second.content == moved.manifest_bytes


def test_a_tag_cached_by_a_clock_that_was_ahead_is_revalidated(
    registry: Registry, node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A tag resolved while the node's clock ran a day ahead used to count
    as fresh until real time caught up, however long the TTL."""
    push_image(registry, "app", "v1", layer_sizes=[10])
    data = tmp_path / "persistent"
    url = "/v2/app/manifests/v1"
    accept = {"Accept": OCI_MANIFEST}
    node = node_factory("--upstream", registry.url, "--tag-ttl", "300", data_dir=data)
    first = httpx.get(f"{node.url}{url}", headers=accept)
    assert node.stop() == 0
    upstream = registry.url.split("://", 1)[1]
    store = BlobStore(data)
    try:
        entry = store.get_tag(upstream, "app", "v1", OCI_MANIFEST)
        assert entry is not None
        ahead = dataclasses.replace(entry, fetched_at=time.time() + 86400)
        store.put_tag(upstream, "app", "v1", ahead, OCI_MANIFEST)
    finally:
        store.close()
    moved = push_image(registry, "app", "v1", layer_sizes=[20])
    again = node_factory("--upstream", registry.url, "--tag-ttl", "300", data_dir=data)
    second = httpx.get(f"{again.url}{url}", headers=accept)
    assert first.content != moved.manifest_bytes
    assert second.status_code == 200
    assert second.headers["docker-content-digest"] == moved.manifest_digest


def test_restart_serves_from_disk_and_sigterm_exits_zero(
    registry: Registry, node_factory: NodeFactory, tmp_path: Path
) -> None:
    image = push_image(registry, "app", "v1")
    data = tmp_path / "persistent"
    node = node_factory("--upstream", registry.url, data_dir=data)
    for digest in image.blobs:
        httpx.get(f"{node.url}/v2/app/blobs/{digest}")
    assert node.stop() == 0
    registry.stop()
    again = node_factory("--upstream", registry.url, data_dir=data)
    for digest in image.blobs:
        response = httpx.get(f"{again.url}/v2/app/blobs/{digest}")
        assert digest_of(response.content) == digest
    assert again.stop() == 0


def test_metrics_health_and_request_logs(
    registry: Registry, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "app", "v1", layers=[b"x" * 100_000])
    digest, layer = image.layers[0]
    node = node_factory("--upstream", registry.url, "--metrics-listen", "127.0.0.1:0")
    address = next(
        e["address"] for e in node.events() if e.get("event") == "metrics_listening"
    )
    for _ in range(2):
        assert httpx.get(f"{node.url}/v2/app/blobs/{digest}").content == layer
    httpx.get(f"{node.url}/v2/app/blobs/sha256:bad")

    assert httpx.get(f"http://{address}/healthz").status_code == 200
    assert httpx.get(f"http://{address}/readyz").status_code == 200
    scraped = httpx.get(f"http://{address}/metrics").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    get_blob = {"kind": "blob", "method": "GET"}
    assert value("tcr_mirror_requests_total", **get_blob, status="200") == 2
    assert (
        value("tcr_mirror_requests_total", kind="invalid", method="GET", status="400")
        == 1
    )
    assert value("tcr_mirror_cache_results_total", kind="blob", result="miss") == 1
    assert value("tcr_mirror_cache_results_total", kind="blob", result="hit") == 1
    served = value("tcr_mirror_served_bytes_total", source="store") + value(
        "tcr_mirror_served_bytes_total", source="upstream"
    )
    assert served == 2 * len(layer)
    upstream = {"upstream": registry.host, "status": "200"}
    assert value("tcr_mirror_upstream_requests_total", **upstream) == 1
    assert value("tcr_mirror_store_bytes") == len(layer)
    assert value("tcr_mirror_blob_fetches_in_flight") == 0
    assert value("tcr_mirror_blob_fetch_waiting_clients") == 0
    assert (
        value(
            "tcr_mirror_upstream_last_success_timestamp_seconds", upstream=registry.host
        )
        > 0
    )
    # The node takes its hard open-file limit; half of it is for clients.
    assert value("tcr_mirror_client_connections_limit") >= 16
    assert value("tcr_mirror_client_connections_refused_total") == 0
    assert value("tcr_mirror_client_connections") >= 0

    requests = [e for e in node.events() if e.get("event") == "request"]
    assert len(requests) == 3
    assert {e["status"] for e in requests} == {200, 400}


def test_request_metrics_keep_methods_to_get_head_and_other(
    registry: Registry, node_factory: NodeFactory
) -> None:
    node = node_factory("--upstream", registry.url, "--metrics-listen", "127.0.0.1:0")
    address = next(
        e["address"] for e in node.events() if e.get("event") == "metrics_listening"
    )
    invented = [f"X{index}" for index in range(20)] + ["PUT", "OPTIONS"]
    with httpx.Client(base_url=node.url) as client:
        for method in ["GET", "HEAD", *invented]:
            assert client.request(method, "/v2/").status_code in (200, 405)
    scraped = httpx.get(f"http://{address}/metrics").text
    by_method: dict[str, float] = {}
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            if sample.name == "tcr_mirror_requests_total":
                method = sample.labels["method"]
                by_method[method] = by_method.get(method, 0) + sample.value
    assert by_method == {"GET": 1, "HEAD": 1, "other": len(invented)}


def test_empty_blob(registry: Registry, node: NodeProcess) -> None:
    image = push_image(registry, "app", "empty", layers=[b""])
    digest = image.layers[0][0]
    assert digest == digest_of(b"")
    with httpx.Client(base_url=node.url, timeout=30) as client:
        for _ in range(2):  # cold, then from the store
            got = client.get(f"/v2/app/blobs/{digest}")
            assert got.status_code == 200
            assert got.content == b""
            assert got.headers["content-length"] == "0"
        assert client.head(f"/v2/app/blobs/{digest}").status_code == 200


def test_a_proxy_in_the_environment_is_not_used_for_a_loopback_upstream(
    registry: Registry, node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in Go programs, the environment's proxies never apply to this
    # host: neither manifests nor blob bodies try the dead proxy.
    image = push_image(registry, "team/app", "v1", layer_sizes=(2048,))
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections fail
    proxy_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy_url)
    try:
        node = node_factory("--upstream", registry.url)
    finally:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"):
            monkeypatch.delenv(name)
    try:
        with httpx.Client(base_url=node.url, trust_env=False) as client:
            manifest = client.get(
                "/v2/team/app/manifests/v1", headers={"Accept": ALL_MANIFESTS}
            )
            assert manifest.status_code == 200
            assert manifest.content == image.manifest_bytes
            digest, data = image.layers[0]
            assert client.get(f"/v2/team/app/blobs/{digest}").content == data
    finally:
        dead.close()


def test_a_proxy_variable_the_node_cannot_use_is_a_warning_when_unneeded(
    registry: Registry, node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A machine-wide SOCKS or HTTPS proxy must not keep a node whose
    # upstreams never go through it (here: on this host) from starting.
    image = push_image(registry, "team/app", "v1", layer_sizes=(2048,))
    variables = {
        "HTTPS_PROXY": "socks5://alice:s3cret@127.0.0.1:1080",
        "http_proxy": "https://alice:s3cret@127.0.0.1:3129",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    try:
        node = node_factory("--upstream", registry.url)
    finally:
        for name in variables:
            monkeypatch.delenv(name)
    with httpx.Client(base_url=node.url, trust_env=False) as client:
        manifest = client.get(
            "/v2/team/app/manifests/v1", headers={"Accept": ALL_MANIFESTS}
        )
        assert manifest.content == image.manifest_bytes
    ignored = [e for e in node.events() if e.get("event") == "proxy_variable_ignored"]
    assert {(e["variable"], e["proxy_scheme"], e["level"]) for e in ignored} == {
        ("HTTPS_PROXY", "socks5", "warning"),
        ("http_proxy", "https", "warning"),
    }
    assert "s3cret" not in node.log_text()

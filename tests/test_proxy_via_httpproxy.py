"""Upstreams reached through a real HTTP proxy (tinyproxy), as in networks
where nodes may not reach the registry directly.

Manifests go through httpx and blob bodies through the mirror's own raw
GET; both must take the proxy, with a ``CONNECT`` tunnel for HTTPS (what
TCR always is) and the absolute URL for plain HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.httpproxy import TinyProxy
from support.images import PushedImage, push_image
from support.node import NodeProcess
from support.registry import Registry
from support.tls import TlsFiles

NodeFactory = Callable[..., NodeProcess]
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"
PROXY_USER = ("alice", "pr0xy-s3cret")
# One layer big enough for several raw reads, one small.
LAYER_SIZES = (3 << 20, 512)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    with TinyProxy(tmp_path / "tinyproxy") as proxy:
        yield proxy


@pytest.fixture
def tinyproxy_with_auth(tmp_path: Path) -> Iterator[TinyProxy]:
    with TinyProxy(tmp_path / "tinyproxy-auth", credentials=PROXY_USER) as proxy:
        yield proxy


def pull_and_check(node: NodeProcess, repo: str, image: PushedImage) -> None:
    with httpx.Client(base_url=node.url, timeout=30, trust_env=False) as client:
        manifest = client.get(
            f"/v2/{repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        )
        assert manifest.status_code == 200, manifest.text
        assert manifest.content == image.manifest_bytes
        for digest, data in image.layers:
            blob = client.get(f"/v2/{repo}/blobs/{digest}")
            assert blob.status_code == 200, blob.text
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
            assert blob.content == data


def test_a_plain_http_upstream_is_pulled_through_the_proxy(
    registry: Registry, tinyproxy: TinyProxy, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "team/app", "v1", layer_sizes=LAYER_SIZES)
    node = node_factory("--upstream", registry.url, "--proxy", tinyproxy.url())

    pull_and_check(node, "team/app", image)

    # The proxy was sent the absolute URL of every request it carried...
    carried = tinyproxy.wait_for_requests(2 + len(image.layers))
    manifest_url = f"{registry.url}/v2/team/app/manifests/v1"
    assert ("HEAD", manifest_url) in carried
    assert ("GET", manifest_url) in carried
    for digest, _ in image.layers:
        assert ("GET", f"{registry.url}/v2/team/app/blobs/{digest}") in carried
        assert registry.blob_gets("team/app", digest) == 1
    # ...and it carried every request of the mirror's that the registry saw.
    seen = [e for e in registry.access_log() if e.user_agent.startswith("tcr-mirror/")]
    assert len(seen) == len(carried)
    started = [e for e in node.events() if e.get("event") == "upstream_proxy"]
    assert started
    assert started[0]["proxy"] == tinyproxy.address
    assert started[0]["source"] == "config"


def test_an_https_upstream_is_pulled_through_a_tunnel_with_proxy_credentials(
    tls_registry: Registry,
    tls_files: TlsFiles,
    tinyproxy_with_auth: TinyProxy,
    node_factory: NodeFactory,
) -> None:
    proxy = tinyproxy_with_auth
    image = push_image(tls_registry, "secure/app", "v1", layer_sizes=LAYER_SIZES)
    config = f'proxy = "{proxy.url(PROXY_USER)}"\n'
    node = node_factory(
        "--upstream", tls_registry.url, "--ca-file", str(tls_files.ca), config=config
    )

    pull_and_check(node, "secure/app", image)

    authority = tls_registry.url.removeprefix("https://")
    carried = proxy.wait_for_requests(2)
    # One tunnel for httpx's connection, one per blob body at least.
    tunnels = [target for method, target in carried if method == "CONNECT"]
    assert len(tunnels) >= 1 + len(image.layers)
    assert set(tunnels) == {authority}
    assert len(tunnels) == len(carried)
    for digest, _ in image.layers:
        assert tls_registry.blob_gets("secure/app", digest) == 1
    log = node.log_text()
    secret = base64.b64encode(":".join(PROXY_USER).encode()).decode()
    assert PROXY_USER[1] not in log
    assert secret not in log


def test_wrong_proxy_credentials_are_a_clean_oci_error(
    tls_registry: Registry,
    tls_files: TlsFiles,
    tinyproxy_with_auth: TinyProxy,
    node_factory: NodeFactory,
) -> None:
    image = push_image(tls_registry, "secure/app", "v1", layer_sizes=(1024,))
    wrong = (PROXY_USER[0], "wr0ng-pa55word")
    config = f'proxy = "{tinyproxy_with_auth.url(wrong)}"\n'
    node = node_factory(
        "--upstream", tls_registry.url, "--ca-file", str(tls_files.ca), config=config
    )
    digest = image.layers[0][0]

    with httpx.Client(base_url=node.url, timeout=30, trust_env=False) as client:
        manifest = client.get(
            "/v2/secure/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        )
        blob = client.get(f"/v2/secure/app/blobs/{digest}")
    for response in (manifest, blob):
        assert response.status_code == 503
        error = response.json()["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert f"proxy {tinyproxy_with_auth.address}" in error["message"]
        assert wrong[1] not in error["message"]
    assert "credentials refused" in blob.json()["errors"][0]["message"]
    assert tls_registry.blob_gets("secure/app", digest) == 0
    log = node.log_text()
    assert "Traceback" not in log
    assert wrong[1] not in log


def test_no_proxy_hosts_and_a_dead_proxy(
    registry: Registry, tinyproxy: TinyProxy, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "team/app", "v1", layer_sizes=(2048,))
    spared = node_factory(
        "--upstream", registry.url, "--proxy", tinyproxy.url(),
        "--no-proxy", "example.invalid,127.0.0.0/8",
    )  # fmt: skip
    pull_and_check(spared, "team/app", image)
    assert tinyproxy.requests() == []

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections fail
    try:
        port = dead.getsockname()[1]
        node = node_factory("--upstream", registry.url, "--proxy", f"127.0.0.1:{port}")
        digest = image.layers[0][0]
        with httpx.Client(base_url=node.url, timeout=30, trust_env=False) as client:
            manifest = client.get(
                "/v2/team/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
            )
            blob = client.get(f"/v2/team/app/blobs/{digest}")
    finally:
        dead.close()
    for response in (manifest, blob):
        assert response.status_code == 503
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert "Traceback" not in node.log_text()

"""An HTTPS upstream, as TCR always is: a real docker-registry serving TLS.

The registry's certificate comes from a CA the test makes, so the node must
be told to trust it (``--ca-file``); without that, the node must refuse the
upstream with an OCI error instead of pulling from an unverified server.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from support.images import push_image
from support.node import NodeProcess
from support.registry import Registry
from support.tls import TlsFiles

NodeFactory = Callable[..., NodeProcess]
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def test_an_https_upstream_is_pulled_through_with_its_ca(
    tls_registry: Registry, tls_files: TlsFiles, node_factory: NodeFactory
) -> None:
    # One layer big enough to take the blob path's raw reads, one small.
    image = push_image(tls_registry, "secure/app", "v1", layer_sizes=(3 << 20, 512))
    node = node_factory("--upstream", tls_registry.url, "--ca-file", str(tls_files.ca))

    with httpx.Client(base_url=node.url, timeout=30) as client:
        manifest = client.get(
            "/v2/secure/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        )
        assert manifest.status_code == 200
        assert manifest.content == image.manifest_bytes
        for digest, data in image.layers:
            blob = client.get(f"/v2/secure/app/blobs/{digest}")
            assert blob.status_code == 200
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
            assert blob.content == data

    for digest, _ in image.layers:
        assert tls_registry.blob_gets("secure/app", digest) == 1


def test_an_untrusted_https_upstream_is_refused_with_an_oci_error(
    tls_registry: Registry, node_factory: NodeFactory
) -> None:
    image = push_image(tls_registry, "secure/app", "v1", layer_sizes=(1024,))
    node = node_factory("--upstream", tls_registry.url)
    digest = image.layers[0][0]

    with httpx.Client(base_url=node.url, timeout=30) as client:
        manifest = client.get(
            "/v2/secure/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        )
        blob = client.get(f"/v2/secure/app/blobs/{digest}")
    for response in (manifest, blob):
        assert response.status_code == 503
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    # Nothing was served from it: the handshake failed before any request.
    assert tls_registry.requests_for("GET", f"/v2/secure/app/blobs/{digest}") == []
    assert node.process is not None
    assert node.process.poll() is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("not a certificate\n", "holds no PEM certificate"),
    ],
)
def test_a_bad_ca_file_stops_the_start_in_one_line(
    tmp_path: Path, content: str | None, message: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "node",
         "--upstream", "https://127.0.0.1:1", "--ca-file", str(ca_file),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("tcr-mirror: error: ")
    assert message in done.stderr

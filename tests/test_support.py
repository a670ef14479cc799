"""The test harness against real registries and real clients.

Every node-mirror test stands on ``tests/support``; these tests show that its
registries, token server, pushes, log parsing, skopeo and containerd do what
they claim when talking to docker-registry directly.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from support.containerd import CONTAINERD_USER_AGENT_PREFIX, Containerd
from support.images import (
    HELM_CHART,
    HELM_CONFIG,
    OCI_MANIFEST,
    push_helm_chart,
    push_image,
    push_index,
    push_large_image,
    push_signature,
)
from support.layers import build_layer, digest_of
from support.registry import Registry, parse_access_line
from support.skopeo import SKOPEO_USER_AGENT_PREFIX, SkopeoError, copy
from support.tokenserver import TokenServer, libtrust_key_id, parse_scopes

# Content builders (no I/O).


def test_layer_is_deterministic_targz_with_matching_diff_id() -> None:
    layer = build_layer(3000, seed=7)

    assert build_layer(3000, seed=7) == layer
    assert build_layer(3000, seed=8).digest != layer.digest
    assert layer.digest == digest_of(layer.data)
    tar_bytes = gzip.decompress(layer.data)
    assert layer.diff_id == digest_of(tar_bytes)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        sizes = {member.name: member.size for member in tar.getmembers()}
    assert sizes["layer-7/data.bin"] == 3000


def test_access_line_parses_escaped_user_agent() -> None:
    line = (
        '127.0.0.1 - - [03/Dec/2026:13:45:16 +0000] "GET /v2/a/blobs/sha256:ab?x=1 '
        'HTTP/1.1" 200 157 "" "tcr-mirror/0.1 \\"quoted\\""'
    )

    entry = parse_access_line(line)

    assert entry is not None
    assert (entry.method, entry.path, entry.query) == (
        "GET",
        "/v2/a/blobs/sha256:ab",
        "x=1",
    )
    assert (entry.status, entry.bytes) == (200, 157)
    assert entry.user_agent == 'tcr-mirror/0.1 "quoted"'
    assert parse_access_line('{"msg":"response completed"}') is None


def test_scopes_split_on_spaces_and_actions() -> None:
    scopes = parse_scopes(["repository:a/b:pull,push repository:c:pull", "bad"])

    assert scopes == [
        ("repository", "a/b", ("pull", "push")),
        ("repository", "c", ("pull",)),
    ]


def test_token_claims_carry_grants_and_expiry(token_server: TokenServer) -> None:
    token_server.expires_in = 7
    account, password = next(iter(token_server.users.items()))

    response = httpx.get(
        token_server.realm,
        params={"service": token_server.service, "scope": "repository:lib/x:pull"},
        auth=(account, password),
    )

    body = response.json()
    header, claims = (
        json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        for part in body["token"].split(".")[:2]
    )
    assert header["alg"] == "ES256"
    assert len(header["kid"].split(":")) == 12
    assert claims["exp"] - claims["iat"] == 7 == body["expires_in"]
    assert claims["aud"] == token_server.service
    assert claims["access"] == [
        {"type": "repository", "name": "lib/x", "actions": ["pull"]}
    ]
    assert token_server.tokens_issued == 1


def test_token_server_refuses_bad_password_and_unknown_service(
    token_server: TokenServer,
) -> None:
    account = next(iter(token_server.users))

    wrong = httpx.get(token_server.realm, auth=(account, "wrong"))
    unknown = httpx.get(token_server.realm, params={"service": "other"})

    assert (wrong.status_code, unknown.status_code) == (401, 400)
    assert [r.status for r in token_server.requests] == [401, 400]
    assert token_server.tokens_issued == 0


def test_libtrust_key_id_format() -> None:
    key_id = libtrust_key_id(ec.generate_private_key(ec.SECP256R1()).public_key())

    groups = key_id.split(":")
    assert len(groups) == 12
    assert all(len(g) == 4 and g.isalnum() and g.isupper() for g in groups)


# Registry and pushes, read back by skopeo.


def test_image_round_trips_through_skopeo(registry: Registry, tmp_path: Path) -> None:
    image = push_image(registry, "lib/app", "v1", layer_sizes=[1000, 20_000, 3000])

    result = copy(f"docker://{registry.host}/lib/app:v1", f"oci:{tmp_path / 'out'}")

    expected = {
        image.manifest_digest,
        image.config_digest,
        *(d for d, _ in image.layers),
    }
    assert set(result.blobs) == expected
    assert result.manifest_digest == image.manifest_digest
    layers = [digest for digest, _ in image.layers]
    assert registry.blob_gets("lib/app", layers[1], SKOPEO_USER_AGENT_PREFIX) == 1


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_index_round_trips_with_all_platforms(
    registry: Registry, tmp_path: Path, media: str
) -> None:
    index = push_index(registry, "lib/multi", "v1", media=media)

    result = copy(
        f"docker://{registry.host}/lib/multi:v1",
        f"dir:{tmp_path / 'out'}",
        all_images=True,
    )

    platforms = [platform for platform, _ in index.images]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    for _, image in index.images:
        assert set(image.blobs) <= set(result.blobs)
    assert len({image.config_digest for _, image in index.images}) == 2
    assert result.manifest_digest == index.index_digest


def test_skopeo_copy_detects_missing_image(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(SkopeoError, match="manifest unknown"):
        copy(f"docker://{registry.host}/lib/none:v1", f"dir:{tmp_path / 'out'}")


def test_artifacts_are_stored_as_pushed(registry: Registry) -> None:
    image = push_image(registry, "lib/app", "v1")
    chart = push_helm_chart(registry, "charts/demo", "1.2.3")
    signature = push_signature(registry, "lib/app", image.descriptor)

    # distribution 2.8 answers 404 for an OCI manifest unless Accept names it.
    accept = {"Accept": OCI_MANIFEST}
    got_chart = httpx.get(f"{registry.url}/v2/charts/demo/manifests/1.2.3")
    chart_ok = httpx.get(
        f"{registry.url}/v2/charts/demo/manifests/1.2.3", headers=accept
    )
    sig_url = f"{registry.url}/v2/lib/app/manifests/{signature.manifest_digest}"
    got_sig = httpx.get(sig_url, headers=accept)

    assert got_chart.status_code == 404
    assert chart_ok.content == chart.manifest_bytes
    document = json.loads(chart_ok.content)
    assert document["config"]["mediaType"] == HELM_CONFIG
    assert document["layers"][0]["mediaType"] == HELM_CHART
    assert json.loads(got_sig.content)["subject"]["digest"] == image.manifest_digest
    assert digest_of(got_sig.content) == signature.manifest_digest


def test_large_image_is_uploaded_in_chunks(registry: Registry, tmp_path: Path) -> None:
    image = push_large_image(
        registry,
        "lib/big",
        "v1",
        layer_sizes=[3 << 20],
        workdir=tmp_path,
        chunk_size=1 << 20,
    )

    layer = image.layer_files[0]
    patches = [e for e in registry.access_log() if e.method == "PATCH"]
    assert len(patches) == 4  # 3 MiB of payload plus tar and gzip framing
    blob = httpx.get(f"{registry.url}/v2/lib/big/blobs/{layer.digest}")
    assert hashlib.sha256(blob.content).hexdigest() == layer.digest.removeprefix(
        "sha256:"
    )
    assert len(blob.content) == layer.size == layer.path.stat().st_size


# Auth modes.


def test_basic_auth_refuses_anonymous_and_accepts_credentials(
    basic_auth_registry: Registry, tmp_path: Path
) -> None:
    registry = basic_auth_registry
    assert registry.credentials is not None
    image = push_image(registry, "lib/app", "v1")
    ref = f"docker://{registry.host}/lib/app:v1"

    anonymous = httpx.get(f"{registry.url}/v2/lib/app/manifests/v1")
    refused = copy(ref, f"dir:{tmp_path / 'anon'}", check=False)
    accepted = copy(ref, f"dir:{tmp_path / 'ok'}", src_creds=registry.credentials)

    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    assert refused.returncode != 0
    assert accepted.manifest_digest == image.manifest_digest


def test_token_auth_refuses_anonymous_and_accepts_credentials(
    token_auth_registry: Registry, token_server: TokenServer, tmp_path: Path
) -> None:
    registry = token_auth_registry
    image = push_image(registry, "lib/app", "v1")
    pushes = token_server.tokens_issued
    ref = f"docker://{registry.host}/lib/app:v1"

    anonymous = httpx.get(f"{registry.url}/v2/lib/app/manifests/v1")
    refused = copy(ref, f"dir:{tmp_path / 'anon'}", check=False)
    accepted = copy(ref, f"dir:{tmp_path / 'ok'}", src_creds=registry.credentials)

    assert anonymous.status_code == 401
    challenge = anonymous.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{token_server.realm}"')
    assert refused.returncode != 0
    assert accepted.manifest_digest == image.manifest_digest
    skopeo_requests = token_server.requests[pushes:]
    assert {r.account for r in skopeo_requests if r.status == 200} >= {"alice"}
    assert any("repository:lib/app:pull" in r.scopes for r in skopeo_requests)


def test_registry_restarts_on_the_same_url_with_its_content(registry: Registry) -> None:
    image = push_image(registry, "lib/app", "v1")
    url = f"{registry.url}/v2/lib/app/blobs/{image.config_digest}"

    registry.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(url)
    registry.start()

    assert httpx.get(url).content == image.config_bytes


# Access log.


def test_access_log_counts_each_blob_get_by_user_agent(registry: Registry) -> None:
    image = push_image(registry, "lib/app", "v1", layer_sizes=[500])
    digest, data = image.layers[0]
    url = f"{registry.url}/v2/lib/app/blobs/{digest}"

    first = httpx.get(url, headers={"User-Agent": "tcr-mirror/0.1"})
    httpx.get(url, headers={"User-Agent": "other-client/2"})
    httpx.head(url, headers={"User-Agent": "tcr-mirror/0.1"})

    assert first.content == data
    assert registry.blob_gets("lib/app", digest) == 2
    assert registry.blob_gets("lib/app", digest, "tcr-mirror/") == 1
    [entry] = registry.requests_for(
        "GET", f"/v2/lib/app/blobs/{digest}", user_agent_prefix="tcr"
    )
    assert (entry.status, entry.bytes) == (200, len(data))


# containerd.


@pytest.mark.root
def test_containerd_pulls_through_hosts_toml(
    registry: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    image = push_image(registry, "lib/app", "v1", layer_sizes=[2000, 4000])
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / registry.host).mkdir(parents=True)
    (hosts_dir / registry.host / "hosts.toml").write_text(
        f'[host."{registry.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )

    result = containerd.pull(f"{registry.host}/lib/app:v1", hosts_dir)

    assert result.returncode == 0, result.stderr
    assert containerd.images()[f"{registry.host}/lib/app:v1"] == image.manifest_digest
    assert set(image.blobs) <= containerd.content_digests()
    digest, data = image.layers[1]
    assert containerd.read_content(digest) == data
    gets = registry.requests_for("GET", f"/v2/lib/app/blobs/{digest}")
    assert [e.user_agent.startswith(CONTAINERD_USER_AGENT_PREFIX) for e in gets] == [
        True
    ]
    # containerd names the upstream in ?ns= only when the host is a mirror.
    assert "ns" not in gets[0].params


@pytest.mark.root
def test_containerd_forget_makes_the_next_pull_fetch_again(
    registry: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    image = push_image(registry, "lib/app", "v1", layer_sizes=[2000])
    ref = f"{registry.host}/lib/app:v1"
    hosts_dir = tmp_path / "certs.d"
    digest, _ = image.layers[0]
    assert containerd.pull(ref, hosts_dir).returncode == 0

    containerd.forget(ref)
    assert digest not in containerd.content_digests()
    assert containerd.pull(ref, hosts_dir).returncode == 0

    assert registry.blob_gets("lib/app", digest, CONTAINERD_USER_AGENT_PREFIX) == 2
    assert digest in containerd.content_digests()


def test_proxy_mode_pulls_through_from_remote(
    registry: Registry, registry_factory: Callable[..., Registry], tmp_path: Path
) -> None:
    image = push_image(registry, "lib/app", "v1", layer_sizes=[700])
    proxy = registry_factory(proxy_remote=registry.url)
    digest, _ = image.layers[0]

    first = copy(f"docker://{proxy.host}/lib/app:v1", f"dir:{tmp_path / 'a'}")
    upstream_gets = registry.blob_gets("lib/app", digest)
    second = copy(f"docker://{proxy.host}/lib/app:v1", f"dir:{tmp_path / 'b'}")

    assert first.manifest_digest == second.manifest_digest == image.manifest_digest
    # distribution 2.8's proxy fetches a blob twice on a miss (one stream to
    # the client, one to its store); a baseline worth knowing for benchmarks.
    assert upstream_gets in (1, 2)
    assert registry.blob_gets("lib/app", digest) == upstream_gets
    assert proxy.blob_gets("lib/app", digest, SKOPEO_USER_AGENT_PREFIX) == 2

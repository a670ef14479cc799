"""End to end: a real docker-registry trusts tokens the TCR simulator issues.

The simulator runs in-process on 127.0.0.1; docker-registry 2.8 runs as a
subprocess with ``auth: token`` pointing at the simulator's
``/service/token`` and trusting its certificate. Instance tokens come from
``CreateInstanceToken`` through ``TcrClient``, and the registry token flow
is driven by hand with httpx so each step is visible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from support.registry import REGISTRY_BINARY, Registry
from tcr_mirror.control import CloudCredentials, TcrClient
from tcr_mirror.control.sim import Key, SimConfig, Simulator, serve_http

SECRET_ID = "AKIDsimregistrytest"
SECRET_KEY = "sim-registry-secret-key"
SERVICE = "harbor-registry"
ISSUER = "tcr-mirror-sim-test"
REPO = "team/app"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class _SimTokenIssuer:
    """What ``support.registry.Registry`` needs to know of a token service."""

    def __init__(self, simulator: Simulator, endpoint: str) -> None:
        self.simulator = simulator
        self.realm = f"{endpoint}/service/token"
        self.service = SERVICE
        self.issuer = ISSUER
        self.users: dict[str, str] = {}

    def write_cert_bundle(self, path: Path) -> Path:
        path.write_bytes(self.simulator.state.signing_key.certificate_pem())
        return path


@pytest.fixture
async def sim(nursery: trio.Nursery) -> tuple[Simulator, str]:
    simulator = Simulator(
        {SECRET_ID: Key(SECRET_KEY)},
        config=SimConfig(deploy_seconds=0, endpoint_seconds=0),
        issuer=ISSUER,
    )
    listeners = await nursery.start(serve_http, simulator.handle, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    return simulator, f"http://127.0.0.1:{port}"


@pytest.fixture
def registry(sim: tuple[Simulator, str], tmp_path: Path) -> Iterator[Registry]:
    if not Path(REGISTRY_BINARY).exists():
        pytest.skip(f"{REGISTRY_BINARY} is not installed")
    issuer = _SimTokenIssuer(*sim)
    with Registry(tmp_path / "registry", token_server=issuer) as started:  # type: ignore[arg-type]
        yield started


@pytest.fixture
async def client(sim: tuple[Simulator, str]) -> AsyncIterator[TcrClient]:
    credentials = CloudCredentials(SECRET_ID, SECRET_KEY)
    async with TcrClient(credentials, region="ap-guangzhou", endpoint=sim[1]) as tcr:
        yield tcr


async def _running_instance(client: TcrClient) -> str:
    created = await client.call(
        "CreateInstance", {"RegistryName": "e2e-registry", "RegistryType": "basic"}
    )
    registry_id = created.data["RegistryId"]
    described = await client.call("DescribeInstances", {"Registryids": [registry_id]})
    assert described.data["Registries"][0]["Status"] == "Running"
    return str(registry_id)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _basic(username: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


async def _bearer(
    http: httpx.AsyncClient, registry: Registry, login: tuple[str, str], scope: str
) -> httpx.Response:
    """Follow the registry's challenge to the token realm; return its answer."""
    challenge = await http.get(f"{registry.url}/v2/")
    assert challenge.status_code == 401
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge.headers["WWW-Authenticate"]))
    assert params["service"] == SERVICE
    return await http.get(
        params["realm"],
        params={"service": params["service"], "scope": scope},
        headers=_basic(*login),
    )


async def _token(
    http: httpx.AsyncClient, registry: Registry, login: tuple[str, str], actions: str
) -> dict[str, str]:
    answer = await _bearer(http, registry, login, f"repository:{REPO}:{actions}")
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


async def _push_blob(
    http: httpx.AsyncClient, registry: Registry, auth: dict[str, str], data: bytes
) -> str:
    opened = await http.post(f"{registry.url}/v2/{REPO}/blobs/uploads/", headers=auth)
    assert opened.status_code == 202, opened.text
    location = httpx.URL(registry.url).join(opened.headers["Location"])
    digest = _digest(data)
    put = await http.put(
        location.copy_merge_params({"digest": digest}), content=data, headers=auth
    )
    assert put.status_code == 201, put.text
    return digest


async def _push_image(
    http: httpx.AsyncClient, registry: Registry, auth: dict[str, str]
) -> tuple[bytes, bytes]:
    layer = b"a small layer, not even a tarball"
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    descriptors: list[dict[str, Any]] = []
    for data, media in (
        (config, "application/vnd.oci.image.config.v1+json"),
        (layer, "application/vnd.oci.image.layer.v1.tar"),
    ):
        digest = await _push_blob(http, registry, auth, data)
        descriptors.append({"mediaType": media, "digest": digest, "size": len(data)})
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": descriptors[0],
            "layers": descriptors[1:],
        }
    ).encode()
    put = await http.put(
        f"{registry.url}/v2/{REPO}/manifests/v1",
        content=manifest,
        headers={**auth, "Content-Type": MANIFEST_TYPE},
    )
    assert put.status_code == 201, put.text
    return manifest, layer


async def test_push_and_pull_with_temporary_instance_token(
    client: TcrClient, registry: Registry
) -> None:
    registry_id = await _running_instance(client)
    issued = await client.call("CreateInstanceToken", {"RegistryId": registry_id})
    login = (issued.data["Username"], issued.data["Token"])

    async with httpx.AsyncClient() as http:
        pusher = await _token(http, registry, login, "pull,push")
        manifest, layer = await _push_image(http, registry, pusher)

        puller = await _token(http, registry, login, "pull")
        got = await http.get(
            f"{registry.url}/v2/{REPO}/manifests/v1",
            headers={**puller, "Accept": MANIFEST_TYPE},
        )
        assert got.status_code == 200
        assert got.content == manifest
        blob = await http.get(
            f"{registry.url}/v2/{REPO}/blobs/{_digest(layer)}",
            headers=puller,
            follow_redirects=True,
        )
        assert blob.content == layer

        # A pull-only registry token must not open an upload.
        denied = await http.post(
            f"{registry.url}/v2/{REPO}/blobs/uploads/", headers=puller
        )
        assert denied.status_code == 401


async def test_longterm_token_stops_working_when_disabled_or_deleted(
    client: TcrClient, registry: Registry
) -> None:
    registry_id = await _running_instance(client)
    issued = await client.call(
        "CreateInstanceToken", {"RegistryId": registry_id, "TokenType": "longterm"}
    )
    login = (issued.data["Username"], issued.data["Token"])
    token_id = issued.data["TokenId"]
    scope = f"repository:{REPO}:pull"

    async with httpx.AsyncClient() as http:
        assert (await _bearer(http, registry, login, scope)).status_code == 200

        await client.call(
            "ModifyInstanceToken",
            {"RegistryId": registry_id, "TokenId": token_id, "Enable": False},
        )
        refused = await _bearer(http, registry, login, scope)
        assert refused.status_code == 401
        assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"

        await client.call(
            "ModifyInstanceToken",
            {"RegistryId": registry_id, "TokenId": token_id, "Enable": True},
        )
        assert (await _bearer(http, registry, login, scope)).status_code == 200

        await client.call(
            "DeleteInstanceToken", {"RegistryId": registry_id, "TokenId": token_id}
        )
        assert (await _bearer(http, registry, login, scope)).status_code == 401
        # Without a registry token, the registry itself refuses the pull.
        anonymous = await http.get(f"{registry.url}/v2/{REPO}/manifests/v1")
        assert anonymous.status_code == 401


async def test_token_service_refuses_wrong_username_and_forged_tokens(
    client: TcrClient, registry: Registry
) -> None:
    registry_id = await _running_instance(client)
    issued = await client.call("CreateInstanceToken", {"RegistryId": registry_id})
    username, token = issued.data["Username"], issued.data["Token"]
    header, claims, signature = token.split(".")
    forged_claims = json.loads(base64.urlsafe_b64decode(claims + "=="))
    forged_claims["operatorUin"] = "999"
    forged = ".".join(
        [
            header,
            base64.urlsafe_b64encode(json.dumps(forged_claims).encode())
            .rstrip(b"=")
            .decode(),
            signature,
        ]
    )
    scope = f"repository:{REPO}:pull"
    async with httpx.AsyncClient() as http:
        for login in [("someone-else", token), ("999", forged), (username, "x")]:
            assert (await _bearer(http, registry, login, scope)).status_code == 401


async def test_tokens_of_a_deleted_instance_are_refused(
    client: TcrClient, registry: Registry, sim: tuple[Simulator, str]
) -> None:
    registry_id = await _running_instance(client)
    issued = await client.call("CreateInstanceToken", {"RegistryId": registry_id})
    login = (issued.data["Username"], issued.data["Token"])
    await client.call("DeleteInstance", {"RegistryId": registry_id})
    async with httpx.AsyncClient() as http:
        refused = await _bearer(http, registry, login, f"repository:{REPO}:pull")
    assert refused.status_code == 401

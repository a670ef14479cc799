"""The TCR simulator: request verification, envelopes, state, HTTP, CLI.

Verification tests send raw requests over a real socket so that what is
checked is what a client puts on the wire.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from support.processes import stop_process
from tcr_mirror.control import _signing
from tcr_mirror.control.sim import (
    Key,
    SigningKey,
    SimConfig,
    SimError,
    Simulator,
    serve_http,
)
from tcr_mirror.control.sim._actions import ACTIONS
from tcr_mirror.control.sim._schema import (
    INTEGER,
    STRING,
    ListOf,
    check,
    opt,
    req,
    unflatten,
)
from tcr_mirror.control.sim._state import SimState

SECRET_ID = "AKIDsimtest000000000000"
SECRET_KEY = "sim-test-secret-key-value"
REGION = "ap-guangzhou"
KEY = SigningKey.generate()  # one RSA key for the module: generation is slow


@pytest.fixture
async def endpoint(nursery: trio.Nursery) -> tuple[Simulator, str]:
    simulator = Simulator(
        {SECRET_ID: Key(SECRET_KEY), "AKIDtemporary": Key("temp-key", "sts-token")},
        config=SimConfig(deploy_seconds=0),
        signing_key=KEY,
    )
    simulator.add_instance("existing-one")
    listeners = await nursery.start(serve_http, simulator.handle, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    return simulator, f"127.0.0.1:{port}"


def _request(
    host: str,
    action: str = "DescribeInstances",
    body: bytes = b"{}",
    *,
    secret_id: str = SECRET_ID,
    secret_key: str = SECRET_KEY,
    timestamp: int | None = None,
    timestamp_offset: int = 0,
    method: str = "POST",
    query: str = "",
    signed: tuple[str, ...] = ("content-type", "host"),
    overrides: dict[str, str | None] | None = None,
    sign_body: bytes | None = None,
) -> tuple[str, dict[str, str], bytes]:
    """Build a signed request; ``overrides`` change or drop headers after signing."""
    # Offsets are taken from the time of sending, not of collection: the
    # suite may run for minutes before this test does.
    if timestamp is None:
        timestamp = int(time.time()) + timestamp_offset
    headers = {
        "content-type": "application/json" if method == "POST" else "text/plain",
        "host": host,
        "x-tc-action": action,
        "x-tc-version": "2019-09-24",
        "x-tc-timestamp": str(timestamp),
        "x-tc-region": REGION,
    }
    headers["authorization"] = _signing.sign(
        secret_id,
        secret_key,
        service="tcr",
        timestamp=timestamp,
        headers=headers,
        body=body if sign_body is None else sign_body,
        method=method,
        query=query,
        signed_headers=signed,
    )
    for name, value in (overrides or {}).items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    url = f"http://{host}/" + (f"?{query}" if query else "")
    return url, headers, body


async def _send(
    request: tuple[str, dict[str, str], bytes], method: str = "POST"
) -> Any:
    url, headers, body = request
    async with httpx.AsyncClient() as http:
        answer = await http.request(method, url, headers=headers, content=body)
    assert answer.status_code == 200
    response = answer.json()["Response"]
    uuid.UUID(response["RequestId"])
    return response


def _code(response: dict[str, Any]) -> str | None:
    error = response.get("Error")
    if error is None:
        return None
    assert set(response) == {"Error", "RequestId"}
    return str(error["Code"])


async def test_signed_request_succeeds(endpoint: tuple[Simulator, str]) -> None:
    response = await _send(_request(endpoint[1]))
    assert _code(response) is None
    assert response["TotalCount"] == 1
    assert response["Registries"][0]["RegistryName"] == "existing-one"


async def test_unsigned_payload_is_verified_as_the_sdks_sign_it(
    endpoint: tuple[Simulator, str],
) -> None:
    # The SDKs' unsigned-payload option: the payload hash is the hash of
    # the words UNSIGNED-PAYLOAD, whatever the body (TCR-API.md §1.3).
    unsigned = {"x-tc-content-sha256": "UNSIGNED-PAYLOAD"}
    body = b'{"Limit": 1}'
    accepted = _request(
        endpoint[1], body=body, sign_body=b"UNSIGNED-PAYLOAD", overrides=unsigned
    )
    assert _code(await _send(accepted)) is None
    # Without the header, the body is hashed as always.
    assert _code(await _send(_request(endpoint[1], body=body))) is None
    refused = _request(endpoint[1], body=body, sign_body=b"UNSIGNED-PAYLOAD")
    assert _code(await _send(refused)) == "AuthFailure.SignatureFailure"


async def test_signature_over_action_header_is_accepted(
    endpoint: tuple[Simulator, str],
) -> None:
    signed = ("content-type", "host", "x-tc-action")
    assert _code(await _send(_request(endpoint[1], signed=signed))) is None


INVALID_AUTH = "AuthFailure.InvalidAuthorization"
BAD_SIGNATURE = "AuthFailure.SignatureFailure"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"sign_body": b'{"Limit": 1}'}, "AuthFailure.SignatureFailure"),
        ({"secret_key": "not-the-key"}, "AuthFailure.SignatureFailure"),
        ({"secret_id": "AKIDunknown"}, "AuthFailure.SecretIdNotFound"),
        ({"timestamp_offset": -400}, "AuthFailure.SignatureExpire"),
        ({"timestamp_offset": 400}, "AuthFailure.SignatureExpire"),
        ({"overrides": {"authorization": None}}, INVALID_AUTH),
        ({"overrides": {"authorization": "Basic eDp5"}}, INVALID_AUTH),
        ({"overrides": {"x-tc-action": None}}, "MissingParameter"),
        ({"overrides": {"x-tc-timestamp": None}}, "MissingParameter"),
        ({"overrides": {"x-tc-timestamp": "soon"}}, "InvalidParameter"),
        ({"overrides": {"x-tc-version": None}}, "MissingParameter"),
        ({"overrides": {"x-tc-region": None}}, "MissingParameter"),
        ({"overrides": {"x-tc-version": "2017-03-12"}}, "NoSuchVersion"),
        ({"overrides": {"x-tc-region": "ap-shanghai"}}, "UnsupportedRegion"),
        ({"overrides": {"x-tc-region": "mars-north-1"}}, "UnsupportedRegion"),
        ({"action": "DescribeEverything"}, "InvalidAction"),
        ({"signed": ("content-type", "host", "x-tc-action"),
          "overrides": {"x-tc-action": "CreateInstanceToken"}}, BAD_SIGNATURE),
        ({"signed": ("content-type",)}, "AuthFailure.SignatureFailure"),
        ({"signed": ("host",)}, "AuthFailure.SignatureFailure"),
        ({"overrides": {"content-type": "application/json; charset=utf-8"}},
         "AuthFailure.SignatureFailure"),
        ({"overrides": {"x-tc-token": "sts"}}, "AuthFailure.TokenFailure"),
        ({"overrides": {"content-type": "text/plain"}}, "UnsupportedProtocol"),
        ({"body": b"not json", "sign_body": b"not json"}, "InvalidParameter"),
        ({"body": b"[1, 2]", "sign_body": b"[1, 2]"}, "InvalidParameter"),
    ],
)  # fmt: skip
async def test_verification_failures(
    endpoint: tuple[Simulator, str], changes: dict[str, Any], code: str
) -> None:
    assert _code(await _send(_request(endpoint[1], **changes))) == code


@pytest.mark.parametrize("timestamp", [b"\xb2", b"\xb9\xb3", b"9" * 5000])
async def test_timestamp_that_int_refuses_is_invalid_parameter(
    endpoint: tuple[Simulator, str], timestamp: bytes
) -> None:
    url, headers, body = _request(endpoint[1])
    raw: dict[str, str | bytes] = {**headers, "x-tc-timestamp": timestamp}
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, headers=raw, content=body)

    assert answer.status_code == 200
    assert _code(answer.json()["Response"]) == "InvalidParameter"


async def test_wrong_scope_date_fails(endpoint: tuple[Simulator, str]) -> None:
    url, headers, body = _request(endpoint[1])
    today = _signing.credential_date(int(headers["x-tc-timestamp"]))
    headers["authorization"] = headers["authorization"].replace(today, "2001-01-01")
    assert _code(await _send((url, headers, body))) == "AuthFailure.SignatureFailure"


async def test_temporary_key_needs_its_token(endpoint: tuple[Simulator, str]) -> None:
    base = {"secret_id": "AKIDtemporary", "secret_key": "temp-key"}
    ok = _request(endpoint[1], **base, overrides={"x-tc-token": "sts-token"})
    assert _code(await _send(ok)) is None
    missing = _request(endpoint[1], **base)
    assert _code(await _send(missing)) == "AuthFailure.TokenFailure"


@pytest.mark.parametrize("token", [b"sts-token\xb2", b"\xb2", b"sts"])
async def test_temporary_key_with_a_wrong_token_fails(
    endpoint: tuple[Simulator, str], token: bytes
) -> None:
    base = {"secret_id": "AKIDtemporary", "secret_key": "temp-key"}
    url, headers, body = _request(endpoint[1], **base)
    raw: dict[str, str | bytes] = {**headers, "x-tc-token": token}
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, headers=raw, content=body)

    assert answer.status_code == 200
    assert _code(answer.json()["Response"]) == "AuthFailure.TokenFailure"


async def test_unsupported_method(endpoint: tuple[Simulator, str]) -> None:
    response = await _send(_request(endpoint[1], method="PUT"), method="PUT")
    assert _code(response) == "UnsupportedProtocol"


async def test_get_form_with_nested_and_string_values(
    endpoint: tuple[Simulator, str],
) -> None:
    simulator, host = endpoint
    registry_id = next(iter(simulator.state.instances))
    query = f"Registryids.0={registry_id}&Limit=5&AllRegion=True"
    response = await _send(
        _request(host, method="GET", body=b"", query=query), method="GET"
    )
    assert _code(response) is None
    assert [r["RegistryId"] for r in response["Registries"]] == [registry_id]

    bad = "Limit=five"
    response = await _send(_request(host, method="GET", body=b"", query=bad), "GET")
    assert _code(response) == "InvalidParameter"
    assert "Limit" in response["Error"]["Message"]


async def test_parameter_checks_follow_tcr_precedence(
    endpoint: tuple[Simulator, str],
) -> None:
    host = endpoint[1]
    cases = [
        (b"{}", "MissingParameter", "RegistryId"),
        (b'{"RegistryId": "tcr-aaaaaaaa", "Colour": 1}', "UnknownParameter", "Colour"),
        (b'{"RegistryId": 7}', "InvalidParameter", "RegistryId"),
        (b'{"RegistryId": "nope"}', "InvalidParameterValue", "nope"),
    ]
    for body, code, mention in cases:
        response = await _send(_request(host, "CreateInstanceToken", body))
        assert _code(response) == code
        assert mention in response["Error"]["Message"]


async def test_injected_fault_and_rate_limit(endpoint: tuple[Simulator, str]) -> None:
    simulator, host = endpoint
    simulator.state.inject("DescribeInstances", "InternalError", times=1)
    assert _code(await _send(_request(host))) == "InternalError"
    assert _code(await _send(_request(host))) is None


async def test_other_routes(endpoint: tuple[Simulator, str]) -> None:
    host = endpoint[1]
    async with httpx.AsyncClient(base_url=f"http://{host}") as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/v2/")).status_code == 404
        no_service = await http.get("/service/token")
        assert no_service.status_code == 400
        assert no_service.json()["errors"][0]["code"] == "UNSUPPORTED"
        anonymous = await http.get("/service/token", params={"service": "x"})
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic")
        garbage = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
        refused = await http.get("/service/token?service=x", headers=garbage)
        assert refused.status_code == 401


# The HTTP server.


async def test_keep_alive_serves_many_requests_on_one_connection(
    endpoint: tuple[Simulator, str],
) -> None:
    host, port = endpoint[1].split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        for _ in range(3):
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await _read_response(stream)
            assert answer.startswith(b"HTTP/1.1 200 ")
            assert answer.endswith(b'{"status": "ok"}')


async def _read_response(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += await stream.receive_some(4096)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"this is not http\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    ],
)
async def test_bad_requests_get_an_http_error_and_close(
    endpoint: tuple[Simulator, str], raw: bytes, status: bytes
) -> None:
    host, port = endpoint[1].split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(raw)
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 " + status)


async def test_handler_crash_is_a_500_not_a_dead_server(nursery: trio.Nursery) -> None:
    async def broken(*_: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        raise RuntimeError("boom")

    listeners = await nursery.start(serve_http, broken, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with httpx.AsyncClient() as http:
        for _ in range(2):
            answer = await http.get(f"http://127.0.0.1:{port}/")
            assert answer.status_code == 500


# Sans-IO state, with a fake clock.


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _state(clock: FakeClock, **config: Any) -> SimState:
    return SimState(SimConfig(**config), KEY, clock=clock, seed=7)


def _call(state: SimState, action: str, **params: Any) -> dict[str, Any]:
    state.settle()
    spec = ACTIONS[action]
    return spec.handler(state, check(spec.fields, params))


def test_instance_deploys_then_deletes_in_the_background() -> None:
    clock = FakeClock()
    state = _state(clock, deploy_seconds=10, delete_seconds=5)
    registry_id = _call(
        state, "CreateInstance", RegistryName="abcde", RegistryType="basic"
    )["RegistryId"]

    def status() -> list[str]:
        found = _call(state, "DescribeInstances", Registryids=[registry_id])
        return [r["Status"] for r in found["Registries"]]

    assert status() == ["Pending"]
    clock.now += 9.9
    assert status() == ["Pending"]
    clock.now += 0.2
    assert status() == ["Running"]
    _call(state, "DeleteInstance", RegistryId=registry_id)
    assert status() == ["Deleting"]
    clock.now += 5
    assert status() == []


def test_public_endpoint_opens_then_policies_are_usable() -> None:
    clock = FakeClock()
    state = _state(clock, endpoint_seconds=3)
    registry_id = _call(
        state, "CreateInstance", RegistryName="abcde", RegistryType="basic"
    )
    registry_id = registry_id["RegistryId"]
    clock.now += 2
    _call(state, "ManageExternalEndpoint", RegistryId=registry_id, Operation="Create")
    with pytest.raises(SimError) as info:
        _call(state, "DescribeSecurityPolicies", RegistryId=registry_id)
    assert info.value.code == "ResourceNotFound"
    clock.now += 3
    status = _call(state, "DescribeExternalEndpointStatus", RegistryId=registry_id)
    assert status["Status"] == "Opened"
    _call(
        state,
        "CreateSecurityPolicy",
        RegistryId=registry_id,
        CidrBlock="10.0.0.1",
        Description="one",
    )
    policies = _call(state, "DescribeSecurityPolicies", RegistryId=registry_id)
    assert policies["SecurityPolicySet"] == [
        {"PolicyIndex": 0, "CidrBlock": "10.0.0.1/32", "Description": "one",
         "PolicyVersion": "1"}
    ]  # fmt: skip


def test_rate_limit_refills_over_time() -> None:
    clock = FakeClock()
    state = _state(clock)
    for _ in range(20):
        state.admit("CreateSecurityPolicy", 20)
    with pytest.raises(SimError) as info:
        state.admit("CreateSecurityPolicy", 20)
    assert info.value.code == "RequestLimitExceeded"
    clock.now += 0.125  # two and a half tokens back at 20/s
    state.admit("CreateSecurityPolicy", 20)
    state.admit("CreateSecurityPolicy", 20)
    with pytest.raises(SimError):
        state.admit("CreateSecurityPolicy", 20)


def test_schema_unflatten_and_lenient_coercion() -> None:
    fields = {
        "Names": req(ListOf(STRING)),
        "Count": opt(INTEGER),
    }
    params = unflatten([("Names.1", "b"), ("Names.0", "a"), ("Count", "3")])
    assert check(fields, params, lenient=True) == {"Names": ["a", "b"], "Count": 3}
    with pytest.raises(SimError) as info:
        check(fields, unflatten([("Names.1", "b")]), lenient=True)
    assert info.value.code == "InvalidParameter"
    with pytest.raises(SimError) as info:
        check(fields, {"Names": ["a"], "Count": True})
    assert info.value.code == "InvalidParameter"


# The CLI.


@pytest.fixture
def sim_process(
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    env = {
        **os.environ,
        "TENCENTCLOUD_SECRET_ID": SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
    }
    cert = tmp_path / "cert.pem"
    process = subprocess.Popen(
        [sys.executable, "-m", "tcr_mirror", "sim", "--listen", "127.0.0.1:0",
         "--registry-cert-out", str(cert), "--instance", "from-cli"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        announcement = json.loads(process.stderr.readline())
        announcement["cert"] = cert
        yield process, announcement
    finally:
        stop_process(process, terminate=False)


async def test_cli_serves_and_exits_zero_on_sigterm(
    sim_process: tuple[subprocess.Popen[str], dict[str, Any]],
) -> None:
    process, announcement = sim_process
    assert announcement["event"] == "sim_listening"
    assert announcement["cert"].read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    response = await _send(_request(announcement["address"]))
    assert (
        response["Registries"][0]["RegistryId"] == announcement["instances"]["from-cli"]
    )

    process.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(lambda: process.wait(timeout=10)) == 0
    assert process.stderr is not None
    assert SECRET_KEY not in process.stderr.read()


def run_sim_cli(listen: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``tcr-mirror sim --listen LISTEN`` run to its end (a start that fails)."""
    return subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "sim", "--listen", listen],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_without_keys_is_a_one_line_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENCENTCLOUD_")}
    done = run_sim_cli("127.0.0.1:0", env)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "tcr-mirror: error: environment variable TENCENTCLOUD_SECRET_ID is not set"
    )


def test_cli_on_an_address_in_use_is_a_one_line_error() -> None:
    env = {
        **os.environ,
        "TENCENTCLOUD_SECRET_ID": "AKIDx",
        "TENCENTCLOUD_SECRET_KEY": "k",
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_sim_cli(f"127.0.0.1:{port}", env)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"tcr-mirror: error: cannot listen on 127.0.0.1:{port} (--listen): "
        "Address already in use"
    )


# Garbage in, a TCR error out: never anything else.

_HEADER_NAMES = st.sampled_from(
    ["authorization", "content-type", "host", "x-tc-action", "x-tc-version",
     "x-tc-timestamp", "x-tc-region", "x-tc-token"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT"]),
    target=st.text(max_size=40).map(lambda text: "/?" + text),
    headers=st.dictionaries(_HEADER_NAMES, st.text(max_size=60)),
    body=st.binary(max_size=80),
)
def test_verify_turns_garbage_into_tcr_errors(
    method: str, target: str, headers: dict[str, str], body: bytes
) -> None:
    from tcr_mirror.control.sim._verify import verify

    try:
        verify(
            method,
            target,
            headers,
            body,
            keys={SECRET_ID: Key(SECRET_KEY)},
            actions=ACTIONS,
            regions={REGION},
            now=time.time(),
        )
    except SimError as exc:
        assert exc.code
        assert exc.message


@settings(max_examples=200, deadline=None)
@given(
    action=st.sampled_from(sorted(ACTIONS)),
    params=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=12),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    ),
)
def test_actions_turn_garbage_params_into_tcr_errors(action: str, params: Any) -> None:
    state = _state(FakeClock(), deploy_seconds=0)
    state.instances.clear()
    spec = ACTIONS[action]
    try:
        spec.handler(state, check(spec.fields, params))
    except SimError as exc:
        assert exc.code

"""TcrClient against the real simulator on 127.0.0.1.

Covers every simulated action's success path, the documented error paths,
retries with virtual time, timeouts, transport failures, the on_call hook
and that no secret reaches a log.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tcr_mirror.control import (
    CallRecord,
    CloudCredentials,
    TcrClient,
    TcrError,
    TcrTransportError,
)
from tcr_mirror.control.sim import Key, SigningKey, SimConfig, Simulator, serve_http
from tcr_mirror.control.sim._personal import push_tag

SECRET_ID = "AKIDclienttest0000000000"
SECRET_KEY = "client-test-secret-key-0123"
CREDENTIALS = CloudCredentials(SECRET_ID, SECRET_KEY)


def recording(endpoint: str, records: list[CallRecord], **options: Any) -> TcrClient:
    """A client of ``endpoint`` whose every call lands in ``records``."""
    return TcrClient(
        CREDENTIALS,
        region="ap-guangzhou",
        endpoint=endpoint,
        on_call=records.append,
        **options,
    )


KEY = SigningKey.generate()

Sim = tuple[Simulator, str]


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Sim:
    simulator = Simulator(
        {SECRET_ID: Key(SECRET_KEY)},
        config=SimConfig(deploy_seconds=0, endpoint_seconds=0, delete_seconds=0),
        signing_key=KEY,
        seed=3,
    )
    listeners = await nursery.start(serve_http, simulator.handle, "127.0.0.1", 0)
    return simulator, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.fixture
async def client(sim: Sim) -> AsyncIterator[TcrClient]:
    async with TcrClient(CREDENTIALS, region="ap-guangzhou", endpoint=sim[1]) as tcr:
        yield tcr


async def _instance(client: TcrClient, name: str = "client-test") -> str:
    created = await client.call(
        "CreateInstance", {"RegistryName": name, "RegistryType": "standard"}
    )
    return str(created.data["RegistryId"])


# Every action, in the order an operator would use them.


async def test_instances_and_tokens(client: TcrClient) -> None:
    registry_id = await _instance(client)
    listed = await client.call(
        "DescribeInstances",
        {"Filters": [{"Name": "RegistryName", "Values": ["client-test"]}]},
    )
    assert listed.data["TotalCount"] == 1
    registry = listed.data["Registries"][0]
    assert registry["PublicDomain"] == "client-test.tencentcloudcr.com"
    assert registry["CreatedAt"].endswith("+08:00")
    status = await client.call("DescribeInstanceStatus", {"RegistryIds": [registry_id]})
    assert status.data["RegistryStatusSet"][0]["Status"] == "Running"

    temp = await client.call("CreateInstanceToken", {"RegistryId": registry_id})
    assert temp.data["TokenId"] == ""
    assert temp.data["Token"].count(".") == 2
    long = await client.call(
        "CreateInstanceToken",
        {"RegistryId": registry_id, "TokenType": "longterm", "Desc": "nodes"},
    )
    token_id = long.data["TokenId"]
    assert len(token_id) == 20
    assert long.data["ExpTime"] > temp.data["ExpTime"]

    await client.call(
        "ModifyInstanceToken",
        {"RegistryId": registry_id, "TokenId": token_id, "ModifyFlag": 1, "Desc": "x"},
    )
    await client.call(
        "ModifyInstanceToken",
        {"RegistryId": registry_id, "TokenId": token_id, "Enable": False},
    )
    tokens = await client.call("DescribeInstanceToken", {"RegistryId": registry_id})
    assert tokens.data["TotalCount"] == 1
    assert tokens.data["Tokens"][0]["Desc"] == "x"
    assert tokens.data["Tokens"][0]["Enabled"] is False
    await client.call(
        "DeleteInstanceToken", {"RegistryId": registry_id, "TokenId": token_id}
    )
    tokens = await client.call("DescribeInstanceToken", {"RegistryId": registry_id})
    assert tokens.data["Tokens"] == []

    await client.call("DeleteInstance", {"RegistryId": registry_id})
    gone = await client.call("DescribeInstances", {"Registryids": [registry_id]})
    assert gone.data == {"TotalCount": 0, "Registries": []}


async def test_public_endpoint_and_security_policies(client: TcrClient) -> None:
    registry_id = await _instance(client)
    ident = {"RegistryId": registry_id}
    status = await client.call("DescribeExternalEndpointStatus", ident)
    assert status.data["Status"] == "Closed"
    await client.call("ManageExternalEndpoint", {**ident, "Operation": "Create"})
    status = await client.call("DescribeExternalEndpointStatus", ident)
    assert status.data == {"Status": "Opened", "Reason": ""}

    for cidr in ("10.1.0.0/16", "192.168.7.7"):
        await client.call(
            "CreateSecurityPolicy", {**ident, "CidrBlock": cidr, "Description": "n"}
        )
    policies = (await client.call("DescribeSecurityPolicies", ident)).data
    entries = policies["SecurityPolicySet"]
    assert [e["CidrBlock"] for e in entries] == ["10.1.0.0/16", "192.168.7.7/32"]
    assert {e["PolicyVersion"] for e in entries} == {"2"}

    await client.call("DeleteSecurityPolicy", {**ident, "CidrBlock": "10.1.0.0/16"})
    await client.call(
        "DeleteSecurityPolicy", {**ident, "PolicyIndex": 1, "PolicyVersion": "3"}
    )
    policies = (await client.call("DescribeSecurityPolicies", ident)).data
    assert policies["SecurityPolicySet"] == []

    await client.call("ManageExternalEndpoint", {**ident, "Operation": "Delete"})
    status = await client.call("DescribeExternalEndpointStatus", ident)
    assert status.data["Status"] == "Closed"


async def test_internal_endpoints(client: TcrClient) -> None:
    registry_id = await _instance(client)
    link = {
        "RegistryId": registry_id,
        "VpcId": "vpc-abcd1234",
        "SubnetId": "subnet-12345678",
    }
    await client.call("ManageInternalEndpoint", {**link, "Operation": "Create"})
    found = await client.call("DescribeInternalEndpoints", {"RegistryId": registry_id})
    assert found.data["TotalCount"] == 1
    vpc = found.data["AccessVpcSet"][0]
    assert vpc["Status"] == "Running"
    assert vpc["AccessIp"].startswith("10.0.")
    await client.call("ManageInternalEndpoint", {**link, "Operation": "Delete"})
    found = await client.call("DescribeInternalEndpoints", {"RegistryId": registry_id})
    assert found.data == {"AccessVpcSet": [], "TotalCount": 0}


async def test_replication(client: TcrClient) -> None:
    source = await _instance(client, "source-one")
    destination = await _instance(client, "destination-one")
    rule = {
        "Name": "rule1",
        "DestNamespace": "ns",
        "Override": False,
        "Filters": [{"Type": "name", "Value": "ns/**"}],
    }
    await client.call(
        "ManageReplication",
        {
            "SourceRegistryId": source,
            "DestinationRegistryId": destination,
            "Rule": rule,
            "DestinationRegionId": 1,
        },
    )
    replica = await client.call(
        "CreateReplicationInstance",
        {"RegistryId": source, "ReplicationRegionName": "ap-hongkong"},
    )
    replica_id = replica.data["ReplicationRegistryId"]
    assert replica_id.startswith(f"{source}-5-")
    listed = await client.call("DescribeReplicationInstances", {"RegistryId": source})
    assert listed.data["ReplicationRegistries"][0]["ReplicationRegionId"] == 5
    sync = await client.call(
        "DescribeReplicationInstanceSyncStatus",
        {"RegistryId": source, "ReplicationRegistryId": replica_id,
         "ShowReplicationLog": True},
    )  # fmt: skip
    assert sync.data["ReplicationStatus"] == "Succeed"
    assert sync.data["ReplicationLog"]["Status"] == "Succeed"

    with pytest.raises(TcrError) as info:
        await client.call("DeleteInstance", {"RegistryId": source})
    assert info.value.code == "OperationDenied"
    await client.call(
        "DeleteReplicationInstance",
        {"RegistryId": source, "ReplicationRegistryId": replica_id},
    )
    await client.call("DeleteInstance", {"RegistryId": source})


async def test_personal_edition(client: TcrClient, sim: Sim) -> None:
    await client.call("CreateUserPersonal", {"Password": "hunter2hunter2"})
    await client.call("ModifyUserPasswordPersonal", {"Password": "another-pass1"})
    await client.call("CreateNamespacePersonal", {"Namespace": "myteam"})
    namespaces = await client.call(
        "DescribeNamespacePersonal", {"Namespace": "", "Limit": 10, "Offset": 0}
    )
    assert namespaces.data["Data"]["NamespaceCount"] == 1
    exists = await client.call(
        "ValidateNamespaceExistPersonal", {"Namespace": "myteam"}
    )
    assert exists.data["Data"] == {"IsExist": True, "IsPreserved": False}

    for repo in ("myteam/app", "myteam/web", "myteam/old"):
        await client.call("CreateRepositoryPersonal", {"RepoName": repo, "Public": 0})
    for tag in ("1", "2", "3"):
        push_tag(sim[0].state, "myteam/app", tag, f"sha256:{tag * 64}")
    await client.call("DeleteImagePersonal", {"RepoName": "myteam/app", "Tag": "1"})
    await client.call(
        "BatchDeleteImagePersonal", {"RepoName": "myteam/app", "Tags": ["2", "9"]}
    )
    images = await client.call("DescribeImagePersonal", {"RepoName": "myteam/app"})
    assert [t["TagName"] for t in images.data["Data"]["TagInfo"]] == ["3"]

    await client.call("DeleteRepositoryPersonal", {"RepoName": "myteam/old"})
    await client.call("BatchDeleteRepositoryPersonal", {"RepoNames": ["myteam/web"]})
    repos = await client.call("DescribeRepositoryOwnerPersonal", {})
    assert [r["RepoName"] for r in repos.data["Data"]["RepoInfo"]] == ["myteam/app"]

    await client.call(
        "ManageImageLifecycleGlobalPersonal",
        {"Type": "global_keep_last_nums", "Val": 20},
    )
    policy = await client.call("DescribeImageLifecycleGlobalPersonal", {})
    strategy = policy.data["Data"]["StrategyInfo"]
    assert [(s["Type"], s["Value"], s["RepoName"]) for s in strategy] == [
        ("global_keep_last_nums", 20, "")
    ]
    await client.call("DeleteImageLifecycleGlobalPersonal", {})
    policy = await client.call("DescribeImageLifecycleGlobalPersonal", {})
    assert policy.data["Data"]["TotalCount"] == 0
    await client.call("DeleteNamespacePersonal", {"Namespace": "myteam"})


# Documented error paths.

MISSING = "tcr-zzzzzzzz"
ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "CreateInstance",
        {"RegistryName": "Bad_Name", "RegistryType": "basic"},
        "InvalidParameter.ErrorRegistryName",
    ),
    (
        "CreateInstance",
        {"RegistryName": "tencent", "RegistryType": "basic"},
        "InvalidParameter.ErrorNameReserved",
    ),
    (
        "CreateInstance",
        {"RegistryName": "client-test", "RegistryType": "basic"},
        "InvalidParameter.ErrorNameExists",
    ),
    (
        "CreateInstance",
        {"RegistryName": "fine-name", "RegistryType": "huge"},
        "InvalidParameterValue",
    ),
    (
        "CreateInstance",
        {
            "RegistryName": "fine-name",
            "RegistryType": "basic",
            "TagSpecification": {"Tags": [{"Key": str(i)} for i in range(11)]},
        },
        "InvalidParameter.ErrorTagOverLimit",
    ),
    ("CreateInstance", {"RegistryType": "basic"}, "MissingParameter"),
    (
        "CreateInstance",
        {"RegistryName": 5, "RegistryType": "basic"},
        "InvalidParameter",
    ),
    ("DeleteInstance", {"RegistryId": MISSING}, "ResourceNotFound"),
    ("DeleteInstance", {"RegistryId": "{id}", "DryRun": True}, "DryRunOperation"),
    (
        "DescribeInstances",
        {"Filters": [{"Name": "Colour", "Values": ["x"]}]},
        "InvalidParameterValue",
    ),
    ("DescribeInstances", {"Limit": "ten"}, "InvalidParameter"),
    ("DescribeInstanceStatus", {}, "MissingParameter"),
    (
        "CreateInstanceToken",
        {"RegistryId": MISSING},
        "ResourceNotFound.TcrResourceNotFound",
    ),
    (
        "CreateInstanceToken",
        {"RegistryId": "{id}", "TokenType": "forever"},
        "InvalidParameterValue",
    ),
    ("CreateInstanceToken", {"RegistryId": "{id}", "Extra": 1}, "UnknownParameter"),
    ("DescribeInstanceToken", {"RegistryId": MISSING}, "ResourceNotFound"),
    (
        "ModifyInstanceToken",
        {"RegistryId": "{id}", "TokenId": "nope", "Enable": True},
        "ResourceNotFound",
    ),
    (
        "ModifyInstanceToken",
        {"RegistryId": "{id}", "TokenId": "{token}", "ModifyFlag": 3},
        "InvalidParameterValue",
    ),
    (
        "ModifyInstanceToken",
        {"RegistryId": "{id}", "TokenId": "{token}"},
        "MissingParameter",
    ),
    (
        "DeleteInstanceToken",
        {"RegistryId": "{id}", "TokenId": "nope"},
        "ResourceNotFound",
    ),
    (
        "ManageExternalEndpoint",
        {"RegistryId": "{id}", "Operation": "Open"},
        "InvalidParameterValue",
    ),
    ("ManageExternalEndpoint", {"RegistryId": "{id}"}, "MissingParameter"),
    ("DescribeExternalEndpointStatus", {"RegistryId": MISSING}, "ResourceNotFound"),
    (
        "CreateSecurityPolicy",
        {"RegistryId": "{id}", "CidrBlock": "1.2.3.0/24"},
        "MissingParameter",
    ),
    (
        "CreateSecurityPolicy",
        {
            "RegistryId": "{id}",
            "CidrBlock": "1.2.3.0/24",
            "Description": "closed endpoint",
        },
        "OperationDenied",
    ),
    (
        "DeleteSecurityPolicy",
        {"RegistryId": "{id}", "CidrBlock": "1.1.1.1"},
        "OperationDenied",
    ),
    ("DescribeSecurityPolicies", {"RegistryId": "{id}"}, "ResourceNotFound"),
    (
        "ManageInternalEndpoint",
        {
            "RegistryId": "{id}",
            "Operation": "Create",
            "VpcId": "vpc-1",
            "SubnetId": "subnet-1",
        },
        "InvalidParameterValue",
    ),
    (
        "ManageInternalEndpoint",
        {
            "RegistryId": "{id}",
            "Operation": "Delete",
            "VpcId": "vpc-abcd1234",
            "SubnetId": "subnet-abcd1234",
        },
        "ResourceNotFound",
    ),
    ("DescribeInternalEndpoints", {}, "MissingParameter"),
    (
        "ManageReplication",
        {
            "SourceRegistryId": "{id}",
            "DestinationRegistryId": MISSING,
            "Rule": {
                "Name": "r",
                "DestNamespace": "n",
                "Override": True,
                "Filters": [],
            },
        },
        "ResourceNotFound.TcrResourceNotFound",
    ),
    (
        "ManageReplication",
        {
            "SourceRegistryId": "{id}",
            "DestinationRegistryId": "{id}",
            "Rule": {
                "Name": "r",
                "DestNamespace": "n",
                "Override": True,
                "Filters": [],
            },
        },
        "InvalidParameter.ErrorTcrInvalidParameter",
    ),
    (
        "ManageReplication",
        {
            "SourceRegistryId": "{id}",
            "DestinationRegistryId": "{id}",
            "Rule": {"Name": "r"},
        },
        "MissingParameter",
    ),
    ("DescribeReplicationInstances", {"RegistryId": MISSING}, "ResourceNotFound"),
    (
        "DescribeReplicationInstanceSyncStatus",
        {"RegistryId": "{id}", "ReplicationRegistryId": "tcr-x-5"},
        "ResourceNotFound",
    ),
    ("CreateNamespacePersonal", {"Namespace": "myteam"}, "ResourceNotFound.ErrNoUser"),
    ("DeleteNamespacePersonal", {"Namespace": "myteam"}, "ResourceNotFound.ErrNoUser"),
    (
        "ManageImageLifecycleGlobalPersonal",
        {"Type": "keep_all", "Val": 1},
        "InvalidParameterValue",
    ),
    (
        "ManageImageLifecycleGlobalPersonal",
        {"Type": "global_keep_last_days"},
        "MissingParameter",
    ),
]

PERSONAL_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("CreateUserPersonal", {"Password": "another1"}, "InvalidParameter.ErrUserExist"),
    ("ModifyUserPasswordPersonal", {"Password": "short"}, "InvalidParameterValue"),
    (
        "CreateNamespacePersonal",
        {"Namespace": "library"},
        "InvalidParameter.ErrNamespaceReserved",
    ),
    (
        "CreateNamespacePersonal",
        {"Namespace": "dockerhub"},
        "InvalidParameter.ErrNamespaceExist",
    ),
    (
        "CreateNamespacePersonal",
        {"Namespace": "mine"},
        "InvalidParameter.ErrNamespaceExist",
    ),
    (
        "DeleteNamespacePersonal",
        {"Namespace": "ghost"},
        "ResourceNotFound.ErrNoNamespace",
    ),
    (
        "CreateRepositoryPersonal",
        {"RepoName": "dockerhub/app"},
        "InvalidParameter.ErrNSMisMatch",
    ),
    (
        "CreateRepositoryPersonal",
        {"RepoName": "mine/app"},
        "InvalidParameter.ErrRepoExist",
    ),
    ("CreateRepositoryPersonal", {"RepoName": "no-slash"}, "InvalidParameterValue"),
    (
        "DeleteRepositoryPersonal",
        {"RepoName": "mine/ghost"},
        "ResourceNotFound.ErrNoRepo",
    ),
    (
        "DeleteRepositoryPersonal",
        {"RepoName": "dockerhub/app"},
        "InternalError.ErrUnauthorized",
    ),
    (
        "BatchDeleteRepositoryPersonal",
        {"RepoNames": [f"mine/r{i}" for i in range(21)]},
        "InvalidParameter.ErrTooLarge",
    ),
    (
        "DeleteImagePersonal",
        {"RepoName": "mine/ghost", "Tag": "1"},
        "ResourceNotFound.ErrNoRepo",
    ),
    (
        "DeleteImagePersonal",
        {"RepoName": "mine/app", "Tag": "9"},
        "ResourceNotFound.ErrNoTag",
    ),
    (
        "BatchDeleteImagePersonal",
        {"RepoName": "mine/ghost", "Tags": ["1"]},
        "ResourceNotFound.ErrNoRepo",
    ),
]


def _fill(params: Any, values: dict[str, str]) -> Any:
    if isinstance(params, dict):
        return {key: _fill(value, values) for key, value in params.items()}
    if isinstance(params, list):
        return [_fill(value, values) for value in params]
    if isinstance(params, str) and params.startswith("{") and params.endswith("}"):
        return values[params[1:-1]]
    return params


async def _expect(client: TcrClient, action: str, params: Any, code: str) -> None:
    with pytest.raises(TcrError) as info:
        await client.call(action, params)
    error = info.value
    assert (error.code, error.action) == (code, action), error
    assert error.request_id
    assert str(error) == f"{code}: {error.message} (RequestId {error.request_id})"


@pytest.mark.parametrize(
    ("action", "params", "code"), ERRORS, ids=[f"{a}-{c}" for a, _, c in ERRORS]
)
async def test_documented_errors(
    client: TcrClient, action: str, params: dict[str, Any], code: str
) -> None:
    registry_id = await _instance(client)
    token = await client.call(
        "CreateInstanceToken", {"RegistryId": registry_id, "TokenType": "longterm"}
    )
    values = {"id": registry_id, "token": token.data["TokenId"]}
    await _expect(client, action, _fill(params, values), code)


@pytest.mark.parametrize(
    ("action", "params", "code"),
    PERSONAL_ERRORS,
    ids=[f"{a}-{c}" for a, _, c in PERSONAL_ERRORS],
)
async def test_documented_personal_errors(
    client: TcrClient, sim: Sim, action: str, params: dict[str, Any], code: str
) -> None:
    await client.call("CreateUserPersonal", {"Password": "first-pass"})
    await client.call("CreateNamespacePersonal", {"Namespace": "mine"})
    await client.call("CreateRepositoryPersonal", {"RepoName": "mine/app"})
    push_tag(sim[0].state, "mine/app", "1", "sha256:" + "1" * 64)
    await _expect(client, action, params, code)


async def test_protected_instance_cannot_be_deleted(client: TcrClient) -> None:
    created = await client.call(
        "CreateInstance",
        {
            "RegistryName": "kept-one",
            "RegistryType": "basic",
            "DeletionProtection": True,
        },
    )
    await _expect(
        client,
        "DeleteInstance",
        {"RegistryId": created.data["RegistryId"]},
        "OperationDenied",
    )


async def test_instance_quota(client: TcrClient, sim: Sim) -> None:
    for index in range(sim[0].config.instance_quota):
        await _instance(client, f"quota-{index:02d}")
    await _expect(
        client,
        "CreateInstance",
        {"RegistryName": "one-too-many", "RegistryType": "basic"},
        "OperationDenied.QuotaOverLimit",
    )


async def test_wrong_secret_key_is_a_signature_failure(sim: Sim) -> None:
    credentials = CloudCredentials(SECRET_ID, "wrong-key")
    async with TcrClient(credentials, region="ap-guangzhou", endpoint=sim[1]) as tcr:
        await _expect(tcr, "DescribeInstances", {}, "AuthFailure.SignatureFailure")


async def test_signing_the_action_header_is_accepted(sim: Sim) -> None:
    async with TcrClient(
        CREDENTIALS, region="ap-guangzhou", endpoint=sim[1], sign_action=True
    ) as tcr:
        assert (await tcr.call("DescribeInstances")).data["TotalCount"] == 0


# Retries, backoff and timeouts, in virtual time.


class TopOfRange(random.Random):
    """Jitter that always picks the ceiling, so sleeps are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_rate_limit_is_retried_with_exponential_backoff(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    simulator, endpoint = sim
    simulator.state.inject("DescribeInstances", "RequestLimitExceeded", times=3)
    records: list[CallRecord] = []
    async with TcrClient(
        CREDENTIALS,
        region="ap-guangzhou",
        endpoint=endpoint,
        rng=TopOfRange(),
        on_call=records.append,
    ) as tcr:
        start = trio.current_time()
        response = await tcr.call("DescribeInstances")
    assert response.data["TotalCount"] == 0
    assert trio.current_time() - start == pytest.approx(0.5 + 1 + 2)
    assert [(r.attempts, r.error) for r in records] == [(4, None)]


async def test_backoff_is_capped_and_gives_up_after_max_attempts(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    simulator, endpoint = sim
    simulator.state.inject("DescribeInstances", "InternalError.DbError", times=10)
    async with TcrClient(
        CREDENTIALS,
        region="ap-guangzhou",
        endpoint=endpoint,
        rng=TopOfRange(),
        max_attempts=6,
        backoff_cap=3,
    ) as tcr:
        start = trio.current_time()
        with pytest.raises(TcrError) as info:
            await tcr.call("DescribeInstances")
    assert info.value.code == "InternalError.DbError"
    assert trio.current_time() - start == pytest.approx(0.5 + 1 + 2 + 3 + 3)


async def test_jitter_stays_within_the_ceiling(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    simulator, endpoint = sim
    simulator.state.inject("DescribeInstances", "RequestLimitExceeded", times=3)
    async with TcrClient(
        CREDENTIALS, region="ap-guangzhou", endpoint=endpoint, rng=random.Random(1)
    ) as tcr:
        start = trio.current_time()
        await tcr.call("DescribeInstances")
    assert 0 < trio.current_time() - start < 0.5 + 1 + 2


@pytest.mark.parametrize(
    "code", ["ResourceNotFound", "AuthFailure.SignatureFailure", "InvalidParameter"]
)
async def test_other_errors_are_not_retried(sim: Sim, code: str) -> None:
    simulator, endpoint = sim
    simulator.state.inject("DescribeInstances", code, times=2)
    records: list[CallRecord] = []
    async with recording(endpoint, records) as tcr:
        await _expect(tcr, "DescribeInstances", {}, code)
        await _expect(tcr, "DescribeInstances", {}, code)
        await tcr.call("DescribeInstances")
    assert [r.attempts for r in records] == [1, 1, 1]


async def test_timeout_is_a_transport_error_after_retries(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    simulator, endpoint = sim
    simulator.state.delays["DescribeInstances"] = 1000
    async with TcrClient(
        CREDENTIALS,
        region="ap-guangzhou",
        endpoint=endpoint,
        timeout=5,
        max_attempts=2,
        rng=TopOfRange(),
    ) as tcr:
        start = trio.current_time()
        with pytest.raises(TcrTransportError) as info:
            await tcr.call("DescribeInstances")
    assert info.value.code == "ClientError.Timeout"
    assert trio.current_time() - start == pytest.approx(5 + 0.5 + 5)


async def test_a_write_cancelled_mid_flight_is_recorded_as_maybe_applied(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    """A shutdown while TCR holds the answer: the token exists in TCR, so
    the audit log (the on_call hook) must hear of the call all the same."""
    simulator, endpoint = sim
    records: list[CallRecord] = []
    async with recording(endpoint, records, timeout=60) as tcr:
        registry_id = await _instance(tcr)
        simulator.state.lose_answer("CreateInstanceToken", hold=1000.0, times=1)
        params = {"RegistryId": registry_id, "TokenType": "longterm", "Desc": "ci"}
        with trio.move_on_after(10) as scope:
            await tcr.call("CreateInstanceToken", params)
        assert scope.cancelled_caught
        with trio.move_on_after(10) as scope:
            await tcr.call("DescribeInstances")
        # Not cancelled: the sim holds only the token's answer.
        assert not scope.cancelled_caught
    cancelled = records[-2]
    assert cancelled.action == "CreateInstanceToken"
    assert cancelled.params == params
    assert isinstance(cancelled.error, TcrTransportError)
    assert cancelled.error.code == "ClientError.Cancelled"
    assert cancelled.error.outcome_unknown
    assert _longterm_tokens(simulator) == 1


async def test_a_read_cancelled_mid_flight_is_recorded(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    simulator, endpoint = sim
    simulator.state.delays["DescribeInstances"] = 1000
    records: list[CallRecord] = []
    async with recording(endpoint, records, timeout=60) as tcr:
        with trio.move_on_after(10):
            await tcr.call("DescribeInstances")
    (record,) = records
    assert isinstance(record.error, TcrTransportError)
    assert record.error.code == "ClientError.Cancelled"
    assert not record.error.outcome_unknown


@asynccontextmanager
async def refused_endpoint() -> AsyncIterator[str]:
    """An endpoint on a port bound but not listening: connections are refused."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_network_error_is_retried_then_raised(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with (
        refused_endpoint() as endpoint,
        TcrClient(
            CREDENTIALS, region="ap-guangzhou", endpoint=endpoint, max_attempts=3
        ) as tcr,
    ):
        with pytest.raises(TcrTransportError) as info:
            await tcr.call("DescribeInstances")
    assert info.value.code == "ClientError.NetworkError"


def _longterm_tokens(simulator: Simulator) -> int:
    return sum(1 for token in simulator.state.tokens.values() if token.token_id)


@pytest.mark.parametrize("hold", [None, 1000.0], ids=["dropped", "timed-out"])
async def test_write_whose_answer_is_lost_is_not_repeated(
    sim: Sim, autojump_clock: trio.abc.Clock, hold: float | None
) -> None:
    simulator, endpoint = sim
    records: list[CallRecord] = []
    async with recording(endpoint, records, timeout=5) as tcr:
        registry_id = await _instance(tcr)
        simulator.state.lose_answer("CreateInstanceToken", hold=hold, times=3)
        with pytest.raises(TcrTransportError) as info:
            await tcr.call(
                "CreateInstanceToken",
                {"RegistryId": registry_id, "TokenType": "longterm", "Desc": "ci"},
            )
    assert info.value.outcome_unknown
    assert "CreateInstanceToken may or may not have taken effect" in str(info.value)
    assert "\n" not in str(info.value)
    assert records[-1].attempts == 1
    assert _longterm_tokens(simulator) == 1


async def test_read_whose_answer_is_lost_is_repeated(sim: Sim) -> None:
    simulator, endpoint = sim
    simulator.state.lose_answer("DescribeInstances")
    records: list[CallRecord] = []
    async with recording(endpoint, records) as tcr:
        assert (await tcr.call("DescribeInstances")).data["TotalCount"] == 0
    assert records[-1].attempts == 2


async def test_write_is_repeated_when_throttled_but_not_after_internal_error(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    simulator, endpoint = sim
    async with TcrClient(CREDENTIALS, region="ap-guangzhou", endpoint=endpoint) as tcr:
        registry_id = await _instance(tcr)
        params = {"RegistryId": registry_id, "TokenType": "longterm"}
        simulator.state.inject("CreateInstanceToken", "RequestLimitExceeded", times=2)
        await tcr.call("CreateInstanceToken", params)
        simulator.state.inject("CreateInstanceToken", "InternalError", times=1)
        await _expect(tcr, "CreateInstanceToken", params, "InternalError")
    assert _longterm_tokens(simulator) == 1


async def test_a_write_answered_internal_error_says_its_outcome_is_unknown(
    sim: Sim, autojump_clock: trio.abc.Clock
) -> None:
    """TCR's InternalError does not say whether the action was applied;
    a read's says nothing of the kind, since reading changes nothing."""
    simulator, endpoint = sim
    async with TcrClient(
        CREDENTIALS, region="ap-guangzhou", endpoint=endpoint, max_attempts=2
    ) as tcr:
        registry_id = await _instance(tcr)
        params = {"RegistryId": registry_id, "TokenType": "longterm"}
        simulator.state.inject("CreateInstanceToken", "InternalError", times=1)
        with pytest.raises(TcrError) as write:
            await tcr.call("CreateInstanceToken", params)
        simulator.state.inject("DescribeInstances", "InternalError", times=2)
        with pytest.raises(TcrError) as read:
            await tcr.call("DescribeInstances", {})
    assert write.value.code == read.value.code == "InternalError"
    assert "CreateInstanceToken may or may not have taken effect" in str(write.value)
    assert "taken effect" not in str(read.value)


async def test_write_is_repeated_when_the_connection_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    records: list[CallRecord] = []
    async with (
        refused_endpoint() as endpoint,
        recording(endpoint, records, max_attempts=3) as tcr,
    ):
        with pytest.raises(TcrTransportError) as info:
            await tcr.call("CreateInstanceToken", {"RegistryId": MISSING})
    assert not info.value.outcome_unknown
    assert records[-1].attempts == 3


@pytest.mark.parametrize(
    ("credentials", "region", "named"),
    [
        (CREDENTIALS, "ap-guangzhöu", "the region"),
        (CloudCredentials("AKIDé", SECRET_KEY), "ap-guangzhou", "the SecretId"),
        (
            CloudCredentials(SECRET_ID, SECRET_KEY, "tok\u00e9n-secret"),
            "ap-guangzhou",
            "the session token",
        ),
        (
            CloudCredentials(SECRET_ID, SECRET_KEY, "tok\nen-secret"),
            "ap-guangzhou",
            "the session token",
        ),
    ],
)
async def test_a_value_no_header_can_carry_is_a_recorded_tcr_error(
    sim: Sim, credentials: CloudCredentials, region: str, named: str
) -> None:
    records: list[CallRecord] = []
    async with TcrClient(
        credentials, region=region, endpoint=sim[1], on_call=records.append
    ) as tcr:
        with pytest.raises(TcrError) as info:
            await tcr.call("CreateInstanceToken", {"RegistryId": MISSING})
    assert info.value.code == "ClientError.InvalidHeader"
    assert named in str(info.value)
    assert "secret" not in str(info.value)
    assert [(r.action, r.error) for r in records] == [
        ("CreateInstanceToken", info.value)
    ]


@pytest.mark.parametrize(
    ("status", "body", "code", "attempts"),
    [
        (200, b"<html>not json</html>", "ClientError.BadResponse", 1),
        (200, b'{"Response": {"TotalCount": 1}}', "ClientError.BadResponse", 1),
        (
            200,
            b'{"Response": {"Error": "x", "RequestId": "r"}}',
            "ClientError.BadResponse",
            1,
        ),
        (
            200,
            b'{"Response": {"Error": [], "RequestId": "r"}}',
            "ClientError.BadResponse",
            1,
        ),
        (404, b"", "ClientError.BadResponse", 1),
        (502, b"bad gateway", "ClientError.BadResponse", 3),
    ],
)
async def test_answers_that_are_not_the_envelope(
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    status: int,
    body: bytes,
    code: str,
    attempts: int,
) -> None:
    seen: list[str] = []

    async def front_end(*request: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        seen.append(request[0])
        return status, [], body

    listeners = await nursery.start(serve_http, front_end, "127.0.0.1", 0)
    endpoint = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    async with TcrClient(
        CREDENTIALS, region="ap-guangzhou", endpoint=endpoint, max_attempts=3
    ) as tcr:
        with pytest.raises(TcrTransportError) as info:
            await tcr.call("DescribeInstances")
    assert info.value.code == code
    assert len(seen) == attempts
    assert info.value.http_status == (None if status == 200 else status)


# The on_call hook and secrets.


async def test_on_call_sees_every_call_with_its_outcome(sim: Sim) -> None:
    records: list[CallRecord] = []
    async with recording(sim[1], records, user_agent="tcr-mirror-test/9") as tcr:
        registry_id = await _instance(tcr)
        with pytest.raises(TcrError):
            await tcr.call("DeleteInstance", {"RegistryId": MISSING})
    assert [r.action for r in records] == ["CreateInstance", "DeleteInstance"]
    created, failed = records
    assert created.response is not None
    assert created.response.data == {"RegistryId": registry_id}
    assert created.params["RegistryName"] == "client-test"
    assert failed.error is not None
    assert failed.error.code == "ResourceNotFound"
    assert failed.response is None
    assert (failed.endpoint, failed.region, failed.user_agent) == (
        sim[1],
        "ap-guangzhou",
        "tcr-mirror-test/9",
    )
    assert failed.started_at > 1_600_000_000
    assert failed.duration >= 0


async def test_an_async_on_call_hook_is_awaited_before_the_call_returns(
    sim: Sim,
) -> None:
    # The CLI's audit hook writes and fsyncs in a worker thread this way;
    # the call must not return before its event is written.
    written: list[str] = []

    async def hook(record: CallRecord) -> None:
        await trio.to_thread.run_sync(written.append, record.action)

    async with TcrClient(
        CREDENTIALS, region="ap-guangzhou", endpoint=sim[1], on_call=hook
    ) as tcr:
        await tcr.call("DescribeInstances")
        assert written == ["DescribeInstances"]


async def test_no_secret_reaches_logs_or_reprs(
    sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_seen: list[str] = [SECRET_KEY, "pass-word-9876"]
    async with TcrClient(CREDENTIALS, region="ap-guangzhou", endpoint=sim[1]) as tcr:
        registry_id = await _instance(tcr)
        issued = await tcr.call(
            "CreateInstanceToken", {"RegistryId": registry_id, "TokenType": "longterm"}
        )
        secrets_seen.append(issued.data["Token"])
        await tcr.call("CreateUserPersonal", {"Password": "pass-word-9876"})
        with pytest.raises(TcrError) as info:
            await tcr.call("CreateUserPersonal", {"Password": "pass-word-9876"})
        shown = " ".join(
            [
                repr(CREDENTIALS),
                repr(tcr),
                repr(issued),
                str(info.value),
                repr(info.value),
            ]
        )
    text = caplog.text + shown
    assert "CreateInstanceToken" in caplog.text  # the calls were logged at all
    for secret in secrets_seen:
        assert secret not in text
    assert "TC3-HMAC-SHA256" not in text
    assert "Signature=" not in text


# Credentials.


def test_credentials_from_env() -> None:
    env = {
        "TENCENTCLOUD_SECRET_ID": "AKIDx",
        "TENCENTCLOUD_SECRET_KEY": "k",
        "TENCENTCLOUD_SESSION_TOKEN": "t",
    }
    assert CloudCredentials.from_env(env) == CloudCredentials("AKIDx", "k", "t")
    with pytest.raises(ValueError, match="TENCENTCLOUD_SECRET_KEY is not set"):
        CloudCredentials.from_env({"TENCENTCLOUD_SECRET_ID": "AKIDx"})


def test_credentials_from_file(tmp_path: Path) -> None:
    path = tmp_path / "creds.toml"
    path.write_text('secret_id = "AKIDf"\nsecret_key = "filekey"\n')
    loaded = CloudCredentials.from_file(str(path))
    assert loaded == CloudCredentials("AKIDf", "filekey")
    assert "filekey" not in repr(loaded)

    for text, message in [
        ('secret_id = "AKIDf"\n', "has no secret_key"),
        ("secret_id = [1]\n", "secret_id is not a string"),
        ("not = toml = at all", "is not TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            CloudCredentials.from_file(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        CloudCredentials.from_file(str(tmp_path / "missing.toml"))

"""Desired state: parsing and the pure diff (no I/O), then plan/apply on the sim."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tcr_mirror.control._desired import (
    DesiredState,
    DesiredVpc,
    load_desired,
    parse_desired,
)
from tcr_mirror.control._diff import (
    Change,
    ObservedInstance,
    ObservedPolicy,
    ObservedToken,
    diff,
)
from tcr_mirror.control._reconcile import rules_from_audit

RID = "tcr-dg284imq"
REGION = "ap-guangzhou"

FULL = f"""
[[instance]]
registry_id = "{RID}"
region = "{REGION}"

[[instance.token]]
description = "ci-pull"

[[instance.token]]
description = "old"
enabled = false

[instance.endpoint]
enabled = true
cidrs = ["10.0.0.0/8", "203.0.113.7"]

[[instance.vpc]]
vpc_id = "vpc-1"
subnet_id = "subnet-1"

[[instance.replication]]
name = "to-bj"
destination_registry_id = "tcr-7o4xeay9"
destination_region = "ap-beijing"
filters = [{{ type = "name", value = "ns/**" }}]
"""


def parse(text: str) -> DesiredState:
    return parse_desired(tomllib.loads(text))


def observed(**fields: Any) -> dict[tuple[str, str], ObservedInstance]:
    return {(RID, REGION): ObservedInstance(RID, REGION, **fields)}


def summary(changes: list[Change]) -> list[tuple[str, str, str]]:
    return [(c.op, c.resource, c.name) for c in changes]


def actions(changes: list[Change]) -> list[list[str]]:
    return [[step.action for step in c.steps] for c in changes]


# --- parsing -------------------------------------------------------------


def test_full_file_parses() -> None:
    desired = parse(FULL)

    (instance,) = desired.instances
    assert instance.registry_id == RID
    assert [t.description for t in instance.tokens] == ["ci-pull", "old"]
    assert instance.tokens[1].enabled is False
    assert instance.endpoint is not None
    assert instance.endpoint.cidrs == ("10.0.0.0/8", "203.0.113.7/32")
    assert instance.vpcs == (DesiredVpc("vpc-1", "subnet-1"),)
    (rule,) = instance.replication
    params = rule.params(RID)
    assert params["DestinationRegionId"] == 8
    assert params["Rule"]["Filters"] == [{"Type": "name", "Value": "ns/**"}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[instance]]\nregion = 'ap-guangzhou'", r"instance\[0\]\.registry_id"),
        ("[[instance]]\nregistry_id='x'\nregion='r'\ncolour=1", "colour: unknown"),
        (
            "[[instance]]\nregistry_id='x'\nregion='r'\n"
            "[[instance.token]]\ndescription='a'\ntype='temp'",
            "only long-term tokens",
        ),
        (
            "[[instance]]\nregistry_id='x'\nregion='r'\n"
            "[instance.endpoint]\ncidrs=['10.0.0.300/8']",
            "is not a CIDR",
        ),
        (
            "[[instance]]\nregistry_id='x'\nregion='r'\n"
            "[[instance.replication]]\nname='n'\ndestination_registry_id='y'\n"
            "destination_region='mars-1'",
            "unknown region",
        ),
        (
            "[[instance]]\nregistry_id='x'\nregion='r'\n"
            "[[instance.token]]\ndescription='a'\n"
            "[[instance.token]]\ndescription='a'",
            "share a description",
        ),
        ("[[instance]]\nregistry_id='x'\nregion='r'\nprune_tokens='yes'", "true or"),
    ],
)
def test_bad_files_say_where(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_load_reports_unreadable_and_non_toml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_desired(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[instance]\n")
    with pytest.raises(ValueError, match="is not TOML"):
        load_desired(bad)


def test_secret_file_is_relative_to_the_desired_file(tmp_path: Path) -> None:
    path = tmp_path / "desired.toml"
    path.write_text(
        f"[[instance]]\nregistry_id='{RID}'\nregion='{REGION}'\n"
        "[[instance.token]]\ndescription='a'\nsecret_file='a.json'\n"
    )

    (instance,) = load_desired(path).instances

    assert instance.tokens[0].secret_file == str(tmp_path / "a.json")


# --- diff ----------------------------------------------------------------


def test_everything_missing_plans_everything_in_order() -> None:
    changes = diff(parse(FULL), observed())

    assert summary(changes) == [
        ("create", "token", '"ci-pull"'),
        ("create", "token", '"old"'),
        ("create", "endpoint", "public"),
        ("create", "policy", "10.0.0.0/8"),
        ("create", "policy", "203.0.113.7/32"),
        ("create", "vpc", "vpc-1/subnet-1"),
        ("create", "replication", "to-bj"),
    ]
    assert actions(changes)[1] == ["CreateInstanceToken", "ModifyInstanceToken"]
    assert changes[1].steps[1].params["TokenId"] == "$TokenId"
    assert changes[2].steps[0].wait_opened


def test_matching_state_plans_nothing() -> None:
    desired = parse(FULL)
    rule = desired.instances[0].replication[0]
    have = observed(
        tokens=(
            ObservedToken("t1", "ci-pull", True),
            ObservedToken("t2", "old", False),
        ),
        endpoint_status="Opened",
        policies=(
            ObservedPolicy("203.0.113.7/32", index=1),
            ObservedPolicy("10.0.0.0/8", index=0),
        ),
        vpcs=(DesiredVpc("vpc-1", "subnet-1"),),
        replication={("tcr-7o4xeay9", "to-bj"): rule.params(RID)},
    )

    assert diff(desired, have) == []


def test_token_enable_flips_and_unlisted_tokens_stay() -> None:
    desired = parse(FULL)
    have = observed(
        tokens=(
            ObservedToken("t1", "ci-pull", False),
            ObservedToken("t2", "old", True),
            ObservedToken("t3", "someone-else", True),
        )
    )

    changes = [c for c in diff(desired, have) if c.resource == "token"]

    assert summary(changes) == [
        ("update", "token", '"ci-pull"'),
        ("update", "token", '"old"'),
    ]
    assert changes[0].steps[0].params == {
        "RegistryId": RID,
        "TokenId": "t1",
        "Enable": True,
        "ModifyFlag": 2,
    }
    assert changes[1].steps[0].params["Enable"] is False


def test_prune_tokens_deletes_unlisted_and_duplicates() -> None:
    desired = parse(
        f"[[instance]]\nregistry_id='{RID}'\nregion='{REGION}'\nprune_tokens=true\n"
        "[[instance.token]]\ndescription='keep'\n"
    )
    have = observed(
        tokens=(
            ObservedToken("t1", "keep", True),
            ObservedToken("t2", "keep", True),
            ObservedToken("t3", "stray", True),
        )
    )

    changes = diff(desired, have)

    assert [(c.op, c.steps[0].params["TokenId"]) for c in changes] == [
        ("delete", "t3"),
        ("delete", "t2"),
    ]


def test_policies_are_the_whole_allowlist() -> None:
    desired = parse(
        f"[[instance]]\nregistry_id='{RID}'\nregion='{REGION}'\n"
        "[instance.endpoint]\ncidrs=['10.0.0.0/8', '192.168.1.0/24']\n"
    )
    have = observed(
        endpoint_status="Opened",
        policies=(ObservedPolicy("10.0.0.0/8"), ObservedPolicy("172.16.0.0/12")),
    )

    changes = diff(desired, have)

    assert summary(changes) == [
        ("create", "policy", "192.168.1.0/24"),
        ("delete", "policy", "172.16.0.0/12"),
    ]
    assert changes[1].steps[0].params == {
        "RegistryId": RID,
        "CidrBlock": "172.16.0.0/12",
    }


def test_opening_endpoint_is_waited_for_before_policies() -> None:
    desired = parse(
        f"[[instance]]\nregistry_id='{RID}'\nregion='{REGION}'\n"
        "[instance.endpoint]\ncidrs=['10.0.0.0/8', '10.1.0.0/16']\n"
    )

    changes = diff(desired, observed(endpoint_status="Opening"))

    assert actions(changes) == [
        ["DescribeExternalEndpointStatus", "CreateSecurityPolicy"],
        ["CreateSecurityPolicy"],
    ]
    assert changes[0].steps[0].wait_opened


def test_disabled_endpoint_is_closed_once() -> None:
    desired = parse(
        f"[[instance]]\nregistry_id='{RID}'\nregion='{REGION}'\n"
        "[instance.endpoint]\nenabled=false\n"
    )

    (change,) = diff(desired, observed(endpoint_status="Opened"))
    assert change.steps[0].params["Operation"] == "Delete"
    assert diff(desired, observed(endpoint_status="Closed")) == []


def test_no_endpoint_table_leaves_endpoint_alone() -> None:
    desired = parse(f"[[instance]]\nregistry_id='{RID}'\nregion='{REGION}'\n")
    have = observed(endpoint_status="Opened", policies=(ObservedPolicy("1.2.3.4/32"),))

    assert diff(desired, have) == []


def test_vpc_links_are_the_whole_set() -> None:
    desired = parse(
        f"[[instance]]\nregistry_id='{RID}'\nregion='{REGION}'\n"
        "[[instance.vpc]]\nvpc_id='vpc-1'\nsubnet_id='subnet-1'\n"
    )
    have = observed(vpcs=(DesiredVpc("vpc-2", "subnet-9"),))

    changes = diff(desired, have)

    assert [(c.op, c.steps[0].params["Operation"], c.name) for c in changes] == [
        ("create", "Create", "vpc-1/subnet-1"),
        ("delete", "Delete", "vpc-2/subnet-9"),
    ]


def test_changed_replication_rule_is_an_update() -> None:
    desired = parse(FULL)
    rule = desired.instances[0].replication[0]
    old = rule.params(RID)
    old["Rule"] = {**old["Rule"], "Override": True}
    have = observed(replication={("tcr-7o4xeay9", "to-bj"): old})

    changes = [c for c in diff(desired, have) if c.resource == "replication"]

    assert summary(changes) == [("update", "replication", "to-bj")]


def test_rules_from_audit_keeps_the_last_successful_rule() -> None:
    import json

    rule = parse(FULL).instances[0].replication[0]
    first = rule.params(RID)
    second = {**first, "Description": "newer"}
    events = [
        {"eventName": "ManageReplication", "errorCode": 0,
         "requestParameters": json.dumps(first)},
        {"eventName": "ManageReplication", "errorCode": 0,
         "requestParameters": json.dumps(second)},
        {"eventName": "ManageReplication", "errorCode": "InternalError",
         "requestParameters": json.dumps({**first, "Description": "failed"})},
    ]  # fmt: skip

    rules = rules_from_audit(events)

    assert rules(RID) == {("tcr-7o4xeay9", "to-bj"): second}
    assert rules("tcr-other000") == {}


def test_change_prints_and_serialises() -> None:
    (change, *_) = diff(parse(FULL), observed())

    assert str(change) == f'+ {RID} token "ci-pull": long-term, enabled'
    assert change.as_json()["actions"] == ["CreateInstanceToken"]


def test_desired_module_is_sans_io() -> None:
    import ast

    import tcr_mirror.control._desired as module

    imported = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert "tomllib" in imported
    assert not imported & {"trio", "socket", "httpx"}


# --- plan/apply against the simulator ------------------------------------


def sim_desired(rid: str, dest: str, secret_file: Path) -> DesiredState:
    return parse_desired(
        tomllib.loads(f"""
[[instance]]
registry_id = "{rid}"
region = "ap-guangzhou"

[[instance.token]]
description = "ci-pull"
secret_file = "{secret_file}"

[[instance.token]]
description = "parked"
enabled = false

[instance.endpoint]
enabled = true
cidrs = ["10.0.0.0/8", "192.0.2.1"]

[[instance.vpc]]
vpc_id = "vpc-74ffq7ov"
subnet_id = "subnet-kpmi5ji6"

[[instance.replication]]
name = "to-bj"
destination_registry_id = "{dest}"
destination_region = "ap-beijing"
filters = [{{ type = "name", value = "team/**" }}]
""")
    )


async def test_apply_then_apply_again_finds_nothing(tmp_path: Path) -> None:
    from support.control_sim import sim_in_process
    from tcr_mirror.control._audit import AuditLog, audit_hook, read_events
    from tcr_mirror.control._reconcile import apply, plan

    log_path = tmp_path / "audit.jsonl"
    # The endpoint takes a moment to open: apply must wait before policies.
    async with sim_in_process(endpoint_seconds=0.3) as sim:
        rid = sim.simulator.add_instance("source-one")
        dest = sim.simulator.add_instance("dest-one")
        desired = sim_desired(rid, dest, tmp_path / "ci.json")
        with AuditLog(log_path) as log:
            async with sim.client(on_call=audit_hook(log)) as client:
                first = await apply(client, desired, poll_interval=0.05)
                assert first.ok, first.as_json()
                assert len(first.done) == 7
                # Policies only once a poll saw the endpoint Opened, however
                # many polls that took.
                events = list(read_events(log_path))
                names = [e["eventName"] for e in events]
                opened = [
                    index
                    for index, e in enumerate(events)
                    if e["eventName"] == "DescribeExternalEndpointStatus"
                    and json.loads(e["responseElements"])["Status"] == "Opened"
                ]
                assert opened
                assert names.index("ManageExternalEndpoint") < opened[0]
                assert opened[0] < names.index("CreateSecurityPolicy")

                rules = rules_from_audit(read_events(log_path))
                again = await plan(client, desired, applied_rules=rules)
                assert again == []
                second = await apply(
                    client, desired, applied_rules=rules, poll_interval=0.05
                )
                assert second.nothing_to_do

                tokens = await client.call("DescribeInstanceToken", {"RegistryId": rid})
                states = {t["Desc"]: t["Enabled"] for t in tokens.data["Tokens"]}
                assert states == {"ci-pull": True, "parked": False}

    saved = json.loads((tmp_path / "ci.json").read_text())
    assert saved["password"].count(".") == 2
    assert oct((tmp_path / "ci.json").stat().st_mode & 0o777) == "0o600"
    assert saved["password"] not in log_path.read_text()


async def test_failure_half_way_reports_done_failed_and_not_attempted(
    tmp_path: Path,
) -> None:
    from support.control_sim import sim_in_process
    from tcr_mirror.control._reconcile import apply

    async with sim_in_process() as sim:
        rid = sim.simulator.add_instance("source-two")
        dest = sim.simulator.add_instance("dest-two")
        desired = sim_desired(rid, dest, tmp_path / "ci.json")
        sim.simulator.state.inject(
            "CreateSecurityPolicy", "OperationDenied", "policy store is read-only"
        )
        async with sim.client() as client:
            report = await apply(client, desired, poll_interval=0.05)

            assert not report.ok
            assert [c.resource for c in report.done] == ["token", "token", "endpoint"]
            assert report.failed is not None
            assert (report.failed.resource, report.failed.name) == (
                "policy",
                "10.0.0.0/8",
            )
            assert report.error is not None
            assert report.error.code == "OperationDenied"
            assert report.error.request_id
            assert [c.resource for c in report.not_attempted] == [
                "policy",
                "vpc",
                "replication",
            ]
            body = report.as_json()
            assert body["failed"]["code"] == "OperationDenied"

            # A rerun plans afresh and finishes the job.
            rerun = await apply(client, desired, poll_interval=0.05)
            assert rerun.ok
            assert [c.resource for c in rerun.done] == [
                "policy",
                "policy",
                "vpc",
                "replication",
            ]

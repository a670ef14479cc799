"""Simulated TCR Enterprise actions: access paths and replication.

The public endpoint opens in the background (Closed → Opening → Opened,
Opened → Deleting → Closed); its allowlist can only be read or changed
while it is Opened, and ``DescribeSecurityPolicies`` answers
``ResourceNotFound`` before that, as terraform expects. VPC links go
Creating → Running and get an address in their subnet.

UNCONFIRMED choices: managing an endpoint into the state it is already in
succeeds without change; a duplicate CIDR is ``InvalidParameterValue``;
``DeleteSecurityPolicy`` by index needs the current ``PolicyVersion``
(optimistic locking) and a stale one is ``InvalidParameterValue``; a
duplicate VPC link is ``InternalError.ErrorConflict`` (in the SDK list).
``CreateReplicationInstance`` and ``DeleteReplicationInstance`` are out of
the documented scope but are needed to make replicas exist at all; their
shapes follow the SDK's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any

from ._schema import BOOLEAN, INTEGER, STRING, ListOf, SimError, Struct, opt, req
from ._state import REGION_IDS, Instance, Replica, SimState, VpcLink, cst_rfc3339

__all__ = ["ACTIONS"]

_VPC = re.compile(r"vpc-[a-z0-9]{8}")
_SUBNET = re.compile(r"subnet-[a-z0-9]{8}")
_REGION_NAMES = {number: name for name, number in REGION_IDS.items()}
_FILTER_TYPES = ("name", "tag", "resource")


def _value_error(message: str) -> SimError:
    return SimError("InvalidParameterValue", message)


def _operation(p: dict[str, Any]) -> str:
    if p["Operation"] not in ("Create", "Delete"):
        raise _value_error("Operation must be `Create` or `Delete`.")
    return str(p["Operation"])


def manage_external_endpoint(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.running_instance(p["RegistryId"])
    endpoint, now = instance.endpoint, state.now()
    if _operation(p) == "Create":
        if endpoint.status in ("Closed", "Deleting"):
            endpoint.move("Opening", now)
    elif endpoint.status in ("Opened", "Opening"):
        endpoint.move("Deleting", now)
        endpoint.policies.clear()
    return {"RegistryId": instance.registry_id}


def describe_external_endpoint_status(
    state: SimState, p: dict[str, Any]
) -> dict[str, Any]:
    instance = state.instance(p["RegistryId"])
    return {"Status": instance.endpoint.status, "Reason": ""}


def _opened(state: SimState, registry_id: str, code: str) -> Instance:
    instance = state.instance(registry_id)
    if instance.endpoint.status != "Opened":
        raise SimError(code, f"The public endpoint of `{registry_id}` is not opened.")
    return instance


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise _value_error(f"CidrBlock `{value}` is not an IP range.") from None


def create_security_policy(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = _opened(state, p["RegistryId"], "OperationDenied")
    endpoint, cidr = instance.endpoint, _cidr(p["CidrBlock"])
    if any(entry["CidrBlock"] == cidr for entry in endpoint.policies):
        raise _value_error(f"CidrBlock `{cidr}` is already allowed.")
    endpoint.policy_version += 1
    endpoint.policies.append(
        {
            "PolicyIndex": endpoint.next_index,
            "CidrBlock": cidr,
            "Description": p["Description"],
        }
    )
    endpoint.next_index += 1
    return {"RegistryId": instance.registry_id}


def delete_security_policy(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = _opened(state, p["RegistryId"], "OperationDenied")
    endpoint = instance.endpoint
    if "CidrBlock" in p:  # the doc: CidrBlock wins over PolicyIndex
        cidr = _cidr(p["CidrBlock"])
        matches = [e for e in endpoint.policies if e["CidrBlock"] == cidr]
    elif "PolicyIndex" in p and "PolicyVersion" in p:
        if p["PolicyVersion"] != str(endpoint.policy_version):
            raise _value_error("PolicyVersion is not the current version.")
        matches = [e for e in endpoint.policies if e["PolicyIndex"] == p["PolicyIndex"]]
    else:
        raise SimError(
            "MissingParameter",
            "The request is missing `CidrBlock`, or `PolicyIndex` and `PolicyVersion`.",
        )
    if not matches:
        raise SimError("ResourceNotFound", "No such security policy.")
    endpoint.policies.remove(matches[0])
    endpoint.policy_version += 1
    return {"RegistryId": instance.registry_id}


def describe_security_policies(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    endpoint = _opened(state, p["RegistryId"], "ResourceNotFound").endpoint
    version = str(endpoint.policy_version)
    return {
        "SecurityPolicySet": [
            {**entry, "PolicyVersion": version} for entry in endpoint.policies
        ]
    }


def manage_internal_endpoint(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.running_instance(p["RegistryId"])
    vpc_id, subnet_id = p["VpcId"], p["SubnetId"]
    if not _VPC.fullmatch(vpc_id) or not _SUBNET.fullmatch(subnet_id):
        raise _value_error(
            "VpcId/SubnetId must look like vpc-xxxxxxxx/subnet-xxxxxxxx."
        )
    if "RegionId" in p and p["RegionId"] not in _REGION_NAMES:
        raise _value_error(f"RegionId {p['RegionId']} is not a known region.")
    existing = [
        v for v in instance.vpcs if (v.vpc_id, v.subnet_id) == (vpc_id, subnet_id)
    ]
    now = state.now()
    if _operation(p) == "Create":
        if existing:
            raise SimError(
                "InternalError.ErrorConflict", "The VPC link already exists."
            )
        # A stable address inside 10.0.0.0/16 derived from the subnet.
        digest = hashlib.sha256(subnet_id.encode()).digest()
        link = VpcLink("vpc", "Creating", now, vpc_id, subnet_id, "", p.get("RegionId"))
        link.access_ip = f"10.0.{digest[0]}.{digest[1] % 250 + 2}"
        instance.vpcs.append(link)
    elif not existing or existing[0].status == "Deleting":
        raise SimError("ResourceNotFound", "No such VPC link.")
    else:
        existing[0].move("Deleting", now)
    return {"RegistryId": instance.registry_id}


def describe_internal_endpoints(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.instance(p["RegistryId"])
    links = [
        {
            "VpcId": v.vpc_id,
            "SubnetId": v.subnet_id,
            "Status": v.status,
            "AccessIp": v.access_ip if v.status == "Running" else "",
        }
        for v in instance.vpcs
    ]
    return {"AccessVpcSet": links, "TotalCount": len(links)}


def manage_replication(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    source = state.instance(
        p["SourceRegistryId"], missing="ResourceNotFound.TcrResourceNotFound"
    )
    peer = p.get("PeerReplicationOption", {})
    if peer.get("EnablePeerReplication"):
        for name in ("PeerRegistryUin", "PeerRegistryToken"):
            if not peer.get(name):
                raise SimError(
                    "MissingParameter",
                    f"The request is missing `PeerReplicationOption.{name}`.",
                )
    else:
        state.instance(
            p["DestinationRegistryId"], missing="ResourceNotFound.TcrResourceNotFound"
        )
    if p["DestinationRegistryId"] == source.registry_id:
        raise SimError(
            "InvalidParameter.ErrorTcrInvalidParameter",
            "Source and destination are the same instance.",
        )
    if "DestinationRegionId" in p and p["DestinationRegionId"] not in _REGION_NAMES:
        raise _value_error("DestinationRegionId is not a known region.")
    rule = p["Rule"]
    for item in rule["Filters"]:
        if item["Type"] not in _FILTER_TYPES:
            raise _value_error(
                f"Filter type must be one of {', '.join(_FILTER_TYPES)}."
            )

    source.rules[rule["Name"]] = {
        "DestinationRegistryId": p["DestinationRegistryId"],
        "Rule": rule,
        "Description": p.get("Description", ""),
    }
    return {}


def _region_of(p: dict[str, Any], id_field: str, name_field: str) -> str:
    if name_field in p:
        if p[name_field] not in REGION_IDS:
            raise _value_error(f"{name_field} is not a known region.")
        return str(p[name_field])
    if p.get(id_field) not in _REGION_NAMES:
        raise SimError("MissingParameter", f"The request is missing `{id_field}`.")
    return _REGION_NAMES[p[id_field]]


def create_replication_instance(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.running_instance(p["RegistryId"])
    region = _region_of(p, "ReplicationRegionId", "ReplicationRegionName")
    if region == instance.region or any(
        r.region_name == region for r in instance.replicas
    ):
        raise SimError(
            "InvalidParameter.ReplicationExists", f"A replica in {region} exists."
        )
    suffix = state.random_name(6, "abcdefghijklmnopqrstuvwxyz0123456789")
    replica_id = f"{instance.registry_id}-{REGION_IDS[region]}-{suffix}"
    now = state.now()
    instance.replicas.append(
        Replica("replica", "Deploying", now, replica_id, region, now)
    )
    return {"ReplicationRegistryId": replica_id}


def _replica(instance: Instance, replica_id: str) -> Replica:
    for replica in instance.replicas:
        if replica.replica_id == replica_id:
            return replica
    raise SimError("ResourceNotFound", f"Replica `{replica_id}` does not exist.")


def delete_replication_instance(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.instance(p["RegistryId"])
    instance.replicas.remove(_replica(instance, p["ReplicationRegistryId"]))
    return {}


def describe_replication_instances(
    state: SimState, p: dict[str, Any]
) -> dict[str, Any]:
    instance = state.instance(p["RegistryId"])
    offset, limit = p.get("Offset", 0), min(p.get("Limit", 20), 100)
    if offset < 0 or limit < 0:
        raise _value_error("Offset and Limit must not be negative.")
    return {
        "TotalCount": len(instance.replicas),
        "ReplicationRegistries": [
            {
                "RegistryId": instance.registry_id,
                "ReplicationRegistryId": r.replica_id,
                "ReplicationRegionId": REGION_IDS[r.region_name],
                "ReplicationRegionName": r.region_name,
                "Status": r.status,
                "CreatedAt": cst_rfc3339(r.created_at),
            }
            for r in instance.replicas[offset : offset + limit]
        ],
    }


def describe_replication_sync_status(
    state: SimState, p: dict[str, Any]
) -> dict[str, Any]:
    instance = state.instance(p["RegistryId"])
    replica = _replica(instance, p["ReplicationRegistryId"])
    if replica.status != "Running":
        return {
            "ReplicationStatus": "StatusUnKnow",
            "ReplicationTime": "0001-01-01T00:00:00Z",
            "ReplicationLog": None,
        }
    log = None
    if p.get("ShowReplicationLog"):
        log = {
            "ResourceType": "image",
            "Source": "",
            "Destination": "",
            "Status": "Succeed",
            "StartTime": cst_rfc3339(replica.since),
            "EndTime": cst_rfc3339(replica.since),
        }
    return {
        "ReplicationStatus": "Succeed",
        "ReplicationTime": cst_rfc3339(replica.since),
        "ReplicationLog": log,
    }


_ID = {"RegistryId": req(STRING)}
_FILTER = Struct({"Type": req(STRING), "Value": opt(STRING)})
_RULE = Struct(
    {
        "Name": req(STRING),
        "DestNamespace": req(STRING),
        "Override": req(BOOLEAN),
        "Filters": req(ListOf(_FILTER)),
        "Deletion": opt(BOOLEAN),
    }
)
_PEER = Struct(
    {
        "PeerRegistryUin": opt(STRING),
        "PeerRegistryToken": opt(STRING),
        "EnablePeerReplication": opt(BOOLEAN),
    }
)
_VPC_PARAMS = {
    **_ID,
    "Operation": req(STRING),
    "VpcId": req(STRING),
    "SubnetId": req(STRING),
    "RegionId": opt(INTEGER),
    "RegionName": opt(STRING),
}

ACTIONS = {
    "ManageExternalEndpoint": (
        {**_ID, "Operation": req(STRING)},
        manage_external_endpoint,
        20,
    ),
    "DescribeExternalEndpointStatus": (_ID, describe_external_endpoint_status, 20),
    "CreateSecurityPolicy": (
        {**_ID, "CidrBlock": req(STRING), "Description": req(STRING)},
        create_security_policy,
        20,
    ),
    "DeleteSecurityPolicy": (
        {
            **_ID,
            "PolicyIndex": opt(INTEGER),
            "PolicyVersion": opt(STRING),
            "CidrBlock": opt(STRING),
        },
        delete_security_policy,
        20,
    ),
    "DescribeSecurityPolicies": (_ID, describe_security_policies, 20),
    "ManageInternalEndpoint": (_VPC_PARAMS, manage_internal_endpoint, 20),
    "DescribeInternalEndpoints": (_ID, describe_internal_endpoints, 20),
    "ManageReplication": (
        {
            "SourceRegistryId": req(STRING),
            "DestinationRegistryId": req(STRING),
            "Rule": req(_RULE),
            "Description": opt(STRING),
            "DestinationRegionId": opt(INTEGER),
            "PeerReplicationOption": opt(_PEER),
        },
        manage_replication,
        20,
    ),
    "CreateReplicationInstance": (
        {
            **_ID,
            "ReplicationRegionId": opt(INTEGER),
            "ReplicationRegionName": opt(STRING),
            "SyncTag": opt(BOOLEAN),
        },
        create_replication_instance,
        20,
    ),
    "DeleteReplicationInstance": (
        {
            **_ID,
            "ReplicationRegistryId": req(STRING),
            "ReplicationRegionId": opt(INTEGER),
        },
        delete_replication_instance,
        20,
    ),
    "DescribeReplicationInstances": (
        {**_ID, "Offset": opt(INTEGER), "Limit": opt(INTEGER)},
        describe_replication_instances,
        20,
    ),
    "DescribeReplicationInstanceSyncStatus": (
        {
            **_ID,
            "ReplicationRegistryId": req(STRING),
            "ReplicationRegionId": opt(INTEGER),
            "ShowReplicationLog": opt(BOOLEAN),
            "Offset": opt(INTEGER),
            "Limit": opt(INTEGER),
        },
        describe_replication_sync_status,
        20,
    ),
}

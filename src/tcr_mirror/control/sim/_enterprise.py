"""Simulated TCR Enterprise actions: instances and instance tokens.

Choices where TCR-API.md says UNCONFIRMED: ``DeleteInstance`` on a
protected instance fails with ``OperationDenied``, and so does deleting an
instance that still has replicas; an instance name must be 5-50 characters
of ``[a-z0-9-]`` starting with a letter, and names are unique per account;
``DescribeInstances`` clamps ``Limit`` to 100 rather than rejecting it, and
rejects filter names other than ``RegistryName`` and ``Tags``. Instance
tokens carry one claim the real ones lack, ``registryId``, so the registry
token service knows which instance a token opens.
"""

from __future__ import annotations

import re
from typing import Any

from ._schema import BOOLEAN, INTEGER, STRING, ListOf, SimError, Struct, opt, req
from ._state import REGION_IDS, Instance, InstanceToken, SimState, cst_rfc3339

__all__ = ["ACTIONS"]

_NAME = re.compile(r"[a-z][a-z0-9-]{3,48}[a-z0-9]")
_RESERVED_NAMES = frozenset({"tencent", "tencentcloud", "qcloud", "harbor", "admin"})
_TYPES = ("basic", "standard", "premium")
_TAG = Struct({"Key": opt(STRING), "Value": opt(STRING)})
_TAG_SPEC = Struct({"ResourceType": opt(STRING), "Tags": opt(ListOf(_TAG))})
_PREPAID = Struct({"Period": opt(INTEGER), "RenewFlag": opt(INTEGER)})
_FILTER = Struct({"Name": req(STRING), "Values": req(ListOf(STRING))})


def _value_error(message: str) -> SimError:
    return SimError("InvalidParameterValue", message)


def create_instance(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    name = p["RegistryName"]
    if not _NAME.fullmatch(name):
        raise SimError(
            "InvalidParameter.ErrorRegistryName",
            "RegistryName must be 5-50 characters of a-z, 0-9 and -, "
            "starting with a letter.",
        )
    if name in _RESERVED_NAMES:
        raise SimError("InvalidParameter.ErrorNameReserved", f"`{name}` is reserved.")
    if any(i.name == name for i in state.instances.values()):
        raise SimError("InvalidParameter.ErrorNameExists", f"`{name}` already exists.")
    if p["RegistryType"] not in _TYPES:
        raise _value_error(f"RegistryType must be one of {', '.join(_TYPES)}.")
    tags = p.get("TagSpecification", {}).get("Tags", [])
    if len(tags) > 10:
        raise SimError("InvalidParameter.ErrorTagOverLimit", "At most 10 tags.")
    if p.get("RegistryChargeType", 0) not in (0, 1):
        raise _value_error("RegistryChargeType must be 0 or 1.")
    if len(state.instances) >= state.config.instance_quota:
        raise SimError("OperationDenied.QuotaOverLimit", "Instance quota reached.")

    now = state.now()
    instance = Instance(
        "instance",
        "Pending",
        now,
        registry_id=state.new_registry_id(),
        name=name,
        registry_type=p["RegistryType"],
        region=state.config.region,
        created_at=now,
        deletion_protection=p.get("DeletionProtection", False),
        charge_type=p.get("RegistryChargeType", 0),
        renew_flag=p.get("RegistryChargePrepaid", {}).get("RenewFlag", 0),
        tags=[{"Key": t.get("Key", ""), "Value": t.get("Value", "")} for t in tags],
        cos_maz=p.get("EnableCosMAZ", False),
        cos_versioning=p.get("EnableCosVersioning", False),
    )
    state.instances[instance.registry_id] = instance
    return {"RegistryId": instance.registry_id}


def delete_instance(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.instance(p["RegistryId"])
    if instance.deletion_protection:
        raise SimError("OperationDenied", "Deletion protection is enabled.")
    if instance.replicas:
        raise SimError("OperationDenied", "Delete the replication instances first.")
    if p.get("DryRun"):
        raise SimError("DryRunOperation", "The request would have succeeded.")
    instance.move("Deleting", state.now())
    return {}


def describe_instances(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    wanted = set(p.get("Registryids") or [])
    found = [
        i
        for i in state.instances.values()
        if (not wanted or i.registry_id in wanted)
        and (p.get("AllRegion") or i.region == state.config.region)
        and all(_filter_matches(i, f) for f in p.get("Filters", []))
    ]
    offset = p.get("Offset", 0)
    limit = min(max(p.get("Limit", 20), 0), 100)
    if offset < 0:
        raise _value_error("Offset must not be negative.")
    page = found[offset : offset + limit]
    return {"TotalCount": len(found), "Registries": [_registry(i) for i in page]}


def _filter_matches(instance: Instance, spec: dict[str, Any]) -> bool:
    values = spec["Values"]
    if spec["Name"] == "RegistryName":
        return instance.name in values
    if spec["Name"] == "Tags":
        pairs = {f"{t['Key']}:{t['Value']}" for t in instance.tags}
        return bool(pairs & set(values))
    raise _value_error(f"Filter name `{spec['Name']}` is not supported.")


def _registry(i: Instance) -> dict[str, Any]:
    return {
        "RegistryId": i.registry_id,
        "RegistryName": i.name,
        "RegistryType": i.registry_type,
        "Status": i.status,
        "PublicDomain": i.domain,
        "CreatedAt": cst_rfc3339(i.created_at),
        "RegionName": i.region,
        "RegionId": REGION_IDS[i.region],
        "EnableAnonymous": False,
        "TokenValidTime": 87600,
        "InternalEndpoint": "",
        "TagSpecification": {"ResourceType": "instance", "Tags": i.tags},
        "ExpiredAt": None,
        "PayMod": i.charge_type,
        "RenewFlag": i.renew_flag,
        "DeletionProtection": i.deletion_protection,
        "EnableCosMAZ": i.cos_maz,
        "EnableCosVersioning": i.cos_versioning,
    }


def describe_instance_status(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    found = [state.instances[i] for i in p["RegistryIds"] if i in state.instances]
    return {
        "RegistryStatusSet": [
            {
                "RegistryId": i.registry_id,
                "Status": i.status,
                "Conditions": [{"Type": "", "Status": i.status, "Reason": ""}],
            }
            for i in found
        ]
    }


def create_instance_token(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.instance(
        p["RegistryId"], missing="ResourceNotFound.TcrResourceNotFound"
    )
    kind = p.get("TokenType", "temp")
    if kind not in ("temp", "longterm"):
        raise _value_error("TokenType must be `temp` or `longterm`.")
    desc = p.get("Desc", "")
    if len(desc) > 255:
        raise _value_error("Desc is longer than 255 characters.")

    now = int(state.now())
    config = state.config
    lifetime = (
        config.temp_token_seconds if kind == "temp" else config.longterm_token_seconds
    )
    claims: dict[str, Any] = {
        "ownerUin": config.owner_uin,
        "operatorUin": config.operator_uin,
        "registryId": instance.registry_id,
        "exp": now + lifetime,
        "nbf": now,
        "iat": now,
    }
    token_id = ""
    if kind == "longterm":
        token_id = claims["tokenId"] = state.new_token_id()
        state.tokens[token_id] = InstanceToken(
            token_id, instance.registry_id, desc, True, now, now + lifetime
        )
    return {
        "Username": config.operator_uin,
        "Token": state.signing_key.encode(claims),
        "ExpTime": (now + lifetime) * 1000,
        "TokenId": token_id,
    }


def _token(state: SimState, registry_id: str, token_id: str) -> InstanceToken:
    state.instance(registry_id)
    token = state.tokens.get(token_id)
    if token is None or token.registry_id != registry_id:
        raise SimError("ResourceNotFound", f"Token `{token_id}` does not exist.")
    return token


def describe_instance_token(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    instance = state.instance(p["RegistryId"])
    tokens = [t for t in state.tokens.values() if t.registry_id == instance.registry_id]
    offset, limit = p.get("Offset", 0), p.get("Limit", 20)
    if offset < 0 or limit < 0:
        raise _value_error("Offset and Limit must not be negative.")
    return {
        "TotalCount": len(tokens),
        "Tokens": [
            {
                "Id": t.token_id,
                "Desc": t.desc,
                "RegistryId": t.registry_id,
                "Enabled": t.enabled,
                "CreatedAt": cst_rfc3339(t.created_at),
                "ExpiredAt": int(t.expires_at * 1000),
            }
            for t in tokens[offset : offset + limit]
        ],
    }


def modify_instance_token(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    token = _token(state, p["RegistryId"], p["TokenId"])
    flag = p.get("ModifyFlag", 2)
    if flag == 1:
        if "Desc" not in p:
            raise SimError(
                "MissingParameter",
                "The request is missing a required parameter `Desc`.",
            )
        if len(p["Desc"]) > 255:
            raise _value_error("Desc is longer than 255 characters.")
        token.desc = p["Desc"]
    elif flag == 2:
        if "Enable" not in p:
            raise SimError(
                "MissingParameter",
                "The request is missing a required parameter `Enable`.",
            )
        token.enabled = p["Enable"]
    else:
        raise _value_error("ModifyFlag must be 1 (description) or 2 (enable).")
    return {}


def delete_instance_token(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    token = _token(state, p["RegistryId"], p["TokenId"])
    del state.tokens[token.token_id]
    return {}


ACTIONS = {
    "CreateInstance": (
        {
            "RegistryName": req(STRING),
            "RegistryType": req(STRING),
            "TagSpecification": opt(_TAG_SPEC),
            "RegistryChargeType": opt(INTEGER),
            "RegistryChargePrepaid": opt(_PREPAID),
            "SyncTag": opt(BOOLEAN),
            "EnableCosMAZ": opt(BOOLEAN),
            "DeletionProtection": opt(BOOLEAN),
            "EnableCosVersioning": opt(BOOLEAN),
        },
        create_instance,
        20,
    ),
    "DeleteInstance": (
        {
            "RegistryId": req(STRING),
            "DeleteBucket": opt(BOOLEAN),
            "DryRun": opt(BOOLEAN),
        },
        delete_instance,
        20,
    ),
    "DescribeInstances": (
        {
            "Registryids": opt(ListOf(STRING)),
            "Offset": opt(INTEGER),
            "Limit": opt(INTEGER),
            "Filters": opt(ListOf(_FILTER)),
            "AllRegion": opt(BOOLEAN),
        },
        describe_instances,
        100,
    ),
    "DescribeInstanceStatus": (
        {"RegistryIds": req(ListOf(STRING))},
        describe_instance_status,
        20,
    ),
    "CreateInstanceToken": (
        {"RegistryId": req(STRING), "TokenType": opt(STRING), "Desc": opt(STRING)},
        create_instance_token,
        100,
    ),
    "DescribeInstanceToken": (
        {"RegistryId": req(STRING), "Limit": opt(INTEGER), "Offset": opt(INTEGER)},
        describe_instance_token,
        20,
    ),
    "ModifyInstanceToken": (
        {
            "TokenId": req(STRING),
            "RegistryId": req(STRING),
            "Enable": opt(BOOLEAN),
            "Desc": opt(STRING),
            "ModifyFlag": opt(INTEGER),
        },
        modify_instance_token,
        20,
    ),
    "DeleteInstanceToken": (
        {"RegistryId": req(STRING), "TokenId": req(STRING)},
        delete_instance_token,
        20,
    ),
}

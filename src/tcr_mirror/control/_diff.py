"""Planning: what TCR has, and the changes that make it what the file says.

:func:`diff` is a pure function from (desired, observed) to the ordered
list of changes. :mod:`._desired` parses the desired state; :mod:`._reconcile`
reads TCR with the Describe* actions (``observe``, ``plan``) and performs
the changes one by one, stopping at the first failure (``apply``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._desired import (
    DesiredInstance,
    DesiredState,
    DesiredVpc,
    normal_cidr,
)

__all__ = [
    "Change",
    "ObservedInstance",
    "ObservedPolicy",
    "ObservedToken",
    "Step",
    "diff",
]


# --- what TCR has --------------------------------------------------------


@dataclass(frozen=True)
class ObservedToken:
    """A long-term token as DescribeInstanceToken lists it."""

    token_id: str
    description: str
    enabled: bool


@dataclass(frozen=True)
class ObservedPolicy:
    """A security-policy entry of the public endpoint."""

    cidr: str
    description: str = ""
    index: int = 0
    version: str = ""


@dataclass(frozen=True)
class ObservedInstance:
    """What the Describe* actions said about one instance.

    ``replication`` holds the rules last applied (TCR has no action that
    lists replication rules; see :func:`observe`).
    """

    registry_id: str
    region: str
    tokens: tuple[ObservedToken, ...] = ()
    endpoint_status: str = "Closed"
    policies: tuple[ObservedPolicy, ...] = ()
    vpcs: tuple[DesiredVpc, ...] = ()
    replication: Mapping[tuple[str, str], Mapping[str, Any]] = field(
        default_factory=dict
    )


# --- changes -------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One TCR call of a change.

    A string parameter ``"$TokenId"`` is filled from the previous step's
    answer. ``wait_opened`` makes apply wait for the public endpoint to be
    ``Opened`` after the call (policies cannot be added before).
    """

    action: str
    params: Mapping[str, Any]
    wait_opened: bool = False


@dataclass(frozen=True)
class Change:
    """One change to one resource of one instance, as plan shows it."""

    op: str  # "create", "update" or "delete"
    resource: str  # "token", "endpoint", "policy", "vpc" or "replication"
    registry_id: str
    region: str
    name: str
    detail: str
    steps: tuple[Step, ...]
    secret_file: str | None = None

    def __str__(self) -> str:
        sign = {"create": "+", "update": "~", "delete": "-"}[self.op]
        return f"{sign} {self.registry_id} {self.resource} {self.name}: {self.detail}"

    def as_json(self) -> dict[str, Any]:
        """Return the change as plain data (for ``--output json``)."""
        return {
            "op": self.op,
            "resource": self.resource,
            "registry_id": self.registry_id,
            "region": self.region,
            "name": self.name,
            "detail": self.detail,
            "actions": [step.action for step in self.steps],
        }


def diff(
    desired: DesiredState, observed: Mapping[tuple[str, str], ObservedInstance]
) -> list[Change]:
    """Compute the changes that make TCR look like ``desired``.

    Pure: no I/O. Per instance the order is tokens, public endpoint
    (opened before its policies are added, closed last), VPC links, then
    replication rules.

    Args:
        desired: the parsed desired-state file.
        observed: what TCR has, keyed by (registry id, region).

    Returns:
        The changes in the order apply must perform them; empty when TCR
        already matches.
    """
    changes: list[Change] = []
    for instance in desired.instances:
        have = observed.get(
            (instance.registry_id, instance.region),
            ObservedInstance(instance.registry_id, instance.region),
        )
        changes += _token_changes(instance, have)
        changes += _endpoint_changes(instance, have)
        changes += _vpc_changes(instance, have)
        changes += _replication_changes(instance, have)
    return changes


def _new(
    instance: DesiredInstance,
    what: tuple[str, str, str, str],
    *steps: Step,
    secret_file: str | None = None,
) -> Change:
    op, resource, name, detail = what
    rid, region = instance.registry_id, instance.region
    return Change(op, resource, rid, region, name, detail, steps, secret_file)


def _step(action: str, wait_opened: bool = False, **params: Any) -> Step:
    return Step(action, params, wait_opened)


def _token_changes(instance: DesiredInstance, have: ObservedInstance) -> list[Change]:
    rid = instance.registry_id
    by_desc: dict[str, ObservedToken] = {}
    extra: list[ObservedToken] = []
    for token in have.tokens:
        if token.description in by_desc:
            extra.append(token)
        by_desc.setdefault(token.description, token)

    changes = []
    for want in instance.tokens:
        name = json.dumps(want.description)
        found = by_desc.pop(want.description, None)
        if found is None:
            state = "enabled" if want.enabled else "disabled"
            steps = [
                _step(
                    "CreateInstanceToken",
                    RegistryId=rid,
                    TokenType="longterm",
                    Desc=want.description,
                )
            ]
            if not want.enabled:
                steps.append(_enable_step(rid, "$TokenId", False))
            what = ("create", "token", name, f"long-term, {state}")
            changes.append(_new(instance, what, *steps, secret_file=want.secret_file))
        elif found.enabled != want.enabled:
            verb = "enable" if want.enabled else "disable"
            what = ("update", "token", name, f"{verb} {found.token_id}")
            step = _enable_step(rid, found.token_id, want.enabled)
            changes.append(_new(instance, what, step))

    if instance.prune_tokens:
        for token in [*by_desc.values(), *extra]:
            name = json.dumps(token.description)
            what = ("delete", "token", name, f"not in desired state ({token.token_id})")
            step = _step("DeleteInstanceToken", RegistryId=rid, TokenId=token.token_id)
            changes.append(_new(instance, what, step))
    return changes


def _enable_step(registry_id: str, token_id: str, enable: bool) -> Step:
    return _step(
        "ModifyInstanceToken",
        RegistryId=registry_id,
        TokenId=token_id,
        Enable=enable,
        ModifyFlag=2,
    )


def _endpoint_changes(
    instance: DesiredInstance, have: ObservedInstance
) -> list[Change]:
    want, rid = instance.endpoint, instance.registry_id
    if want is None:
        return []
    if not want.enabled:
        if have.endpoint_status in ("Closed", "Deleting"):
            return []
        what = ("delete", "endpoint", "public", "close public access")
        step = _step("ManageExternalEndpoint", RegistryId=rid, Operation="Delete")
        return [_new(instance, what, step)]

    changes = []
    if have.endpoint_status not in ("Opened", "Opening"):
        what = ("create", "endpoint", "public", "open public access")
        step = _step("ManageExternalEndpoint", True, RegistryId=rid, Operation="Create")
        changes.append(_new(instance, what, step))
    present = {_normal_or_raw(p.cidr): p for p in have.policies}
    # Policies can be added only once the endpoint is Opened (§2.2).
    wait = have.endpoint_status == "Opening"
    for cidr in want.cidrs:
        if cidr not in present:
            what = ("create", "policy", cidr, "allow on public endpoint")
            steps = [
                _step(
                    "CreateSecurityPolicy",
                    RegistryId=rid,
                    CidrBlock=cidr,
                    Description="tcr-mirror desired state",
                )
            ]
            if wait:
                status = _step("DescribeExternalEndpointStatus", True, RegistryId=rid)
                steps.insert(0, status)
                wait = False
            changes.append(_new(instance, what, *steps))
    for cidr, policy in present.items():
        if cidr not in want.cidrs:
            what = ("delete", "policy", cidr, "not in desired state")
            # CidrBlock wins over PolicyIndex in DeleteSecurityPolicy (§2.2).
            step = _step("DeleteSecurityPolicy", RegistryId=rid, CidrBlock=policy.cidr)
            changes.append(_new(instance, what, step))
    return changes


def _normal_or_raw(cidr: str) -> str:
    try:
        return normal_cidr(cidr)
    except ValueError:
        return cidr


def _vpc_changes(instance: DesiredInstance, have: ObservedInstance) -> list[Change]:
    if instance.vpcs is None:
        return []
    changes = []
    for op, vpcs, operation in (
        ("create", [v for v in instance.vpcs if v not in have.vpcs], "Create"),
        ("delete", [v for v in have.vpcs if v not in instance.vpcs], "Delete"),
    ):
        for vpc in vpcs:
            detail = "attach" if op == "create" else "detach (not in desired state)"
            what = (op, "vpc", f"{vpc.vpc_id}/{vpc.subnet_id}", detail)
            step = _step(
                "ManageInternalEndpoint",
                RegistryId=instance.registry_id,
                Operation=operation,
                VpcId=vpc.vpc_id,
                SubnetId=vpc.subnet_id,
            )
            changes.append(_new(instance, what, step))
    return changes


def _replication_changes(
    instance: DesiredInstance, have: ObservedInstance
) -> list[Change]:
    changes = []
    for rule in instance.replication:
        params = rule.params(instance.registry_id)
        current = have.replication.get((rule.destination_registry_id, rule.name))
        if current is not None and _same_rule(current, params):
            continue
        op = "create" if current is None else "update"
        detail = f"to {rule.destination_registry_id} ({rule.destination_region})"
        step = Step("ManageReplication", params)
        changes.append(_new(instance, (op, "replication", rule.name, detail), step))
    return changes


def _same_rule(current: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    keys = ("DestinationRegistryId", "DestinationRegionId", "Description", "Rule")
    return all(current.get(key) == params.get(key) for key in keys)

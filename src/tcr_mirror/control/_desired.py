"""Desired state for TCR instances: parse a TOML file, plan, apply.

The file names, per instance (registry id + region): long-term instance
tokens (by description, enabled or not), the public endpoint and the CIDRs
its security policies allow, VPC endpoints, and replication rules::

    [[instance]]
    registry_id = "tcr-dg284imq"
    region = "ap-guangzhou"
    prune_tokens = false            # delete long-term tokens not named here

    [[instance.token]]
    description = "ci-pull"
    enabled = true
    secret_file = "ci-pull.json"    # where apply writes a new token (0600)

    [instance.endpoint]
    enabled = true
    cidrs = ["10.0.0.0/8", "203.0.113.7/32"]

    [[instance.vpc]]
    vpc_id = "vpc-74ffq7ov"
    subnet_id = "subnet-kpmi5ji6"

    [[instance.replication]]
    name = "to-beijing"
    destination_registry_id = "tcr-7o4xeay9"
    destination_region = "ap-beijing"
    filters = [{ type = "name", value = "ns/**" }]

Sections left out are not managed: no ``endpoint`` table leaves the public
endpoint and its policies as they are, no ``vpc`` key leaves VPC links alone.
Named CIDRs and VPC links are the whole set (others are removed); tokens are
only removed with ``prune_tokens``, since other tools make tokens too.

:func:`diff` is a pure function from (desired, observed) to the ordered list
of changes; this module does no I/O beyond reading the file.
:mod:`._reconcile` reads TCR with the Describe* actions (``observe``, ``plan``)
and performs the changes one by one, stopping at the first failure
(``apply``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REGION_IDS",
    "Change",
    "DesiredEndpoint",
    "DesiredInstance",
    "DesiredReplication",
    "DesiredState",
    "DesiredToken",
    "DesiredVpc",
    "ObservedInstance",
    "ObservedPolicy",
    "ObservedToken",
    "Step",
    "diff",
    "load_desired",
    "parse_desired",
]

# TCR-API.md §2.1: the numeric region ids of DestinationRegionId.
_REGION_TABLE = """
ap-guangzhou 1 ap-shanghai 4 ap-hongkong 5 na-toronto 6
ap-shanghai-fsi 7 ap-beijing 8 ap-singapore 9 ap-shenzhen-fsi 11
ap-guangzhou-open 12 na-siliconvalley 15 ap-chengdu 16
eu-frankfurt 17 ap-seoul 18 ap-chongqing 19 ap-mumbai 21
na-ashburn 22 ap-bangkok 23 eu-moscow 24 ap-tokyo 25 ap-nanjing 33
ap-tianjin 36 ap-shenzhen 37 ap-taipei 39 ap-beijing-fsi 46
ap-jakarta 72 sa-saopaulo 74
"""
_REGION_WORDS = _REGION_TABLE.split()
REGION_IDS: Mapping[str, int] = dict(
    zip(_REGION_WORDS[::2], map(int, _REGION_WORDS[1::2]), strict=True)
)
_FILTER_TYPES = ("name", "tag", "resource")


# --- the desired state ---------------------------------------------------


@dataclass(frozen=True)
class DesiredToken:
    """A long-term instance token, known by its description."""

    description: str
    enabled: bool = True
    secret_file: str | None = None


@dataclass(frozen=True)
class DesiredEndpoint:
    """The public endpoint; ``cidrs`` are its whole allowlist."""

    enabled: bool
    cidrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class DesiredVpc:
    """A VPC endpoint: a link from a subnet to the instance."""

    vpc_id: str
    subnet_id: str


@dataclass(frozen=True)
class DesiredReplication:
    """A replication rule from this instance to a destination instance."""

    name: str
    destination_registry_id: str
    destination_region: str
    dest_namespace: str = ""
    override: bool = False
    deletion: bool = False
    description: str = ""
    filters: tuple[tuple[str, str], ...] = ()

    def params(self, source_registry_id: str) -> dict[str, Any]:
        """Return the ``ManageReplication`` parameters for this rule."""
        return {
            "SourceRegistryId": source_registry_id,
            "DestinationRegistryId": self.destination_registry_id,
            "DestinationRegionId": REGION_IDS[self.destination_region],
            "Description": self.description,
            "Rule": {
                "Name": self.name,
                "DestNamespace": self.dest_namespace,
                "Override": self.override,
                "Deletion": self.deletion,
                "Filters": [{"Type": t, "Value": v} for t, v in self.filters],
            },
        }


@dataclass(frozen=True)
class DesiredInstance:
    """Everything the file says about one instance."""

    registry_id: str
    region: str
    tokens: tuple[DesiredToken, ...] = ()
    prune_tokens: bool = False
    endpoint: DesiredEndpoint | None = None
    vpcs: tuple[DesiredVpc, ...] | None = None
    replication: tuple[DesiredReplication, ...] = ()


@dataclass(frozen=True)
class DesiredState:
    """The whole desired-state file."""

    instances: tuple[DesiredInstance, ...]


def load_desired(path: str | os.PathLike[str]) -> DesiredState:
    """Read and check a desired-state TOML file.

    Raises:
        ValueError: unreadable, not TOML, or not the expected shape; the
            message names the file and the offending key.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ValueError(f"cannot read {os.fspath(path)}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{os.fspath(path)} is not TOML: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    return parse_desired(data, base_dir=base)


def parse_desired(data: Mapping[str, Any], *, base_dir: str = ".") -> DesiredState:
    """Check parsed TOML and build the desired state.

    Args:
        data: the TOML document.
        base_dir: relative ``secret_file`` paths are taken from here.

    Raises:
        ValueError: the document is not the expected shape.
    """
    _only(data, "", {"instance"})
    raw = data.get("instance", [])
    if not isinstance(raw, list):
        raise ValueError("instance: expected [[instance]] tables")
    instances = tuple(
        _instance(item, f"instance[{n}]", base_dir) for n, item in enumerate(raw)
    )
    ids = [(i.registry_id, i.region) for i in instances]
    if len(set(ids)) != len(ids):
        raise ValueError("instance: the same registry is named twice")
    return DesiredState(instances)


def _instance(item: Any, where: str, base_dir: str) -> DesiredInstance:
    table = _table(item, where)
    _only(
        table,
        where,
        {"registry_id", "region", "prune_tokens", "token", "endpoint", "vpc"}
        | {"replication"},
    )
    tokens = tuple(
        _token(t, f"{where}.token[{n}]", base_dir)
        for n, t in enumerate(_list(table, "token", where))
    )
    descriptions = [t.description for t in tokens]
    if len(set(descriptions)) != len(descriptions):
        raise ValueError(f"{where}.token: two tokens share a description")
    endpoint = None
    if "endpoint" in table:
        endpoint = _endpoint(table["endpoint"], f"{where}.endpoint")
    vpcs = None
    if "vpc" in table:
        vpcs = tuple(
            _vpc(v, f"{where}.vpc[{n}]")
            for n, v in enumerate(_list(table, "vpc", where))
        )
    rules = tuple(
        _replication(r, f"{where}.replication[{n}]")
        for n, r in enumerate(_list(table, "replication", where))
    )
    return DesiredInstance(
        registry_id=_str(table, "registry_id", where),
        region=_str(table, "region", where),
        tokens=tokens,
        prune_tokens=_bool(table, "prune_tokens", where, False),
        endpoint=endpoint,
        vpcs=vpcs,
        replication=rules,
    )


def _token(item: Any, where: str, base_dir: str) -> DesiredToken:
    table = _table(item, where)
    _only(table, where, {"description", "type", "enabled", "secret_file"})
    kind = table.get("type", "longterm")
    if kind != "longterm":
        # TCR cannot list temporary tokens (TCR-API.md §2.2), so there is
        # nothing to compare; `control serve` keeps those fresh instead.
        raise ValueError(
            f"{where}.type: only long-term tokens can be desired state "
            f"(temporary ones are handed out by `tcr-mirror control serve`)"
        )
    secret_file = table.get("secret_file")
    if secret_file is not None and not isinstance(secret_file, str):
        raise ValueError(f"{where}.secret_file: expected a string")
    return DesiredToken(
        description=_str(table, "description", where),
        enabled=_bool(table, "enabled", where, True),
        secret_file=os.path.join(base_dir, secret_file) if secret_file else None,
    )


def _endpoint(item: Any, where: str) -> DesiredEndpoint:
    table = _table(item, where)
    _only(table, where, {"enabled", "cidrs"})
    cidrs = table.get("cidrs", [])
    if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
        raise ValueError(f"{where}.cidrs: expected a list of strings")
    normal = []
    for cidr in cidrs:
        try:
            normal.append(_normal_cidr(cidr))
        except ValueError:
            raise ValueError(f"{where}.cidrs: {cidr!r} is not a CIDR") from None
    enabled = _bool(table, "enabled", where, True)
    if normal and not enabled:
        raise ValueError(f"{where}: cidrs need the endpoint enabled")
    return DesiredEndpoint(enabled, tuple(dict.fromkeys(normal)))


def _vpc(item: Any, where: str) -> DesiredVpc:
    table = _table(item, where)
    _only(table, where, {"vpc_id", "subnet_id"})
    return DesiredVpc(_str(table, "vpc_id", where), _str(table, "subnet_id", where))


def _replication(item: Any, where: str) -> DesiredReplication:
    table = _table(item, where)
    keys = {"name", "destination_registry_id", "destination_region"}
    keys |= {"dest_namespace", "override", "deletion", "description", "filters"}
    _only(table, where, keys)
    region = _str(table, "destination_region", where)
    if region not in REGION_IDS:
        raise ValueError(f"{where}.destination_region: unknown region {region!r}")
    filters = []
    for n, raw in enumerate(_list(table, "filters", where)):
        entry = _table(raw, f"{where}.filters[{n}]")
        _only(entry, f"{where}.filters[{n}]", {"type", "value"})
        kind = _str(entry, "type", f"{where}.filters[{n}]")
        if kind not in _FILTER_TYPES:
            raise ValueError(f"{where}.filters[{n}].type: one of {_FILTER_TYPES}")
        filters.append((kind, str(entry.get("value", ""))))
    return DesiredReplication(
        name=_str(table, "name", where),
        destination_registry_id=_str(table, "destination_registry_id", where),
        destination_region=region,
        dest_namespace=str(table.get("dest_namespace", "")),
        override=_bool(table, "override", where, False),
        deletion=_bool(table, "deletion", where, False),
        description=str(table.get("description", "")),
        filters=tuple(filters),
    )


def _table(item: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a table")
    return item


def _list(table: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key}: expected a list of tables")
    return value


def _only(table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"{prefix}{unknown[0]}: unknown key")


def _str(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key}: expected a non-empty string")
    return value


def _bool(table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: expected true or false")
    return value


def _normal_cidr(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr.strip(), strict=False))


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
        return _normal_cidr(cidr)
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

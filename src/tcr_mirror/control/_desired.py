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

This module parses the file and does no other I/O. :func:`._diff.diff`
turns (desired, observed) into the ordered list of changes, and
:mod:`._reconcile` reads TCR and applies them.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REGION_IDS",
    "DesiredEndpoint",
    "DesiredInstance",
    "DesiredReplication",
    "DesiredState",
    "DesiredToken",
    "DesiredVpc",
    "load_desired",
    "normal_cidr",
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
            normal.append(normal_cidr(cidr))
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


def normal_cidr(cidr: str) -> str:
    """A CIDR in its canonical form (host bits cleared).

    Raises:
        ValueError: ``cidr`` is not a network.
    """
    return str(ipaddress.ip_network(cidr.strip(), strict=False))

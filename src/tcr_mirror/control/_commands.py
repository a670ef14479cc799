"""The single-action subcommands of ``tcr-mirror control``, as data.

Each family (``instances``, ``tokens``, ...) lists its verbs: the argparse
arguments, how they become the TCR action's parameters, and how the answer
reads as text (``None``: "<Action>: ok (RequestId ...)"). ``cli`` turns
the table into subparsers; adding a verb is adding a row.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._client import TcrClient, TcrResponse
from ._desired import REGION_IDS

__all__ = ["CALLS", "Arg", "CallCommand", "Paging", "arg", "blank", "call", "table"]


@dataclass(frozen=True)
class Arg:
    """One argparse argument: its names and keyword options."""

    names: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


def arg(*names: str, **options: Any) -> Arg:
    """Shorthand for :class:`Arg`."""
    return Arg(names, options)


@dataclass(frozen=True)
class Paging:
    """Where a list action's answer keeps its items and their total count.

    ``inside`` names the object holding both (``Data`` for Personal
    actions), None when they sit in the answer itself.
    """

    items: str
    total: str
    inside: str | None = None

    def split(self, answer: TcrResponse) -> tuple[list[Any], int | None]:
        """The page's items and the total count (None if unreadable)."""
        holder = answer.data.get(self.inside) if self.inside else answer.data
        if not isinstance(holder, dict):
            return [], None
        items = holder.get(self.items)
        total = holder.get(self.total)
        return (
            list(items) if isinstance(items, list) else [],
            total if isinstance(total, int) else None,
        )

    def merged(self, first: TcrResponse, items: list[Any]) -> TcrResponse:
        """``first`` with the items of every page."""
        data = dict(first.data)
        if self.inside:
            holder = data.get(self.inside)
            holder = holder if isinstance(holder, dict) else {}
            data[self.inside] = {**holder, self.items: items}
        else:
            data[self.items] = items
        return TcrResponse(first.action, first.request_id, data)


@dataclass(frozen=True)
class CallCommand:
    """A subcommand that is exactly one TCR action (one page at a time).

    A command with ``paging`` sends ``Limit`` and ``Offset`` and reads on
    until it has ``TotalCount`` items, so a list is never cut at one page.
    """

    name: str
    help: str
    action: str
    args: tuple[Arg, ...]
    params: Callable[[argparse.Namespace], dict[str, Any]]
    text: Callable[[TcrResponse], str] | None = None
    paging: Paging | None = None


PAGE_SIZE = 100  # the largest Limit TCR's list actions accept
_MAX_PAGES = 1000


async def call(
    client: TcrClient, command: CallCommand, params: dict[str, Any]
) -> TcrResponse:
    """Call ``command``'s action; a list action page by page.

    Returns:
        The answer; for a list, the first page's with every page's items.

    Raises:
        TcrError: a call failed.
    """
    paging = command.paging
    if paging is None:
        return await client.call(command.action, params)
    first: TcrResponse | None = None
    items: list[Any] = []
    for _ in range(_MAX_PAGES):
        page_params = {**params, "Limit": PAGE_SIZE, "Offset": len(items)}
        answer = await client.call(command.action, page_params)
        first = first or answer
        page, total = paging.split(answer)
        items += page
        if _last_page(page, total, len(items)):
            break
    assert first is not None
    return paging.merged(first, items)


def _last_page(page: list[Any], total: int | None, seen: int) -> bool:
    # The total decides, since a server may cap a page below Limit; without
    # one, a short page is the last.
    if not page:
        return True
    if total is not None:
        return seen >= total
    return len(page) < PAGE_SIZE


REGISTRY = arg("registry_id", metavar="REGISTRY_ID", help="instance id (tcr-...)")


def table(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(blank(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def blank(value: Any) -> Any:
    return "-" if value is None or value == "" else value


def _rows(key: str, columns: list[str]) -> Callable[[TcrResponse], str]:
    def show(answer: TcrResponse) -> str:
        return table(list(answer.data.get(key) or []), columns)

    return show


def _fields(*keys: str) -> Callable[[TcrResponse], str]:
    def show(answer: TcrResponse) -> str:
        return "\n".join(f"{k}: {blank(answer.data.get(k))}" for k in keys)

    return show


def _filters(values: list[str] | None) -> list[dict[str, str]]:
    filters = []
    for value in values or []:
        kind, sep, pattern = value.partition("=")
        if not sep:
            raise ValueError(
                f"--filter wants TYPE=VALUE (name, tag, resource): {value!r}"
            )
        filters.append({"Type": kind, "Value": pattern})
    return filters


def _region_id(name: str) -> int:
    if name not in REGION_IDS:
        raise ValueError(f"unknown region {name!r}")
    return REGION_IDS[name]


_INSTANCES = (
    CallCommand(
        "create",
        "create an Enterprise instance",
        "CreateInstance",
        (
            arg("--name", required=True),
            arg("--type", default="basic", choices=("basic", "standard", "premium")),
            arg("--deletion-protection", action="store_true"),
        ),
        lambda a: {
            "RegistryName": a.name,
            "RegistryType": a.type,
            "DeletionProtection": a.deletion_protection,
        },
        _fields("RegistryId"),
    ),
    CallCommand(
        "delete",
        "delete an instance",
        "DeleteInstance",
        (REGISTRY, arg("--delete-bucket", action="store_true")),
        lambda a: {"RegistryId": a.registry_id, "DeleteBucket": a.delete_bucket},
    ),
    CallCommand(
        "list",
        "list instances",
        "DescribeInstances",
        (arg("--all-regions", action="store_true"),),
        lambda a: {"AllRegion": a.all_regions},
        _rows(
            "Registries",
            ["RegistryId", "RegistryName", "Status", "RegionName", "PublicDomain"],
        ),
        Paging("Registries", "TotalCount"),
    ),
    CallCommand(
        "status",
        "show the status of instances",
        "DescribeInstanceStatus",
        (arg("registry_ids", nargs="+", metavar="REGISTRY_ID"),),
        lambda a: {"RegistryIds": a.registry_ids},
        _rows("RegistryStatusSet", ["RegistryId", "Status"]),
    ),
)

_TOKENS = (
    CallCommand(
        "list",
        "list long-term tokens",
        "DescribeInstanceToken",
        (REGISTRY,),
        lambda a: {"RegistryId": a.registry_id},
        _rows("Tokens", ["Id", "Desc", "Enabled", "CreatedAt", "ExpiredAt"]),
        Paging("Tokens", "TotalCount"),
    ),
    CallCommand(
        "enable",
        "enable a long-term token",
        "ModifyInstanceToken",
        (REGISTRY, arg("token_id", metavar="TOKEN_ID")),
        lambda a: {
            "RegistryId": a.registry_id,
            "TokenId": a.token_id,
            "Enable": True,
            "ModifyFlag": 2,
        },
    ),
    CallCommand(
        "disable",
        "disable a long-term token",
        "ModifyInstanceToken",
        (REGISTRY, arg("token_id", metavar="TOKEN_ID")),
        lambda a: {
            "RegistryId": a.registry_id,
            "TokenId": a.token_id,
            "Enable": False,
            "ModifyFlag": 2,
        },
    ),
    CallCommand(
        "delete",
        "delete a long-term token",
        "DeleteInstanceToken",
        (REGISTRY, arg("token_id", metavar="TOKEN_ID")),
        lambda a: {"RegistryId": a.registry_id, "TokenId": a.token_id},
    ),
)

_ENDPOINT = (
    CallCommand(
        "enable",
        "open public access",
        "ManageExternalEndpoint",
        (REGISTRY,),
        lambda a: {"RegistryId": a.registry_id, "Operation": "Create"},
    ),
    CallCommand(
        "disable",
        "close public access",
        "ManageExternalEndpoint",
        (REGISTRY,),
        lambda a: {"RegistryId": a.registry_id, "Operation": "Delete"},
    ),
    CallCommand(
        "status",
        "show public access status",
        "DescribeExternalEndpointStatus",
        (REGISTRY,),
        lambda a: {"RegistryId": a.registry_id},
        _fields("Status", "Reason"),
    ),
)

_POLICIES = (
    CallCommand(
        "add",
        "allow a CIDR on the public endpoint",
        "CreateSecurityPolicy",
        (REGISTRY, arg("cidr", metavar="CIDR"), arg("--description", default="")),
        lambda a: {
            "RegistryId": a.registry_id,
            "CidrBlock": a.cidr,
            "Description": a.description or "tcr-mirror",
        },
    ),
    CallCommand(
        "remove",
        "remove a CIDR from the allowlist",
        "DeleteSecurityPolicy",
        (REGISTRY, arg("cidr", metavar="CIDR")),
        lambda a: {"RegistryId": a.registry_id, "CidrBlock": a.cidr},
    ),
    CallCommand(
        "list",
        "list the allowlist",
        "DescribeSecurityPolicies",
        (REGISTRY,),
        lambda a: {"RegistryId": a.registry_id},
        _rows(
            "SecurityPolicySet",
            ["PolicyIndex", "CidrBlock", "Description", "PolicyVersion"],
        ),
    ),
)

_VPC_ARGS = (REGISTRY, arg("--vpc", required=True), arg("--subnet", required=True))
_VPC = (
    CallCommand(
        "attach",
        "link a VPC subnet to the instance",
        "ManageInternalEndpoint",
        _VPC_ARGS,
        lambda a: {
            "RegistryId": a.registry_id,
            "Operation": "Create",
            "VpcId": a.vpc,
            "SubnetId": a.subnet,
        },
    ),
    CallCommand(
        "detach",
        "remove a VPC link",
        "ManageInternalEndpoint",
        _VPC_ARGS,
        lambda a: {
            "RegistryId": a.registry_id,
            "Operation": "Delete",
            "VpcId": a.vpc,
            "SubnetId": a.subnet,
        },
    ),
    CallCommand(
        "list",
        "list VPC links",
        "DescribeInternalEndpoints",
        (REGISTRY,),
        lambda a: {"RegistryId": a.registry_id},
        _rows("AccessVpcSet", ["VpcId", "SubnetId", "Status", "AccessIp"]),
    ),
)

_REPLICA = arg("replica_id", metavar="REPLICA_ID")
_REPLICATION = (
    CallCommand(
        "create",
        "create a replica instance in another region",
        "CreateReplicationInstance",
        (REGISTRY, arg("--replica-region", required=True, metavar="REGION")),
        lambda a: {
            "RegistryId": a.registry_id,
            "ReplicationRegionId": _region_id(a.replica_region),
            "ReplicationRegionName": a.replica_region,
        },
        _fields("ReplicationRegistryId"),
    ),
    CallCommand(
        "delete",
        "delete a replica instance",
        "DeleteReplicationInstance",
        (REGISTRY, _REPLICA),
        lambda a: {"RegistryId": a.registry_id, "ReplicationRegistryId": a.replica_id},
    ),
    CallCommand(
        "list",
        "list replica instances",
        "DescribeReplicationInstances",
        (REGISTRY,),
        lambda a: {"RegistryId": a.registry_id},
        _rows(
            "ReplicationRegistries",
            ["ReplicationRegistryId", "ReplicationRegionName", "Status", "CreatedAt"],
        ),
        Paging("ReplicationRegistries", "TotalCount"),
    ),
    CallCommand(
        "status",
        "show a replica's sync status",
        "DescribeReplicationInstanceSyncStatus",
        (REGISTRY, _REPLICA),
        lambda a: {"RegistryId": a.registry_id, "ReplicationRegistryId": a.replica_id},
        _fields("ReplicationStatus", "ReplicationTime"),
    ),
    CallCommand(
        "rule",
        "create or update a replication rule to another instance",
        "ManageReplication",
        (
            arg("source", metavar="SOURCE_REGISTRY_ID"),
            arg("destination", metavar="DESTINATION_REGISTRY_ID"),
            arg("--name", required=True),
            arg("--destination-region", metavar="REGION"),
            arg("--dest-namespace", default=""),
            arg("--filter", action="append", metavar="TYPE=VALUE"),
            arg("--override", action="store_true"),
            arg("--deletion", action="store_true"),
            arg("--description", default=""),
        ),
        lambda a: {
            "SourceRegistryId": a.source,
            "DestinationRegistryId": a.destination,
            **(
                {"DestinationRegionId": _region_id(a.destination_region)}
                if a.destination_region
                else {}
            ),
            "Description": a.description,
            "Rule": {
                "Name": a.name,
                "DestNamespace": a.dest_namespace,
                "Override": a.override,
                "Deletion": a.deletion,
                "Filters": _filters(a.filter),
            },
        },
    ),
)

_NAMESPACE = arg("namespace", metavar="NAMESPACE")
_NAMESPACES = (
    CallCommand(
        "create",
        "create a Personal namespace",
        "CreateNamespacePersonal",
        (_NAMESPACE,),
        lambda a: {"Namespace": a.namespace},
    ),
    CallCommand(
        "delete",
        "delete a Personal namespace",
        "DeleteNamespacePersonal",
        (_NAMESPACE,),
        lambda a: {"Namespace": a.namespace},
    ),
    CallCommand(
        "list",
        "list Personal namespaces",
        "DescribeNamespacePersonal",
        (arg("--match", default="", help="substring of the name"),),
        lambda a: {"Namespace": a.match},
        lambda r: table(
            list((r.data.get("Data") or {}).get("NamespaceInfo") or []),
            ["Namespace", "RepoCount", "CreationTime"],
        ),
        Paging("NamespaceInfo", "NamespaceCount", inside="Data"),
    ),
)

_REPO = arg("repository", metavar="NAMESPACE/REPO")
_REPOSITORIES = (
    CallCommand(
        "delete",
        "delete a Personal repository",
        "DeleteRepositoryPersonal",
        (_REPO,),
        lambda a: {"RepoName": a.repository},
    ),
    CallCommand(
        "batch-delete",
        "delete several Personal repositories",
        "BatchDeleteRepositoryPersonal",
        (arg("repositories", nargs="+", metavar="NAMESPACE/REPO"),),
        lambda a: {"RepoNames": a.repositories},
    ),
)

_TAGS = (
    CallCommand(
        "delete",
        "delete a tag of a Personal repository",
        "DeleteImagePersonal",
        (_REPO, arg("tag", metavar="TAG")),
        lambda a: {"RepoName": a.repository, "Tag": a.tag},
    ),
    CallCommand(
        "batch-delete",
        "delete several tags of a Personal repository",
        "BatchDeleteImagePersonal",
        (_REPO, arg("tags", nargs="+", metavar="TAG")),
        lambda a: {"RepoName": a.repository, "Tags": a.tags},
    ),
)

_LIFECYCLE = (
    CallCommand(
        "set",
        "set the Personal global cleanup policy",
        "ManageImageLifecycleGlobalPersonal",
        (
            arg("--keep", required=True, choices=("last-days", "last-nums")),
            arg("--value", required=True, type=int),
        ),
        lambda a: {"Type": f"global_keep_{a.keep.replace('-', '_')}", "Val": a.value},
    ),
    CallCommand(
        "show",
        "show the Personal global cleanup policy",
        "DescribeImageLifecycleGlobalPersonal",
        (),
        lambda a: {},
        lambda r: table(
            list((r.data.get("Data") or {}).get("StrategyInfo") or []),
            ["Type", "Value", "Valid", "CreationTime"],
        ),
    ),
    CallCommand(
        "delete",
        "delete the Personal global cleanup policy",
        "DeleteImageLifecycleGlobalPersonal",
        (),
        lambda a: {},
    ),
)

CALLS: tuple[tuple[str, str, tuple[CallCommand, ...]], ...] = (
    ("instances", "Enterprise instances", _INSTANCES),
    ("tokens", "instance access tokens", _TOKENS),
    ("endpoint", "public endpoint", _ENDPOINT),
    ("policies", "public endpoint allowlist", _POLICIES),
    ("vpc", "VPC endpoints", _VPC),
    ("replication", "replica instances and replication rules", _REPLICATION),
    ("namespaces", "Personal namespaces", _NAMESPACES),
    ("repositories", "Personal repositories", _REPOSITORIES),
    ("tags", "Personal image tags", _TAGS),
    ("lifecycle", "Personal global cleanup policy", _LIFECYCLE),
)

"""Plan and apply desired state against TCR (the I/O half of :mod:`._desired`).

``observe`` reads every instance the desired state names with the Describe*
actions, :func:`._diff.diff` turns that into changes, and
``apply_changes`` performs them in order. A failure stops the run: the
report names the changes done, the one that failed with TCR's code, and
those not attempted, so a rerun (which plans afresh) picks up from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._client import TcrClient, TcrResponse
from ._desired import DesiredInstance, DesiredState, DesiredVpc
from ._diff import Change, ObservedInstance, ObservedPolicy, ObservedToken, diff
from ._errors import TcrError

__all__ = [
    "ApplyReport",
    "Clients",
    "apply",
    "apply_changes",
    "observe",
    "plan",
    "rules_from_audit",
]

Clients = TcrClient | Callable[[str], TcrClient]


def _client(clients: Clients, region: str) -> TcrClient:
    return clients if isinstance(clients, TcrClient) else clients(region)


async def observe(
    clients: Clients,
    desired: DesiredState,
    *,
    applied_rules: Callable[[str], Mapping[tuple[str, str], Mapping[str, Any]]]
    | None = None,
) -> dict[tuple[str, str], ObservedInstance]:
    """Read what TCR has for every instance the desired state names.

    Args:
        clients: one client, or a function from region to client.
        desired: which instances and which parts of them to read.
        applied_rules: given a registry id, the replication rules last
            applied to it, keyed by (destination registry id, rule name).
            TCR has no action that lists rules, so this comes from our own
            record of successful ManageReplication calls (the audit log).

    Returns:
        The observation, keyed by (registry id, region).

    Raises:
        TcrError: a Describe* call failed.
    """
    observed = {}
    for instance in desired.instances:
        client = _client(clients, instance.region)
        observed[(instance.registry_id, instance.region)] = await _observe_instance(
            client, instance, applied_rules
        )
    return observed


async def _observe_instance(
    client: TcrClient,
    instance: DesiredInstance,
    applied_rules: Callable[[str], Mapping[tuple[str, str], Mapping[str, Any]]] | None,
) -> ObservedInstance:
    rid = instance.registry_id
    tokens: tuple[ObservedToken, ...] = ()
    if instance.tokens or instance.prune_tokens:
        tokens = await _observe_tokens(client, rid)
    status: str = "Closed"
    policies: tuple[ObservedPolicy, ...] = ()
    if instance.endpoint is not None:
        status, policies = await _observe_endpoint(client, rid)
    vpcs: tuple[DesiredVpc, ...] = ()
    if instance.vpcs is not None:
        answer = await client.call("DescribeInternalEndpoints", {"RegistryId": rid})
        vpcs = tuple(
            DesiredVpc(str(v.get("VpcId")), str(v.get("SubnetId")))
            for v in answer.data.get("AccessVpcSet") or []
            if v.get("Status") != "Deleting"
        )
    rules = applied_rules(rid) if applied_rules and instance.replication else {}
    return ObservedInstance(rid, instance.region, tokens, status, policies, vpcs, rules)


async def _observe_tokens(client: TcrClient, rid: str) -> tuple[ObservedToken, ...]:
    tokens: list[ObservedToken] = []
    offset = 0
    for _ in range(1000):  # bounded paging: 100 per page
        answer = await client.call(
            "DescribeInstanceToken", {"RegistryId": rid, "Limit": 100, "Offset": offset}
        )
        page = answer.data.get("Tokens") or []
        tokens += [
            ObservedToken(
                str(t.get("Id")), str(t.get("Desc") or ""), bool(t.get("Enabled"))
            )
            for t in page
        ]
        offset += len(page)
        if not page or offset >= int(answer.data.get("TotalCount") or 0):
            break
    return tuple(tokens)


async def _observe_endpoint(
    client: TcrClient, rid: str
) -> tuple[str, tuple[ObservedPolicy, ...]]:
    answer = await client.call("DescribeExternalEndpointStatus", {"RegistryId": rid})
    status = str(answer.data.get("Status") or "Closed")
    if status != "Opened":
        # Policies can be read only once the endpoint is Opened (§2.2).
        return status, ()
    answer = await client.call("DescribeSecurityPolicies", {"RegistryId": rid})
    policies = tuple(
        ObservedPolicy(
            str(p.get("CidrBlock")),
            str(p.get("Description") or ""),
            int(p.get("PolicyIndex") or 0),
            str(p.get("PolicyVersion") or ""),
        )
        for p in answer.data.get("SecurityPolicySet") or []
    )
    return status, policies


async def plan(
    clients: Clients,
    desired: DesiredState,
    *,
    applied_rules: Callable[[str], Mapping[tuple[str, str], Mapping[str, Any]]]
    | None = None,
) -> list[Change]:
    """Read TCR and return the changes that would make it match ``desired``.

    Raises:
        TcrError: reading TCR failed.
    """
    observed = await observe(clients, desired, applied_rules=applied_rules)
    return diff(desired, observed)


@dataclass(frozen=True)
class ApplyReport:
    """What apply did: done, the one that failed (with TCR's error), the rest."""

    done: tuple[Change, ...]
    failed: Change | None = None
    error: TcrError | None = None
    not_attempted: tuple[Change, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every change was made."""
        return self.failed is None

    @property
    def nothing_to_do(self) -> bool:
        """True when TCR already matched the desired state."""
        return self.ok and not self.done

    def as_json(self) -> dict[str, Any]:
        """Return the report as plain data (for ``--output json``)."""
        return {
            "ok": self.ok,
            "nothing_to_do": self.nothing_to_do,
            "done": [c.as_json() for c in self.done],
            "failed": None
            if self.failed is None
            else {
                **self.failed.as_json(),
                "code": self.error.code if self.error else "",
                "message": self.error.message if self.error else "",
                "request_id": self.error.request_id if self.error else None,
            },
            "not_attempted": [c.as_json() for c in self.not_attempted],
        }


async def apply(
    clients: Clients,
    desired: DesiredState,
    *,
    applied_rules: Callable[[str], Mapping[tuple[str, str], Mapping[str, Any]]]
    | None = None,
    poll_interval: float = 2.0,
    poll_timeout: float = 300.0,
) -> ApplyReport:
    """Plan, then perform the changes in order, stopping at the first failure.

    Running it again right after a success finds nothing to do.

    Raises:
        TcrError: reading TCR for the plan failed (nothing was changed).
    """
    changes = await plan(clients, desired, applied_rules=applied_rules)
    return await apply_changes(
        clients, changes, poll_interval=poll_interval, poll_timeout=poll_timeout
    )


async def apply_changes(
    clients: Clients,
    changes: Sequence[Change],
    *,
    poll_interval: float = 2.0,
    poll_timeout: float = 300.0,
) -> ApplyReport:
    """Perform planned changes in order; stop at the first that fails.

    Returns:
        The report: changes done, the failed one with TCR's error, and
        those not attempted.
    """
    done: list[Change] = []
    for index, change in enumerate(changes):
        client = _client(clients, change.region)
        try:
            await _perform(client, change, poll_interval, poll_timeout)
        except TcrError as exc:
            return ApplyReport(tuple(done), change, exc, tuple(changes[index + 1 :]))
        done.append(change)
    return ApplyReport(tuple(done))


async def _perform(
    client: TcrClient, change: Change, poll_interval: float, poll_timeout: float
) -> None:
    previous: TcrResponse | None = None
    for step in change.steps:
        params = _fill(step.params, previous)
        previous = await client.call(step.action, params)
        if step.action == "CreateInstanceToken" and change.secret_file:
            _write_secret(change, previous)
        if step.wait_opened:
            await _wait_opened(client, change.registry_id, poll_interval, poll_timeout)


def _fill(params: Mapping[str, Any], previous: TcrResponse | None) -> dict[str, Any]:
    filled = dict(params)
    for key, value in params.items():
        if isinstance(value, str) and value.startswith("$") and previous is not None:
            filled[key] = previous.data.get(value[1:])
    return filled


async def _wait_opened(
    client: TcrClient, registry_id: str, interval: float, timeout: float
) -> None:
    with trio.move_on_after(timeout):
        while True:
            answer = await client.call(
                "DescribeExternalEndpointStatus", {"RegistryId": registry_id}
            )
            if answer.data.get("Status") == "Opened":
                return
            await trio.sleep(interval)
    raise TcrError(
        "ClientError.Timeout",
        f"public endpoint of {registry_id} not Opened after {timeout:g} s",
        action="DescribeExternalEndpointStatus",
    )


def _write_secret(change: Change, answer: TcrResponse) -> None:
    assert change.secret_file is not None
    secret = {
        "registry_id": change.registry_id,
        "token_id": answer.data.get("TokenId"),
        "username": answer.data.get("Username"),
        "password": answer.data.get("Token"),
        "expires_at_ms": answer.data.get("ExpTime"),
    }
    tmp = f"{change.secret_file}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # open() applies the mode to a new file only, not to a stale one.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(secret, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, change.secret_file)
    except OSError as exc:
        # The token exists in TCR now and cannot be shown again: the report
        # must name it so that it can be deleted, and stop the run here.
        raise TcrError(
            "ClientError.SecretFileError",
            f"token {answer.data.get('TokenId')} created but not saved: "
            f"cannot write {change.secret_file}: {exc.strerror}",
            request_id=answer.request_id,
            action="CreateInstanceToken",
        ) from None


def rules_from_audit(
    events: Iterable[Mapping[str, Any]],
) -> Callable[[str], Mapping[tuple[str, str], Mapping[str, Any]]]:
    """Index successful ManageReplication events by source registry.

    Returns:
        A function for :func:`observe`'s ``applied_rules``: the last rule
        applied per (destination registry id, rule name).
    """
    # TODO: rules changed or deleted outside tcr-mirror (console, other
    # tools) are invisible here; read them from TCR once an action lists them.
    table: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {}
    for event in events:
        if event.get("eventName") != "ManageReplication" or event.get("errorCode"):
            continue
        try:
            params = json.loads(event.get("requestParameters") or "{}")
            source = params["SourceRegistryId"]
            key = (params["DestinationRegistryId"], params["Rule"]["Name"])
        except (ValueError, KeyError, TypeError):
            continue
        table.setdefault(source, {})[key] = params
    return lambda registry_id: table.get(registry_id, {})

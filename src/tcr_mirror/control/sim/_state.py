"""In-memory state of a simulated TCR account (sans-IO).

Theory of operation. Resources that TCR builds in the background (an
instance deploying, a public endpoint opening, a VPC link being made) go
through intermediate states that clients are expected to poll. The
simulator models them as *timed* transitions: a resource records its
status and the moment it entered it, and :meth:`SimState.settle` (run
before every request) moves everything whose delay has passed to the next
status, or removes it. The delays come from :class:`SimConfig`, so tests
can make them zero or drive a fake clock. Transitions that a request
causes (``DeleteInstance``: Running → Deleting) live in the handlers, which
check the current status first.

The table below is the whole background machine; the delays are the names
of :class:`SimConfig` fields. ``None`` means the resource disappears.
"""

from __future__ import annotations

import collections
import datetime
import random
import re
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._jwt import SigningKey
from ._schema import SimError

__all__ = [
    "REGION_IDS",
    "Endpoint",
    "Instance",
    "InstanceToken",
    "PersonalAccount",
    "Replica",
    "SimConfig",
    "SimState",
    "Timed",
    "VpcLink",
    "cst_rfc3339",
]

# TCR-API.md §2.1 (terraform's RegionIdMap).
REGION_IDS: dict[str, int] = {
    "ap-guangzhou": 1, "ap-shanghai": 4, "ap-hongkong": 5, "na-toronto": 6,
    "ap-shanghai-fsi": 7, "ap-beijing": 8, "ap-singapore": 9, "ap-shenzhen-fsi": 11,
    "ap-guangzhou-open": 12, "na-siliconvalley": 15, "ap-chengdu": 16,
    "eu-frankfurt": 17, "ap-seoul": 18, "ap-chongqing": 19, "ap-mumbai": 21,
    "na-ashburn": 22, "ap-bangkok": 23, "eu-moscow": 24, "ap-tokyo": 25,
    "ap-nanjing": 33, "ap-tianjin": 36, "ap-shenzhen": 37, "ap-taipei": 39,
    "ap-beijing-fsi": 46, "ap-jakarta": 72, "sa-saopaulo": 74,
}  # fmt: skip

_REGISTRY_ID = re.compile(r"tcr-[a-z0-9]{8}")
_CST = datetime.timezone(datetime.timedelta(hours=8))

# (kind, status) -> (delay field of SimConfig, next status or None = gone)
TIMED_TRANSITIONS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("instance", "Pending"): ("deploy_seconds", "Running"),
    ("instance", "Deleting"): ("delete_seconds", None),
    ("endpoint", "Opening"): ("endpoint_seconds", "Opened"),
    ("endpoint", "Deleting"): ("endpoint_seconds", "Closed"),
    ("vpc", "Creating"): ("endpoint_seconds", "Running"),
    ("vpc", "Deleting"): ("endpoint_seconds", None),
    ("replica", "Deploying"): ("deploy_seconds", "Running"),
}


def cst_rfc3339(moment: float) -> str:
    """TCR's Enterprise time format: RFC 3339 in UTC+8, whole seconds."""
    local = datetime.datetime.fromtimestamp(moment, tz=_CST)
    return local.isoformat(timespec="seconds")


@dataclass(frozen=True)
class SimConfig:
    """Who the account is and how long background work takes."""

    region: str = "ap-guangzhou"
    owner_uin: str = "100012345678"
    operator_uin: str = "100012345678"
    deploy_seconds: float = 2.0
    delete_seconds: float = 1.0
    endpoint_seconds: float = 1.0
    temp_token_seconds: int = 3600
    longterm_token_seconds: int = 315_360_000
    instance_quota: int = 10


@dataclass
class Timed:
    """A resource with a status that may change by itself over time."""

    kind: str
    status: str
    since: float

    def move(self, status: str, now: float) -> None:
        self.status, self.since = status, now


@dataclass
class Endpoint(Timed):
    """The public endpoint of an instance and its allowlist."""

    policies: list[dict[str, Any]] = field(default_factory=list)
    policy_version: int = 0
    next_index: int = 0


@dataclass
class VpcLink(Timed):
    vpc_id: str = ""
    subnet_id: str = ""
    access_ip: str = ""
    region_id: int | None = None


@dataclass
class Replica(Timed):
    replica_id: str = ""
    region_name: str = ""
    created_at: float = 0.0


@dataclass
class InstanceToken:
    token_id: str
    registry_id: str
    desc: str
    enabled: bool
    created_at: float
    expires_at: float


@dataclass
class Instance(Timed):
    registry_id: str = ""
    name: str = ""
    registry_type: str = "basic"
    region: str = ""
    created_at: float = 0.0
    deletion_protection: bool = False
    charge_type: int = 0
    renew_flag: int = 0
    tags: list[dict[str, str]] = field(default_factory=list)
    cos_maz: bool = False
    cos_versioning: bool = False
    endpoint: Endpoint = field(
        default_factory=lambda: Endpoint("endpoint", "Closed", 0)
    )
    vpcs: list[VpcLink] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def domain(self) -> str:
        return f"{self.name}.tencentcloudcr.com"


@dataclass
class PersonalAccount:
    """The Personal edition side of the account (namespaces are global)."""

    password: str | None = None
    namespaces: dict[str, float] = field(default_factory=dict)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    lifecycle: dict[str, tuple[int, float]] = field(default_factory=dict)
    # Namespaces other accounts hold, and names TCR keeps for itself.
    foreign: frozenset[str] = frozenset({"dockerhub", "mirrors"})
    reserved: frozenset[str] = frozenset({"library", "qcloud", "tencentyun", "tke"})


class SimState:
    """Everything one simulated account holds, plus the clock and faults.

    Args:
        config: Account identity and background delays.
        signing_key: Signs instance tokens (and, elsewhere, registry tokens).
        clock: Unix time; tests pass a fake one.
        seed: Seeds identifier generation, for reproducible ids.
    """

    def __init__(
        self,
        config: SimConfig,
        signing_key: SigningKey,
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.signing_key = signing_key
        self.clock = clock
        self._rng = random.Random(seed)
        self.instances: dict[str, Instance] = {}
        self.tokens: dict[str, InstanceToken] = {}
        self.personal = PersonalAccount()
        self._faults: dict[str, collections.deque[SimError]] = {}
        self.delays: dict[str, float] = {}
        self._lost_answers: dict[str, collections.deque[float | None]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def now(self) -> float:
        return self.clock()

    def random_name(self, length: int, alphabet: str) -> str:
        return "".join(self._rng.choice(alphabet) for _ in range(length))

    def new_registry_id(self) -> str:
        while True:
            candidate = "tcr-" + self.random_name(8, _LOWER_ALNUM)
            if candidate not in self.instances:
                return candidate

    def new_token_id(self) -> str:
        # Real ids look like xids: 20 chars of base32hex, lower case.
        return self.random_name(20, string.digits + "abcdefghijklmnopqrstuv")

    def instance(
        self, registry_id: str, *, missing: str = "ResourceNotFound"
    ) -> Instance:
        """Look up a live (not deleting) instance.

        Raises:
            SimError: ``InvalidParameterValue`` for a malformed id, or the
                ``missing`` code when there is no such instance.
        """
        if not _REGISTRY_ID.fullmatch(registry_id):
            raise SimError(
                "InvalidParameterValue", f"RegistryId `{registry_id}` is malformed."
            )
        found = self.instances.get(registry_id)
        if found is None or found.status == "Deleting":
            raise SimError(missing, f"Instance `{registry_id}` does not exist.")
        return found

    def running_instance(self, registry_id: str) -> Instance:
        """Like :meth:`instance`, and the instance must be ``Running``."""
        found = self.instance(registry_id)
        if found.status != "Running":
            raise SimError(
                "ResourceInsufficient.ErrorInstanceNotRunning",
                f"Instance `{registry_id}` is {found.status}, not Running.",
            )
        return found

    def settle(self) -> None:
        """Apply every background transition whose delay has passed."""
        now = self.now()
        for owner, resource in list(self._timed()):
            rule = TIMED_TRANSITIONS.get((resource.kind, resource.status))
            if rule is None:
                continue
            delay_field, target = rule
            due = resource.since + float(getattr(self.config, delay_field))
            if now < due:
                continue
            if target is not None:
                resource.move(target, due)
            else:
                self._remove(owner, resource)

    def _timed(self) -> Iterator[tuple[Instance | None, Timed]]:
        for instance in list(self.instances.values()):
            yield None, instance
            yield instance, instance.endpoint
            for vpc in instance.vpcs:
                yield instance, vpc
            for replica in instance.replicas:
                yield instance, replica

    def _remove(self, owner: Instance | None, resource: Timed) -> None:
        if owner is None and isinstance(resource, Instance):
            del self.instances[resource.registry_id]
            for token_id in [
                t.token_id
                for t in self.tokens.values()
                if t.registry_id == resource.registry_id
            ]:
                del self.tokens[token_id]
        elif owner is not None and isinstance(resource, VpcLink):
            owner.vpcs.remove(resource)

    def inject(self, action: str, code: str, message: str = "", times: int = 1) -> None:
        """Make the next ``times`` calls of ``action`` fail with ``code``.

        A test hook: the real API's throttling and internal errors cannot
        be provoked on demand.
        """
        queue = self._faults.setdefault(action, collections.deque())
        for _ in range(times):
            queue.append(SimError(code, message or f"Injected {code}."))

    def take_fault(self, action: str) -> SimError | None:
        queue = self._faults.get(action)
        return queue.popleft() if queue else None

    def lose_answer(
        self, action: str, *, hold: float | None = None, times: int = 1
    ) -> None:
        """Run the next ``times`` calls of ``action``, then lose the answer.

        A test hook for a write that took effect while its caller saw a
        timeout or a broken connection: the answer is held ``hold`` seconds
        before it is sent, or (None) the connection is closed without one.
        """
        queue = self._lost_answers.setdefault(action, collections.deque())
        queue.extend([hold] * times)

    def take_lost_answer(self, action: str) -> tuple[bool, float | None]:
        """Whether this call's answer is lost, and how long it is held."""
        queue = self._lost_answers.get(action)
        if not queue:
            return False, None
        return True, queue.popleft()

    def admit(self, action: str, rate: float) -> None:
        """Token-bucket rate limit per action (burst = one second's worth).

        Raises:
            SimError: ``RequestLimitExceeded`` when the bucket is empty.
        """
        now = self.now()
        level, last = self._buckets.get(action, (rate, now))
        level = min(rate, level + (now - last) * rate)
        if level < 1 - 1e-9:  # float clocks lose a hair on each refill
            self._buckets[action] = (level, now)
            raise SimError(
                "RequestLimitExceeded",
                f"Your current request times equals to `{rate:g}` in a second, "
                "which exceeds the frequency limit. Please reduce the frequency.",
            )
        self._buckets[action] = (level - 1, now)


_LOWER_ALNUM = string.ascii_lowercase + string.digits

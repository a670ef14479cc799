"""The simulator as one HTTP handler: the API at ``/``, tokens beside it.

Routes: ``/`` is the TCR API 3.0 endpoint (verified by :mod:`._verify`,
executed by :mod:`._actions`, answered in TCR's envelope, always HTTP 200);
``GET /service/token`` is the registry token service
(:mod:`._registry_auth`); ``GET /healthz`` answers 200. Anything else is a
404. Every API answer carries a fresh UUID ``RequestId``, errors included.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from . import _enterprise
from ._actions import ACTIONS, run
from ._http import DropConnection
from ._jwt import SigningKey
from ._registry_auth import RegistryTokenService
from ._schema import SimError
from ._state import SimConfig, SimState
from ._verify import Key, verify

__all__ = ["Simulator"]

logger = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
_JSON = [("content-type", "application/json")]


class Simulator:
    """A simulated TCR account behind one HTTP handler.

    Args:
        keys: Accepted API keys by SecretId.
        config: Account identity, region and background delays.
        clock: Unix time (for signatures, tokens and delays).
        seed: Makes generated ids reproducible.
        signing_key: Signs instance and registry tokens; made if not given.
        issuer: ``iss`` of registry tokens (the registry must expect it).
        extra_regions: Regions served besides ``config.region``.
    """

    def __init__(
        self,
        keys: Mapping[str, Key],
        *,
        config: SimConfig | None = None,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        signing_key: SigningKey | None = None,
        issuer: str = "tcr-mirror-sim",
        extra_regions: Iterable[str] = (),
    ) -> None:
        self.keys = dict(keys)
        self.config = config or SimConfig()
        self.clock = clock
        self.state = SimState(
            self.config, signing_key or SigningKey.generate(), clock=clock, seed=seed
        )
        self.registry_auth = RegistryTokenService(self.state, issuer=issuer)
        self.regions = frozenset({self.config.region, *extra_regions})

    def add_instance(self, name: str, registry_type: str = "basic") -> str:
        """Create an instance that is already Running (for demos and tests).

        Returns:
            Its RegistryId.

        Raises:
            SimError: The name is invalid or taken.
        """
        created = _enterprise.create_instance(
            self.state, {"RegistryName": name, "RegistryType": registry_type}
        )
        instance = self.state.instances[created["RegistryId"]]
        instance.move("Running", self.state.now())
        return instance.registry_id

    async def handle(
        self, method: str, target: str, headers: Headers, body: bytes
    ) -> tuple[int, Headers, bytes]:
        """Answer one HTTP request (the :mod:`._http` handler signature)."""
        path, _, query = target.partition("?")
        by_name = {name.lower(): value for name, value in headers}
        if path == "/":
            return 200, _JSON, await self._api(method, target, by_name, body)
        if path == "/service/token" and method == "GET":
            return self.registry_auth.handle(query, by_name)
        if path == "/healthz" and method in ("GET", "HEAD"):
            return 200, _JSON, b'{"status": "ok"}'
        return 404, _JSON, b'{"error": "not found"}'

    async def _lose_answer(self, action: str) -> None:
        lost, hold = self.state.take_lost_answer(action)
        if not lost:
            return
        if hold is None:
            raise DropConnection
        await trio.sleep(hold)

    async def _api(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> bytes:
        request_id = str(uuid.uuid4())
        action = headers.get("x-tc-action", "")
        response: dict[str, Any]
        try:
            request = verify(
                method,
                target,
                headers,
                body,
                keys=self.keys,
                actions=ACTIONS,
                regions=self.regions,
                now=self.clock(),
            )
            delay = self.state.delays.get(request.action)
            if delay:
                await trio.sleep(delay)
            response = run(self.state, request)
            code = ""
            await self._lose_answer(request.action)
        except SimError as exc:
            response, code = (
                {"Error": {"Code": exc.code, "Message": exc.message}},
                exc.code,
            )
        except DropConnection:
            raise
        except Exception:
            logger.exception(
                "%s", json.dumps({"event": "sim_action_failed", "action": action})
            )
            code = "InternalError"
            response = {"Error": {"Code": code, "Message": "Internal error."}}
        response["RequestId"] = request_id
        logger.info(
            "%s",
            json.dumps(
                {
                    "event": "sim_api_call",
                    "action": action,
                    "code": code,
                    "request_id": request_id,
                }
            ),
        )
        return json.dumps({"Response": response}).encode()

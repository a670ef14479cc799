"""Pull credentials handed out by the control plane.

``tcr-mirror control serve`` keeps a temporary TCR instance token fresh and
hands it to node daemons at ``GET /v1/credentials?registry=<host>`` behind
a shared node secret. The node asks again every ``refresh`` seconds, and
sooner when the token nears its expiry, so a renewed token is picked up
without a restart. While the control plane cannot be reached, the last
credentials are used until they expire.

The daemon runs :meth:`ControlPlaneCredentials.keep_fresh` beside the
mirror, so renewals happen in the background: no pull waits for the
control plane (which may stall for its whole timeout) while the
credentials in hand are valid. Without it, the first caller past the
refresh time renews, and callers meanwhile get the current credentials.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import trio

from tcr_mirror.proxy._auth import Credentials
from tcr_mirror.proxy._config import tls_context
from tcr_mirror.proxy._errors import UpstreamUnavailable

__all__ = ["ControlPlaneCredentials"]

logger = logging.getLogger(__name__)

# Ask for new credentials this long before the current ones expire.
_EXPIRY_MARGIN = 60.0
_RETRY_AFTER_FAILURE = 5.0


class ControlPlaneCredentials:
    """A credential source backed by the control plane's token service.

    Args:
        url: Base URL of ``tcr-mirror control serve``.
        registry: The registry host whose credentials to ask for.
        node_secret: The shared secret sent as a bearer token.
        refresh: Longest time to keep credentials without asking again.
        retry: Time to wait before asking again after a failure.
        ca_file: CA certificates to trust besides the system's.
        timeout: How long one request to the control plane may take.
    """

    def __init__(
        self,
        url: str,
        registry: str,
        node_secret: str,
        *,
        refresh: float = 30.0,
        retry: float = _RETRY_AFTER_FAILURE,
        ca_file: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._url = url.rstrip("/") + "/v1/credentials"
        self._registry = registry
        self._secret = node_secret
        self._refresh = refresh
        self._retry = retry
        self._current: Credentials | None = None
        self._expires_at = 0.0
        self._refresh_at = 0.0
        self._lock = trio.Lock()
        self._kept_fresh = False
        self._timeout = timeout
        # The control plane is the node's neighbour: never through a proxy.
        self._client = httpx.AsyncClient(
            timeout=timeout, verify=tls_context(ca_file), trust_env=False
        )

    def __repr__(self) -> str:
        return f"ControlPlaneCredentials({self._url!r}, registry={self._registry!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def credentials(self) -> Credentials | None:
        """The current credentials, fetched again when due.

        Waits for the control plane only when there are no valid
        credentials, or when they are due for renewal, nobody renews them
        in the background, and no other caller is renewing them already.

        Raises:
            UpstreamUnavailable: No valid credentials could be had.
        """
        current = self._current
        if current is not None and time.time() < self._expires_at:
            due = trio.current_time() >= self._refresh_at
            if self._kept_fresh or not due or self._lock.locked():
                await trio.lowlevel.checkpoint()
                return current
        async with self._lock:
            if trio.current_time() >= self._refresh_at:
                await self._renew()
            if self._current is None or time.time() >= self._expires_at:
                raise UpstreamUnavailable(
                    f"no credentials for {self._registry} from the control plane"
                )
            return self._current

    async def keep_fresh(self) -> None:
        """Renew the credentials whenever they are due, until cancelled."""
        self._kept_fresh = True
        try:
            while True:
                async with self._lock:
                    if trio.current_time() >= self._refresh_at:
                        await self._renew()
                await trio.sleep_until(self._refresh_at)
        finally:
            self._kept_fresh = False

    async def _renew(self) -> None:
        try:
            # httpx bounds each read alone: a control plane that trickles
            # its answer would hold the renewal, and every pull waiting for
            # credentials, for ever.
            with trio.fail_after(self._timeout):
                response = await self._client.get(
                    self._url,
                    params={"registry": self._registry},
                    headers={"Authorization": f"Bearer {self._secret}"},
                )
            username, password, expires_at = _parse(response)
        except (httpx.HTTPError, ValueError, trio.TooSlowError) as exc:
            self._refresh_at = trio.current_time() + self._retry
            logger.warning(
                "control_credentials_failed",
                extra={
                    "registry": self._registry,
                    "reason": str(exc)[:200] or type(exc).__name__,
                },
            )
            return
        if self._current is None or self._current.password != password:
            logger.info(
                "control_credentials_renewed",
                extra={"registry": self._registry, "expires_at": expires_at},
            )
        self._current = Credentials(username, password)
        self._expires_at = expires_at
        until_expiry = expires_at - time.time() - _EXPIRY_MARGIN
        # Never later than the refresh period; never sooner than a second
        # because expiry is near (the control plane renews well before).
        wait = min(self._refresh, max(1.0, until_expiry))
        self._refresh_at = trio.current_time() + wait


def _parse(response: httpx.Response) -> tuple[str, str, float]:
    if response.status_code != 200:
        raise ValueError(f"control plane answered {response.status_code}")
    try:
        document = json.loads(response.content)
        username, password = document["username"], document["password"]
        expires_at = float(document["expires_at"])
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise ValueError("control plane answered malformed credentials") from exc
    if not isinstance(username, str) or not isinstance(password, str):
        raise ValueError("control plane answered malformed credentials")
    return username, password, expires_at

"""An async TCR API 3.0 client on httpx and trio.

One :meth:`TcrClient.call` is one TCR action: the parameters go as a JSON
POST to ``/``, signed with TC3-HMAC-SHA256 (:mod:`._signing`), and the
envelope that comes back becomes a :class:`TcrResponse` or a
:class:`TcrError`.

Retries: TCR throttles per action (``RequestLimitExceeded*``) before it
runs the action, and the Go SDK retries exactly that. A read (``Describe*``
and the like) is also retried after ``InternalError*``,
``ServiceUnavailable*``, network failures, timeouts and HTTP 5xx from a
front end. A write is not: after a timeout or a lost answer TCR may have
applied it, and a second try would make a second long-term token or
policy. A write is retried only when it surely did not take effect:
throttled, or the connection could not be opened. Otherwise its error says
that the outcome is unknown (:attr:`TcrTransportError.outcome_unknown`).
Backoff is exponential with full jitter (a uniform sleep between 0 and
``min(cap, base * 2**n)``) so that many nodes throttled together do not
come back together. Every attempt is signed afresh: the timestamp must stay
within five minutes of server time. Other codes are final.

Parameters and answers are never logged: parameters can carry a password
(``CreateUserPersonal``) or a peer's token (``ManageReplication``), and
``CreateInstanceToken`` answers with a token. The ``on_call`` hook receives
them as they are; redacting is the hook's job.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import trio

from . import _signing
from ._credentials import CloudCredentials
from ._errors import (
    BAD_RESPONSE,
    CANCELLED,
    INVALID_HEADER,
    NETWORK_ERROR,
    TIMEOUT,
    TcrError,
    TcrTransportError,
)

__all__ = ["CallRecord", "TcrClient", "TcrResponse", "is_read"]

logger = logging.getLogger(__name__)

_SERVICE = "tcr"
_THROTTLED_PREFIX = "RequestLimitExceeded"
_TRANSIENT_PREFIXES = (_THROTTLED_PREFIX, "InternalError", "ServiceUnavailable")
_RETRYABLE_TRANSPORT = frozenset({NETWORK_ERROR, TIMEOUT})
# How long a cancelled call may still take to reach the audit log.
_RECORD_GRACE = 5.0
# What a header carries, to name it in an error without its value.
_HEADER_SOURCES = {
    "authorization": "the SecretId",
    "x-tc-token": "the session token",
    "x-tc-region": "the region",
    "x-tc-action": "the action",
}
# Actions that change nothing in TCR, so that running one twice is harmless.
_READ_PREFIXES = ("Describe", "Validate", "Get", "List", "Check")


@dataclass(frozen=True)
class TcrResponse:
    """A successful answer.

    Attributes:
        action: The action that was called.
        request_id: TCR's ``RequestId``.
        data: The ``Response`` object without ``RequestId``.
    """

    action: str
    request_id: str
    data: dict[str, Any]

    def __repr__(self) -> str:
        # ``data`` may hold a token (CreateInstanceToken): show only keys.
        return (
            f"TcrResponse(action={self.action!r}, request_id={self.request_id!r}, "
            f"fields={sorted(self.data)!r})"
        )


@dataclass(frozen=True)
class CallRecord:
    """What one :meth:`TcrClient.call` did, handed to the ``on_call`` hook.

    Exactly one of ``response`` and ``error`` is set. ``params`` are as
    sent, secrets included; the hook must redact before storing.
    """

    action: str
    params: Mapping[str, Any]
    response: TcrResponse | None
    error: TcrError | None
    started_at: float
    duration: float
    endpoint: str
    region: str
    user_agent: str
    attempts: int = 1

    def __repr__(self) -> str:
        outcome = self.error.code if self.error else "ok"
        return (
            f"CallRecord(action={self.action!r}, outcome={outcome!r}, "
            f"attempts={self.attempts}, duration={self.duration:.3f})"
        )


def is_read(action: str) -> bool:
    """Whether ``action`` only reads, so that repeating it is harmless."""
    return action.startswith(_READ_PREFIXES)


def _is_retryable(action: str, error: TcrError) -> bool:
    if not is_read(action):
        # TCR throttles before it runs the action (TCR-API.md §1.6 step 8).
        return error.code.startswith(_THROTTLED_PREFIX) or (
            isinstance(error, TcrTransportError) and not error.sent
        )
    if isinstance(error, TcrTransportError):
        # A 5xx comes from a gateway in front of TCR, which answers 200 itself.
        status = error.http_status or 0
        return error.code in _RETRYABLE_TRANSPORT or status >= 500
    return error.code.startswith(_TRANSIENT_PREFIXES)


_MAYBE_APPLIED = "may or may not have taken effect: check TCR before trying again"


def _unknown_outcome(action: str, error: TcrError) -> TcrError:
    """The final error of a write that may have taken effect in TCR."""
    if not isinstance(error, TcrTransportError):
        # TCR's own InternalError says nothing of how far the action got.
        if not error.code.startswith("InternalError"):
            return error
        return TcrError(
            error.code,
            f"{error.message}; {action} {_MAYBE_APPLIED}",
            request_id=error.request_id,
            action=action,
        )
    if not error.sent:
        return error
    if error.http_status is not None and error.http_status < 500:
        return error
    return TcrTransportError(
        error.code,
        f"{error.message}; {action} {_MAYBE_APPLIED}",
        request_id=error.request_id,
        action=action,
        http_status=error.http_status,
        outcome_unknown=True,
    )


def parse_envelope(action: str, status: int, body: bytes) -> TcrResponse:
    """Turn TCR's answer into a response, or raise the error it carries.

    Raises:
        TcrError: The envelope holds ``Response.Error``.
        TcrTransportError: ``ClientError.BadResponse`` when the status is
            not 200 (``http_status`` set) or the body is not the envelope.
    """
    if status != 200:
        raise TcrTransportError(
            BAD_RESPONSE, f"HTTP status {status}", action=action, http_status=status
        )
    try:
        envelope = json.loads(body)
        response = envelope["Response"]
        request_id = response.get("RequestId")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TcrTransportError(
            BAD_RESPONSE, "answer is not a TCR response envelope", action=action
        ) from None
    error = response.get("Error")
    if error is not None and not isinstance(error, dict):
        # SDKs treat any ``Error`` key as a failure; one we cannot read is
        # no success either.
        raise TcrTransportError(
            BAD_RESPONSE, "answer has an Error that is not an object", action=action
        )
    if isinstance(error, dict):
        raise TcrError(
            str(error.get("Code", "")),
            str(error.get("Message", "")),
            request_id=request_id,
            action=action,
        )
    if not isinstance(request_id, str):
        raise TcrTransportError(BAD_RESPONSE, "answer has no RequestId", action=action)
    data = {key: value for key, value in response.items() if key != "RequestId"}
    return TcrResponse(action, request_id, data)


class TcrClient:
    """A client for one TCR endpoint, region and set of credentials.

    Use it as an async context manager, or call :meth:`aclose` when done.
    ``on_call`` is called with a :class:`CallRecord` after every call; if it
    returns an awaitable (an async hook), the call awaits it before it
    returns, so a hook that writes a file can do so in a worker thread.
    Extra keyword arguments beyond the common ones exist for tests and
    tuning: ``backoff_base``/``backoff_cap`` (seconds), ``rng`` (the
    jitter source), ``sign_action`` (also sign ``x-tc-action``, as the
    newer doc does) and ``transport`` (an httpx transport).
    """

    def __init__(
        self,
        credentials: CloudCredentials,
        *,
        region: str,
        endpoint: str = "https://tcr.tencentcloudapi.com",
        version: str = "2019-09-24",
        timeout: float = 10.0,
        max_attempts: int = 4,
        on_call: Callable[[CallRecord], Awaitable[None] | None] | None = None,
        user_agent: str = "tcr-mirror/0.1",
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        rng: random.Random | None = None,
        sign_action: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._credentials = credentials
        self.region = region
        self.endpoint = endpoint
        self.version = version
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.user_agent = user_agent
        self._on_call = on_call
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._signed_headers = ("content-type", "host") + (
            ("x-tc-action",) if sign_action else ()
        )
        self._host = httpx.URL(endpoint).netloc.decode("ascii")
        self._http = httpx.AsyncClient(
            timeout=timeout, transport=transport, follow_redirects=False
        )

    def __repr__(self) -> str:
        return (
            f"TcrClient(endpoint={self.endpoint!r}, region={self.region!r}, "
            f"secret_id={self._credentials.secret_id!r})"
        )

    async def __aenter__(self) -> TcrClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        await self._http.aclose()

    async def call(
        self, action: str, params: Mapping[str, Any] | None = None
    ) -> TcrResponse:
        """Call one TCR action, retrying throttling and transient failures.

        A write (any action but a read, see :func:`is_read`) is retried only
        when it surely did not take effect.

        Args:
            action: The action name, e.g. ``"CreateInstanceToken"``.
            params: The action's parameters (JSON-serialisable).

        Returns:
            The answer's fields.

        Raises:
            TcrError: TCR answered with an error, or the last retry did.
            TcrTransportError: No usable answer after the last attempt;
                ``outcome_unknown`` is set when a write may have taken effect.
        """
        params = dict(params or {})
        body = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
        started_at, start = time.time(), trio.current_time()
        response: TcrResponse | None = None
        error: TcrError | None = None
        attempt = 0
        cancelled: trio.Cancelled | None = None
        try:
            while attempt < self.max_attempts:
                attempt += 1
                try:
                    response = await self._attempt(action, body)
                    error = None
                    break
                except TcrError as exc:
                    error = exc
                    if not _is_retryable(action, exc) or attempt == self.max_attempts:
                        break
                    await self._backoff(action, attempt, exc)
        except trio.Cancelled as exc:
            # A shutdown cut the call short, maybe after TCR acted on it:
            # the audit log must still hold it, a write as maybe applied.
            cancelled = exc
            error = TcrTransportError(
                CANCELLED, "cancelled before an answer arrived", action=action
            )
        if error is not None and not is_read(action):
            error = _unknown_outcome(action, error)
        duration = trio.current_time() - start
        # Shielded for a cancelled call only, and then for a short while.
        with trio.CancelScope(shield=cancelled is not None) as scope:
            if cancelled is not None:
                scope.deadline = trio.current_time() + _RECORD_GRACE
            await self._record(
                action, params, response, error, started_at, duration, attempt
            )
        if cancelled is not None:
            raise cancelled
        if error is not None:
            raise error
        assert response is not None
        return response

    async def _attempt(self, action: str, body: bytes) -> TcrResponse:
        headers = self._headers(action, body)
        try:
            with trio.fail_after(self.timeout):
                reply = await self._http.post(
                    self.endpoint, content=body, headers=headers
                )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # No connection, so nothing of the request reached TCR.
            raise TcrTransportError(
                NETWORK_ERROR, f"{type(exc).__name__}: {exc}", action=action, sent=False
            ) from None
        except (trio.TooSlowError, httpx.TimeoutException):
            raise TcrTransportError(
                TIMEOUT, f"no answer within {self.timeout} s", action=action
            ) from None
        except httpx.HTTPError as exc:
            raise TcrTransportError(
                NETWORK_ERROR, f"{type(exc).__name__}: {exc}", action=action
            ) from None
        return parse_envelope(action, reply.status_code, reply.content)

    def _headers(self, action: str, body: bytes) -> dict[str, str]:
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "host": self._host,
            "x-tc-action": action,
            "x-tc-version": self.version,
            "x-tc-timestamp": str(timestamp),
            "x-tc-region": self.region,
            "x-tc-requestclient": self.user_agent,
            "user-agent": self.user_agent,
        }
        if self._credentials.token:
            headers["x-tc-token"] = self._credentials.token
        headers["authorization"] = _signing.sign(
            self._credentials.secret_id,
            self._credentials.secret_key,
            service=_SERVICE,
            timestamp=timestamp,
            headers=headers,
            body=body,
            signed_headers=self._signed_headers,
        )
        for name, value in headers.items():
            # httpx refuses such a value with a UnicodeEncodeError (or sends
            # a control character); either way TCR never sees the request.
            # The value stays out of the message: it may be a token.
            if not (value.isascii() and value.isprintable()):
                source = _HEADER_SOURCES.get(name, f"the {name} header")
                raise TcrError(
                    INVALID_HEADER,
                    f"{source} is not printable ASCII, so no HTTP header can "
                    f"carry it; {action} was not sent",
                    action=action,
                )
        return headers

    async def _backoff(self, action: str, attempt: int, error: TcrError) -> None:
        ceiling = min(self._backoff_cap, self._backoff_base * 2 ** (attempt - 1))
        delay = self._rng.uniform(0, ceiling)
        _log(
            logging.INFO,
            "tcr_call_retry",
            action=action,
            attempt=attempt,
            code=error.code,
            request_id=error.request_id,
            delay=round(delay, 3),
        )
        await trio.sleep(delay)

    async def _record(
        self,
        action: str,
        params: Mapping[str, Any],
        response: TcrResponse | None,
        error: TcrError | None,
        started_at: float,
        duration: float,
        attempts: int,
    ) -> None:
        outcome = response or error
        _log(
            logging.DEBUG if error is None else logging.INFO,
            "tcr_call",
            action=action,
            code=error.code if error else "",
            request_id=outcome.request_id if outcome else None,
            attempts=attempts,
            duration=round(duration, 3),
        )
        if self._on_call is None:
            return
        record = CallRecord(
            action=action,
            params=params,
            response=response,
            error=error,
            started_at=started_at,
            duration=duration,
            endpoint=self.endpoint,
            region=self.region,
            user_agent=self.user_agent,
            attempts=attempts,
        )
        pending = self._on_call(record)
        if pending is not None:
            await pending


def _log(level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s", json.dumps({"event": event, **fields}))

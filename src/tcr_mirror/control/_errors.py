"""Errors of the TCR control plane, each carrying TCR's own answer.

TCR (Tencent Cloud API 3.0) answers every request that reached the server
with HTTP 200 and an envelope ``{"Response": {"Error": {"Code", "Message"},
"RequestId"}}``. :class:`TcrError` keeps that code, message and request id so
callers (the audit log, the CLI) can show TCR's words, not ours. Failures
before an answer arrived (network, timeout, an answer that is not the
envelope) are :class:`TcrTransportError` with a ``ClientError.*`` code, the
same family the official SDKs use.
"""

from __future__ import annotations

__all__ = [
    "BAD_RESPONSE",
    "CANCELLED",
    "INVALID_HEADER",
    "NETWORK_ERROR",
    "TIMEOUT",
    "TcrError",
    "TcrTransportError",
]

NETWORK_ERROR = "ClientError.NetworkError"
TIMEOUT = "ClientError.Timeout"
BAD_RESPONSE = "ClientError.BadResponse"
INVALID_HEADER = "ClientError.InvalidHeader"
# Ours: the caller stopped waiting (a shutdown) before an answer arrived.
CANCELLED = "ClientError.Cancelled"


class TcrError(Exception):
    """A TCR call failed; the root of every control-plane error.

    Attributes:
        code: TCR's error code, e.g. ``"AuthFailure.SignatureFailure"``.
        message: TCR's message (or ours for transport errors).
        request_id: The ``RequestId`` of the answer, None if there was none.
        action: The action called (``X-TC-Action``), None if unknown.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        action: str | None = None,
    ) -> None:
        super().__init__(code, message, request_id, action)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.action = action

    def __str__(self) -> str:
        if self.request_id is None:
            return f"{self.code}: {self.message}"
        return f"{self.code}: {self.message} (RequestId {self.request_id})"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"request_id={self.request_id!r}, action={self.action!r})"
        )


class TcrTransportError(TcrError):
    """No usable TCR answer: network failure, timeout, a malformed reply,
    or a caller that stopped waiting.

    ``code`` is one of ``ClientError.NetworkError``, ``ClientError.Timeout``,
    ``ClientError.BadResponse`` or ``ClientError.Cancelled``.
    ``http_status`` is the status of an answer that was not TCR's HTTP 200
    (None otherwise). ``sent`` is False only when no connection could be
    opened, so TCR surely did not see the request. ``outcome_unknown`` marks
    a write that TCR may have applied.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        action: str | None = None,
        http_status: int | None = None,
        sent: bool = True,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(code, message, request_id=request_id, action=action)
        self.http_status = http_status
        self.sent = sent
        self.outcome_unknown = outcome_unknown

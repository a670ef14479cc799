"""The node mirror's one error root, with its OCI wire answer attached.

Every failure a client can see is a :class:`RegistryError`: an OCI
distribution error code, the HTTP status that goes with it, and a message.
Handlers raise; the server turns the error into the spec's JSON body in one
place (:meth:`RegistryError.body`), so no code path invents its own shape.
"""

from __future__ import annotations

import json
from typing import ClassVar

__all__ = [
    "BlobUnknown",
    "Denied",
    "DigestInvalid",
    "HeadTooLarge",
    "ManifestInvalid",
    "ManifestUnknown",
    "NameInvalid",
    "NameUnknown",
    "PaginationNumberInvalid",
    "RangeInvalid",
    "RegistryError",
    "RequestTooLarge",
    "StoreFull",
    "StoreUnavailable",
    "TagInvalid",
    "TooManyRequests",
    "Unauthorized",
    "UpstreamUnavailable",
    "Unsupported",
]


class RegistryError(Exception):
    """An error answered to the client as OCI error JSON.

    Attributes:
        code: The OCI error code, e.g. ``BLOB_UNKNOWN``.
        status: The HTTP status sent with it.
        message: A human sentence for the ``message`` field.
        headers: Extra response headers (``Retry-After``, ``Content-Range``).
    """

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(
        self, message: str, *, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = list(headers or [])

    def body(self) -> bytes:
        """Return the error as the distribution spec's JSON document."""
        error = {"code": self.code, "message": self.message, "detail": None}
        return json.dumps({"errors": [error]}).encode()


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404


class TagInvalid(RegistryError):
    code = "TAG_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class ManifestInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    status = 400


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 404


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401


class Denied(RegistryError):
    code = "DENIED"
    status = 403


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"
    status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers=[("Retry-After", str(retry_after))])
        self.retry_after = retry_after


class Unsupported(RegistryError):
    """A write, or an API this read-only mirror does not offer."""

    code = "UNSUPPORTED"
    status = 405

    def __init__(self, message: str) -> None:
        # A 405 names the methods that are allowed (RFC 9110, 15.5.6).
        super().__init__(message, headers=[("Allow", "GET, HEAD")])


class HeadTooLarge(RegistryError):
    """RFC 9110 §15.5.20 / RFC 6585 §5: the request head is too large."""

    # The distribution spec has no code for it; clients key on the status.
    code = "UNSUPPORTED"
    status = 431

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=[("Connection", "close")])


class RequestTooLarge(RegistryError):
    """RFC 9110 §15.5.14: a body larger than any pull request carries."""

    code = "UNSUPPORTED"
    status = 413

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=[("Connection", "close")])


class PaginationNumberInvalid(RegistryError):
    code = "PAGINATION_NUMBER_INVALID"
    status = 400


class RangeInvalid(RegistryError):
    """RFC 9110 §15.5.17: the range cannot be served for this blob."""

    # Not a code of the distribution spec, which has none for ranges;
    # clients key on the 416 status and the Content-Range header.
    code = "RANGE_INVALID"
    status = 416

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message, headers=[("Content-Range", f"bytes */{size}")])


class UpstreamUnavailable(RegistryError):
    """The upstream could not be reached or answered nonsense.

    Answered quickly, so containerd moves on to its next host.
    """

    code = "UNAVAILABLE"
    status = 503


class StoreFull(RegistryError):
    """No room could be made in the store for a blob."""

    code = "UNAVAILABLE"
    status = 507


class StoreUnavailable(RegistryError):
    """The node's disk failed an operation (other than by being full).

    Answered like an unreachable upstream, so containerd moves on to the
    registry itself.
    """

    code = "UNAVAILABLE"
    status = 503

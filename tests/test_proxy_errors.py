"""Every error a client can see: its OCI code, HTTP status and JSON body."""

from __future__ import annotations

import json

import pytest

from tcr_mirror.proxy import _errors
from tcr_mirror.proxy._errors import RegistryError

# class -> (code, status, extra headers). The distribution spec's codes
# where it has one; the status is the one clients act on.
TABLE: dict[str, tuple[str, int, set[str]]] = {
    "BlobUnknown": ("BLOB_UNKNOWN", 404, set()),
    "Denied": ("DENIED", 403, set()),
    "DigestInvalid": ("DIGEST_INVALID", 400, set()),
    "HeadTooLarge": ("UNSUPPORTED", 431, {"connection"}),
    "ManifestInvalid": ("MANIFEST_INVALID", 400, set()),
    "ManifestUnknown": ("MANIFEST_UNKNOWN", 404, set()),
    "NameInvalid": ("NAME_INVALID", 400, set()),
    "NameUnknown": ("NAME_UNKNOWN", 404, set()),
    "PaginationNumberInvalid": ("PAGINATION_NUMBER_INVALID", 400, set()),
    "RangeInvalid": ("RANGE_INVALID", 416, {"content-range"}),
    "RequestTooLarge": ("UNSUPPORTED", 413, {"connection"}),
    "StoreFull": ("UNAVAILABLE", 507, set()),
    "StoreUnavailable": ("UNAVAILABLE", 503, set()),
    "TagInvalid": ("TAG_INVALID", 400, set()),
    "TooManyRequests": ("TOOMANYREQUESTS", 429, {"retry-after"}),
    "Unauthorized": ("UNAUTHORIZED", 401, set()),
    "UpstreamUnavailable": ("UNAVAILABLE", 503, set()),
    "Unsupported": ("UNSUPPORTED", 405, {"allow"}),
}


def make(name: str) -> RegistryError:
    cls = getattr(_errors, name)
    if name == "TooManyRequests":
        return cls("slow down", retry_after=7)  # type: ignore[no-any-return]
    if name == "RangeInvalid":
        return cls("past the end", size=10)  # type: ignore[no-any-return]
    return cls("what happened")  # type: ignore[no-any-return]


def test_every_error_class_is_in_the_table() -> None:
    exported = {
        name
        for name in _errors.__all__
        if issubclass(getattr(_errors, name), RegistryError) and name != "RegistryError"
    }
    assert exported == set(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_code_status_headers_and_body(name: str) -> None:
    code, status, headers = TABLE[name]
    error = make(name)

    assert (error.code, error.status) == (code, status)
    assert {header.lower() for header, _ in error.headers} == headers
    document = json.loads(error.body())
    assert document == {
        "errors": [{"code": code, "message": error.message, "detail": None}]
    }

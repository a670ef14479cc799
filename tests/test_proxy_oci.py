"""Request parsing: the grammar of names, tags, digests, routes and ranges."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcr_mirror.proxy._errors import (
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    PaginationNumberInvalid,
    RangeInvalid,
    RegistryError,
    TagInvalid,
    Unsupported,
    UpstreamUnavailable,
)
from tcr_mirror.proxy._mirror import relative_link
from tcr_mirror.proxy._oci import (
    ByteRange,
    Kind,
    parse_digest,
    parse_range,
    parse_route,
)

SHA = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("target", "kind", "name", "reference"),
    [
        ("/v2/", Kind.BASE, "", ""),
        ("/v2", Kind.BASE, "", ""),
        (
            "/v2/library/busybox/manifests/latest",
            Kind.MANIFEST,
            "library/busybox",
            "latest",
        ),
        (f"/v2/a/b/c/manifests/{SHA}", Kind.MANIFEST, "a/b/c", SHA),
        (f"/v2/app/blobs/{SHA}", Kind.BLOB, "app", SHA),
        ("/v2/my-app/tags/list", Kind.TAGS, "my-app", ""),
        (f"/v2/app/referrers/{SHA}", Kind.REFERRERS, "app", SHA),
        # A repository may itself be called "blobs" or "manifests".
        ("/v2/blobs/manifests/v1", Kind.MANIFEST, "blobs", "v1"),
        ("/v2/x/manifests/manifests/tags/list", Kind.TAGS, "x/manifests/manifests", ""),
    ],
)
def test_routes(target: str, kind: Kind, name: str, reference: str) -> None:
    route = parse_route("GET", target)
    assert (route.kind, route.name, route.reference) == (kind, name, reference)


def test_namespace_and_query_are_kept() -> None:
    route = parse_route("GET", "/v2/app/tags/list?ns=docker.io&n=10&last=v1&x=1")
    assert route.namespace == "docker.io"
    assert route.query == (("n", "10"), ("last", "v1"))


@pytest.mark.parametrize(
    ("method", "target", "error"),
    [
        ("PUT", "/v2/app/manifests/v1", Unsupported),
        ("POST", "/v2/app/blobs/uploads/", Unsupported),
        ("DELETE", f"/v2/app/blobs/{SHA}", Unsupported),
        ("GET", "/v2/app/blobs/uploads/1234", Unsupported),
        ("GET", "/v2/_catalog", NameUnknown),
        ("GET", "/metrics", NameUnknown),
        ("GET", "/v2/App/manifests/v1", NameInvalid),
        ("GET", "/v2/../etc/manifests/v1", NameInvalid),
        ("GET", "/v2/a/../b/manifests/v1", NameInvalid),
        ("GET", "/v2/a//b/manifests/v1", NameInvalid),
        ("GET", "/v2/a%2Fb/manifests/v1", NameInvalid),
        ("GET", "/v2/a%2e%2e/manifests/v1", NameInvalid),
        ("GET", "/v2/-a/manifests/v1", NameInvalid),
        ("GET", "/v2/" + "a" * 256 + "/manifests/v1", NameInvalid),
        ("GET", "/v2/app/manifests/.hidden", TagInvalid),
        ("GET", "/v2/app/manifests/" + "t" * 129, TagInvalid),
        ("GET", "/v2/app/blobs/latest", DigestInvalid),
        ("GET", "/v2/app/blobs/sha256:1234", DigestInvalid),
        ("GET", "/v2/app/blobs/sha256:" + "AB" * 32, DigestInvalid),
        ("GET", "/v2/app/blobs/md5:" + "ab" * 16, DigestInvalid),
        ("GET", "/v2/app/manifests/sha256:../../x", NameUnknown),
        ("GET", "/v2/app/manifests/sha256:..", DigestInvalid),
        ("GET", "/v2/app/tags/list?n=-1", PaginationNumberInvalid),
        ("GET", "/v2/app/tags/list?n=abc", PaginationNumberInvalid),
        # Digits int() cannot read were a 500 and a logged traceback.
        ("GET", "/v2/app/tags/list?n=%C2%B2", PaginationNumberInvalid),
        ("GET", "/v2/app/tags/list?n=" + "1" * 5000, PaginationNumberInvalid),
        ("GET", "/v2/app/tags/list?last=%2e%2e", TagInvalid),
        ("GET", "/v2/app/manifests/v1?ns=", NameInvalid),
    ],
)
def test_bad_requests(method: str, target: str, error: type[RegistryError]) -> None:
    with pytest.raises(error):
        parse_route(method, target)


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (NameInvalid, "NAME_INVALID", 400),
        (DigestInvalid, "DIGEST_INVALID", 400),
        (TagInvalid, "TAG_INVALID", 400),
        (Unsupported, "UNSUPPORTED", 405),
        (PaginationNumberInvalid, "PAGINATION_NUMBER_INVALID", 400),
    ],
)
def test_error_wire_form(error: type[RegistryError], code: str, status: int) -> None:
    exc = error("why")
    assert (exc.code, exc.status) == (code, status)
    assert json.loads(exc.body()) == {
        "errors": [{"code": code, "message": "why", "detail": None}]
    }


def test_sha512_digest() -> None:
    digest = parse_digest("sha512:" + "0f" * 64)
    assert (digest.algorithm, len(digest.hex)) == ("sha512", 128)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", ByteRange(0, 9)),
        ("bytes=10-", ByteRange(10, 99)),
        ("bytes=-10", ByteRange(90, 99)),
        ("bytes=-1000", ByteRange(0, 99)),
        ("bytes=50-5000", ByteRange(50, 99)),
        ("bytes=99-99", ByteRange(99, 99)),
        ("BYTES = 0-0", ByteRange(0, 0)),
        ("bytes=0-1,5-6", None),
        # A unit other than bytes is ignored (RFC 9110, 14.2).
        ("items=0-1", None),
        ("garbage", None),
    ],
)
def test_ranges(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ("bytes=100-", "unsatisfiable"),
        ("bytes=100-150", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=5-2", "malformed"),
        ("bytes=", "malformed"),
        ("bytes=a-b", "malformed"),
        ("bytes=1", "malformed"),
        ("bytes=--1", "malformed"),
        ("bytes=0x1-2", "malformed"),
        ("bytes=١-٢", "malformed"),
    ],
)
def test_bad_ranges(header: str, why: str) -> None:
    with pytest.raises(RangeInvalid) as info:
        parse_range(header, 100)
    assert ("Content-Range", "bytes */100") in info.value.headers
    assert info.value.message.startswith(why), info.value.message


def test_range_on_empty_blob() -> None:
    with pytest.raises(RangeInvalid):
        parse_range("bytes=0-", 0)
    with pytest.raises(RangeInvalid):
        parse_range("bytes=-5", 0)


@given(st.text(alphabet=string.printable, max_size=80), st.integers(0, 10**6))
def test_any_range_header_is_a_range_or_a_416(header: str, size: int) -> None:
    try:
        result = parse_range(header, size)
    except RangeInvalid:
        return
    if result is not None:
        assert 0 <= result.first <= result.last < size


@given(st.text(max_size=120), st.sampled_from(["GET", "HEAD", "PUT", "GARBAGE"]))
def test_any_target_is_a_route_or_an_oci_error(target: str, method: str) -> None:
    try:
        route = parse_route(method, "/v2/" + target)
    except RegistryError as exc:
        status = exc.status
        assert 400 <= status < 500
        return
    # Whatever passes is safe to put in a URL path or on disk.
    assert ".." not in route.name.split("/")
    assert "%" not in route.name
    assert "%" not in route.reference


@pytest.mark.parametrize(
    ("link", "namespace", "expected"),
    [
        ('</v2/app/tags/list?n=2&last=b>; rel="next"', None,
         '</v2/app/tags/list?n=2&last=b>; rel="next"'),
        ('<https://registry.example/v2/app/tags/list?n=2&last=b>; rel="next"', None,
         '</v2/app/tags/list?n=2&last=b>; rel="next"'),
        ('</v2/app/tags/list?n=2&last=b>; rel="next"', "docker.io",
         '</v2/app/tags/list?n=2&last=b&ns=docker.io>; rel="next"'),
        ("not a link", "docker.io", "not a link"),
    ],
)  # fmt: skip
def test_tags_link_points_back_at_the_mirror(
    link: str, namespace: str | None, expected: str
) -> None:
    assert relative_link(link, namespace) == expected


@pytest.mark.parametrize(
    "link", ['<//x:y:z/v2/app/tags/list>; rel="next"', '</v2/a\tb>; rel="next"']
)
def test_an_upstream_link_that_is_no_url_is_a_503(link: str) -> None:
    """httpx's InvalidURL went up to the server: a 500 and a traceback."""
    with pytest.raises(UpstreamUnavailable, match="Link is no URL"):
        relative_link(link, "docker.io")

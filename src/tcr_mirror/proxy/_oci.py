"""Sans-IO parsing of OCI distribution pull requests.

Everything a request names is checked against the distribution spec's
grammar before anything else happens: the repository name, the tag or
digest, the ``ns`` query parameter and the ``Range`` header. Only names that
pass are ever used to build an upstream URL or a path on disk, which is what
keeps ``..`` and encoded slashes out of both.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from tcr_mirror.proxy._errors import (
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    PaginationNumberInvalid,
    RangeInvalid,
    TagInvalid,
    Unsupported,
)

__all__ = [
    "ByteRange",
    "Digest",
    "Kind",
    "Route",
    "is_digest",
    "is_uint",
    "parse_digest",
    "parse_range",
    "parse_route",
]

# distribution-spec "Pulling manifests": the <name> and <reference> grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
# The algorithms we can verify, with the length of their hex encoding.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")
# Registries commonly cap names at 255 characters; longer ones are refused
# before they reach an upstream URL.
_MAX_NAME = 255
_MAX_TAGS_PAGE = 10_000


class Kind(enum.Enum):
    """What a request asks for."""

    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True)
class Digest:
    """A validated content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Route:
    """A parsed pull request.

    Attributes:
        kind: What is asked for.
        name: The repository name (empty for ``/v2/``).
        reference: A tag or a digest string for manifests, a digest for
            blobs and referrers, empty otherwise.
        digest: The parsed digest when the reference is one.
        namespace: containerd's ``ns`` query parameter, or None.
        query: The other query parameters that matter for the kind (``n`` and
            ``last`` for tags, ``artifactType`` for referrers).
    """

    kind: Kind
    name: str = ""
    reference: str = ""
    digest: Digest | None = None
    namespace: str | None = None
    query: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range ``first..last`` already clamped to a size."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.first}-{self.last}/{size}"


def parse_digest(text: str) -> Digest:
    """Parse and validate a digest.

    Raises:
        DigestInvalid: The text is not a digest, or names an algorithm this
            mirror cannot verify, or its encoding has the wrong length.
    """
    match = _DIGEST_RE.fullmatch(text)
    if match is None:
        raise DigestInvalid(f"invalid digest {text!r}")
    algorithm, encoded = match.groups()
    expected = _HEX_LENGTH.get(algorithm)
    if expected is None:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
    if len(encoded) != expected or not _HEX_RE.fullmatch(encoded):
        raise DigestInvalid(f"invalid {algorithm} digest {text!r}")
    return Digest(algorithm, encoded)


def is_digest(reference: str) -> bool:
    """Tell a digest reference from a tag (tags cannot hold a colon)."""
    return ":" in reference


def parse_route(method: str, target: str) -> Route:
    """Parse a request line's method and target into a :class:`Route`.

    Raises:
        RegistryError: The request is not a valid pull request: a write
            (``UNSUPPORTED``), a path outside the pull API (``NAME_UNKNOWN``),
            or a bad name, tag, digest or query parameter.
    """
    if method not in ("GET", "HEAD"):
        raise Unsupported(f"{method} is not supported: this mirror is read-only")
    path, _, query_string = target.partition("?")
    query = _parse_query(query_string)
    namespace = query.pop("ns", None)
    if namespace is not None and not namespace:
        raise NameInvalid("empty ns parameter")

    if path in ("/v2", "/v2/"):
        return Route(Kind.BASE, namespace=namespace)
    if not path.startswith("/v2/"):
        raise NameUnknown(f"not an OCI distribution API path: {_clip(path)}")
    if "%" in path:
        # No valid name, tag or digest contains a percent sign, so an encoded
        # character can only be an attempt to smuggle a '/' or '..' through.
        raise NameInvalid("percent-encoded characters are not allowed in paths")
    return _parse_repository_path(path[4:], namespace, query)


def _parse_repository_path(
    rest: str, namespace: str | None, query: dict[str, str]
) -> Route:
    # The name may hold slashes, so the API word is found from the right.
    parts = rest.split("/")
    if len(parts) >= 3 and parts[-2] in ("manifests", "blobs", "referrers"):
        name, api, reference = "/".join(parts[:-2]), parts[-2], parts[-1]
    elif len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        name, api, reference = "/".join(parts[:-2]), "tags", ""
    elif len(parts) >= 3 and "blobs" in parts and "uploads" in parts:
        raise Unsupported("blob uploads are not supported: this mirror is read-only")
    else:
        raise NameUnknown(f"not an OCI distribution API path: /v2/{_clip(rest)}")
    _check_name(name)

    if api == "manifests":
        digest = None
        if is_digest(reference):
            digest = parse_digest(reference)
        elif not _TAG_RE.fullmatch(reference):
            raise TagInvalid(f"invalid tag {_clip(reference)!r}")
        return Route(Kind.MANIFEST, name, reference, digest, namespace)
    if api == "blobs":
        digest = parse_digest(reference)
        return Route(Kind.BLOB, name, reference, digest, namespace)
    if api == "referrers":
        digest = parse_digest(reference)
        extra = _pick(query, "artifactType")
        return Route(Kind.REFERRERS, name, reference, digest, namespace, extra)
    return Route(Kind.TAGS, name, namespace=namespace, query=_tags_query(query))


def _check_name(name: str) -> None:
    if len(name) > _MAX_NAME:
        raise NameInvalid(f"repository name longer than {_MAX_NAME} characters")
    if not _NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {_clip(name)!r}")


def _tags_query(query: dict[str, str]) -> tuple[tuple[str, str], ...]:
    picked = _pick(query, "n", "last")
    for key, value in picked:
        # isdigit() alone takes "²", and a few thousand digits, both of
        # which int() refuses.
        if key == "n" and not (is_uint(value) and int(value) <= _MAX_TAGS_PAGE):
            raise PaginationNumberInvalid(f"invalid n {_clip(value)!r}")
        if key == "last" and not _TAG_RE.fullmatch(value):
            raise TagInvalid(f"invalid last {_clip(value)!r}")
    return picked


def _pick(query: dict[str, str], *keys: str) -> tuple[tuple[str, str], ...]:
    return tuple((key, query[key]) for key in keys if key in query)


def _parse_query(query_string: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            query_string, keep_blank_values=True, strict_parsing=False, errors="strict"
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise NameInvalid("malformed query string") from exc
    return dict(pairs)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Resolve a ``Range`` header against a blob of ``size`` bytes.

    Returns:
        The clamped range, or None when the whole blob is to be sent: no
        header, a unit other than bytes (RFC 9110 says to ignore it), or
        several ranges (a server may ignore those, and no registry client
        asks for them).

    Raises:
        RangeInvalid: The byte ranges are malformed or cannot be satisfied;
            the error carries ``Content-Range: bytes */size``.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes":
        return None
    if not spec:
        raise RangeInvalid(f"malformed Range header {_clip(header)!r}", size=size)
    if "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash or not is_uint(first_text or "0") or not is_uint(last_text or "0"):
        raise RangeInvalid(f"malformed Range header {_clip(header)!r}", size=size)

    if not first_text:
        # Suffix range: the last N bytes.
        if not last_text or int(last_text) == 0 or size == 0:
            raise RangeInvalid(f"unsatisfiable range {_clip(header)!r}", size=size)
        return ByteRange(max(0, size - int(last_text)), size - 1)
    first = int(first_text)
    if last_text and int(last_text) < first:
        raise RangeInvalid(f"malformed Range header {_clip(header)!r}", size=size)
    if first >= size:
        raise RangeInvalid(f"unsatisfiable range {_clip(header)!r}", size=size)
    last = int(last_text) if last_text else size - 1
    return ByteRange(first, min(last, size - 1))


def is_uint(text: str) -> bool:
    """Whether ``text`` is decimal digits ``int()`` takes, at most 19 of them
    (any such number fits an unsigned 64-bit count)."""
    return text.isascii() and text.isdigit() and len(text) <= 19


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."

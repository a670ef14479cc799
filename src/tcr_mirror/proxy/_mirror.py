"""The pull API of the node mirror: what each request is answered with.

Digests are immutable, so a manifest or blob found by digest in the store
is served from it forever. Tags move, so a tag is trusted for ``tag_ttl``
seconds after it was last resolved upstream; after that it is revalidated
(one upstream request however many clients ask at once), and when the
upstream cannot be reached the last known digest is served
(stale-if-error).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import trio

from tcr_mirror.proxy._errors import (
    BlobUnknown,
    Denied,
    ManifestInvalid,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamUnavailable,
)
from tcr_mirror.proxy._fetch import BlobFetch, BlobFetcher
from tcr_mirror.proxy._http import FileBody, Request, Response
from tcr_mirror.proxy._metrics import MirrorMetrics
from tcr_mirror.proxy._oci import (
    Digest,
    Kind,
    Route,
    is_uint,
    parse_digest,
    parse_range,
    parse_route,
)
from tcr_mirror.proxy._sendfile import unwatch_file, watch_file
from tcr_mirror.proxy._singleflight import SingleFlight
from tcr_mirror.proxy._store import BlobStore, TagEntry, disk_error
from tcr_mirror.proxy._upstream import Upstream, status_error

__all__ = ["MANIFEST_MEDIA_TYPES", "Mirror", "Upstreams"]

logger = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
_DEFAULT_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
# The image spec asks registries to accept manifests of at least 4 MiB.
_MAX_MANIFEST = 4 << 20
_MAX_PASSTHROUGH = 4 << 20
_API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


class Upstreams:
    """The allow-list: upstreams by the ``ns`` value that selects them."""

    def __init__(self, upstreams: list[Upstream], default: Upstream | None) -> None:
        self._by_key = {upstream.key: upstream for upstream in upstreams}
        self.default = default

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._by_key.values())

    def select(self, namespace: str | None) -> Upstream:
        """Pick the upstream for a request.

        Raises:
            Denied: ``ns`` names a registry not on the allow-list, or there
                is no ``ns`` and no default upstream.
        """
        if namespace is None:
            if self.default is None:
                raise Denied("no ns parameter and no default upstream configured")
            return self.default
        upstream = self._by_key.get(namespace)
        if upstream is None:
            raise Denied(f"registry {namespace!r} is not on this mirror's allow-list")
        return upstream

    async def keep_credentials_fresh(self) -> None:
        """Renew every upstream's credentials in the background until
        cancelled (see :meth:`Upstream.keep_credentials_fresh`)."""
        async with trio.open_nursery() as nursery:
            for upstream in self._by_key.values():
                nursery.start_soon(upstream.keep_credentials_fresh)

    async def aclose(self) -> None:
        for upstream in self._by_key.values():
            await upstream.aclose()


@dataclass(frozen=True)
class _Manifest:
    digest: Digest
    media_type: str
    body: bytes
    # ``upstream`` when fetched for this request (or a flight it joined),
    # ``store`` when read from the store: the served-bytes label.
    source: str = "store"


class Mirror:
    """Answers pull requests from the store, the fetches and the upstreams.

    Args:
        store: The node's blob store.
        fetcher: Shares blob fetches between requests.
        upstreams: The allow-list.
        tag_ttl: Seconds a resolved tag is served without asking upstream.
        metrics: Where requests and cache results are counted.
    """

    def __init__(
        self,
        store: BlobStore,
        fetcher: BlobFetcher,
        upstreams: Upstreams,
        *,
        tag_ttl: float = 5.0,
        metrics: MirrorMetrics | None = None,
    ) -> None:
        self._store = store
        self._fetcher = fetcher
        self._upstreams = upstreams
        self._tag_ttl = tag_ttl
        self._metrics = metrics or MirrorMetrics()
        self._manifest_flights: SingleFlight[_Manifest] = SingleFlight()

    async def handle(self, request: Request) -> Response:
        """Answer one request; raises :class:`RegistryError` for OCI errors."""
        kind = "invalid"
        status = 500
        try:
            route = parse_route(request.method, request.target)
            kind = route.kind.value
            response = await self._route(route, request)
            status = response.status
            return response
        except RegistryError as exc:
            status = exc.status
            raise
        finally:
            self._metrics.requests.labels(kind, request.method, str(status)).inc()

    def _cache(self, kind: str, result: str) -> None:
        self._metrics.cache_results.labels(kind, result).inc()

    async def _route(self, route: Route, request: Request) -> Response:
        if route.kind is Kind.BASE:
            return Response(200, [_API_VERSION, _JSON], b"{}")
        upstream = self._upstreams.select(route.namespace)
        if route.kind is Kind.MANIFEST:
            return await self._manifest(route, upstream, request)
        if route.kind is Kind.BLOB:
            return await self._blob(route, upstream, request)
        return await self._passthrough(route, upstream)

    # -- manifests ----------------------------------------------------------

    async def _manifest(
        self, route: Route, upstream: Upstream, request: Request
    ) -> Response:
        accept = _printable_accept(request.headers.get("accept", ""))
        if route.digest is not None:
            manifest = await self._manifest_by_digest(route, upstream, accept)
        else:
            manifest = await self._manifest_by_tag(route, upstream, accept)
        headers = [
            ("Content-Type", manifest.media_type),
            ("Docker-Content-Digest", str(manifest.digest)),
            ("ETag", f'"{manifest.digest}"'),
            _API_VERSION,
        ]
        return Response(200, headers, manifest.body, source=manifest.source)

    async def _manifest_by_digest(
        self, route: Route, upstream: Upstream, accept: str
    ) -> _Manifest:
        assert route.digest is not None
        digest = route.digest
        stored = self._store.get_manifest(digest)
        if stored is not None:
            self._cache("manifest", "hit")
            return _Manifest(digest, *stored)
        self._cache("manifest", "miss")

        async def fetch() -> _Manifest:
            # The digest fixes the bytes whatever the client accepts, and a
            # registry refuses types missing from Accept: ask for them all.
            everything = f"{_DEFAULT_ACCEPT}, {accept}" if accept else ""
            return await self._get_manifest(
                upstream, route.name, str(digest), everything, named=digest
            )

        key = (upstream.key, route.name, str(digest))
        return await self._manifest_flights.do(key, fetch)

    async def _manifest_by_tag(
        self, route: Route, upstream: Upstream, accept: str
    ) -> _Manifest:
        tag = route.reference
        variant = _accept_variant(accept)
        entry = self._store.get_tag(upstream.key, route.name, tag, variant)
        cached = self._cached_tag(entry, accept)
        assert entry is None or cached is None or entry.digest == str(cached.digest)
        if cached is not None and entry and _fresh(entry, self._tag_ttl, time.time()):
            self._cache("tag", "hit")
            return cached
        if cached is None:
            self._cache("tag", "miss")

        async def revalidate() -> _Manifest:
            return await self._resolve_tag(upstream, route.name, tag, accept, variant)

        key = (upstream.key, route.name, tag, accept)
        try:
            manifest = await self._manifest_flights.do(key, revalidate)
        except (UpstreamUnavailable, TooManyRequests) as exc:
            if cached is None:
                raise
            self._cache("tag", "stale")
            logger.warning(
                "tag_served_stale",
                extra={
                    "upstream": upstream.key,
                    "repository": route.name,
                    "tag": tag,
                    "reason": exc.message,
                },
            )
            return cached
        if cached is not None:
            # Known but past its TTL, and the upstream answered.
            self._cache("tag", "revalidated")
        return manifest

    def _cached_tag(self, entry: TagEntry | None, accept: str) -> _Manifest | None:
        if entry is None or not _accepts(accept, entry.media_type):
            return None
        digest = Digest(*entry.digest.split(":", 1))
        stored = self._store.get_manifest(digest)
        return None if stored is None else _Manifest(digest, *stored)

    async def _resolve_tag(
        self, upstream: Upstream, name: str, tag: str, accept: str, variant: str
    ) -> _Manifest:
        # A HEAD tells the digest without the body (and registries that
        # count pulls do not count it); the body is fetched only when the
        # digest is new to this node.
        digest, media_type = await self._head_manifest(upstream, name, tag, accept)
        stored = self._store.get_manifest(digest) if digest else None
        if digest is not None and stored is not None and stored[0] == media_type:
            manifest = _Manifest(digest, *stored)
        else:
            manifest = await self._get_manifest(
                upstream, name, tag, accept, headed=digest
            )
        entry = TagEntry(str(manifest.digest), manifest.media_type, time.time())
        self._store.put_tag(upstream.key, name, tag, entry, variant)
        return manifest

    async def _head_manifest(
        self, upstream: Upstream, name: str, reference: str, accept: str
    ) -> tuple[Digest | None, str]:
        path = f"/v2/{name}/manifests/{reference}"
        headers = {"Accept": _upstream_accept(accept)}
        async with upstream.request(
            "HEAD", path, repository=name, headers=headers
        ) as r:
            if r.status_code != 200:
                raise status_error(r, f"manifest {name}:{reference}", upstream.key)
            return _digest_header(r.headers), r.headers.get("content-type", "")

    async def _get_manifest(
        self,
        upstream: Upstream,
        name: str,
        reference: str,
        accept: str,
        *,
        named: Digest | None = None,
        headed: Digest | None = None,
    ) -> _Manifest:
        """GET a manifest and keep it, once its bytes match the digest it
        goes by.

        That digest is ``named`` (asked for by digest), else the answer's
        ``Docker-Content-Digest``, else ``headed`` (what a HEAD of the tag
        just said; the answer's own header wins, as the tag may have moved
        in between). A body that matches none it should was damaged on the
        way and is neither kept nor served.

        Raises:
            UpstreamUnavailable: The bytes do not match; or the upstream
                failed.
        """
        path = f"/v2/{name}/manifests/{reference}"
        headers = {"Accept": _upstream_accept(accept)}
        async with upstream.request("GET", path, repository=name, headers=headers) as r:
            if r.status_code != 200:
                raise status_error(r, f"manifest {name}:{reference}", upstream.key)
            body = await _read_limited(
                r, _MAX_MANIFEST, upstream.key, deadline=upstream.timeouts.read
            )
            media_type = r.headers.get("content-type", "")
            expected = named or _digest_header(r.headers) or headed
        # Kept and sent on as a header: it must be printable ASCII.
        if not (media_type and media_type.isascii() and media_type.isprintable()):
            raise ManifestInvalid(
                f"upstream {upstream.key} sent no usable manifest media type"
            )
        algorithm = expected.algorithm if expected else "sha256"
        digest = Digest(algorithm, hashlib.new(algorithm, body).hexdigest())
        if expected is not None and digest != expected:
            raise UpstreamUnavailable(
                f"upstream {upstream.key} sent a manifest that does not match "
                f"{expected}"
            )
        self._store.put_manifest(digest, media_type, body)
        return _Manifest(digest, media_type, body, source="upstream")

    # -- blobs ----------------------------------------------------------------

    async def _blob(
        self, route: Route, upstream: Upstream, request: Request
    ) -> Response:
        assert route.digest is not None
        digest = route.digest
        # Fetches are shared by digest, so a client may join one from another
        # upstream or repository. If that one refuses the blob, which says
        # nothing of this client's, the client asks its own (once); so
        # does one whose fetch lost its file.
        for attempt in range(2):
            fetch = self._fetcher.in_flight(digest)
            if fetch is None:
                opened = self._store.open_blob(digest)
                if opened is not None:
                    self._cache("blob", "hit")
                    fd, size = opened
                    return self._stored_blob_response(request, digest, fd, size)
                if not attempt:
                    self._cache("blob", "miss")
                if request.method == "HEAD":
                    return await self._head_blob(route, upstream, digest, request)
                fetch = self._fetcher.fetch(upstream, route.name, digest)
            elif not attempt:
                self._cache("blob", "joined")

            reading = self._open_fetched(fetch, last=bool(attempt))
            if reading is None:
                continue
            fd = reading
            try:
                size = await fetch.wait_size()
                if not size:
                    # An empty body has no last byte to hold back.
                    await fetch.wait_verified()
            except RegistryError:
                os.close(fd)
                if attempt or fetch.origin == (upstream.key, route.name):
                    raise
                continue
            except BaseException:
                os.close(fd)
                raise
            response = self._blob_response(request, digest, fd, size)
            if isinstance(response.body, FileBody):
                response.body.fetch = fetch
                self._follow_fetch(response.body)
            return response
        raise AssertionError("not reached: the second attempt returns or raises")

    def _open_fetched(self, fetch: BlobFetch, *, last: bool) -> int | None:
        """Open the file of a fetch in flight; None if it was deleted.

        Raises:
            StoreUnavailable: It cannot be opened (too many open files),
                or was deleted on the ``last`` attempt too.
        """
        try:
            return os.open(fetch.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            # Deleted behind the fetch: no new client can read it, so the
            # next attempt starts a fetch of its own.
            self._fetcher.abandon(fetch)
            if last:
                raise disk_error(exc, f"read blob {fetch.digest}") from exc
            return None
        except OSError as exc:
            raise disk_error(exc, f"read blob {fetch.digest}") from exc

    def _follow_fetch(self, body: FileBody) -> None:
        """Count the client as waiting on a fetch until its body is done."""
        waiting = self._metrics.fetch_waiting_clients
        waiting.inc()
        release = body.release

        def released() -> None:
            waiting.dec()
            if release is not None:
                release()

        body.release = released

    def _stored_blob_response(
        self, request: Request, digest: Digest, fd: int, size: int
    ) -> Response:
        """:meth:`_blob_response` for a stored blob: a file found short or
        unreadable while it is sent is dropped, so the next request fetches
        it again."""
        response = self._blob_response(request, digest, fd, size)
        assert isinstance(response.body, FileBody)
        body = response.body
        watch_file(fd, functools.partial(self._store.drop_damaged, digest, fd))
        release = body.release

        def released() -> None:
            # The server closed fd just before, with no checkpoint between.
            unwatch_file(fd)
            if release is not None:
                release()

        body.release = released
        return response

    def _blob_response(
        self, request: Request, digest: Digest, fd: int, size: int
    ) -> Response:
        """A 200 or 206 for a blob of ``size`` bytes readable from ``fd``.

        The blob counts as read, so never evicted, until the body is done.
        """
        try:
            byte_range = parse_range(request.headers.get("range"), size)
        except RegistryError:
            os.close(fd)
            raise
        self._store.acquire_reader(digest)
        headers = _blob_headers(digest)
        if byte_range is None:
            first, length, status = 0, size, 200
        else:
            headers.append(("Content-Range", byte_range.content_range(size)))
            first, length, status = byte_range.first, byte_range.length, 206
        release = functools.partial(self._store.release_reader, digest)
        return Response(status, headers, FileBody(fd, first, length, release=release))

    async def _head_blob(
        self, route: Route, upstream: Upstream, digest: Digest, request: Request
    ) -> Response:
        """The head a GET of a blob not stored would have, from the
        upstream's size, its ``Range`` included: the same HEAD must not get
        a 200 before the blob is stored and a 206 or 416 after."""
        path = f"/v2/{route.name}/blobs/{digest}"
        async with upstream.request("HEAD", path, repository=route.name) as r:
            if r.status_code != 200:
                raise status_error(
                    r, f"blob {digest}", upstream.key, not_found=BlobUnknown
                )
            size = r.headers.get("content-length", "")
        if not is_uint(size):
            raise UpstreamUnavailable(f"upstream {upstream.key} sent no blob size")
        byte_range = parse_range(request.headers.get("range"), int(size))
        headers = _blob_headers(digest)
        if byte_range is None:
            return Response(200, [*headers, ("Content-Length", size)])
        headers.append(("Content-Range", byte_range.content_range(int(size))))
        headers.append(("Content-Length", str(byte_range.length)))
        return Response(206, headers)

    # -- tags list and referrers ----------------------------------------------

    async def _passthrough(self, route: Route, upstream: Upstream) -> Response:
        if route.kind is Kind.TAGS:
            path = f"/v2/{route.name}/tags/list"
        else:
            path = f"/v2/{route.name}/referrers/{route.digest}"
        params = dict(route.query)
        async with upstream.request(
            "GET", path, repository=route.name, params=params
        ) as r:
            if r.status_code != 200:
                raise status_error(r, path, upstream.key, not_found=NameUnknown)
            body = await _read_limited(
                r, _MAX_PASSTHROUGH, upstream.key, deadline=upstream.timeouts.read
            )
            headers = [("Content-Type", r.headers.get("content-type", _JSON[1]))]
            link = r.headers.get("link")
        if link:
            headers.append(("Link", relative_link(link, route.namespace)))
        return Response(200, headers, body)


_JSON = ("Content-Type", "application/json")


def _blob_headers(digest: Digest) -> list[tuple[str, str]]:
    return [
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", str(digest)),
        ("ETag", f'"{digest}"'),
        ("Accept-Ranges", "bytes"),
        _API_VERSION,
    ]


def _fresh(entry: TagEntry, tag_ttl: float, now: float) -> bool:
    """Whether a tag resolved at ``entry.fetched_at`` is served unasked.

    One resolved "in the future" was stored by a clock that was ahead and
    has since been set back: trusted, it would be served unchecked until
    the clock caught up, days perhaps, so it is revalidated instead.
    """
    age = now - entry.fetched_at
    return 0 <= age < tag_ttl


def _upstream_accept(accept: str) -> str:
    """The Accept to send upstream for a client's Accept.

    A client that names manifest types gets exactly those (a registry may
    answer differently, e.g. a single image for a client that cannot read
    indexes). One that names none (``*/*`` or nothing) is taken to accept
    every manifest type, as registries would otherwise fall back to the
    obsolete schema 1 or refuse.
    """
    offered = _media_types(accept)
    if offered & set(MANIFEST_MEDIA_TYPES):
        return accept
    return _DEFAULT_ACCEPT


def _accept_variant(accept: str) -> str:
    """The manifest types a client asks for, as a key for what a tag
    resolves to: a registry answers by them alone (see ``_upstream_accept``).
    """
    return ",".join(sorted(_media_types(accept) & set(MANIFEST_MEDIA_TYPES)))


def _media_types(accept: str) -> set[str]:
    return {part.split(";")[0].strip() for part in accept.split(",")} - {""}


def _printable_accept(accept: str) -> str:
    """Drop the media ranges of an Accept header that are not plain ASCII.

    No registry media type needs more, and they cannot be sent upstream.
    """
    parts = (part.strip() for part in accept.split(","))
    return ", ".join(p for p in parts if p and p.isascii() and p.isprintable())


def _accepts(accept: str, media_type: str) -> bool:
    offered = _media_types(accept)
    if not offered & set(MANIFEST_MEDIA_TYPES):
        return True
    return media_type in offered


def relative_link(link: str, namespace: str | None) -> str:
    """Point a tags-list ``Link`` header back at the mirror.

    An upstream may give an absolute URL; the client must come back to the
    mirror, so only the path and query are kept, and the ``ns`` the client
    sent is added so that the next page comes from the same upstream.

    Raises:
        UpstreamUnavailable: The link holds no URL httpx can read (a port
            that is no number, a control character).
    """
    start, end = link.find("<"), link.find(">")
    if start == -1 or end < start:
        return link
    try:
        target = httpx.URL(link[start + 1 : end])
    except httpx.InvalidURL as exc:
        # Passed on as it is, it would send the client somewhere unknown;
        # left out, the client would take the page as the last one.
        raise UpstreamUnavailable(f"the upstream's Link is no URL: {exc}") from None
    if namespace is not None:
        target = target.copy_set_param("ns", namespace)
    relative = target.raw_path.decode("ascii")
    return f"<{relative}>{link[end + 1 :]}"


def _digest_header(headers: httpx.Headers) -> Digest | None:
    try:
        return parse_digest(headers.get("docker-content-digest", ""))
    except RegistryError:
        return None


async def _read_limited(
    response: httpx.Response, limit: int, key: str, *, deadline: float
) -> bytes:
    """Read a small answer whole, refusing one past ``limit`` bytes or
    one that takes more than ``deadline`` seconds.

    httpx bounds each read alone, so an upstream sending a byte now and
    then would hold the request, and every client waiting on the same tag,
    for as long as it liked.

    Raises:
        UpstreamUnavailable: The answer is larger, slower, or it broke off.
    """
    # A declared length is refused before reading: leaving httpx's nested
    # body generators half-way leaves them for trio to finalise, with a
    # ResourceWarning per generator, and draining could mean gigabytes.
    declared = response.headers.get("content-length", "")
    digits = declared.isascii() and declared.isdigit()
    if digits and (len(declared) > 18 or int(declared) > limit):
        raise UpstreamUnavailable(f"upstream {key} sent more than {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        with trio.fail_after(deadline):
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > limit:
                    raise UpstreamUnavailable(
                        f"upstream {key} sent more than {limit} bytes"
                    )
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable(
            f"upstream {key} broke off the response: {type(exc).__name__}"
        ) from exc
    except trio.TooSlowError:
        raise UpstreamUnavailable(
            f"upstream {key} took more than {deadline:g} s to send {total} bytes"
        ) from None
    return b"".join(chunks)

"""The node mirror against an upstream that misbehaves (issues #2 and #3).

Each test runs a real ``tcr-mirror node`` whose default upstream is a
:class:`FaultProxy` in front of a real docker-registry, sets one fault and
pulls through the mirror with httpx. What must hold whatever the fault: the
client gets the right bytes or an error (an OCI error status, or a body
shorter than its declared length), never a complete wrong body; a failed
fetch leaves nothing in the store; and the daemon keeps serving.

Every node also has the registry itself as upstream ``ns=direct``, so a
test can show the daemon serves others while its default upstream is
stalled or blocked.
"""

from __future__ import annotations

import email.utils
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from support.faultproxy import Fault, FaultKind, FaultProxy
from support.images import OCI_MANIFEST, PushedImage, push_image
from support.layers import digest_of
from support.node import NodeFactory, NodeProcess
from support.pull import Pulled
from support.pull import pull as pull_url
from support.registry import Registry
from support.tls import make_tls_files

REPO = "faults/app"
TAG = "v1"
DIRECT = "direct"
MIB = 1 << 20
# The mirror's upstream read timeout, short so that stalls end quickly.
READ_TIMEOUT = 1.0
# Generous: outcomes are asserted, never timings.
CLIENT_TIMEOUT = 60.0


# Fixtures.


@pytest.fixture(scope="module")
def image(module_registry: Registry) -> PushedImage:
    """An image with one 3 MiB layer."""
    return push_image(module_registry, REPO, TAG, layer_sizes=(3 * MIB,))


@pytest.fixture
def proxy(
    request: pytest.FixtureRequest,
    module_registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FaultProxy]:
    """The fault proxy; ``https`` (by indirect parametrization) serves TLS."""
    scheme = getattr(request, "param", "http")
    tls = make_tls_files(tmp_path_factory.mktemp("tls")) if scheme == "https" else None
    with FaultProxy(module_registry.url, tls=tls) as fault_proxy:
        yield fault_proxy


# The faults that meet the blob reader's two transports differently run over
# both: both are read in a worker thread, but ssl handles timeouts, cut
# records and shutdowns its own way.
both_schemes = pytest.mark.parametrize("proxy", ["http", "https"], indirect=True)


@pytest.fixture
def node_factory(tmp_path: Path, node_factory: NodeFactory) -> NodeFactory:
    """Starts nodes: ``node_factory(default_url, direct_url=, credentials=)``."""
    files = itertools.count()

    def start(
        default_url: str,
        *,
        direct_url: str | None = None,
        credentials: tuple[str, str] | None = None,
        ca_file: Path | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> NodeProcess:
        args = ["--tag-ttl", "0", "--upstream", default_url]
        if ca_file is not None:
            args += ["--ca-file", str(ca_file)]
        if direct_url is not None:
            args += ["--upstream", f"{DIRECT}={direct_url}"]
        if credentials is not None:
            secret = tmp_path / f"upstream{next(files)}.credentials"
            secret.write_text(":".join(credentials) + "\n")
            args += ["--credentials-file", str(secret)]
        # A stop cuts a stalled client after a short drain.
        config = (
            f"read_timeout = {read_timeout}\nconnect_timeout = 2.0\n"
            "drain_timeout = 1.0\n"
        )
        return node_factory(*args, config=config)

    return start


@pytest.fixture
def node(
    node_factory: NodeFactory, proxy: FaultProxy, module_registry: Registry
) -> NodeProcess:
    ca_file = proxy.tls.ca if proxy.tls is not None else None
    return node_factory(proxy.url, direct_url=module_registry.url, ca_file=ca_file)


# Helpers.


def pull(url: str, headers: dict[str, str] | None = None) -> Pulled:
    # Only these end a body short here; any other error (a client timeout)
    # fails the test rather than pass as a cut body.
    cut_by = (httpx.RemoteProtocolError, httpx.ReadError)
    return pull_url(url, headers, timeout=CLIENT_TIMEOUT, cut_by=cut_by)


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def blob_url(node: NodeProcess, digest: str, ns: str | None = None) -> str:
    query = f"?ns={ns}" if ns else ""
    return f"{node.url}{blob_path(digest)}{query}"


def manifest_url(node: NodeProcess, reference: str, ns: str | None = None) -> str:
    query = f"?ns={ns}" if ns else ""
    return f"{node.url}/v2/{REPO}/manifests/{reference}{query}"


def layer(image: PushedImage) -> tuple[str, bytes]:
    return image.layers[0]


def stored_files(node: NodeProcess) -> list[Path]:
    """Blob files and temporary files in the node's store."""
    return [
        path
        for directory in ("blobs", "tmp")
        for path in (node.data_dir / directory).rglob("*")
        if path.is_file()
    ]


def assert_got_blob(pulled: Pulled, digest: str) -> None:
    assert pulled.status == 200, pulled.body[:300]
    assert pulled.complete
    assert digest_of(pulled.body) == digest


def assert_no_complete_body(pulled: Pulled, size: int) -> None:
    """The client saw an error status or a body cut short, never all of it."""
    if pulled.status == 200:
        assert int(pulled.headers["content-length"]) == size
        assert not pulled.complete
        assert len(pulled.body) < size
    else:
        assert pulled.status >= 500


def assert_serves(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, ns: str | None = None
) -> None:
    """With the faults cleared, the layer is served whole and right."""
    proxy.clear_faults()
    digest, _ = layer(image)
    assert_got_blob(pull(blob_url(node, digest, ns)), digest)


def wait_for_request(proxy: FaultProxy, method: str, path: str) -> None:
    deadline = time.monotonic() + 20
    while proxy.count(method, path) == 0:
        assert time.monotonic() < deadline, f"{method} {path} never reached the proxy"
        time.sleep(0.02)


# Cut bodies and resumes.


@both_schemes
def test_cut_body_is_resumed_from_the_first_missing_byte(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, _ = layer(image)
    # Not a multiple of any buffer size: every byte that arrived is kept.
    cut = 700_001
    proxy.add_fault(Fault(FaultKind.CUT, times=2, after=cut))

    pulled = pull(blob_url(node, digest))

    assert_got_blob(pulled, digest)
    ranges = [r.range for r in proxy.requests if r.path == blob_path(digest)]
    assert ranges == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]
    # Stored: the next client is served without asking upstream.
    assert_got_blob(pull(blob_url(node, digest)), digest)
    assert proxy.count("GET", blob_path(digest)) == 3


@both_schemes
def test_fetch_gives_up_after_three_resumes(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, data = layer(image)
    step = MIB // 4
    proxy.add_fault(Fault(FaultKind.CUT, after=step))

    pulled = pull(blob_url(node, digest))

    assert_no_complete_body(pulled, len(data))
    ranges = [r.range for r in proxy.requests if r.path == blob_path(digest)]
    assert ranges == [None, *(f"bytes={step * i}-" for i in (1, 2, 3))]
    assert stored_files(node) == []
    assert_serves(node, proxy, image)
    assert proxy.count("GET", blob_path(digest), range=None) == 2


@pytest.mark.parametrize("bad_resume", [FaultKind.IGNORE_RANGE, FaultKind.WRONG_RANGE])
def test_resume_not_answered_with_the_asked_range_fails_cleanly(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, bad_resume: FaultKind
) -> None:
    digest, data = layer(image)
    proxy.add_fault(Fault(FaultKind.CUT, times=1, after=MIB))
    proxy.add_fault(Fault(bad_resume))

    pulled = pull(blob_url(node, digest))

    assert_no_complete_body(pulled, len(data))
    assert pulled.body == data[: len(pulled.body)]
    assert proxy.count("GET", blob_path(digest), range=f"bytes={MIB}-") == 1
    assert stored_files(node) == []
    # A fresh fetch from the first byte, not a resume of the failed one.
    assert_serves(node, proxy, image)
    assert proxy.count("GET", blob_path(digest), range=None) == 2


@both_schemes
def test_corrupted_byte_never_completes_and_is_fetched_again(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, data = layer(image)
    proxy.add_fault(Fault(FaultKind.CORRUPT, times=1))

    pulled = pull(blob_url(node, digest))

    assert_no_complete_body(pulled, len(data))
    assert stored_files(node) == []
    assert_serves(node, proxy, image)
    assert proxy.count("GET", blob_path(digest)) == 2


@both_schemes
def test_clients_joined_to_a_failing_fetch_all_see_it_fail(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, data = layer(image)
    # The stall keeps the fetch in flight for a read timeout, so the second
    # client joins it; the resume then gets a wrong range and fails it.
    proxy.add_fault(Fault(FaultKind.STALL_BODY, times=1, after=MIB, seconds=30))
    proxy.add_fault(Fault(FaultKind.WRONG_RANGE))

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(pull, blob_url(node, digest))
        wait_for_request(proxy, "GET", blob_path(digest))
        second = pool.submit(pull, blob_url(node, digest))
        pulled = [first.result(CLIENT_TIMEOUT), second.result(CLIENT_TIMEOUT)]

    for one in pulled:
        assert_no_complete_body(one, len(data))
    ranges = [r.range for r in proxy.requests if r.path == blob_path(digest)]
    assert ranges == [None, f"bytes={MIB}-"], "one fetch for both clients"
    assert stored_files(node) == []
    assert_serves(node, proxy, image)


# Stalls.


@both_schemes
@pytest.mark.parametrize("stall", [FaultKind.STALL_HEAD, FaultKind.STALL_BODY])
def test_stalled_upstream_ends_in_an_error_while_others_are_served(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, stall: FaultKind
) -> None:
    digest, data = layer(image)
    proxy.add_fault(Fault(stall, after=MIB // 4, seconds=30))

    with ThreadPoolExecutor(max_workers=1) as pool:
        stalled = pool.submit(pull, blob_url(node, digest))
        wait_for_request(proxy, "GET", blob_path(digest))
        # While the default upstream hangs, the daemon answers others.
        assert httpx.get(f"{node.url}/v2/", timeout=CLIENT_TIMEOUT).status_code == 200
        other = pull(manifest_url(node, TAG, ns=DIRECT), {"Accept": OCI_MANIFEST})
        assert other.status == 200
        assert digest_of(other.body) == image.manifest_digest
        pulled = stalled.result(timeout=CLIENT_TIMEOUT)

    assert_no_complete_body(pulled, len(data))
    if stall is FaultKind.STALL_HEAD:
        assert (pulled.status, pulled.error_code()) == (503, "UNAVAILABLE")
    assert stored_files(node) == []
    assert_serves(node, proxy, image)


@both_schemes
def test_a_node_stopped_while_its_upstream_stalls_stops_cleanly(
    node_factory: NodeFactory, proxy: FaultProxy, image: PushedImage
) -> None:
    # The fetch's worker thread is blocked reading the stalled upstream,
    # with a read timeout far longer than the stop may take: stopping must
    # end that read rather than wait it out.
    ca_file = proxy.tls.ca if proxy.tls is not None else None
    node = node_factory(proxy.url, ca_file=ca_file, read_timeout=300.0)
    digest, data = layer(image)
    proxy.add_fault(Fault(FaultKind.STALL_BODY, after=MIB // 4, seconds=300))

    with ThreadPoolExecutor(max_workers=1) as pool:
        stalled = pool.submit(pull, blob_url(node, digest))
        wait_for_request(proxy, "GET", blob_path(digest))
        wait_until_written(node, data[: MIB // 4])
        assert node.stop(timeout=30) == 0
        pulled = stalled.result(timeout=CLIENT_TIMEOUT)

    assert_no_complete_body(pulled, len(data))
    assert stored_files(node) == []
    assert "Traceback" not in node.log_text()


def wait_until_written(node: NodeProcess, prefix: bytes) -> None:
    """Wait until a temporary file of the node starts with ``prefix``."""
    deadline = time.monotonic() + 20
    while prefix not in node.temp_file_heads(len(prefix)).values():
        assert time.monotonic() < deadline, "the fetch never wrote the first bytes"
        time.sleep(0.02)


# Error answers.


def test_upstream_500_is_answered_503_unavailable(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, _ = layer(image)
    proxy.add_fault(Fault(FaultKind.STATUS, status=500))

    pulled = pull(blob_url(node, digest))

    assert (pulled.status, pulled.error_code()) == (503, "UNAVAILABLE")
    assert_serves(node, proxy, image)


@both_schemes
@pytest.mark.parametrize("kind", [FaultKind.GARBAGE, FaultKind.CLOSE])
def test_garbage_or_closed_connection_is_answered_503_unavailable(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, kind: FaultKind
) -> None:
    digest, _ = layer(image)
    proxy.add_fault(Fault(kind, methods=frozenset({"GET", "HEAD"}), path_contains=""))

    blob = pull(blob_url(node, digest))
    manifest = pull(manifest_url(node, TAG), {"Accept": OCI_MANIFEST})

    assert (blob.status, blob.error_code()) == (503, "UNAVAILABLE")
    assert (manifest.status, manifest.error_code()) == (503, "UNAVAILABLE")
    assert_serves(node, proxy, image)


# Rate limiting.


def retry_after_of(pulled: Pulled) -> int:
    assert (pulled.status, pulled.error_code()) == (429, "TOOMANYREQUESTS")
    return int(pulled.headers["retry-after"])


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_long_retry_after_blocks_the_upstream_until_then(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, form: str
) -> None:
    digest, _ = layer(image)
    value = "30"
    if form == "http-date":
        value = email.utils.formatdate(time.time() + 30, usegmt=True)
    proxy.add_fault(
        Fault(FaultKind.STATUS, status=429, headers=(("Retry-After", value),))
    )

    first = pull(blob_url(node, digest))
    seen = len(proxy.requests)
    again = pull(blob_url(node, digest))
    other = pull(blob_url(node, image.config_digest))

    assert 1 <= retry_after_of(first) <= 31
    assert 1 <= retry_after_of(again) <= 31
    assert 1 <= retry_after_of(other) <= 31
    assert len(proxy.requests) == seen, "a blocked upstream was asked again"
    assert proxy.count("GET", blob_path(digest)) == 1
    # The default upstream is blocked; the daemon serves through the other.
    assert_serves(node, proxy, image, ns=DIRECT)


def test_short_retry_after_is_waited_out_and_retried(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage
) -> None:
    digest, _ = layer(image)
    retry = (("Retry-After", "1"),)
    proxy.add_fault(Fault(FaultKind.STATUS, times=1, status=429, headers=retry))

    pulled = pull(blob_url(node, digest))

    assert_got_blob(pulled, digest)
    assert proxy.count("GET", blob_path(digest)) == 2
    assert_serves(node, proxy, image)


# Redirects to blob storage.


@pytest.mark.parametrize("auth", ["token_auth_registry", "basic_auth_registry"])
def test_redirect_to_storage_carries_no_authorization(
    request: pytest.FixtureRequest, node_factory: NodeFactory, auth: str
) -> None:
    registry: Registry = request.getfixturevalue(auth)
    assert registry.credentials is not None
    pushed = push_image(registry, REPO, TAG, layer_sizes=(2 * MIB,))
    digest, _ = layer(pushed)
    with FaultProxy(registry.url) as proxy:
        proxy.add_fault(Fault(FaultKind.REDIRECT))
        node = node_factory(proxy.url, credentials=registry.credentials)

        pulled = pull(blob_url(node, digest))

        assert_got_blob(pulled, digest)
        storage = [r for r in proxy.storage_requests if r.method == "GET"]
        assert storage, "the blob was not fetched from storage"
        assert all("authorization" not in r.headers for r in storage)
        to_registry = [r for r in proxy.requests if r.path == blob_path(digest)]
        assert any("authorization" in r.headers for r in to_registry)
    served = registry.requests_for("GET", blob_path(digest))
    assert any(entry.status == 200 for entry in served)


# Tags when the upstream fails.


@pytest.mark.parametrize("kind", [FaultKind.STATUS, FaultKind.CLOSE])
def test_tag_is_served_stale_when_the_upstream_fails(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, kind: FaultKind
) -> None:
    accept = {"Accept": OCI_MANIFEST}
    fresh = pull(manifest_url(node, TAG), accept)
    assert fresh.status == 200
    assert digest_of(fresh.body) == image.manifest_digest
    head_path = f"/v2/{REPO}/manifests/{TAG}"
    asked = proxy.count("HEAD", head_path)
    manifests = frozenset({"GET", "HEAD"})
    proxy.add_fault(Fault(kind, methods=manifests, path_contains="/manifests/"))

    stale = pull(manifest_url(node, TAG), accept)
    unknown = pull(manifest_url(node, "never-pulled"), accept)

    assert stale.status == 200
    assert stale.body == fresh.body
    assert stale.headers["docker-content-digest"] == image.manifest_digest
    assert proxy.count("HEAD", head_path) > asked, "the tag was not revalidated"
    assert any(e.get("event") == "tag_served_stale" for e in node.events())
    assert (unknown.status, unknown.error_code()) == (503, "UNAVAILABLE")
    proxy.clear_faults()
    assert pull(manifest_url(node, TAG), accept).status == 200
    assert_serves(node, proxy, image)


@pytest.mark.parametrize("reference", ["tag", "digest"], ids=["by-tag", "by-digest"])
def test_a_manifest_damaged_on_its_way_is_neither_served_nor_kept(
    node: NodeProcess, proxy: FaultProxy, image: PushedImage, reference: str
) -> None:
    """The soak (loadtest/soak_node.py) found it: by tag, a flipped byte
    was kept and served under the digest of the damaged bytes."""
    accept = {"Accept": OCI_MANIFEST}
    name = TAG if reference == "tag" else image.manifest_digest
    proxy.add_fault(Fault(FaultKind.CORRUPT, times=1, path_contains="/manifests/"))

    damaged = pull(manifest_url(node, name), accept)

    assert (damaged.status, damaged.error_code()) == (503, "UNAVAILABLE")
    assert "does not match" in damaged.body.decode()
    again = pull(manifest_url(node, name), accept)
    assert again.status == 200
    assert digest_of(again.body) == image.manifest_digest
    assert again.headers["docker-content-digest"] == image.manifest_digest
    # Nothing of the damaged answer was kept: the tag stays on the real one.
    assert pull(manifest_url(node, TAG), accept).body == again.body

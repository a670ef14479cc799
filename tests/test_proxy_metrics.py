"""The node's /metrics, read from a real node that pulls through a real registry.

Each test makes the node take a path (a cache hit, a stale tag, an
eviction, an upstream that is down) and checks the series that path must
move, by their exposed names and labels.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from support.faultproxy import Fault, FaultKind, FaultProxy
from support.images import push_image
from support.node import NodeFactory, NodeProcess
from support.registry import Registry, free_port
from support.tokenserver import TokenServer
from tcr_mirror.proxy._metrics import MirrorMetrics

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {"Accept": OCI_MANIFEST}

Scrape = Callable[..., float]


def start(node_factory: NodeFactory, registry: Registry, *args: str) -> NodeProcess:
    return node_factory(
        "--upstream", registry.url, "--metrics-listen", "127.0.0.1:0", *args
    )


def scrape(node: NodeProcess) -> Scrape:
    """Read /metrics once; the result gives a sample's value by name and labels."""
    address = next(
        e["address"] for e in node.events() if e.get("event") == "metrics_listening"
    )
    response = httpx.get(f"http://{address}/metrics")
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    return value


def tag_results(metrics: Scrape) -> dict[str, float]:
    results = ("hit", "miss", "stale", "revalidated")
    return {
        result: metrics("tcr_mirror_cache_results_total", kind="tag", result=result)
        for result in results
    }


def test_a_fresh_tag_counts_as_a_hit_and_an_unknown_one_as_a_miss(
    registry: Registry, node_factory: NodeFactory
) -> None:
    push_image(registry, "app", "v1", layer_sizes=[10])
    node = start(node_factory, registry, "--tag-ttl", "300")
    for _ in range(3):
        response = httpx.get(f"{node.url}/v2/app/manifests/v1", headers=ACCEPT)
        assert response.status_code == 200

    counted = tag_results(scrape(node))
    assert counted == {"hit": 2, "miss": 1, "stale": 0, "revalidated": 0}


def test_a_tag_served_while_the_upstream_is_down_counts_as_stale(
    registry: Registry, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "app", "v1", layer_sizes=[10])
    node = start(node_factory, registry, "--tag-ttl", "0")
    url = f"{node.url}/v2/app/manifests/v1"
    assert httpx.get(url, headers=ACCEPT).status_code == 200
    assert httpx.get(url, headers=ACCEPT).status_code == 200
    before = scrape(node)
    last_contact = before(
        "tcr_mirror_upstream_last_success_timestamp_seconds", upstream=registry.host
    )

    registry.stop()
    stale = httpx.get(url, headers=ACCEPT)

    assert stale.content == image.manifest_bytes
    after = scrape(node)
    assert tag_results(after) == {"hit": 0, "miss": 1, "stale": 1, "revalidated": 1}
    errors = {"upstream": registry.host, "status": "error"}
    assert after("tcr_mirror_upstream_requests_total", **errors) >= 1
    # Nothing answered: the last contact stays where the registry left it.
    assert last_contact > 0
    assert (
        after(
            "tcr_mirror_upstream_last_success_timestamp_seconds",
            upstream=registry.host,
        )
        == last_contact
    )


def test_upstream_requests_are_timed_and_the_last_contact_moves(
    registry: Registry, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "app", "v1", layer_sizes=[3000, 4000])
    node = start(node_factory, registry, "--tag-ttl", "0")
    gauge = "tcr_mirror_upstream_last_success_timestamp_seconds"
    assert scrape(node)(gauge, upstream=registry.host) == 0

    assert httpx.get(f"{node.url}/v2/app/manifests/v1").status_code == 200
    first = scrape(node)(gauge, upstream=registry.host)
    for digest in image.blobs:
        assert httpx.get(f"{node.url}/v2/app/blobs/{digest}").status_code == 200
    metrics = scrape(node)

    assert first > 0
    assert metrics(gauge, upstream=registry.host) >= first
    answered = sum(
        metrics("tcr_mirror_upstream_requests_total", upstream=registry.host, status=s)
        for s in ("200", "401", "404", "307")
    )
    # The manifest's HEAD and GET, and one GET per blob at least.
    assert answered >= 2 + len(image.blobs)
    timed = metrics(
        "tcr_mirror_upstream_request_duration_seconds_count", upstream=registry.host
    )
    assert timed == answered
    assert (
        metrics(
            "tcr_mirror_upstream_request_duration_seconds_bucket",
            upstream=registry.host,
            le="+Inf",
        )
        == answered
    )


def test_bytes_served_by_source_add_up_to_the_bodies(
    registry: Registry, node_factory: NodeFactory
) -> None:
    layer = b"y" * 300_000
    image = push_image(registry, "app", "v1", layers=[layer])
    digest = image.layers[0][0]
    node = start(node_factory, registry)
    bodies = [httpx.get(f"{node.url}/v2/app/blobs/{digest}") for _ in range(3)]
    ranged = httpx.get(
        f"{node.url}/v2/app/blobs/{digest}", headers={"Range": "bytes=10-109"}
    )

    assert all(body.content == layer for body in bodies)
    assert ranged.status_code == 206
    served = "tcr_mirror_served_bytes_total"
    # A body's last bytes are counted once sent, which the client may see
    # before the node does.
    total = 3 * len(layer) + 100
    for _ in range(100):
        metrics = scrape(node)
        if (
            metrics(served, source="upstream") + metrics(served, source="store")
            >= total
        ):
            break
        time.sleep(0.05)
    assert metrics(served, source="upstream") == len(layer)
    assert metrics(served, source="store") == 2 * len(layer) + 100
    results = {
        result: metrics("tcr_mirror_cache_results_total", kind="blob", result=result)
        for result in ("hit", "miss")
    }
    assert results == {"hit": 3, "miss": 1}


def test_evictions_are_counted_with_their_bytes(
    registry: Registry, node_factory: NodeFactory
) -> None:
    sizes = [600_000, 600_000, 600_000]
    image = push_image(registry, "app", "v1", layer_sizes=sizes)
    node = start(
        node_factory, registry, "--max-store-bytes", "1MiB",
        "--store-watermarks", "0.9,0.5",
    )  # fmt: skip
    for digest, data in image.layers:
        assert httpx.get(f"{node.url}/v2/app/blobs/{digest}").content == data

    metrics = scrape(node)
    evicted = [e for e in node.events() if e.get("event") == "blob_evicted"]
    assert len(evicted) >= 1
    assert metrics("tcr_mirror_store_evictions_total") == len(evicted)
    assert metrics("tcr_mirror_store_evicted_bytes_total") == sum(
        e["size"] for e in evicted
    )
    assert metrics("tcr_mirror_store_budget_bytes") == 1024 * 1024
    assert 0 < metrics("tcr_mirror_store_bytes") <= 1024 * 1024


def test_label_values_never_carry_what_clients_send(
    registry: Registry, node_factory: NodeFactory
) -> None:
    push_image(registry, "app", "v1", layer_sizes=[10])
    node = start(node_factory, registry)
    with httpx.Client(base_url=node.url) as client:
        for index in range(5):
            client.get(f"/v2/repo{index}/manifests/tag{index}")
            client.get(f"/v2/repo{index}/blobs/sha256:{index:064x}")
            client.get(f"/v2/repo{index}/tags/list?n={index}")
            client.get(f"/not-v2/{index}")

    address = next(
        e["address"] for e in node.events() if e.get("event") == "metrics_listening"
    )
    text = httpx.get(f"http://{address}/metrics").text
    families = list(text_string_to_metric_families(text))
    labels = {
        value
        for family in families
        for sample in family.samples
        for value in sample.labels.values()
    }
    # Every request was counted: under labels of the node's own making.
    counted = sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "tcr_mirror_requests_total"
    )
    assert counted == 20
    from_clients = ("repo", "sha256", "/", "v2")
    assert not [value for value in labels if any(s in value for s in from_clients)]


def test_fetches_in_flight_and_waiting_clients_rise_and_fall(
    registry: Registry, node_factory: NodeFactory
) -> None:
    mib = 1 << 20
    image = push_image(registry, "app", "v1", layers=[b"z" * (3 * mib)])
    digest = image.layers[0][0]
    with FaultProxy(registry.url) as proxy:
        # The body stops after its first MiB until the proxy is stopped.
        proxy.add_fault(Fault(FaultKind.STALL_BODY, times=1, after=mib, seconds=60))
        node = node_factory("--upstream", proxy.url, "--metrics-listen", "127.0.0.1:0")
        url = f"{node.url}/v2/app/blobs/{digest}"
        with (
            httpx.Client(timeout=30) as first_client,
            httpx.Client(timeout=30) as second_client,
            first_client.stream("GET", url) as first,
            second_client.stream("GET", url) as second,
        ):
            assert (first.status_code, second.status_code) == (200, 200)
            during = scrape(node)
    # The proxy is gone: the fetch fails, and lets its clients go.
    after = scrape(node)
    for _ in range(200):
        if not after("tcr_mirror_blob_fetch_waiting_clients"):
            break
        time.sleep(0.05)
        after = scrape(node)

    assert during("tcr_mirror_blob_fetches_in_flight") == 1
    assert during("tcr_mirror_blob_fetch_waiting_clients") == 2
    joined = {"kind": "blob", "result": "joined"}
    assert during("tcr_mirror_cache_results_total", **joined) == 1
    assert after("tcr_mirror_blob_fetch_waiting_clients") == 0
    assert after("tcr_mirror_blob_fetches_in_flight") == 0


def test_a_token_endpoint_that_is_down_counts_as_an_upstream_error(
    token_auth_registry: Registry,
    token_server: TokenServer,
    node_factory: NodeFactory,
    tmp_path: Path,
) -> None:
    assert token_auth_registry.credentials is not None
    user, password = token_auth_registry.credentials
    push_image(token_auth_registry, "private/app", "v1", layer_sizes=[10])
    credentials = tmp_path / "credentials"
    credentials.write_text(f"{user}:{password}\n")
    node = start(
        node_factory, token_auth_registry, "--credentials-file", str(credentials)
    )
    url = f"{node.url}/v2/private/app/manifests/v1"
    token_server.stop()

    refused = httpx.get(url, headers=ACCEPT)

    assert refused.status_code == 503
    metrics = scrape(node)
    errors = {"upstream": token_auth_registry.host, "status": "error"}
    assert metrics("tcr_mirror_upstream_requests_total", **errors) == 1
    challenged = {"upstream": token_auth_registry.host, "status": "401"}
    assert metrics("tcr_mirror_upstream_requests_total", **challenged) == 1
    timed = metrics(
        "tcr_mirror_upstream_request_duration_seconds_count",
        upstream=token_auth_registry.host,
    )
    # The failed token request is timed as well as the answered challenge.
    assert timed == 2


def test_requests_the_server_refuses_itself_are_counted(
    registry: Registry, node_factory: NodeFactory
) -> None:
    """Refused before the mirror routes them, they were in no series: an
    operator could not see a client sending garbage or oversized heads."""
    node = start(node_factory, registry)
    host, port = node.url.removeprefix("http://").split(":")
    oversized = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", oversized + b"\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(raw)
            status_line = sock.makefile("rb").readline()
        assert status_line.split()[1] in (b"400", b"431"), status_line

    metrics = scrape(node)
    refused = {
        status: metrics(
            "tcr_mirror_requests_total", kind="invalid", method=method, status=status
        )
        for method, status in (("other", "400"), ("GET", "431"))
    }
    assert refused == {"400": 1, "431": 1}


def test_manifest_bodies_count_as_bytes_served_by_their_source(
    registry: Registry, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "app", "v1", layer_sizes=[10])
    node = start(node_factory, registry, "--tag-ttl", "300")
    url = f"{node.url}/v2/app/manifests/v1"
    served = "tcr_mirror_served_bytes_total"
    size = len(image.manifest_bytes)

    fetched = httpx.get(url, headers=ACCEPT)
    after_fetch = scrape(node)
    stored = httpx.get(url, headers=ACCEPT)
    after_store = scrape(node)
    head = httpx.head(url, headers=ACCEPT)
    after_head = scrape(node)

    assert fetched.content == stored.content == image.manifest_bytes
    assert head.status_code == 200
    assert after_fetch(served, source="upstream") == size
    assert after_fetch(served, source="store") == 0
    assert after_store(served, source="upstream") == size
    assert after_store(served, source="store") == size
    # A HEAD sends no body.
    assert after_head(served, source="upstream") == size
    assert after_head(served, source="store") == size


def test_failed_upstream_requests_are_timed(node_factory: NodeFactory) -> None:
    """Without the failures, an upstream that times out or refuses every
    connection would look fast in the histogram instead of slow."""
    upstream = f"127.0.0.1:{free_port()}"  # nobody listens there
    node = node_factory(
        "--upstream", f"http://{upstream}", "--metrics-listen", "127.0.0.1:0"
    )

    refused = httpx.get(f"{node.url}/v2/app/manifests/v1", headers=ACCEPT)

    assert refused.status_code == 503
    metrics = scrape(node)
    errors = metrics(
        "tcr_mirror_upstream_requests_total", upstream=upstream, status="error"
    )
    timed = metrics(
        "tcr_mirror_upstream_request_duration_seconds_count", upstream=upstream
    )
    assert errors >= 1
    assert timed == errors


def test_metrics_page_answers_only_get_and_head(
    registry: Registry, node_factory: NodeFactory
) -> None:
    node = start(node_factory, registry)
    address = next(
        e["address"] for e in node.events() if e.get("event") == "metrics_listening"
    )
    url = f"http://{address}/metrics"

    posted = httpx.post(url, content=b"x")
    got = httpx.get(url)
    head = httpx.head(url)

    assert posted.status_code == 405
    assert posted.headers["Allow"] == "GET, HEAD"
    assert got.status_code == 200
    assert "tcr_mirror_requests_total" in got.text
    assert head.status_code == 200
    assert head.content == b""


def test_a_proxy_refusing_its_credentials_is_no_upstream_contact() -> None:
    """Only the upstream's own answers count as contact; a 407 comes from a
    proxy between (an http:// upstream reached with wrong proxy
    credentials), so the gauge must not say the upstream was reached."""
    registry = CollectorRegistry()
    metrics = MirrorMetrics(registry)
    name = "tcr_mirror_upstream_last_success_timestamp_seconds"
    metrics.observe_upstream("registry", 407, 0.01, now=1000.0)
    metrics.observe_upstream("registry", 503, 0.01, now=1001.0)
    assert registry.get_sample_value(name, {"upstream": "registry"}) is None
    metrics.observe_upstream("registry", 404, 0.01, now=1002.0)
    assert registry.get_sample_value(name, {"upstream": "registry"}) == 1002.0

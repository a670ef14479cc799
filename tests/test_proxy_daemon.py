"""The node process's start and stop: one-line start-up errors, probes, drain.

Every test runs a real ``tcr-mirror node`` process on 127.0.0.1. The drain
tests hold a response in flight with a client that reads a large blob at
its own pace (its receive buffer kept small, so the node cannot push the
whole body into the kernel ahead of it), or with an upstream that stalls
mid-body behind the fault-injecting proxy.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from support.faultproxy import Fault, FaultKind, FaultProxy
from support.images import PushedImage, push_image
from support.layers import digest_of
from support.node import NodeFactory, NodeProcess
from support.registry import Registry
from support.waiting import wait_until
from tcr_mirror.proxy._daemon import _METRICS_MAX_CONNECTIONS

WAIT = 30.0
# Far more than the kernel buffers between the node and a client whose
# receive buffer is small (the send buffer autotunes up to tcp_wmem's
# maximum, 4 MiB by default): a body the kernel held whole would reach the
# client even from a node that closed its socket at once.
BLOB_SIZE = 32 << 20
SMALL_BUFFER = 64 * 1024


# -- start-up errors ----------------------------------------------------------


def run_node(args: list[str], *, prefix: list[str] | None = None) -> list[str]:
    """Run a node that is expected to fail to start; its stderr lines."""
    command = [*(prefix or [sys.executable]), "-m", "tcr_mirror", "node", *args]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    # Log events may come first (the store is opened before the listener);
    # the error is one line at the end.
    for line in lines[:-1]:
        json.loads(line)
    return lines


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_port_in_use_is_one_line_and_exit_status_2(
    tmp_path: Path, occupied_port: int
) -> None:
    lines = run_node(
        ["--listen", f"127.0.0.1:{occupied_port}", "--data-dir", str(tmp_path / "d"),
         "--upstream", "http://127.0.0.1:1"]
    )  # fmt: skip
    assert lines[-1] == (
        f"tcr-mirror: error: cannot listen on 127.0.0.1:{occupied_port} "
        "(--listen): Address already in use"
    )


def test_a_metrics_port_in_use_is_one_line_and_exit_status_2(
    tmp_path: Path, occupied_port: int
) -> None:
    lines = run_node(
        ["--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{occupied_port}",
         "--data-dir", str(tmp_path / "d"), "--upstream", "http://127.0.0.1:1"]
    )  # fmt: skip
    assert lines[-1].startswith(
        f"tcr-mirror: error: cannot listen on 127.0.0.1:{occupied_port} "
        "(--metrics-listen): "
    )


def test_a_data_dir_that_cannot_be_made_is_one_line_and_exit_status_2(
    tmp_path: Path,
) -> None:
    # Under a regular file no directory can be made, even by root.
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "sub"
    lines = run_node(
        ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
         "--upstream", "http://127.0.0.1:1"]
    )  # fmt: skip
    assert lines == [
        f"tcr-mirror: error: cannot use data directory {data_dir}: "
        f"{data_dir / 'blobs'}: Not a directory"
    ]


def test_a_data_dir_where_lmdb_cannot_open_is_one_line_and_exit_status_2(
    tmp_path: Path,
) -> None:
    # A file size limit below LMDB's first two pages, as a full quota would
    # be: the index cannot be created, nor rebuilt after it is moved aside.
    limited = (
        "import os, resource, sys; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    data_dir = tmp_path / "d"
    lines = run_node(
        ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
         "--upstream", "http://127.0.0.1:1"],
        prefix=[sys.executable, "-c", limited],
    )  # fmt: skip
    assert lines[-1].startswith(
        f"tcr-mirror: error: cannot use data directory {data_dir}: "
    )
    assert lines[-1].endswith("File too large")


# -- probes ---------------------------------------------------------------------


def test_probes_are_served_on_the_mirror_port_and_not_logged(
    registry: Registry, node_factory: NodeFactory
) -> None:
    node = node_factory("--upstream", registry.url)
    with httpx.Client(base_url=node.url, timeout=WAIT) as client:
        for path in ("/healthz", "/readyz", "/readyz?verbose"):
            assert client.get(path).status_code == 200
            assert client.head(path).status_code == 200
        assert client.post("/readyz").status_code == 405
        assert client.get("/v2/").status_code == 200
    logged = [e["target"] for e in node.events() if e.get("event") == "request"]
    assert logged == ["/v2/"]


def healthz_over(sock: socket.socket) -> bytes:
    """Ask ``/healthz`` on a keep-alive connection; all that came back,
    empty if the server closed it."""
    received = b""
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
        while not received.endswith(b"ok\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return received


def test_the_metrics_port_takes_few_connections_and_the_mirror_serves_on(
    registry: Registry, node_factory: NodeFactory
) -> None:
    """The metrics listener took up to 4096 connections, outside the share
    of the open-file limit the mirror's connections are kept within."""
    node = node_factory("--upstream", registry.url, "--metrics-listen", "127.0.0.1:0")
    host, port = metrics_address(node).rsplit(":", 1)
    held: list[socket.socket] = []
    try:
        for _ in range(_METRICS_MAX_CONNECTIONS):
            sock = socket.create_connection((host, int(port)), timeout=WAIT)
            held.append(sock)
            assert healthz_over(sock).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection((host, int(port)), timeout=WAIT) as past:
            assert healthz_over(past) == b""
        with httpx.Client(base_url=node.url, timeout=WAIT) as client:
            assert client.get("/v2/").status_code == 200
    finally:
        for sock in held:
            sock.close()


# -- drain ----------------------------------------------------------------------


def metrics_address(node: NodeProcess) -> str:
    (event,) = node.events_named("metrics_listening")
    return str(event["address"])


def refused(node: NodeProcess) -> bool:
    try:
        socket.create_connection((node.host, node.port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


class SlowClient:
    """A blob GET on a raw socket whose body is read only when asked."""

    def __init__(self, node: NodeProcess, digest: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        self.sock.settimeout(WAIT)
        self.sock.connect((node.host, node.port))
        self.sock.sendall(
            f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.sock.recv(65536)
            assert chunk, received
            received += chunk
        self.head, _, self.body = received.partition(b"\r\n\r\n")
        assert self.head.startswith(b"HTTP/1.1 200 "), self.head

    def read_to_end(self) -> bytes:
        """The rest of the body, until the node closes the connection."""
        parts = [self.body]
        while chunk := self.sock.recv(1 << 20):
            parts.append(chunk)
        self.sock.close()
        return b"".join(parts)


@pytest.fixture
def big_image(registry: Registry) -> PushedImage:
    layer = hashlib.sha256(b"drain").digest() * (BLOB_SIZE // 32)
    return push_image(registry, "app", "v1", layers=[layer])


def cached_node(
    node_factory: NodeFactory,
    registry: Registry,
    image: PushedImage,
    *args: str,
    config: str | None = None,
) -> NodeProcess:
    """A node with the image's layer stored."""
    node = node_factory("--upstream", registry.url, *args, config=config)
    digest, data = image.layers[0]
    got = httpx.get(f"{node.url}/v2/app/blobs/{digest}", timeout=WAIT)
    assert got.content == data
    return node


def signal_and_wait_for_drain(node: NodeProcess, signum: int = signal.SIGTERM) -> None:
    """Signal the node and wait for its drain to begin (or for it to end)."""
    process = node.process
    assert process is not None
    process.send_signal(signum)
    wait_until(
        lambda: bool(node.events_named("node_draining")) or process.poll() is not None,
        "the drain",
    )


def exit_status(node: NodeProcess) -> int:
    assert node.process is not None
    return node.process.wait(timeout=WAIT)


def test_sigterm_lets_a_body_in_flight_finish_and_exits_zero(
    registry: Registry, node_factory: NodeFactory, big_image: PushedImage
) -> None:
    node = cached_node(
        node_factory, registry, big_image, "--metrics-listen", "127.0.0.1:0"
    )
    metrics = f"http://{metrics_address(node)}"
    digest, data = big_image.layers[0]
    idle = socket.create_connection((node.host, node.port), timeout=WAIT)
    idle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
    client = SlowClient(node, digest)
    assert httpx.get(f"{metrics}/readyz", timeout=WAIT).status_code == 200

    signal_and_wait_for_drain(node)

    # The idle keep-alive connection is closed at once, new connections are
    # refused, and the node says it is not ready while the body goes on.
    assert idle.recv(65536) == b""
    idle.close()
    wait_until(lambda: refused(node), "the listener to close")
    readyz = httpx.get(f"{metrics}/readyz", timeout=WAIT)
    assert readyz.status_code == 503
    assert httpx.get(f"{metrics}/healthz", timeout=WAIT).status_code == 200
    assert client.read_to_end() == data
    assert exit_status(node) == 0
    (stopped,) = node.events_named("node_stopped")
    assert stopped["drained"] is True
    assert not node.events_named("node_drain_timed_out")


def test_sigterm_lets_a_fetch_from_a_slow_upstream_finish_and_keeps_the_blob(
    registry: Registry, node_factory: NodeFactory, big_image: PushedImage
) -> None:
    digest, data = big_image.layers[0]
    with FaultProxy(registry.url) as proxy:
        # The upstream stalls a few MiB in, then cuts; the node resumes.
        proxy.add_fault(
            Fault(FaultKind.STALL_BODY, times=1, after=4 << 20, seconds=2.0)
        )
        node = node_factory("--upstream", proxy.url, "--drain-timeout", "120")
        url = f"{node.url}/v2/app/blobs/{digest}"
        with ThreadPoolExecutor(max_workers=1) as pool:
            pulled = pool.submit(lambda: httpx.get(url, timeout=WAIT).content)
            path = f"/v2/app/blobs/{digest}"
            wait_until(lambda: proxy.count("GET", path) > 0, "the upstream GET")
            signal_and_wait_for_drain(node, signal.SIGINT)
            assert pulled.result(timeout=WAIT) == data
        assert exit_status(node) == 0
    hex_ = digest.split(":", 1)[1]
    stored = node.data_dir / "blobs" / "sha256" / hex_[:2] / hex_
    assert digest_of(stored.read_bytes()) == digest


def test_a_second_signal_cuts_the_drain(
    registry: Registry, node_factory: NodeFactory, big_image: PushedImage
) -> None:
    node = cached_node(node_factory, registry, big_image, "--drain-timeout", "600")
    digest, data = big_image.layers[0]
    client = SlowClient(node, digest)
    signal_and_wait_for_drain(node)
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    assert exit_status(node) == 0
    assert len(client.read_to_end()) < len(data)
    (cut,) = node.events_named("node_drain_cut")
    assert (cut["signal"], cut["responses_in_flight"]) == ("SIGTERM", 1)


def test_the_drain_timeout_cuts_the_drain(
    registry: Registry, node_factory: NodeFactory, big_image: PushedImage
) -> None:
    node = cached_node(
        node_factory, registry, big_image, config="drain_timeout = 0.5\n"
    )
    digest, data = big_image.layers[0]
    client = SlowClient(node, digest)
    signal_and_wait_for_drain(node)
    assert exit_status(node) == 0
    assert len(client.read_to_end()) < len(data)
    (timed_out,) = node.events_named("node_drain_timed_out")
    assert (timed_out["drain_timeout"], timed_out["responses_in_flight"]) == (0.5, 1)
    assert node.events_named("node_stopped")[0]["drained"] is False

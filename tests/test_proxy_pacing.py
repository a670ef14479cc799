"""Connections that never leave the host are not paced.

containerd reaches the node mirror over loopback or the node's own address.
Where the host's default congestion control paces (BBR), that only costs
CPU, so the mirror switches such connections to reno; the end-to-end test
reads the algorithm of the mirror's side of a real connection with ``ss``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.node import NodeProcess
from tcr_mirror.proxy._http import same_host

SS_TIMEOUT = 10.0


@pytest.mark.parametrize(
    ("peer", "local", "expected"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.5", "127.0.0.1", True),
        ("::1", "::1", True),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
        # The node's own address, as when containerd uses the node's IP.
        ("10.0.3.7", "10.0.3.7", True),
        ("fe80::1%eth0", "fe80::1%eth0", True),
        ("::ffff:10.0.3.7", "10.0.3.7", True),
        # Another host.
        ("10.0.3.8", "10.0.3.7", False),
        ("2001:db8::2", "2001:db8::1", False),
        ("::ffff:10.0.3.8", "::ffff:10.0.3.7", False),
        # Not an IP address at all (a Unix socket's path, say).
        ("", "", False),
        ("/run/x.sock", "/run/x.sock", False),
    ],
)
def test_same_host_tells_local_connections_from_remote_ones(
    peer: str, local: str, expected: bool
) -> None:
    assert same_host(peer, local) is expected


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(
        tmp_path / "node",
        # Never contacted: the test only opens a connection.
        ["--upstream", "http://127.0.0.1:9"],
        log_path=tmp_path / "node.log",
    )
    process.start()
    yield process
    process.kill()


def _congestion_of_server_side(port: int) -> str | None:
    """The congestion control ``ss`` shows for the socket on local ``port``."""
    output = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=SS_TIMEOUT,
    ).stdout
    words = output.split()
    for name in ("reno", "cubic", "bbr", "bbr2", "dctcp", "vegas", "westwood"):
        if name in words:
            return name
    return None


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_a_loopback_client_connection_uses_reno(node: NodeProcess) -> None:
    with socket.create_connection((node.host, node.port), timeout=10) as client:
        # Answered once, so the server has surely set up the connection.
        client.sendall(b"GET /v2/nothing HTTP/1.1\r\nhost: x\r\n\r\n")
        assert client.recv(64).startswith(b"HTTP/1.1 404")
        deadline = time.monotonic() + SS_TIMEOUT
        seen = _congestion_of_server_side(node.port)
        while seen is None and time.monotonic() < deadline:
            time.sleep(0.1)
            seen = _congestion_of_server_side(node.port)
        assert seen == "reno"

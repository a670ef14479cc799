"""The whole chain, every part a real process on 127.0.0.1.

``tcr-mirror sim`` plays TCR (API and registry token service), a real
docker-registry trusts the simulator's tokens, ``tcr-mirror control serve``
keeps a temporary instance token fresh, and ``tcr-mirror node`` pulls with
whatever token the control plane hands it, picking up renewals while it
runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from support.images import push_image
from support.node import NodeProcess
from support.registry import REGISTRY_BINARY, Registry
from support.waiting import wait_until

SECRET_ID = "AKIDchaintest000000"
SECRET_KEY = "chain-test-key-NEVER-LOG-91b2"
NODE_SECRET = "node-secret-chain-77"
ISSUER = "tcr-mirror-sim-chain"


class _SimTokenService:
    """What ``Registry`` needs to trust the simulator's registry tokens."""

    def __init__(self, announcement: dict[str, Any], cert: Path) -> None:
        self.realm = str(announcement["token_realm"])
        self.service = "tcr-chain"
        self.issuer = ISSUER
        self.users: dict[str, str] = {}
        self._cert = cert

    def write_cert_bundle(self, path: Path) -> Path:
        path.write_bytes(self._cert.read_bytes())
        return path


def _start(
    command: list[str], log: Path, event: str
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = dict(
        os.environ, TENCENTCLOUD_SECRET_ID=SECRET_ID, TENCENTCLOUD_SECRET_KEY=SECRET_KEY
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "tcr_mirror", *command],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[bytes] = []
    announcement: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if parsed.get("event") == event:
            announcement = parsed
            break
    threading.Thread(
        target=_copy, args=(process.stderr, log, lines), daemon=True
    ).start()
    if not announcement:
        process.kill()
        raise RuntimeError(
            f"{command[0]} did not announce {event}: {b''.join(lines)!r}"
        )
    return process, announcement


_COPIERS: list[threading.Thread] = []


def _copy(stream: IO[bytes], log: Path, first: list[bytes]) -> None:
    with stream, log.open("ab") as out:
        out.write(b"".join(first))
        for line in stream:
            out.write(line)
            out.flush()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    while _COPIERS:
        _COPIERS.pop().join(10)


def test_node_pulls_with_tokens_the_control_plane_renews(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    if not Path(REGISTRY_BINARY).exists():
        pytest.skip(f"{REGISTRY_BINARY} is not installed")
    logs = tmp_path / "logs"
    logs.mkdir()
    cert = tmp_path / "sim-cert.pem"
    sim, announced = _start(
        ["sim", "--listen", "127.0.0.1:0", "--registry-cert-out", str(cert),
         "--issuer", ISSUER, "--instance", "chain"],
        logs / "sim.log", "sim_listening",
    )  # fmt: skip
    processes.append(sim)
    registry_id = announced["instances"]["chain"]

    (tmp_path / "registry").mkdir()
    registry = Registry(
        tmp_path / "registry", token_server=_SimTokenService(announced, cert)
    )  # type: ignore[arg-type]
    registry.start()
    try:
        _run_chain(tmp_path, logs, processes, announced, registry, registry_id)
    finally:
        registry.stop()

    everything = "".join(log.read_text(errors="replace") for log in logs.iterdir())
    for secret in (SECRET_KEY, NODE_SECRET):
        assert secret not in everything


def _run_chain(
    tmp_path: Path,
    logs: Path,
    processes: list[subprocess.Popen[bytes]],
    announced: dict[str, Any],
    registry: Registry,
    registry_id: str,
) -> None:
    node_secret = tmp_path / "node-secret"
    node_secret.write_text(NODE_SECRET + "\n")
    serve, served = _start(
        ["control", "--endpoint", str(announced["endpoint"]), "--audit-log",
         str(tmp_path / "audit.jsonl"), "serve", "--listen", "127.0.0.1:0",
         "--node-secret-file", str(node_secret),
         "--registry", f"{registry.host}={registry_id}",
         # Renew after 0.02% of the token's hour: about every 0.7 s.
         "--renew-fraction", "0.0002"],
        logs / "serve.log", "control_serve_listening",
    )  # fmt: skip
    processes.append(serve)
    control_url = f"http://{served['listen']}"

    first = _credentials(control_url, registry.host)
    pusher = _PushTarget(registry.url, (first["username"], first["password"]))
    one = push_image(pusher, "team/one", "v1", layer_sizes=[50_000])
    two = push_image(pusher, "team/two", "v1", layer_sizes=[60_000])

    node = NodeProcess(
        tmp_path / "data",
        ["--upstream", registry.url, "--credentials-url", control_url,
         "--node-secret-file", str(node_secret), "--credentials-refresh", "0.2"],
        log_path=logs / "node.log",
    )  # fmt: skip
    node.start()
    try:
        _pull(node, "team/one", one.layers)
        # After a renewal, a pull that needs a new registry login (another
        # repository's scope) logs in with the renewed token. TCR offers no
        # way to revoke a temporary token, so the old one would still work;
        # what shows the pick-up is the node's own renewal events.
        seen = _credentials(control_url, registry.host)
        _credentials(control_url, registry.host, unlike=seen["password"])
        # The node logs a renewal each time the token it gets changes: the
        # first token, then the renewed one, within its 0.2 s refresh.
        wait_until(
            lambda: len(node.events_named("control_credentials_renewed")) >= 2,
            "the node to pick up the renewed token",
        )
        _pull(node, "team/two", two.layers)
    finally:
        assert node.stop() == 0


class _PushTarget:
    def __init__(self, url: str, credentials: tuple[str, str]) -> None:
        self.url = url
        self.credentials = credentials
        self.verify = True


def _credentials(url: str, registry: str, unlike: str = "") -> dict[str, str]:
    """Poll the control plane (bounded) for a token other than ``unlike``."""
    for _ in range(200):
        answer = httpx.get(
            f"{url}/v1/credentials",
            params={"registry": registry},
            headers={"Authorization": f"Bearer {NODE_SECRET}"},
        )
        if answer.status_code == 200 and answer.json()["password"] != unlike:
            return answer.json()  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError("the control plane handed out no (new) token")


def _pull(node: NodeProcess, repository: str, layers: list[tuple[str, bytes]]) -> None:
    with httpx.Client(base_url=node.url, timeout=30) as client:
        manifest = client.get(f"/v2/{repository}/manifests/v1")
        assert manifest.status_code == 200, manifest.text
        for digest, data in layers:
            blob = client.get(f"/v2/{repository}/blobs/{digest}")
            assert blob.content == data

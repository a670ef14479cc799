"""Real clients pull through the node mirror: skopeo and containerd."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import skopeo
from support.containerd import Containerd
from support.images import push_image, push_index
from support.node import NodeProcess
from support.registry import Registry

MIRROR_AGENT = "tcr-mirror/"


@pytest.fixture
def node(registry: Registry, tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(
        tmp_path / "data", ["--upstream", registry.url], log_path=tmp_path / "node.log"
    )
    yield process.start()
    process.kill()


def test_skopeo_copies_multi_layer_image(
    registry: Registry, node: NodeProcess, tmp_path: Path
) -> None:
    image = push_image(registry, "team/app", "v1", layer_sizes=[300_000, 70_000, 5])
    result = skopeo.copy(
        f"docker://{node.address}/team/app:v1", f"dir:{tmp_path / 'out'}"
    )
    assert set(result.blobs) >= set(image.blobs)
    assert registry.blob_gets("team/app", image.layers[0][0]) == 1


def test_skopeo_copies_multi_arch_index(
    registry: Registry, node: NodeProcess, tmp_path: Path
) -> None:
    index = push_index(registry, "multi", "v2", layer_sizes=[40_000])
    result = skopeo.copy(
        f"docker://{node.address}/multi:v2", f"oci:{tmp_path / 'oci'}", all_images=True
    )
    assert result.manifest_digest == index.index_digest
    for _platform, image in index.images:
        assert set(image.blobs) <= set(result.blobs)


def test_containerd_pulls_only_through_the_mirror(
    registry: Registry, node: NodeProcess, containerd: Containerd, tmp_path: Path
) -> None:
    image = push_image(registry, "team/app", "v1", layer_sizes=[200_000, 3000])
    certs = tmp_path / "certs.d"
    written = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "containerd-config",
         "--certs-dir", str(certs), "--mirror", node.url, registry.host],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert (certs / registry.host / "hosts.toml").exists()

    pulled = containerd.pull(f"{registry.host}/team/app:v1", certs)
    assert pulled.returncode == 0, pulled.stderr
    assert containerd.images()[f"{registry.host}/team/app:v1"] == image.manifest_digest
    assert set(image.blobs) <= containerd.content_digests()

    # Every request the registry saw came from the mirror, none from
    # containerd going around it.
    agents = {
        entry.user_agent for entry in registry.access_log() if entry.method == "GET"
    }
    pulls = [a for a in agents if not a.startswith("Go-http-client")]
    assert pulls
    assert all(agent.startswith(MIRROR_AGENT) for agent in pulls), agents

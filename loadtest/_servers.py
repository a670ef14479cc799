"""The servers of the benchmark: seeded upstream, nginx, and the two caches.

Big blobs are not pushed through the registry API: they are written straight
into docker-registry's filesystem layout before it starts (data file under
``blobs/``, a ``_layers`` link in the repository), which is what a push
leaves behind, at the speed of the disk. Manifests and small blobs go up
through the API, which also proves the layout: a manifest PUT fails if a
layer it names is not linked into the repository.

nginx serves the very same blob files (hard links, so the same page cache)
as static files with ``sendfile on``: the practical limit of this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.images import Descriptor  # noqa: E402
from support.node import NodeProcess  # noqa: E402
from support.pushclient import Pusher  # noqa: E402
from support.registry import Registry, free_port  # noqa: E402
from support.tls import make_tls_files  # noqa: E402

__all__ = [
    "Blob",
    "Mirror",
    "Nginx",
    "Registry",
    "Upstream",
    "free_port",
    "registry_blob_file",
]

REPOSITORY = "bench/app"
TAG = "v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
_BLOCK = 16 << 20
_V2 = Path("docker/registry/v2")


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def api_path(self) -> str:
        return f"/v2/{REPOSITORY}/blobs/{self.digest}"


def registry_blob_file(storage: Path, hex_digest: str) -> Path:
    """Where a docker-registry with ``storage`` keeps a blob's bytes."""
    return storage / _V2 / "blobs/sha256" / hex_digest[:2] / hex_digest / "data"


def write_blob(storage: Path, size: int, seed: int) -> Blob:
    """Writes a blob of ``size`` bytes into a registry's storage and repository.

    The bytes are one seeded random block repeated, each copy stamped with
    its index, so no two blocks (and no two seeds) are equal.
    """
    block = bytearray(random.Random(seed).randbytes(_BLOCK))
    hasher = hashlib.sha256()
    temp = storage / _V2 / f"seed-{seed}.tmp"
    temp.parent.mkdir(parents=True, exist_ok=True)
    with temp.open("wb") as out:
        for index in range((size + _BLOCK - 1) // _BLOCK):
            block[:8] = index.to_bytes(8, "little")
            chunk = memoryview(block)[: min(_BLOCK, size - index * _BLOCK)]
            out.write(chunk)
            hasher.update(chunk)
    hex_digest = hasher.hexdigest()

    data = registry_blob_file(storage, hex_digest)
    data.parent.mkdir(parents=True, exist_ok=True)
    os.rename(temp, data)
    link = storage / _V2 / "repositories" / REPOSITORY / "_layers/sha256" / hex_digest
    link.mkdir(parents=True, exist_ok=True)
    (link / "link").write_text(f"sha256:{hex_digest}")
    return Blob(f"sha256:{hex_digest}", size, data)


def drop_blob(blob: Blob) -> None:
    """Deletes a seeded blob's data file (its link stays; the space is freed)."""
    blob.path.unlink(missing_ok=True)


def tls_twin(upstream: Upstream, workdir: Path) -> Registry:
    """A second registry serving the upstream's storage over HTTPS.

    Its certificate comes from a CA made here, in ``workdir/tls/ca.pem``.
    """
    registry = Registry(workdir, tls=make_tls_files(workdir / "tls"))
    registry.storage = upstream.storage
    return registry


class Upstream:
    """The upstream docker-registry with the benchmark's blobs and manifest."""

    def __init__(self, workdir: Path) -> None:
        self.registry = Registry(workdir)
        self.blobs: dict[str, Blob] = {}
        self.manifest_digest = ""

    @property
    def storage(self) -> Path:
        return self.registry.storage

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def port(self) -> int:
        return self.registry.port

    def seed(self, name: str, size: int, seed: int) -> Blob:
        self.blobs[name] = write_blob(self.storage, size, seed)
        return self.blobs[name]

    def push_manifest(self) -> None:
        """Pushes a config and a manifest naming every seeded blob, tag ``v1``."""
        layer_type = "application/vnd.oci.image.layer.v1.tar"
        with Pusher(self.registry) as pusher:
            config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
            config_digest = pusher.blob(REPOSITORY, config)
            document = {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": Descriptor(
                    "application/vnd.oci.image.config.v1+json",
                    config_digest,
                    len(config),
                ).to_json(),
                "layers": [
                    Descriptor(layer_type, blob.digest, blob.size).to_json()
                    for blob in self.blobs.values()
                ],
            }
            body = json.dumps(document, separators=(",", ":")).encode()
            self.manifest_digest = pusher.manifest(REPOSITORY, TAG, body, MANIFEST_TYPE)

    def check(self) -> None:
        """Raises if the registry does not serve a seeded blob at its size."""
        for blob in self.blobs.values():
            response = httpx.head(self.registry.url + blob.api_path, timeout=10)
            length = response.headers.get("content-length")
            if response.status_code != 200 or length != str(blob.size):
                raise RuntimeError(f"upstream does not serve {blob.digest}")


_NGINX_CONF = """\
{user}daemon off;
master_process on;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/root;
    }}
}}
"""


class Nginx:
    """nginx in the foreground serving blob files as ``/<hex>``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def link(self, blob: Blob) -> str:
        """Hard-links a blob into the document root; returns its URL path."""
        target = self.workdir / "root" / blob.hex
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(blob.path, target)
        return f"/{blob.hex}"

    def start(self) -> None:
        (self.workdir / "root").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # Run as root, nginx would drop its workers to nobody, who cannot
        # enter the private temporary directory.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        conf = self.workdir / "nginx.conf"
        text = _NGINX_CONF.format(user=user, dir=self.workdir, port=self.port)
        conf.write_text(text)
        command = ["/usr/sbin/nginx", "-p", str(self.workdir), "-c", str(conf)]
        command += ["-e", str(self.workdir / "error.log")]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_listening(self.port, self._process)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # SIGQUIT is nginx's graceful stop; the master then ends its workers.
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=10)


class Mirror:
    """One ``tcr-mirror node`` process with a data directory of its own."""

    def __init__(
        self, workdir: Path, upstream_url: str, ca_file: Path | None = None
    ) -> None:
        workdir.mkdir(parents=True)
        self.workdir = workdir
        trust = ["--ca-file", str(ca_file)] if ca_file is not None else []
        self.node = NodeProcess(
            workdir / "data",
            ["--upstream", upstream_url, "--log-level", "info", *trust],
            log_path=workdir / "node.log",
        )
        self.peak_rss = 0

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def pid(self) -> int | None:
        process = self.node.process
        return process.pid if process is not None else None

    def start(self) -> Mirror:
        self.node.start()
        return self

    def sample_rss(self) -> int:
        """Reads the process's peak RSS (VmHWM) in bytes and remembers it."""
        process = self.node.process
        if process is None or process.poll() is not None:
            return self.peak_rss
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            return self.peak_rss
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
        return self.peak_rss

    def stop(self) -> None:
        self.sample_rss()
        try:
            self.node.stop()
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.node.kill()

    def remove_data(self) -> None:
        shutil.rmtree(self.workdir / "data", ignore_errors=True)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited at start")
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        return
    raise RuntimeError(f"server on port {port} did not start in time")

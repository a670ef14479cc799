"""Build test images, indexes and artifacts and push them to a registry.

Everything is deterministic: the same repository and tag (or seed) give the
same blobs and manifest digests on every run. Manifests are compact JSON
with sorted keys; layers are real tar.gz blobs (see ``support.layers``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .layers import (
    Layer,
    LayerFile,
    build_layer,
    diff_id_of,
    digest_of,
    make_targz,
    write_layer_file,
)
from .pushclient import Pusher, PushError, PushTarget, RegistryAuth

__all__ = [
    "OCI_EMPTY_CONFIG",
    "Descriptor",
    "PushError",
    "PushTarget",
    "PushedArtifact",
    "PushedImage",
    "PushedIndex",
    "Pusher",
    "RegistryAuth",
    "push_artifact",
    "push_helm_chart",
    "push_image",
    "push_index",
    "push_large_image",
    "push_signature",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_EMPTY_CONFIG = b"{}"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"

_MEDIA = {
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, OCI_INDEX),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST),
}
# A layer whose diff_id equals its digest was pushed uncompressed.
_UNCOMPRESSED = {
    "oci": OCI_LAYER_TAR,
    "docker": "application/vnd.docker.image.rootfs.diff.tar",
}
_CREATED = "2024-01-01T00:00:00Z"


@dataclass(frozen=True)
class Descriptor:
    """An OCI descriptor (what a manifest or index says about a blob)."""

    media_type: str
    digest: str
    size: int
    platform: tuple[str, str] | None = None
    artifact_type: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        if self.platform is not None:
            out["platform"] = {"os": self.platform[0], "architecture": self.platform[1]}
        return out


@dataclass(frozen=True)
class PushedImage:
    """An image manifest now in the registry, with everything it references."""

    repo: str
    tag: str | None
    manifest_bytes: bytes
    manifest_digest: str
    media_type: str
    config_digest: str
    config_bytes: bytes
    layers: list[tuple[str, bytes]]
    layer_files: list[LayerFile] = field(default_factory=list)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(
            self.media_type, self.manifest_digest, len(self.manifest_bytes)
        )

    @property
    def blobs(self) -> list[str]:
        """Digests of the config and every layer."""
        files = [layer.digest for layer in self.layer_files]
        return [self.config_digest, *(d for d, _ in self.layers), *files]


@dataclass(frozen=True)
class PushedIndex:
    """An OCI image index or Docker manifest list and its per-platform images."""

    repo: str
    tag: str | None
    index_bytes: bytes
    index_digest: str
    media_type: str
    images: list[tuple[tuple[str, str], PushedImage]]

    @property
    def manifest_digest(self) -> str:
        return self.index_digest

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.index_digest, len(self.index_bytes))


@dataclass(frozen=True)
class PushedArtifact:
    """A non-image OCI manifest (Helm chart, signature, SBOM...)."""

    repo: str
    tag: str | None
    manifest_bytes: bytes
    manifest_digest: str
    artifact_type: str | None
    config_digest: str
    layers: list[tuple[str, bytes]]

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(
            OCI_MANIFEST,
            self.manifest_digest,
            len(self.manifest_bytes),
            artifact_type=self.artifact_type,
        )


def _dumps(document: dict[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _seed_for(repo: str, tag: str | None, salt: str = "") -> int:
    # Stable across runs (unlike hash()), distinct per repository and tag.
    key = f"{repo}:{tag}:{salt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:6], "big")


# Images.


def _image_config(
    diff_ids: Sequence[str], platform: tuple[str, str]
) -> dict[str, object]:
    return {
        "created": _CREATED,
        "os": platform[0],
        "architecture": platform[1],
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": _CREATED, "created_by": f"tcr-mirror test layer {i}"}
            for i in range(len(diff_ids))
        ],
    }


def _put_image(
    pusher: Pusher,
    repo: str,
    tag: str | None,
    media: str,
    platform: tuple[str, str],
    layers: Sequence[tuple[str, int, str]],
) -> tuple[bytes, str, str, bytes]:
    """Pushes config and manifest for layers already uploaded.

    ``layers`` holds (digest, size, diff_id). Returns (manifest bytes,
    manifest digest, config digest, config bytes).
    """
    manifest_type, config_type, layer_type, _ = _MEDIA[media]
    config = _dumps(_image_config([diff for _, _, diff in layers], platform))
    config_digest = pusher.blob(repo, config)
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": Descriptor(config_type, config_digest, len(config)).to_json(),
            "layers": [
                Descriptor(
                    layer_type if diff_id != digest else _UNCOMPRESSED[media],
                    digest,
                    size,
                ).to_json()
                for digest, size, diff_id in layers
            ],
        }
    )
    digest = pusher.manifest(repo, tag or digest_of(manifest), manifest, manifest_type)
    return manifest, digest, config_digest, config


def push_image(
    registry: PushTarget,
    repo: str,
    tag: str | None = "latest",
    *,
    layer_sizes: Sequence[int] = (1024, 2048),
    layers: Sequence[bytes] | None = None,
    media: str = "oci",
    platform: tuple[str, str] = ("linux", "amd64"),
    seed: int | None = None,
) -> PushedImage:
    """Builds an image and pushes it; ``tag=None`` pushes by digest only.

    Layers are ``layers`` as given (gzip bytes are declared tar+gzip with
    the sha256 of the gunzipped bytes as diff_id; anything else is declared
    an uncompressed tar) or else built from ``layer_sizes`` as tar.gz blobs of
    seeded random bytes (``seed`` defaults to one derived from repo and tag).

    Raises:
        PushError: the registry refused a step.
    """
    if layers is None:
        base = _seed_for(repo, tag, "/".join(platform)) if seed is None else seed
        built = [build_layer(size, base + i) for i, size in enumerate(layer_sizes)]
    else:
        built = [Layer(data, digest_of(data), diff_id_of(data)) for data in layers]

    with Pusher(registry) as pusher:
        for layer in built:
            pusher.blob(repo, layer.data)
        refs = [(layer.digest, layer.size, layer.diff_id) for layer in built]
        manifest, digest, config_digest, config = _put_image(
            pusher, repo, tag, media, platform, refs
        )
    return PushedImage(
        repo=repo,
        tag=tag,
        manifest_bytes=manifest,
        manifest_digest=digest,
        media_type=_MEDIA[media][0],
        config_digest=config_digest,
        config_bytes=config,
        layers=[(layer.digest, layer.data) for layer in built],
    )


def push_large_image(
    registry: PushTarget,
    repo: str,
    tag: str | None,
    *,
    layer_sizes: Sequence[int],
    workdir: Path,
    media: str = "oci",
    seed: int | None = None,
    chunk_size: int = 16 << 20,
) -> PushedImage:
    """Like ``push_image`` for big layers: they are built as files in
    ``workdir`` and uploaded in chunks. ``PushedImage.layers`` is empty and
    ``layer_files`` lists the files.
    """
    base = _seed_for(repo, tag) if seed is None else seed
    files = []
    for i, size in enumerate(layer_sizes):
        path = workdir / f"layer-{base + i}.tar.gz"
        files.append(write_layer_file(path, size, base + i))

    with Pusher(registry, chunk_size=chunk_size) as pusher:
        for layer in files:
            pusher.blob_file(repo, layer.path, layer.digest)
        refs = [(layer.digest, layer.size, layer.diff_id) for layer in files]
        manifest, digest, config_digest, config = _put_image(
            pusher, repo, tag, media, ("linux", "amd64"), refs
        )
    return PushedImage(
        repo=repo,
        tag=tag,
        manifest_bytes=manifest,
        manifest_digest=digest,
        media_type=_MEDIA[media][0],
        config_digest=config_digest,
        config_bytes=config,
        layers=[],
        layer_files=files,
    )


def push_index(
    registry: PushTarget,
    repo: str,
    tag: str | None = "latest",
    *,
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    layer_sizes: Sequence[int] = (1024,),
    media: str = "oci",
) -> PushedIndex:
    """Pushes one image per platform (by digest), then the index on ``tag``.

    ``media="oci"`` gives an OCI image index, ``"docker"`` a Docker manifest
    list.
    """
    images = [
        (
            platform,
            push_image(
                registry,
                repo,
                None,
                layer_sizes=layer_sizes,
                media=media,
                platform=platform,
                seed=_seed_for(repo, tag, "/".join(platform)),
            ),
        )
        for platform in platforms
    ]
    index_type = _MEDIA[media][3]
    index = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [
                Descriptor(
                    image.media_type,
                    image.manifest_digest,
                    len(image.manifest_bytes),
                    platform=platform,
                ).to_json()
                for platform, image in images
            ],
        }
    )
    with Pusher(registry) as pusher:
        digest = pusher.manifest(repo, tag or digest_of(index), index, index_type)
    return PushedIndex(repo, tag, index, digest, index_type, images)


# Artifacts.


def push_artifact(
    registry: PushTarget,
    repo: str,
    tag: str | None,
    *,
    config_media_type: str,
    config: bytes,
    layers: Sequence[tuple[str, bytes]],
    artifact_type: str | None = None,
    subject: Descriptor | None = None,
    annotations: dict[str, str] | None = None,
) -> PushedArtifact:
    """Pushes an OCI manifest of any config and layer media types.

    ``layers`` holds (media type, bytes). ``tag=None`` pushes by digest.
    """
    with Pusher(registry) as pusher:
        config_digest = pusher.blob(repo, config)
        layer_refs = [
            Descriptor(media_type, pusher.blob(repo, data), len(data))
            for media_type, data in layers
        ]
        document: dict[str, object] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor(
                config_media_type, config_digest, len(config)
            ).to_json(),
            "layers": [layer.to_json() for layer in layer_refs],
        }
        if artifact_type is not None:
            document["artifactType"] = artifact_type
        if subject is not None:
            document["subject"] = subject.to_json()
        if annotations:
            document["annotations"] = dict(annotations)
        manifest = _dumps(document)
        digest = pusher.manifest(
            repo, tag or digest_of(manifest), manifest, OCI_MANIFEST
        )
    return PushedArtifact(
        repo=repo,
        tag=tag,
        manifest_bytes=manifest,
        manifest_digest=digest,
        artifact_type=artifact_type,
        config_digest=config_digest,
        layers=[
            (layer.digest, data)
            for layer, (_, data) in zip(layer_refs, layers, strict=True)
        ],
    )


def push_helm_chart(
    registry: PushTarget,
    repo: str,
    tag: str = "0.1.0",
    *,
    name: str = "demo",
) -> PushedArtifact:
    """Pushes a Helm chart the way ``helm push`` lays it out in OCI."""
    chart_yaml = f"apiVersion: v2\nname: {name}\nversion: {tag}\n".encode()
    chart = make_targz({f"{name}/Chart.yaml": chart_yaml})
    config = _dumps({"apiVersion": "v2", "name": name, "version": tag})
    return push_artifact(
        registry,
        repo,
        tag,
        config_media_type=HELM_CONFIG,
        config=config,
        layers=[(HELM_CHART, chart)],
    )


def push_signature(
    registry: PushTarget,
    repo: str,
    subject: Descriptor,
    *,
    artifact_type: str = "application/vnd.example.signature.v1+json",
    payload: bytes | None = None,
    tag: str | None = None,
) -> PushedArtifact:
    """Pushes an OCI 1.1 artifact (signature, SBOM...) that refers to
    ``subject``, with the empty config and one payload layer.
    """
    if payload is None:
        payload = _dumps({"signed": subject.digest})
    return push_artifact(
        registry,
        repo,
        tag,
        config_media_type=OCI_EMPTY,
        config=OCI_EMPTY_CONFIG,
        layers=[(artifact_type, payload)],
        artifact_type=artifact_type,
        subject=subject,
    )

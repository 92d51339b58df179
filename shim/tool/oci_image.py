"""Checkpoints as OCI images in containerd's image store (`checkpoint create --create-image NAME`), and back.

The image has one uncompressed layer: the checkpoint archive's tar (checkpoint/, config.dump, spec.dump, ...), as
Podman's checkpoint images do. It is an ordinary OCI image (manifest, config, layer), so `ctr images export` /
`import` and registries move it like any other; its manifest's annotations say it is a checkpoint and of which
container and image. containerd never runs it: `pyshim restore NAME` reads the layer and restores from it.
"""

from __future__ import annotations

import datetime
import json
import os

from shim.tool import archive
from shim.tool.containerd_api import ContainerdClient
from shim.tool.errors import ToolError

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
CHECKPOINT_ANNOTATION = "io.pyshim.checkpoint"
CONTAINER_ANNOTATION = "io.pyshim.checkpoint.container"
BASE_IMAGE_ANNOTATION = "io.pyshim.checkpoint.image"


def _arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def create(client: ContainerdClient, staging: str, name: str, *, container_id: str, base_image: str) -> str:
    """The staged checkpoint as image `name`; the manifest's digest."""
    layer_path = f"{staging}-layer.tar"
    try:
        archive.write(staging, layer_path, progress=archive.Progress(f"writing image {name}"))
        with client.lease():
            layer = client.write_file(layer_path, MEDIA_LAYER, ref=f"pyshim-checkpoint-layer-{os.getpid()}",
                                      labels={})
            now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
            config = {"created": now, "architecture": _arch(), "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [layer.digest]}, "config": {},
                      "history": [{"created": now, "created_by": f"pyshim checkpoint create {container_id}"}]}
            config_blob = client.write(json.dumps(config, sort_keys=True).encode(), MEDIA_CONFIG,
                                       ref=f"pyshim-checkpoint-config-{os.getpid()}", labels={})
            annotations = {CHECKPOINT_ANNOTATION: "true", CONTAINER_ANNOTATION: container_id,
                           BASE_IMAGE_ANNOTATION: base_image, "org.opencontainers.image.created": now}
            manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                        "config": {"mediaType": MEDIA_CONFIG, "digest": config_blob.digest, "size": config_blob.size},
                        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer.digest, "size": layer.size}],
                        "annotations": annotations}
            manifest_blob = client.write(
                json.dumps(manifest, sort_keys=True).encode(), MEDIA_MANIFEST,
                ref=f"pyshim-checkpoint-manifest-{os.getpid()}",
                labels={"containerd.io/gc.ref.content.config": config_blob.digest,
                        "containerd.io/gc.ref.content.l.0": layer.digest})
            client.create_image(name, manifest_blob, labels={CHECKPOINT_ANNOTATION: "true"})
        return manifest_blob.digest
    finally:
        try:
            os.unlink(layer_path)
        except FileNotFoundError:
            pass


def checkpoint_layer(client: ContainerdClient, name: str) -> str | None:
    """The digest of a checkpoint image's layer, None when containerd has no image `name`; ToolError for an image
    that is not a checkpoint."""
    import grpc

    try:
        image = client.image(name)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            return None  # (a path is no image name either)
        raise
    manifest = json.loads(client.read(image.target.digest))
    if (manifest.get("annotations") or {}).get(CHECKPOINT_ANNOTATION) != "true" or len(manifest.get("layers", [])) != 1:
        raise ToolError(f"image {name} is not a pyshim checkpoint image (no {CHECKPOINT_ANNOTATION} annotation); "
                        "to run it, use ctr run; to restore, give a checkpoint archive, directory or image")
    return manifest["layers"][0]["digest"]


def fetch(client: ContainerdClient, layer_digest: str, destination: str) -> None:
    """A checkpoint image's layer unpacked into destination."""
    layer_path = os.path.join(destination, ".layer.tar")
    try:
        client.read_to_file(layer_digest, layer_path)
        archive.extract(layer_path, destination)
    finally:
        try:
            os.unlink(layer_path)
        except FileNotFoundError:
            pass


LABEL_FILTER = f'labels."{CHECKPOINT_ANNOTATION}"==true'


def listed(client: ContainerdClient) -> list[dict]:
    """The checkpoint images in the namespace, as `checkpoint ls` shows entries."""
    entries = []
    for image in client.images(LABEL_FILTER):
        entry = {"name": image.name, "path": f"image {image.name}", "kind": "image", "size": 0}
        try:
            manifest = json.loads(client.read(image.target.digest))
            annotations = manifest.get("annotations") or {}
            entry.update(container=annotations.get(CONTAINER_ANNOTATION, ""),
                         image=annotations.get(BASE_IMAGE_ANNOTATION, ""),
                         checkpointed=annotations.get("org.opencontainers.image.created", ""),
                         size=sum(layer.get("size", 0) for layer in manifest.get("layers", [])))
        except Exception:  # noqa: BLE001 - an image whose content is gone is still listed, by name
            pass
        entries.append(entry)
    return entries

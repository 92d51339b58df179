"""Building the test image: busybox-static in an OCI image layout tarball, made locally and deterministically.

No image registry is reachable from the test machines, so the image is assembled here from /bin/busybox with
tarfile/hashlib/json only (busybox is only asked which applets it has): one uncompressed layer, a config with its
diff_id, a manifest and an index whose annotations name the image for `ctr images import`. The same inputs always
give the same bytes, so the tarball is cached under its content key and built once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IMAGE_REF = "localhost/pyshim-test/busybox:latest"
BUSYBOX = Path("/bin/busybox")
DEFAULT_COMMAND = ("/bin/sh",)
# A CRI pod's sandbox ("pause") image: the same busybox layer, a command that lives until it is signalled. The shell
# waits in `wait`, which a trapped TERM interrupts at once (a foreground sleep would delay the trap).
PAUSE_IMAGE_REF = "localhost/pyshim-test/pause:latest"
PAUSE_COMMAND = ("/bin/sh", "-c", "trap 'exit 0' TERM INT; sleep 86400 & wait")

# Applets the tests may use; those this busybox lacks (Debian 12's has no flock) are left out and reported.
APPLETS = (
    "awk", "cat", "date", "echo", "env", "false", "flock", "grep", "head", "hostname", "id", "ip", "kill", "ls",
    "mkdir", "mv", "nc", "pidof", "printf", "ps", "readlink", "rm", "sed", "seq", "sh", "sleep", "stat", "tail",
    "tee", "test", "timeout", "touch", "true", "usleep", "wc", "xargs",
)

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"

# Bump when the layout of the image changes, so cached tarballs from an older builder are not reused.
BUILDER_VERSION = "2"
# A fixed, non-zero timestamp: some tools treat mtime 0 as "unset".
EPOCH = 946684800  # 2000-01-01T00:00:00Z

_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class TestImage:
    """A built image tarball and the name `ctr images import` gives it."""

    __test__ = False  # not a pytest test class despite the name

    path: Path
    ref: str
    manifest_digest: str
    missing_applets: tuple[str, ...] = ()


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes, **extra: object) -> dict:
    return {"mediaType": media_type, "digest": digest(data), "size": len(data), **extra}


def tar_entry(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in sorted(entries, key=lambda e: e[0].name):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def rootfs_layer(busybox: bytes, applets: tuple[str, ...] = APPLETS) -> bytes:
    """The single layer: /bin/busybox plus applet symlinks, /etc/passwd and /etc/group for root, and /tmp."""
    return tar_bytes(rootfs_entries(busybox, applets))


def rootfs_entries(busybox: bytes, applets: tuple[str, ...] = APPLETS) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The busybox rootfs as tar entries, for images that add files to it (harness/redis_image.py)."""
    files = {
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
        "etc/group": b"root:x:0:\n",
        # The counter the checkpoint tests' workloads rewrite in place at a fixed width: a process dumped while it
        # has the file open is restored into a fresh rootfs (no --rw) only if the file is there, at the same size.
        "tmp/count": b"00000000\n",
    }
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for directory, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("root", 0o700),
                            ("run", 0o755), ("sys", 0o555), ("tmp", 0o1777)):
        entries.append((tar_entry(directory, tarfile.DIRTYPE, mode), None))
    entries.append((tar_entry("bin/busybox", tarfile.REGTYPE, 0o755, len(busybox)), busybox))
    for applet in applets:
        entries.append((tar_entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="busybox"), None))
    for name, data in files.items():
        entries.append((tar_entry(name, tarfile.REGTYPE, 0o644, len(data)), data))
    return entries


def image_blobs(layer: bytes, ref: str,
                command: tuple[str, ...] = DEFAULT_COMMAND) -> tuple[dict[str, bytes], bytes, str]:
    """Config, manifest and index for one layer: (blobs by digest, index.json bytes, manifest digest)."""
    arch = _GO_ARCH.get(platform.machine(), platform.machine())
    config = _json_bytes({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": list(command),
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
        "history": [{"created_by": "pyshim integration harness (integration/harness/image.py)"}],
    })
    manifest = _json_bytes({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": _descriptor(MEDIA_CONFIG, config),
        "layers": [_descriptor(MEDIA_LAYER, layer)],
    })
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = _json_bytes({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [_descriptor(
            MEDIA_MANIFEST, manifest,
            platform={"architecture": arch, "os": "linux"},
            annotations={
                # containerd's importer names the image from this one when present...
                "io.containerd.image.name": ref,
                # ...and the OCI annotation carries the tag, as the image-layout spec defines it.
                "org.opencontainers.image.ref.name": tag,
            },
        )],
    })
    blobs = {digest(data): data for data in (layer, config, manifest)}
    return blobs, index, digest(manifest)


def layout_tarball(blobs: dict[str, bytes], index: bytes) -> bytes:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/...) as one tar."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (tar_entry("blobs", tarfile.DIRTYPE, 0o755), None),
        (tar_entry("blobs/sha256", tarfile.DIRTYPE, 0o755), None),
    ]
    layout = _json_bytes({"imageLayoutVersion": "1.0.0"})
    for name, data in (("oci-layout", layout), ("index.json", index)):
        entries.append((tar_entry(name, tarfile.REGTYPE, 0o644, len(data)), data))
    for blob_digest, data in blobs.items():
        name = "blobs/sha256/" + blob_digest.removeprefix("sha256:")
        entries.append((tar_entry(name, tarfile.REGTYPE, 0o644, len(data)), data))
    return tar_bytes(entries)


def available_applets(busybox: Path) -> set[str]:
    """What this busybox binary implements (`busybox --list`)."""
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=10, check=True)
    return set(listed.stdout.split())


def build_test_image(cache_dir: Path, busybox: Path = BUSYBOX, ref: str = IMAGE_REF) -> TestImage:
    """The test image tarball for these inputs, built now or taken from cache_dir."""
    busybox_bytes = busybox.read_bytes()
    available = available_applets(busybox)
    applets = tuple(a for a in APPLETS if a in available)
    path = cached_layout(cache_dir, "busybox", [BUILDER_VERSION, ref, list(applets), digest(busybox_bytes)],
                         lambda: rootfs_layer(busybox_bytes, applets), ref)
    missing = tuple(a for a in APPLETS if a not in available)
    return TestImage(path=path, ref=ref, manifest_digest=manifest_digest(path), missing_applets=missing)


def build_pause_image(cache_dir: Path, busybox: Path = BUSYBOX, ref: str = PAUSE_IMAGE_REF,
                      command: tuple[str, ...] = PAUSE_COMMAND) -> TestImage:
    """The test image's layer with a long-lived command: a CRI pod's sandbox image (nothing is ever pulled)."""
    busybox_bytes = busybox.read_bytes()
    available = available_applets(busybox)
    applets = tuple(a for a in APPLETS if a in available)
    path = cached_layout(cache_dir, "pause", [BUILDER_VERSION, ref, list(applets), digest(busybox_bytes)],
                         lambda: rootfs_layer(busybox_bytes, applets), ref, command)
    return TestImage(path=path, ref=ref, manifest_digest=manifest_digest(path),
                     missing_applets=tuple(a for a in APPLETS if a not in available))


def cached_layout(cache_dir: Path, name: str, inputs: list, layer: Callable[[], bytes], ref: str,
                  command: tuple[str, ...] = DEFAULT_COMMAND) -> Path:
    """The image layout tarball of layer() named ref, under cache_dir keyed by inputs; built only when absent.
    A command other than the default is part of the key."""
    extra = [] if command == DEFAULT_COMMAND else [list(command)]
    key = hashlib.sha256(_json_bytes([*inputs, *extra, platform.machine()])).hexdigest()[:32]
    path = cache_dir / f"{name}-{key}.oci.tar"
    if not path.exists():
        blobs, index, _ = image_blobs(layer(), ref, command)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(layout_tarball(blobs, index))
        os.replace(tmp, path)  # concurrent builders write identical bytes; the rename keeps readers whole
    return path


def manifest_digest(path: Path) -> str:
    with tarfile.open(path) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    return index["manifests"][0]["digest"]

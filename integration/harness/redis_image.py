"""Building the redis test image: the busybox image plus Debian's redis-server and redis-cli and the shared objects
they load, nothing more.

redis comes from the .debs packaging/install.sh unpacked into PYSHIM_REDIS (the system package is never installed:
it would start a service). The shared objects are exactly those the dynamic loader resolves for the two binaries
(LD_TRACE_LOADED_OBJECTS, as ldd does, with the prefix's library directory searched first); each is copied, symlinks
resolved, under its soname at the path it has on the host, or at its package path when it came from the prefix.
/etc/passwd and /etc/group are the busybox image's (root only). Deterministic and cached by content like the busybox
image: the same binaries, libraries and busybox always give the same tarball.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

from .image import (
    APPLETS,
    BUSYBOX,
    TestImage,
    available_applets,
    cached_layout,
    digest,
    manifest_digest,
    rootfs_entries,
    tar_bytes,
    tar_entry,
)

REDIS_IMAGE_REF = "localhost/pyshim-test/redis:latest"
BINARIES = ("redis-server", "redis-cli")
# Bump when the layout of the image changes, so cached tarballs from an older builder are not reused.
REDIS_BUILDER_VERSION = "1"


def library_dirs(prefix: Path) -> str:
    """The multiarch library directories of an unpacked Debian tree, as a search path."""
    return ":".join(sorted(str(d) for d in (prefix / "usr" / "lib").glob("*-linux-gnu*") if d.is_dir()))


def loaded_objects(binary: Path, search_first: str) -> list[Path]:
    """The shared objects the loader maps for binary (its interpreter included, the vDSO not), in load order."""
    trace = subprocess.run([str(binary)], env={"LD_TRACE_LOADED_OBJECTS": "1", "LD_LIBRARY_PATH": search_first},
                           capture_output=True, text=True, timeout=10)
    if trace.returncode != 0 or "not found" in trace.stdout:
        raise RuntimeError(f"the loader cannot resolve every library of {binary}:\n{trace.stdout}{trace.stderr}")
    objects = []
    for line in trace.stdout.splitlines():
        # "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
        path = line.split("=>", 1)[-1].strip().split(" (", 1)[0]
        if path.startswith("/"):
            objects.append(Path(path))
    return objects


def redis_files(prefix: Path) -> dict[str, tuple[int, bytes]]:
    """What the image adds to busybox: image path -> (mode, bytes)."""
    files: dict[str, tuple[int, bytes]] = {}
    search_first = library_dirs(prefix)
    for name in BINARIES:
        binary = prefix / "usr" / "bin" / name
        # redis-server is a symlink to redis-check-rdb in the package; redis picks its role from argv[0]'s name.
        files[f"usr/bin/{name}"] = (0o755, binary.read_bytes())
        for loaded in loaded_objects(binary, search_first):
            inside = loaded.relative_to(prefix) if loaded.is_relative_to(prefix) else loaded.relative_to("/")
            files[str(inside)] = (loaded.stat().st_mode & 0o777, loaded.read_bytes())
    return files


def redis_layer(busybox: bytes, applets: tuple[str, ...], files: dict[str, tuple[int, bytes]]) -> bytes:
    entries = rootfs_entries(busybox, applets)
    present = {info.name for info, _ in entries}
    for name, (mode, data) in files.items():
        parent = Path(name).parent
        while str(parent) != "." and str(parent) not in present:
            entries.append((tar_entry(str(parent), tarfile.DIRTYPE, 0o755), None))
            present.add(str(parent))
            parent = parent.parent
        entries.append((tar_entry(name, tarfile.REGTYPE, mode, len(data)), data))
    return tar_bytes(entries)


def build_redis_image(cache_dir: Path, redis_prefix: Path, busybox: Path = BUSYBOX,
                      ref: str = REDIS_IMAGE_REF) -> TestImage:
    """The redis test image tarball for these inputs, built now or taken from cache_dir."""
    if not (redis_prefix / "usr" / "bin" / "redis-server").exists():
        raise FileNotFoundError(f"no redis-server under {redis_prefix}: re-run packaging/install-test.sh")
    busybox_bytes = busybox.read_bytes()
    available = available_applets(busybox)
    applets = tuple(a for a in APPLETS if a in available)
    files = redis_files(redis_prefix)
    inputs = [REDIS_BUILDER_VERSION, ref, list(applets), digest(busybox_bytes),
              sorted((name, mode, digest(data)) for name, (mode, data) in files.items())]
    path = cached_layout(cache_dir, "redis", inputs, lambda: redis_layer(busybox_bytes, applets, files), ref)
    missing = tuple(a for a in APPLETS if a not in available)
    return TestImage(path=path, ref=ref, manifest_digest=manifest_digest(path), missing_applets=missing)

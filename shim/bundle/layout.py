"""Names shared by the shim's actions: socket addresses, bundle files. Standard library only
(start and delete import it)."""

from __future__ import annotations

import os

try:  # the built-in implementation loads faster than OpenSSL's through hashlib
    from _sha256 import sha256  # type: ignore[import-not-found]  # CPython's private module: typeshed has no stub
except ImportError:  # pragma: no cover
    from hashlib import sha256

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
ADDRESS_FILE = "address"
INIT_PID_FILE = "init.pid"
RUNTIME_FILE = "pyshim-runtime"  # which OCI runtime and root Create used; read by delete
RUNTIME_LOG = "log.json"
RESTORE_MARKER = "restoring.json"  # a restore in progress, for delete to end (shim.criu.unfinished)


def group_id(bundle: str, container_id: str) -> str:
    """The shim group a container joins: containers of one pod/group share a shim."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            data = f.read()
    except OSError:
        return container_id
    if not any(key.encode() in data for key in GROUP_ANNOTATIONS):
        return container_id  # the common case, decided without loading json
    from shim.bundle.config import parse
    from shim.errors import InvalidArgument

    try:
        annotations = parse(data, "config.json").get("annotations") or {}
    except InvalidArgument:  # Create will say what is wrong with it
        return container_id
    for key in GROUP_ANNOTATIONS:
        if annotations.get(key):
            return annotations[key]
    return container_id


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """unix:// address of a shim's socket, derived as the Go shim library derives it."""
    digest = sha256(os.path.join(containerd_address, namespace, group).encode()).hexdigest()
    return f"unix://{SOCKET_DIR}/{digest}"


def write_atomically(path: str, data: str | bytes, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def write_settings(path: str, settings: dict[str, str]) -> None:
    """key=value lines: read back by `delete` without importing json."""
    write_atomically(path, "".join(f"{key}={value}\n" for key, value in settings.items()))


def read_settings(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return {}

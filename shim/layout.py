"""Names shared by the shim's actions: socket addresses, bundle files. Standard library only
(start and delete import it)."""

from __future__ import annotations

import hashlib
import json
import os

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
ADDRESS_FILE = "address"
INIT_PID_FILE = "init.pid"
RUNTIME_FILE = "pyshim-runtime.json"  # which OCI runtime and root Create used; read by delete
RUNTIME_LOG = "log.json"


def group_id(bundle: str, container_id: str) -> str:
    """The shim group a container joins: containers of one pod/group share a shim."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            annotations = json.load(f).get("annotations") or {}
    except (OSError, ValueError):
        return container_id
    for key in GROUP_ANNOTATIONS:
        if annotations.get(key):
            return annotations[key]
    return container_id


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """unix:// address of a shim's socket, derived as the Go shim library derives it."""
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, group).encode()).hexdigest()
    return f"unix://{SOCKET_DIR}/{digest}"


def write_atomically(path: str, data: str | bytes, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)
    os.rename(tmp, path)

"""A container's bundle as the server reads it: config.json parsed once, at Create, into a `Bundle` value, and the
paths the shim derives from the bundle directory.

One failure policy for every reader: a config.json that cannot be read, is not JSON, or is not an object fails
`Bundle.read` with InvalidArgument naming the file and why; nothing is guessed or defaulted. Parts the runtime
spec makes optional (annotations, namespaces, root) read as empty when absent.

The bundle belongs to containerd; the one thing pyshim writes into it is the CRIU configuration a restore hands to
runc (`Bundle.with_criu_config`, called by shim.criu.restore only), and the value it returns replaces the old one.
Standard library only, json imported when used: `start` reaches `parse` through shim.bundle.layout.group_id.
"""

from __future__ import annotations

import os
from typing import Any

from shim.bundle.layout import INIT_PID_FILE, write_atomically
from shim.errors import InvalidArgument

CONFIG_FILE = "config.json"
ROOTFS_DIR = "rootfs"  # where containerd's Mount list is mounted, whatever root.path says
CRIU_CONFIG_ANNOTATION = "org.criu.config"  # runc hands the file it names to CRIU as its configuration


def parse(data: bytes, path: str) -> dict[str, Any]:
    """config.json's bytes as a dict: the one place the file is parsed."""
    import json

    try:
        config = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path} is not a JSON object")
    return config


class Bundle:
    """A bundle directory and its config.json as read (an immutable value: a rewrite makes a new one)."""

    __slots__ = ("path", "config")

    def __init__(self, path: str, config: dict[str, Any]) -> None:
        self.path = path
        self.config = config

    @classmethod
    def read(cls, path: str) -> Bundle:
        file = os.path.join(path, CONFIG_FILE)
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidArgument(f"bundle {path}: cannot read {CONFIG_FILE}: {exc.strerror or exc}") from None
        return cls(path, parse(data, file))

    def __repr__(self) -> str:
        return f"Bundle({self.path!r})"

    # -- what config.json says ---------------------------------------------------------------------------------

    @property
    def annotations(self) -> dict[str, str]:
        return self.config.get("annotations") or {}

    @property
    def linux(self) -> dict[str, Any]:
        return self.config.get("linux") or {}

    @property
    def namespaces(self) -> list[dict[str, Any]]:
        return self.linux.get("namespaces") or []

    def namespace(self, kind: str) -> dict[str, Any] | None:
        """The namespace entry of that type ("pid", "network", ...), None when the container shares the host's."""
        return next((ns for ns in self.namespaces if ns.get("type") == kind), None)

    def has_own_namespace(self, kind: str) -> bool:
        """A new namespace of that type is made for the container (listed without a path)."""
        ns = self.namespace(kind)
        return ns is not None and not ns.get("path")

    def namespace_path(self, kind: str) -> str:
        """The path of a namespace the container joins (given by path, so it outlives the task); "" otherwise."""
        ns = self.namespace(kind)
        return (ns.get("path") or "") if ns is not None else ""

    @property
    def cgroups_path(self) -> str:
        return self.linux.get("cgroupsPath") or ""

    @property
    def root(self) -> str:
        """The container's root file system as the runtime sees it (root.path, relative to the bundle)."""
        root = (self.config.get("root") or {}).get("path") or ROOTFS_DIR
        return os.path.realpath(root if root.startswith("/") else os.path.join(self.path, root))

    # -- paths the shim derives from the bundle -----------------------------------------------------------------

    @property
    def rootfs(self) -> str:
        """Where the shim mounts containerd's Mount list."""
        return os.path.join(self.path, ROOTFS_DIR)

    @property
    def init_pid_file(self) -> str:
        return os.path.join(self.path, INIT_PID_FILE)

    def exec_pid_file(self, exec_id: str) -> str:
        return os.path.join(self.path, f"{exec_id}.pid")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- the one write ------------------------------------------------------------------------------------------

    def with_criu_config(self, criu_config: str) -> Bundle:
        """Point config.json's org.criu.config annotation at criu_config (runc gives that file to the restore's
        CRIU) and return the bundle as now written. The only write pyshim makes to containerd's bundle."""
        import json

        config = {**self.config, "annotations": {**self.annotations, CRIU_CONFIG_ANNOTATION: criu_config}}
        write_atomically(os.path.join(self.path, CONFIG_FILE), json.dumps(config))
        return Bundle(self.path, config)

"""Which namespaces a process is in, by inode: what CRIU's `external` keys and runc's state name."""

from __future__ import annotations

import os

# /proc/<pid>/ns entries for the namespace types an OCI config can name (and `time`).
TYPES = {"network": "net", "pid": "pid", "mount": "mnt", "ipc": "ipc", "uts": "uts", "user": "user",
         "cgroup": "cgroup", "time": "time"}


def inode_of(path: str) -> int:
    """The inode of a namespace file (a /proc/<pid>/ns entry or a bind mount of one)."""
    return os.stat(path).st_ino


def namespaces_of(pid: int) -> dict[str, int]:
    """OCI namespace type -> inode for each namespace of pid this kernel has."""
    found = {}
    for kind, entry in TYPES.items():
        try:
            found[kind] = inode_of(f"/proc/{pid}/ns/{entry}")
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise ProcessLookupError(f"no process {pid}") from None
            # a namespace type this kernel does not have
    return found


def same_namespace(path_a: str, path_b: str) -> bool:
    """Whether two namespace files name the same namespace (nsfs: one device, so the inode decides)."""
    a, b = os.stat(path_a), os.stat(path_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

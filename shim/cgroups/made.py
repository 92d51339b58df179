"""The cgroup directories a container's cgroupsPath names in each of the host's hierarchies, and removing those a
failed restore made.

`runc restore` creates the container's cgroups before CRIU runs; killed mid-restore (pyshim's timeout) it has not
yet written its state, so `runc delete` does not know them and they stay, empty, one per hierarchy. Only directories
that did not exist before the restore are removed, only with rmdir (which refuses a cgroup still holding a process
or a child cgroup), and never a parent: /<namespace> is shared by every container of the namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

from shim.cgroups.parse import parse_mountinfo_cgroups

HOST_CGROUPS = "/sys/fs/cgroup"


def directories(cgroups_path: str, *, mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    """<hierarchy>/<cgroups_path> for every cgroup hierarchy mounted under /sys/fs/cgroup; [] for a cgroups_path
    that is not an absolute cgroupfs path (systemd's "slice:prefix:name" form is systemd's to remove)."""
    if not cgroups_path.startswith("/") or ":" in cgroups_path or ".." in cgroups_path.split("/"):
        return []
    with open(mountinfo) as f:
        mounts = parse_mountinfo_cgroups(f.read())
    found = []
    for mount in mounts:
        if mount.root == "/" and (mount.mount_point + "/").startswith(HOST_CGROUPS + "/"):
            path = Path(mount.mount_point) / cgroups_path.lstrip("/")
            if path not in found:
                found.append(path)
    return found


def remove_made(cgroups_path: str, existed: set[Path]) -> list[Path]:
    """rmdir the container's cgroups (and their sub-cgroups, deepest first) that are not in existed; returns
    those that could not be removed (a process is still in them)."""
    left = []
    for top in directories(cgroups_path):
        if top in existed or not top.is_dir():
            continue
        for directory, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(Path(directory))
    return left

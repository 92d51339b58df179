"""Removing the cgroups that runc created for a test namespace.

ctr gives every container the cgroups path /<namespace>/<id>. `runc delete` removes the container's own cgroup but
not the /<namespace> parent, so without this every test would leave an empty directory in each hierarchy.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, the hybrid unified one, or the v2 root)."""
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split()[0] in ("cgroup", "cgroup2"):
            roots.append(Path(before.split()[4]))
    return roots


def remove_cgroup_tree(name: str) -> list[Path]:
    """rmdir <hierarchy>/<name> and its sub-cgroups, deepest first; cgroups still holding processes are kept.

    Returns the directories that could not be removed (not empty = something is still running there).
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"refusing to remove cgroup tree {name!r}")
    left: list[Path] = []
    for hierarchy in _hierarchies():
        top = hierarchy / name
        if not top.is_dir():
            continue
        for dirpath, _dirnames, _files in sorted(os.walk(top), key=lambda e: -len(e[0])):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(Path(dirpath))
    return left

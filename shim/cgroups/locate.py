"""Finding a process's cgroup directories: which cgroup mode the host uses, and where
/proc/<pid>/cgroup says the process lives in that mode's hierarchies.

Everything takes the cgroupfs root and the procfs root as paths, so tests can point them
at fake trees.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shim.cgroups.files import read_text
from shim.cgroups.parse import CgroupMount, ProcCgroup, parse_mountinfo_cgroups, parse_proc_cgroup

DEFAULT_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROC = Path("/proc")


class CgroupNotFound(LookupError):
    """The process has no cgroup to report on: it has exited (and been reaped), or its
    cgroup directories are gone. The task service maps this to a NotFound error."""


class Mode(enum.Enum):
    # Hybrid hosts (v1 controllers plus an empty /sys/fs/cgroup/unified) count as v1:
    # the controllers, and so the statistics, are all in the v1 hierarchies.
    V1 = "v1"
    V2 = "v2"


def detect_mode(root: Path = DEFAULT_ROOT) -> Mode:
    # The root of a cgroup2 mount always has cgroup.controllers; on v1 and hybrid hosts
    # the root is a tmpfs holding one directory per hierarchy.
    return Mode.V2 if (root / "cgroup.controllers").exists() else Mode.V1


@dataclass(frozen=True)
class V1Cgroup:
    """The process's directory in each v1 controller hierarchy that has one."""

    controllers: Mapping[str, Path]

    def path(self, controller: str) -> Path | None:
        return self.controllers.get(controller)


@dataclass(frozen=True)
class V2Cgroup:
    path: Path


Cgroup = V1Cgroup | V2Cgroup


def find_cgroup(pid: int, *, root: Path = DEFAULT_ROOT, proc: Path = DEFAULT_PROC) -> Cgroup:
    """The cgroup(s) of `pid`; raises CgroupNotFound if the process or its cgroup is gone."""
    text = read_text(proc / str(pid) / "cgroup")
    if text is None:
        raise CgroupNotFound(f"process {pid} not found")
    entries = parse_proc_cgroup(text)
    # When cgroupfs is mounted from a subtree (e.g. a shim inside a container without a
    # cgroup namespace: mount root /docker/<id>), /proc/<pid>/cgroup paths start with that
    # subtree; our own mountinfo says which prefix to strip.
    mounts = parse_mountinfo_cgroups(read_text(proc / "self" / "mountinfo") or "")
    if detect_mode(root) is Mode.V2:
        return _find_v2(pid, entries, mounts, root)
    return _find_v1(pid, entries, mounts, root)


def _relative(path: str, mount_root: str) -> str:
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]
    return path.lstrip("/")


def _find_v2(pid: int, entries: list[ProcCgroup], mounts: list[CgroupMount], root: Path) -> V2Cgroup:
    entry = next((e for e in entries if e.hierarchy == 0), None)
    if entry is None:
        raise CgroupNotFound(f"process {pid} has no cgroup v2 entry")
    real = root.resolve()
    mount_root = next((m.root for m in mounts if m.fstype == "cgroup2" and Path(m.mount_point) == real), "/")
    path = root / _relative(entry.path, mount_root)
    if not path.is_dir():
        raise CgroupNotFound(f"cgroup {path} of process {pid} does not exist")
    return V2Cgroup(path)


def _find_v1(pid: int, entries: list[ProcCgroup], mounts: list[CgroupMount], root: Path) -> V1Cgroup:
    found: dict[str, Path] = {}
    for entry in entries:
        if entry.hierarchy == 0:
            continue  # the (empty) unified hierarchy of a hybrid host
        for controller in entry.controllers:
            if controller.startswith("name="):
                continue  # named hierarchies (systemd) carry no statistics
            hierarchy = _hierarchy_dir(root, controller, entry.controllers)
            if hierarchy is None:
                continue
            real = hierarchy.resolve()
            mount_root = next((m.root for m in mounts if m.fstype == "cgroup" and Path(m.mount_point) == real), "/")
            path = hierarchy / _relative(entry.path, mount_root)
            if path.is_dir():
                found[controller] = path
    if not found:
        raise CgroupNotFound(f"no cgroup directory of process {pid} exists under {root}")
    return V1Cgroup(found)


def _hierarchy_dir(root: Path, controller: str, comounted: tuple[str, ...]) -> Path | None:
    # Usually <root>/<controller> (a symlink to e.g. "cpu,cpuacct" when co-mounted); some
    # hosts have only the co-mounted directory.
    for candidate in (root / controller, root / ",".join(comounted)):
        if candidate.is_dir():
            return candidate
    return None

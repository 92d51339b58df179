"""Where runc puts a container's cgroup on cgroup v2, from the OCI config's `linux.cgroupsPath`.

A restore needs it before runc has made the cgroup: on v2, runc (1.1) does not tell CRIU the new container's
cgroup (it does on v1, per controller), so CRIU puts the restored processes back into the cgroup they were dumped
from, that of the checkpointed container. Given as CRIU's cgroup-root, the new container's path takes that place.

runc reads cgroupsPath two ways: "slice:prefix:name" for its systemd driver (the unit `<prefix>-<name>.scope`
below the slice, a slice `a-b.slice` nested as /a.slice/a-b.slice) and a path for its cgroupfs driver (absolute
from the hierarchy's root, or relative to runc's own cgroup, which is the shim's).
"""

from __future__ import annotations

import posixpath

DEFAULT_SLICE = "system.slice"


def expand_slice(slice_name: str) -> str:
    """systemd's slice nesting: "a-b.slice" -> "/a.slice/a-b.slice"; "-.slice" (the root) -> "/"."""
    if slice_name == "-.slice":
        return "/"
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise ValueError(f"invalid systemd slice name {slice_name!r}")
    stem = slice_name[: -len(".slice")]
    parts = stem.split("-")
    if not all(parts):
        raise ValueError(f"invalid systemd slice name {slice_name!r}")
    return "".join(f"/{'-'.join(parts[: i + 1])}.slice" for i in range(len(parts)))


def container_cgroup_v2(cgroups_path: str, own_cgroup: str) -> str:
    """The container's cgroup as a path from the root of the unified hierarchy. own_cgroup is the cgroup runc runs
    in (the shim's, from /proc/self/cgroup) for a relative cgroupfs path. Raises ValueError for a path runc would
    refuse too."""
    parts = cgroups_path.split(":")
    if len(parts) == 3:
        parent, prefix, name = parts
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return posixpath.join(expand_slice(parent or DEFAULT_SLICE), unit)
    if not cgroups_path:
        raise ValueError("the container has no cgroupsPath")
    return posixpath.normpath(posixpath.join(own_cgroup, cgroups_path))

"""Moving a process into an existing cgroup by path: how the shim honours
Options.shim_cgroup (shim/server/daemon.py calls join for itself at startup).

The cgroup must already exist, as with the Go shim; it is not created here. On v1 the
path is joined in every hierarchy where it exists.

join_like moves a process into the cgroups of another (the shim forked by the fork server joins
those of the `start` that asked for it).
"""

from __future__ import annotations

from pathlib import Path

from shim.cgroups.files import read_text
from shim.cgroups.locate import DEFAULT_PROC, DEFAULT_ROOT, CgroupNotFound, Mode, detect_mode
from shim.cgroups.parse import CgroupMount, ProcCgroup, parse_mountinfo_cgroups, parse_proc_cgroup


def join(path: str, pid: int, *, root: Path = DEFAULT_ROOT) -> list[Path]:
    """Write `pid` into cgroup.procs of the cgroup `path` (e.g. "/shims/foo"); returns
    the directories joined. Raises CgroupNotFound if the cgroup exists nowhere."""
    relative = path.strip("/")
    if detect_mode(root) is Mode.V2:
        directories = [root / relative]
    else:
        # Each v1 hierarchy, once: co-mounted controllers appear as symlinks too.
        hierarchies = {h.resolve(): h for h in sorted(root.iterdir()) if h.is_dir() and h.name != "unified"}
        directories = [h / relative for h in hierarchies.values()]
    joined = []
    for directory in directories:
        if (directory / "cgroup.procs").exists():
            (directory / "cgroup.procs").write_text(str(pid))
            joined.append(directory)
    if not joined:
        raise CgroupNotFound(f"cgroup {path} does not exist under {root}")
    return joined


def join_like(source_pid: int, pid: int, *, proc: Path = DEFAULT_PROC, prefer: Path = DEFAULT_ROOT) -> list[str]:
    """Move `pid` into the cgroups `source_pid` is in, hierarchy by hierarchy, as if source_pid had forked
    it (how a shim forked by the fork server ends up where one forked by `start` would be). Hierarchies
    where the two already agree are left alone. Returns what could not be done (empty when all is done).

    Each hierarchy of /proc/<source_pid>/cgroup is found among the cgroup mounts of our mountinfo (a mount
    under `prefer` first), by its controllers (v1) or as cgroup2 (v2, and a hybrid host's unified one)."""
    wanted_text = read_text(proc / str(source_pid) / "cgroup") or ""
    wanted = parse_proc_cgroup(wanted_text)
    if not wanted:
        return [f"cgroups of process {source_pid} unreadable"]
    current_text = read_text(proc / str(pid) / "cgroup") or ""
    if current_text == wanted_text:
        return []  # the common case, decided without reading mountinfo
    current = {entry.hierarchy: entry.path for entry in parse_proc_cgroup(current_text)}
    mounts = parse_mountinfo_cgroups(read_text(proc / "self" / "mountinfo") or "")
    problems = []
    for entry in wanted:
        if current.get(entry.hierarchy) == entry.path:
            continue
        directory = _directory_of(entry, mounts, str(prefer))
        if directory is None:
            problems.append(f"no mount of cgroup hierarchy {entry.hierarchy}:{','.join(entry.controllers)} "
                            f"holds {entry.path}")
            continue
        try:
            (directory / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror or exc}")
    return problems


def _directory_of(entry: ProcCgroup, mounts: list[CgroupMount], prefer: str) -> Path | None:
    if entry.hierarchy == 0:
        candidates = [m for m in mounts if m.fstype == "cgroup2"]
    else:
        candidates = [m for m in mounts if m.fstype == "cgroup" and set(entry.controllers) <= set(m.super_options)]
    candidates.sort(key=lambda m: not (m.mount_point == prefer or m.mount_point.startswith(prefer.rstrip("/") + "/")))
    for mount in candidates:
        root = mount.root.rstrip("/")
        if entry.path != root and not entry.path.startswith(root + "/"):
            continue  # this mount shows another part of the hierarchy
        directory = Path(mount.mount_point) / entry.path[len(root):].lstrip("/")
        if directory.is_dir():
            return directory
    return None

"""Moving a process into an existing cgroup by path: how the shim honours
Options.shim_cgroup (shim/daemon.py calls join for itself at startup).

The cgroup must already exist, as with the Go shim; it is not created here. On v1 the
path is joined in every hierarchy where it exists.
"""

from __future__ import annotations

from pathlib import Path

from shim.cgroups.locate import DEFAULT_ROOT, CgroupNotFound, Mode, detect_mode


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

"""A cgroup v2 host, simulated on a hybrid one: commands run in a mount namespace whose /sys/fs/cgroup is cgroup2.

The test machines are cgroup v1 "hybrid" hosts: /sys/fs/cgroup is a tmpfs of v1 hierarchies plus the cgroup2 one at
/sys/fs/cgroup/unified. runc, CRIU, containerd and both shims choose their cgroup mode by what /sys/fs/cgroup is, so
a containerd started by `wrap()` (everything it starts inherits the namespace: shims, runc, CRIU, the containers'
processes) runs as on a cgroup v2 host: runc makes v2 cgroups, pauses through cgroup.freeze, CRIU dumps v2 cgroups.

What such a containerd cannot show: the controllers the host binds to v1 hierarchies (cpu, cpuacct, cpuset, memory,
io/blkio, pids, ...) are absent from the cgroup2 hierarchy (a controller lives in one hierarchy only), so there are no
limits, no memory or pids statistics and no OOM events in this mode.

The kernel still lists the v1 hierarchies in /proc/<pid>/cgroup, and CRIU dumps (and on restore recreates) the
whole subtree below a task's cgroup in each of them: at the host's root that would be every cgroup on the host. So
the command first joins a cgroup of its own in each v1 hierarchy (`isolate_v1()`, below the caller's; cpuset's given
its parent's cpus and mems), which on a real v2 host would not exist at all, and which `remove_v1()` removes.

The namespace is made by `unshare --mount` with propagation left as it is; the v1 cgroups are joined, then
/sys/fs/cgroup is made a slave (so the cgroup2 mount on it never propagates back) and cgroup2 is mounted there. It
ends with its last process; no mount of its own is left on the host. `share()` makes a directory (a test
containerd's temp dir) a shared mount first, so that what containerd and the shims mount below it inside the
namespace (the bundles' rootfs) is seen on the host too, where the tests read containers' files; `unshare_dir()`
undoes it. Cgroups runc makes there are in the host's unified hierarchy (/sys/fs/cgroup/unified/<namespace>/<id>),
where harness.cgroups removes them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from . import commands, mounts

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where a hybrid host mounts the cgroup2 hierarchy.
UNIFIED = CGROUP_ROOT / "unified"
# Why limits, memory metrics and OOM kills are not shown in this view (skip reasons).
NO_V1_CONTROLLERS = ("cgroup v2 view of a cgroup v1 hybrid host: the cpu, memory and pids controllers are bound to "
                     "the host's v1 hierarchies, so they are absent from cgroup2 and no limit, memory metric or OOM "
                     "kill can be shown")
# sh -c _SCRIPT cgroup2-view <cgroup.procs files to join...> -- <command...>
_SCRIPT = ('while [ "$1" != -- ]; do echo $$ > "$1" || exit 1; shift; done; shift; '
           'mount --make-rslave /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"')


def _fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at path, from our mountinfo (the last mount there wins)."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if before.split()[4] == str(path):
            found = after.split()[0]
    return found


def unavailable_reason() -> str | None:
    """Why the mode cannot run here, or None: it needs a hybrid host (cgroup2 at /sys/fs/cgroup/unified below a
    /sys/fs/cgroup mount) and unshare."""
    if _fstype(CGROUP_ROOT) == "cgroup2":
        return "the host is cgroup v2 already: every containerd of the suite runs in v2 mode"
    if _fstype(UNIFIED) != "cgroup2":
        return f"no cgroup2 hierarchy at {UNIFIED} (a cgroup v1-only host) to give a containerd as /sys/fs/cgroup"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def wrap(argv: Sequence[str], join: Sequence[Path] = ()) -> list[str]:
    """argv run in a new mount namespace whose /sys/fs/cgroup is cgroup2, after joining the v1 cgroups `join`
    (isolate_v1()); argv's process keeps the pid that unshare had (unshare and the shell exec)."""
    return [shutil.which("unshare") or "unshare", "--mount", "--propagation", "unchanged", "--",
            "sh", "-c", _SCRIPT, "cgroup2-view", *(str(d / "cgroup.procs") for d in join), "--", *argv]


def _v1_hierarchies() -> dict[frozenset[str], Path]:
    """Mount point of each v1 hierarchy under /sys/fs/cgroup by its controllers (named ones as name=<name>), from
    our mountinfo. (Not elsewhere: a CRIU at work mounts the same hierarchies in its transient cgroup yard.)"""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fstype, _source, options = after.split()[:3]
        point = Path(before.split()[4])
        if fstype == "cgroup" and point.parent == CGROUP_ROOT:
            found[frozenset(options.split(",")) - {"rw", "ro"}] = point
    return found


def isolate_v1(name: str) -> list[Path]:
    """A cgroup `name` below ours in every v1 hierarchy mounted here (see the module docstring); the directories,
    in the order to join them."""
    mounts_by_controllers = _v1_hierarchies()
    made = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        wanted = frozenset(controllers.split(","))
        mount = next((point for names, point in mounts_by_controllers.items() if wanted <= names), None)
        if hierarchy == "0" or mount is None:
            continue
        directory = mount / path.lstrip("/") / name
        directory.mkdir(exist_ok=True)
        made.append(directory)
        if "cpuset" in wanted:  # a new cpuset has no cpus or memory nodes to run on until given some
            for item in ("cpuset.cpus", "cpuset.mems"):
                (directory / item).write_text((directory.parent / item).read_text())
    return made


def remove_v1(directories: Sequence[Path], timeout: float = 3.0) -> list[Path]:
    """rmdir what isolate_v1() made, once nothing runs there; returns those still busy after timeout seconds (a v1
    cgroup can stay busy for a moment after its last process was reaped, seen on a loaded machine)."""
    busy = list(directories)
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for directory in busy:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(directory)
        if not left or time.monotonic() >= deadline:
            return left
        busy = left
        time.sleep(0.05)


def share(directory: Path) -> None:
    """Make directory a mount of its own in a shared peer group, so mounts made below it in a namespace made
    afterwards by wrap() appear on the host (and the other way round)."""
    commands.run(["mount", "--bind", str(directory), str(directory)], timeout=10)
    commands.run(["mount", "--make-private", str(directory)], timeout=10)
    commands.run(["mount", "--make-shared", str(directory)], timeout=10)


def unshare_dir(directory: Path) -> list[str]:
    """Unmount what is left below directory, then directory's own bind mount. Returns what was left below it."""
    left = mounts.unmount_all_under(directory)
    return [point for point in left if point != str(directory)]

"""Process relations as /proc shows them: a process's parent, children and descendants, its command line.

Only reads: a pid read here may be reused by the time it is used, so whoever signals one takes a pidfd first and
checks the relation again (shim.children.spawn.kill_tree, shim.criu.restore).
"""

from __future__ import annotations

import os


def parent_of(pid: int) -> int | None:
    """The parent pid from /proc/<pid>/stat, or None when the process is gone."""
    fields = _stat_after_comm(pid)
    return None if fields is None else int(fields[1])


def session_of(pid: int) -> int | None:
    """The session id from /proc/<pid>/stat, or None when the process is gone."""
    fields = _stat_after_comm(pid)
    return None if fields is None else int(fields[3])


def _stat_after_comm(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after "pid (comm) ": state, ppid, pgrp, session, ... (comm may hold spaces
    and parentheses, so the split starts after its last ")")."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)  # a plain read: a buffered file object costs more than the read on a busy host
    except OSError:
        return None
    finally:
        os.close(fd)
    return stat[stat.rindex(b")") + 2:].split()


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from one pass over /proc (every process's stat: about 3 us each)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (parent := parent_of(int(entry))) is not None:
            children.setdefault(parent, []).append(int(entry))
    return children


def children_of(pid: int) -> list[int]:
    return children_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    """The processes below pid, parents before children."""
    children = children_by_parent()
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(0), [])
        found += below
        queue += below
    return found


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []

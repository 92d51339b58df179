"""Process lookups and signals by pid, through /proc and pidfds.

A pidfd refers to one process for its whole life, so signalling or waiting through it cannot hit a different
process that reused the pid. Every lookup here is by pid: nothing matches processes by name.
"""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path


def _stat_after_name(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state (field 3) on, or None if pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after the last ')' are fixed.
    return stat.rsplit(")", 1)[1].split()


def parent_pid(pid: int) -> int | None:
    """The parent of pid, or None if pid is gone."""
    fields = _stat_after_name(pid)
    return int(fields[1]) if fields else None


def is_running(pid: int) -> bool:
    """True unless pid is gone or a zombie (exited, waiting to be reaped)."""
    fields = _stat_after_name(pid)
    return fields is not None and fields[0] != "Z"


def children_of(ppid: int) -> list[int]:
    """Pids whose parent is ppid (zombies included)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_pid(int(entry)) == ppid:
            children.append(int(entry))
    return children


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def open_pidfd(pid: int) -> int | None:
    """A pidfd for pid, or None if the process is already gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def send_signal(pidfd: int, signum: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass  # it ended on its own


def wait_exited(pidfd: int, timeout: float) -> bool:
    """True once the process behind pidfd has exited (a pidfd becomes readable then), False on timeout."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def kill_child_of(ppid: int, pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal pid only if it is still ppid's child (checked after taking a pidfd, so the check cannot go stale)."""
    pidfd = open_pidfd(pid)
    if pidfd is None:
        return
    try:
        if parent_pid(pid) == ppid:
            send_signal(pidfd, signum)
    finally:
        os.close(pidfd)


def unix_socket_listeners(path: str | Path) -> list[int]:
    """Pids holding a listening unix socket bound to path (from /proc/net/unix and /proc/<pid>/fd)."""
    so_acceptcon = 0x10000
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & so_acceptcon:
            inodes.add(f"socket:[{fields[6]}]")
    if not inodes:
        return []
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    holders.append(int(entry))
                    break
            except OSError:
                continue
    return holders

"""A restore in progress, recorded in the bundle, so that `delete` can end it when the server died mid-restore.

A shim server SIGKILLed while `runc restore` runs leaves runc, its CRIU and the half-restored tree running (they are
the server's children, re-parented), runc's private bind of the rootfs mounted at `<state dir>/criu-root`, runc's
state and the cgroups the restore made. containerd then runs the shim's `delete` action, on its hot path: the server
writes a marker file (`restoring.json` in the bundle) when a restore starts, records runc's pid and start time once
it is spawned (and the lazy-pages daemon's for a lazy restore), and removes the marker when the restore is over, cleaned
up or not. `delete` reads nothing more than the marker's absence in the common case; when it is there:

1. end(): SIGKILL each recorded process whose start time is still the recorded one, with its descendants (CRIU and
   the restored tree; every pidfd taken and the parent checked again before a signal), wait (bounded) until they
   are gone, unmount criu-root and whatever CRIU left mounted in the restore's work dir (CRIU's cgroup yard);
   release_network_lock(): the lock CRIU took in a namespace given by path (recorded with what it held before);
2. `delete` runs `runc delete --force` as it always does when runc has state for the id;
3. remove_leftovers(): runc's state dir when runc never wrote state.json (files and empty dirs only, nothing
   through a mount), the cgroups the restore made (rmdir only, never a parent), the restore's own work dir, the
   marker. The rootfs is never touched: `delete` unmounts it afterwards, as always.

Standard library only (json loaded only when a marker is found): `delete` imports it.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import time

from shim.bundle.layout import RESTORE_MARKER as MARKER
from shim.bundle.layout import write_atomically
from shim.forkserver.wire import process_start_time as start_time

# Seconds for SIGKILLed processes to be gone: they go within milliseconds, and one still there after a second is
# stuck in the kernel and would not go in three either. With the runtime's delete after it (3 s at most,
# shim/actions/delete.py) the action stays within containerd's 5 s for `delete`.
GONE_WAIT = 1.0


def path(bundle: str) -> str:
    return os.path.join(bundle, MARKER)


def record(bundle: str, facts: dict) -> None:
    """Write (or rewrite) the marker: what `delete` needs to end and undo this restore."""
    import json

    write_atomically(path(bundle), json.dumps(facts), mode=0o600)


def add_process(bundle: str, facts: dict, pid: int) -> None:
    """Record a process the restore started (runc, the lazy-pages daemon), with its start time, in facts and the
    marker."""
    started = start_time(pid)
    if started is not None:
        facts.setdefault("processes", []).append([pid, started])
        record(bundle, facts)


def forget(bundle: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path(bundle))


def load(marker: str) -> dict:
    import json

    try:
        with open(marker, "rb") as f:
            facts = json.load(f)
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def end(facts: dict) -> list[int]:
    """SIGKILL the recorded processes that are still what was recorded, with everything below them; wait until
    they are gone (bounded); unmount criu-root and the work dir's mounts. The pids signalled."""
    from shim.children.proctree import children_by_parent, parent_of
    from shim.rootfs.unmount import unmount_all

    children = children_by_parent()
    pidfds: dict[int, int] = {}
    for entry in facts.get("processes") or []:
        try:
            pid, started = int(entry[0]), int(entry[1])
        except (TypeError, ValueError, IndexError):
            continue
        _open_tree(pid, started, children, pidfds, parent_of)
    try:
        for pidfd in pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _wait_gone(list(pidfds.values()), GONE_WAIT)
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)
    # criu-root first: removing runc's state through a still-mounted bind of the rootfs would empty the rootfs.
    for mounted in (os.path.join(str(facts.get("state_dir") or ""), "criu-root"), str(facts.get("work") or "")):
        if os.path.isabs(mounted):
            unmount_all(mounted)
    return sorted(pidfds)


def _open_tree(pid: int, started: int, children: dict[int, list[int]], pidfds: dict[int, int], parent_of) -> None:
    """Pidfds of pid (if its start time is the recorded one) and of its descendants (each checked, under its pidfd,
    to be still the child of one already taken)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    if start_time(pid) != started:  # gone, or the pid is another process's now
        os.close(pidfd)
        return
    pidfds[pid] = pidfd
    queue = [pid]
    while queue:
        parent = queue.pop(0)
        for child in children.get(parent, []):
            if child in pidfds:
                continue
            try:
                fd = os.pidfd_open(child)
            except OSError:
                continue
            if parent_of(child) != parent:
                os.close(fd)
                continue
            pidfds[child] = fd
            queue.append(child)


def _wait_gone(pidfds: list[int], timeout: float) -> None:
    """Until every process is gone (a pidfd turns readable when its process exits) or the timeout."""
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    left = set(pidfds)
    deadline = time.monotonic() + timeout
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for fd, _ in poller.poll(remaining * 1000):
            left.discard(fd)
            poller.unregister(fd)


def release_network_lock(facts: dict, firewall=None) -> list[str]:
    """After end(): the network lock the restore's CRIU took in a namespace given by path, and did not live to
    remove, removed (what the namespace held before the restore stays). What was removed, or why it could not be,
    as readable lines. Imports asyncio and shim.criu.netlock only when there is a lock to remove."""
    recorded = facts.get("network_lock")
    if not isinstance(recorded, dict):
        return []
    import asyncio

    from shim.criu import netlock

    lock = netlock.Lock.from_record(recorded.get("lock"))
    if lock is None:
        return []
    try:
        return asyncio.run(netlock.release(firewall or netlock.CommandFirewall(), lock,
                                           before=netlock.Held.from_record(recorded.get("held"))))
    except Exception as exc:  # noqa: BLE001 - delete goes on: the rest of the clean-up matters as much
        return [f"CRIU's {lock.method} network lock in {lock.namespace} could not be removed: {exc}"]


def remove_leftovers(facts: dict, marker: str) -> list[str]:
    """After `runc delete --force`: runc's unfinished state, the cgroups the restore made, CRIU's root yard, its own
    work dir, the marker. What could not be removed, as readable lines."""
    problems = remove_unfinished_state(str(facts.get("state_dir") or ""))
    cgroups_path = str(facts.get("cgroups_path") or "")
    if cgroups_path:
        from pathlib import Path

        from shim.cgroups.made import remove_made

        problems += [f"cgroup {p} still in use" for p in remove_made(cgroups_path,
                                                                      {Path(p) for p in facts.get("cgroups_before")
                                                                       or []})]
    work = str(facts.get("work") or "")
    if os.path.isabs(work):
        from shim.criu.mount_yard import remove_left_behind

        remove_left_behind(os.path.join(work, "restore.log"))  # the killed CRIU's root yard in the host's /tmp
    if facts.get("own_work") and os.path.isabs(work):
        from shim.rootfs.unmount import mount_points_under

        if not mount_points_under(work):  # never remove through a mount that would not go
            shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
    return problems


def remove_unfinished_state(state: str) -> list[str]:
    """runc's state dir for the id when `runc delete` could not remove it because runc was killed before writing
    state.json: its files, and empty directories only (rmdir), so nothing is removed through a mount. A state
    with state.json is runc's to remove (runc delete said why it did not)."""
    if not os.path.isabs(state):
        return []
    try:
        entries = os.listdir(state)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"cannot read {state}: {exc}"]
    if "state.json" in entries:
        return []
    problems = []
    for name in entries:
        entry = os.path.join(state, name)
        try:
            if os.path.isdir(entry) and not os.path.islink(entry):
                os.rmdir(entry)
            else:
                os.unlink(entry)
        except OSError as exc:
            problems.append(f"cannot remove {entry}: {exc}")
    with contextlib.suppress(OSError):
        os.rmdir(state)
    return problems

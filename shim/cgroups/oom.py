"""Watching a container's cgroup for OOM events, for the shim to publish TaskOOM.

    async with contextlib.aclosing(watch_oom(cgroup)) as events:
        async for count in events:
            ...  # `count` new OOM events since the last one

The iterator ends when the cgroup is gone (v1, v2) or has no processes left (v2). It
holds file descriptors, so close it (aclosing) when the container goes away early.

v1: an eventfd registered on memory.oom_control through cgroup.event_control; the kernel
signals it on every OOM in the cgroup, and also once when the cgroup is removed, which is
told apart by the directory being gone.
v2: memory.events, whose oom_kill counter the kernel bumps on each OOM kill, watched with
inotify (the kernel raises IN_MODIFY on it), or polled when asked to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path

from shim.cgroups import inotify
from shim.cgroups.files import read_parsed
from shim.cgroups.locate import Cgroup, CgroupNotFound, V1Cgroup
from shim.cgroups.parse import parse_flat_keyed
from shim.fdwait import readable


class OomKillCounter:
    """Turns successive memory.events readings into counts of new OOM kills. A reading
    without an oom_kill line (a file caught mid-rewrite, or an old kernel) changes
    nothing; a counter that went down (a recreated cgroup) becomes the new baseline."""

    def __init__(self, baseline: int = 0) -> None:
        self.kills = baseline

    def update(self, events: Mapping[str, int]) -> int:
        kills = events.get("oom_kill")
        if kills is None:
            return 0
        new = max(kills - self.kills, 0)
        self.kills = kills
        return new


def watch_oom(cgroup: Cgroup, *, poll_interval: float | None = None) -> AsyncGenerator[int, None]:
    """OOM events of `cgroup` as they happen. On v2 only kills count, and inotify is used
    unless `poll_interval` (seconds) is given. Raises CgroupNotFound, on the call or the
    first iteration, if the cgroup has no memory controller files."""
    if isinstance(cgroup, V1Cgroup):
        memory = cgroup.path("memory")
        if memory is None:
            raise CgroupNotFound(f"{cgroup} has no memory cgroup")
        return _watch_v1(memory)
    if poll_interval is not None:
        return _poll_v2(cgroup.path, poll_interval)
    return _watch_v2(cgroup.path)


async def _watch_v1(path: Path) -> AsyncGenerator[int, None]:
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        try:
            control = os.open(path / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CgroupNotFound(f"{path} has no memory.oom_control") from None
        try:
            # The kernel takes its own references; both fds may be closed afterwards.
            (path / "cgroup.event_control").write_text(f"{efd} {control}")
        finally:
            os.close(control)
        while True:
            await readable(efd)
            try:
                count = os.eventfd_read(efd)
            except BlockingIOError:
                continue
            if not path.is_dir():
                return  # the removal notification, not an OOM
            yield count
    finally:
        os.close(efd)


def _populated(path: Path) -> bool:
    events = read_parsed(path / "cgroup.events", parse_flat_keyed)
    # No cgroup.events (a fake tree, or the cgroup is gone): decided by memory.events.
    return events is None or events.get("populated", 1) != 0


def _read_events(path: Path) -> dict[str, int] | None:
    return read_parsed(path / "memory.events", parse_flat_keyed)


async def _watch_v2(path: Path) -> AsyncGenerator[int, None]:
    fd = inotify.init()
    try:
        try:
            inotify.add_watch(fd, path / "memory.events", inotify.IN_MODIFY)
        except FileNotFoundError:
            raise CgroupNotFound(f"{path} has no memory.events") from None
        # Emptying the cgroup modifies cgroup.events, which ends the watch.
        with contextlib.suppress(FileNotFoundError):
            inotify.add_watch(fd, path / "cgroup.events", inotify.IN_MODIFY)
        # The baseline is read after the watch exists, so no change can fall between.
        counter = OomKillCounter()
        counter.update(_read_events(path) or {})
        while True:
            await readable(fd)
            try:
                events = inotify.parse_events(os.read(fd, 4096))
            except BlockingIOError:
                continue
            current = _read_events(path)
            if current is None:
                return
            if new := counter.update(current):
                yield new
            if any(e.mask & inotify.IN_IGNORED for e in events) or not _populated(path):
                return
    finally:
        os.close(fd)


async def _poll_v2(path: Path, interval: float) -> AsyncGenerator[int, None]:
    counter = OomKillCounter()
    first = _read_events(path)
    if first is None:
        raise CgroupNotFound(f"{path} has no memory.events")
    counter.update(first)
    while True:
        await asyncio.sleep(interval)
        current = _read_events(path)
        if current is None:
            return
        if new := counter.update(current):
            yield new
        if not _populated(path):
            return

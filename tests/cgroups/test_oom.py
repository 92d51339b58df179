import asyncio
import contextlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from shim.cgroups import CgroupNotFound, Mode, OomKillCounter, V1Cgroup, V2Cgroup, detect_mode, find_cgroup, watch_oom
from shim.cgroups.inotify import IN_IGNORED, IN_MODIFY, Event, parse_events


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_counter_reports_new_kills_only():
    counter = OomKillCounter()
    assert counter.update({"oom": 0, "oom_kill": 0}) == 0
    assert counter.update({"oom": 1, "oom_kill": 1}) == 1
    assert counter.update({"oom": 2, "oom_kill": 1}) == 0  # an OOM without a kill
    assert counter.update({"oom": 5, "oom_kill": 4}) == 3
    assert counter.update({}) == 0  # file read mid-rewrite: no change, baseline kept
    assert counter.update({"oom_kill": 5}) == 1
    assert counter.update({"oom_kill": 0}) == 0  # went down: new baseline
    assert counter.update({"oom_kill": 2}) == 2


def test_counter_baseline():
    assert OomKillCounter(baseline=3).update({"oom_kill": 3}) == 0


def test_parse_inotify_events():
    raw = (struct.pack("iIII", 1, IN_MODIFY, 0, 0)
           + struct.pack("iIII", 2, IN_IGNORED, 0, 16) + b"name\0".ljust(16, b"\0"))
    assert parse_events(raw) == [Event(1, IN_MODIFY, ""), Event(2, IN_IGNORED, "name")]
    assert parse_events(raw[:10]) == []


def fake_v2(tmp_path: Path) -> V2Cgroup:
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return V2Cgroup(tmp_path)


def rewrite(path: Path, text: str) -> None:
    # In place, as the kernel does: a replaced file would be a different inode to inotify.
    with open(path, "r+") as f:
        f.truncate()
        f.write(text)


async def drive(cgroup: V2Cgroup, poll_interval: float | None) -> list[int]:
    events = cgroup.path / "memory.events"
    seen: list[int] = []

    async def consume():
        async with contextlib.aclosing(watch_oom(cgroup, poll_interval=poll_interval)) as oom:
            async for count in oom:
                seen.append(count)

    async def settle(condition=lambda: True):
        for _ in range(200):
            await asyncio.sleep(0.01)
            if condition():
                return

    task = asyncio.create_task(consume())
    await settle()
    rewrite(events, "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n")
    await settle(lambda: len(seen) == 1)
    rewrite(events, "low 0\nhigh 0\nmax 2\noom 2\noom_kill 1\n")  # an OOM, no kill
    await settle()
    rewrite(events, "low 0\nhigh 0\nmax 4\noom 4\noom_kill 3\n")
    await settle(lambda: len(seen) == 2)
    rewrite(cgroup.path / "cgroup.events", "populated 0\nfrozen 0\n")
    await task  # ends: inotify sees cgroup.events change, polling reads it next round
    return seen


def test_v2_inotify_watch_yields_kills_and_ends_when_empty(tmp_path):
    assert run(drive(fake_v2(tmp_path), None)) == [1, 2]


def test_v2_polling_watch(tmp_path):
    assert run(drive(fake_v2(tmp_path), 0.01)) == [1, 2]


def test_v2_watch_ends_when_cgroup_removed(tmp_path):
    cgroup = fake_v2(tmp_path)

    async def main():
        async with contextlib.aclosing(watch_oom(cgroup)) as oom:
            consume = asyncio.ensure_future(anext(oom, None))
            await asyncio.sleep(0.05)
            (tmp_path / "memory.events").unlink()  # inotify: IN_ATTRIB/IN_DELETE_SELF, IN_IGNORED
            rewrite(tmp_path / "cgroup.events", "populated 0\n")
            return await consume

    assert run(main()) is None


def test_missing_memory_files_are_not_found(tmp_path):
    with pytest.raises(CgroupNotFound):
        watch_oom(V1Cgroup({}))

    async def first(poll_interval):
        return await anext(watch_oom(V2Cgroup(tmp_path), poll_interval=poll_interval))

    for poll_interval in (None, 0.01):
        with pytest.raises(CgroupNotFound):
            run(first(poll_interval))


def _v1_memory_cgroup() -> Path | None:
    if os.geteuid() != 0 or detect_mode() is not Mode.V1:
        return None
    try:
        memory = find_cgroup(os.getpid()).path("memory")
    except CgroupNotFound:
        return None
    return memory if memory is not None and os.access(memory, os.W_OK) else None


@pytest.mark.skipif(_v1_memory_cgroup() is None, reason="needs root and a writable cgroup v1 memory hierarchy")
def test_v1_eventfd_watch_sees_a_real_oom_kill():
    child = _v1_memory_cgroup() / f"pyshim-oom-test-{os.getpid()}"
    child.mkdir()
    try:
        (child / "memory.limit_in_bytes").write_text(str(32 << 20))

        async def main():
            async with contextlib.aclosing(watch_oom(V1Cgroup({"memory": child}))) as oom:
                first = asyncio.ensure_future(anext(oom))
                await asyncio.sleep(0.05)  # let the generator register its eventfd
                hog = (
                    f"open({str(child / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"
                    "b = bytearray(256 << 20)\n"
                    "b[::4096] = b'x' * len(range(0, len(b), 4096))\n"
                )
                process = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", hog])
                assert process.returncode == -9
                assert await first >= 1
                # Removing the cgroup also signals the eventfd; that ends the iteration.
                after = asyncio.ensure_future(anext(oom, None))
                await asyncio.sleep(0.05)
                child.rmdir()
                assert await after is None

        run(main())
    finally:
        with contextlib.suppress(FileNotFoundError):
            child.rmdir()

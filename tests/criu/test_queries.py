"""VERSION, FEATURE_CHECK and CHECK against the installed CRIU, compared with what the machine
says by other means (criu's CLI, the kernel config)."""

import asyncio
import gzip
import os
import re
import signal

from shim.children.spawn import run as run_command
from shim.criu.rpc import CriuRpc

from .helpers import needs_criu, reaping, run

pytestmark = needs_criu


def kernel_config() -> dict[str, str]:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return dict(line.strip().split("=", 1) for line in f if "=" in line and not line.startswith("#"))
    except OSError:
        return {}


def test_version_matches_the_cli():
    async def scenario():
        async with reaping() as reaper:
            cli = await run_command(reaper, ["criu", "--version"])
            return await CriuRpc(reaper).version(), cli.stdout.decode()

    version, cli = run(scenario())
    major, minor, sublevel = map(int, re.search(r"Version: (\d+)\.(\d+)(?:\.(\d+))?", cli).group(1, 2, 3))
    assert version[:3] == (major, minor, sublevel or 0)
    assert version[:2] == (4, 2)  # the project's CRIU (environment.md); older ones fail on this kernel


def test_feature_check_reports_what_the_kernel_has():
    async def scenario():
        async with reaping() as reaper:
            rpc = CriuRpc(reaper)
            cli = {name: (await run_command(reaper, ["criu", "check", "--feature", name])).status == 0
                   for name in ("mem_dirty_track", "uffd-noncoop", "pidfd_store")}
            return await rpc.feature_check(), await rpc.feature_check(mem_track=False, pidfd_store=False), cli

    features, only_lazy, cli = run(scenario())
    assert features == {"mem_track": cli["mem_dirty_track"], "lazy_pages": cli["uffd-noncoop"],
                        "pidfd_store": cli["pidfd_store"]}
    assert only_lazy == {"lazy_pages": features["lazy_pages"]}  # only what was asked is reported
    config = kernel_config()
    if config:  # the kernel's own word: soft-dirty tracking and userfaultfd
        assert features["mem_track"] == (config.get("CONFIG_MEM_SOFT_DIRTY") == "y")
        if config.get("CONFIG_USERFAULTFD") != "y":
            assert not features["lazy_pages"]
    # The project's machines (environment.md): userfaultfd yes, soft-dirty no.
    assert features["lazy_pages"] is True and features["mem_track"] is False


def test_check_passes():
    async def scenario():
        async with reaping() as reaper:
            return await CriuRpc(reaper).check()

    assert run(scenario()) is None


def test_a_criu_started_ahead_serves_the_next_call_and_a_dead_one_is_replaced():
    async def scenario():
        async with reaping() as reaper:
            rpc = CriuRpc(reaper)
            ahead = rpc.start_ahead()
            first = await rpc.version()
            served = ahead.pid
            ahead = rpc.start_ahead()
            os.kill(ahead.pid, signal.SIGKILL)  # dies while it waits for its request
            for _ in range(200):
                if not ahead.waiting():
                    break
                await asyncio.sleep(0.01)
            dead_waiting = ahead.waiting()
            second = await rpc.version()  # a fresh CRIU answers instead
            return first, second, served, dead_waiting

    first, second, served, dead_waiting = run(scenario())
    assert first == second and served > 0
    assert dead_waiting is False

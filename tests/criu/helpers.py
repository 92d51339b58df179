"""Scaffolding for the CRIU tests: a loop with a reaper, processes to dump, /proc state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal

import pytest

from shim.children.reaper import Reaper
from shim.children.spawn import spawn

needs_criu = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("criu") is None,
                                reason="needs root and criu on PATH")


def run(coro, timeout: float = 15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def reaping():
    """A reaper serving SIGCHLD for the duration, recording every exit it sees. No subreaper:
    the tests' processes and a restored tree (rst_sibling) are direct children."""
    reaper = Reaper()
    reaper.exits = []
    reaper.add_listener(reaper.exits.append)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
    try:
        yield reaper
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)


@contextlib.asynccontextmanager
async def target(reaper: Reaper, *argv: str):
    """A process in its own session (CRIU refuses to dump a tree sharing our session unless
    shell_job), killed and reaped at the end if it is still there."""
    with reaper.subscribe() as exits:
        pid = spawn(argv or ("sleep", "1000"), setsid=True)
        try:
            await wait_for_exec(pid, argv[-1] if argv else "1000")
            yield pid, exits
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # reaped already (dumped without leave_running): its exit was delivered
            else:
                await exits.wait(pid)


async def wait_for_exec(pid: int, last_arg: str) -> None:
    """Dumping a process halfway through exec (unshare -> sleep) would dump the wrong image."""
    for _ in range(200):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if args[0].endswith(b"sleep") and last_arg.encode() in args:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pid {pid} never became sleep")


def state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: R, S, T (stopped), t (ptrace stop), Z..."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2]


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def images_dir(tmp_path, name: str = "images") -> int:
    """An images directory and an fd of ours for it (criu_opts.images_dir_fd)."""
    path = tmp_path / name
    path.mkdir(mode=0o700)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


class FakeDumper:
    """shim.criu.checkpoint's Dumper seam without CRIU or /proc: nothing is refused, the facts are the ones given
    (by default a container at pid with nothing to declare), and the dump is dump(job), a coroutine function the test
    writes (it may write CRIU's log into job.work, images into job.partial.path, or raise as CRIU would)."""

    def __init__(self, dump, facts=None) -> None:
        self._dump = dump
        self._facts = facts

    async def preflight(self, options) -> None:
        pass

    async def facts(self, container_id, bundle, pid, options):
        from shim.criu.plan import ContainerFacts

        return self._facts or ContainerFacts(rootfs="/", pid=pid)

    async def dump(self, job, ready) -> None:
        await self._dump(job)


class FakeFirewall:
    """shim.criu.netlock's Firewall seam, in memory: iptables-save output per tool, what iptables-restore was fed,
    the nftables tables, the ones deleted; and the inode of every namespace asked about (it must be open then)."""

    def __init__(self, *, iptables: str = "", tables=()) -> None:
        self.saves = {"iptables-save": iptables, "ip6tables-save": iptables}
        self.restored: list[tuple[str, str]] = []
        self.tables = list(tables)
        self.deleted: list[str] = []
        self.namespaces: list[int] = []

    def _seen(self, fd: int) -> None:
        self.namespaces.append(os.fstat(fd).st_ino)

    async def iptables_save(self, fd: int, tool: str) -> str:
        self._seen(fd)
        return self.saves[tool]

    async def iptables_restore(self, fd: int, tool: str, commands: str) -> None:
        self._seen(fd)
        self.restored.append((tool, commands))

    async def nft_tables(self, fd: int) -> list[tuple[str, str]]:
        self._seen(fd)
        return list(self.tables)

    async def nft_delete(self, fd: int, names: list[str]) -> None:
        self._seen(fd)
        self.deleted.extend(names)


class FailingFirewall(FakeFirewall):
    """A namespace whose tools fail (nsenter, netlink)."""

    async def iptables_save(self, fd: int, tool: str) -> str:
        raise OSError("nsenter: exit status 1")

    async def nft_tables(self, fd: int) -> list[tuple[str, str]]:
        raise OSError("netlink: EPERM")

"""Non-terminal fifo IO: the runtime's pipes on one side, the client's fifos on the other."""

import asyncio
import os
import stat

import pytest

from shim.background import BackgroundTasks
from shim.stdio import ProcessIO, StdioConfig, StdioError
from tests.stdio.helpers import fifos, read_to_eof, reaping, run, run_child, write_and_close

ME = {"uid": os.getuid(), "gid": os.getgid()}
IDS = {"container_id": "c1", "namespace": "default", "background": BackgroundTasks()}


def test_round_trip_through_the_fifos(tmp_path):
    stdin, stdout, stderr = fifos(tmp_path, "in", "out", "err")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig(stdin, stdout, stderr), reaper=reaper, **ME, **IDS)
            try:
                stdio = io.runtime_stdio
                assert all(isinstance(fd, int) for fd in stdio)
                assert stat.S_ISFIFO(os.fstat(stdio[1]).st_mode)  # a pipe, not the client's fifo
                out = asyncio.ensure_future(read_to_eof(stdout))
                err = asyncio.ensure_future(read_to_eof(stderr))
                child = asyncio.ensure_future(run_child(reaper, ["sh", "-c", "cat; echo done >&2"], stdio))
                await asyncio.sleep(0.05)  # the process has its fds: what runc create leaves behind
                io.close_after_start()
                await write_and_close(stdin, b"hello through stdin\n")
                io.close_stdin()  # CloseIO after the client finished writing
                status = await child
                assert await io.wait_drained(2)
                return status, await out, await err
            finally:
                io.close()

    assert run(scenario()) == (0, b"hello through stdin\n", b"done\n")


def test_close_stdin_makes_cat_see_end_of_file(tmp_path):
    stdin, stdout = fifos(tmp_path, "in", "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig(stdin, stdout, ""), reaper=reaper, **ME, **IDS)
            try:
                assert io.runtime_stdio[2] is None  # no stderr requested: /dev/null
                child = asyncio.ensure_future(run_child(reaper, ["cat"], io.runtime_stdio))
                await asyncio.sleep(0.05)
                io.close_after_start()
                # No client writer is open, yet cat keeps waiting: the shim holds the fifo open.
                await asyncio.sleep(0.2)
                assert not child.done()
                io.close_stdin()
                return await asyncio.wait_for(child, 2)
            finally:
                io.close()

    assert run(scenario()) == 0


def test_fifos_nobody_opened_do_not_block_creation(tmp_path):
    stdin, stdout, stderr = fifos(tmp_path, "in", "out", "err")

    async def scenario():
        async with reaping() as reaper:
            io = await asyncio.wait_for(
                ProcessIO.create(StdioConfig(stdin, stdout, stderr), reaper=reaper, **ME, **IDS), 1)
            try:
                # The process can write (into the fifo's buffer) although no client reads.
                status = await run_child(reaper, ["sh", "-c", "echo out; echo err >&2"], io.runtime_stdio)
                io.close_after_start()
                return status, await io.wait_drained(2)
            finally:
                io.close()

    assert run(scenario()) == (0, True)


def test_missing_fifo_is_reported_by_path(tmp_path):
    async def scenario():
        async with reaping() as reaper:
            await ProcessIO.create(StdioConfig("", str(tmp_path / "nope"), ""), reaper=reaper, **ME, **IDS)

    with pytest.raises(StdioError, match=f"stdout fifo {tmp_path}/nope does not exist"):
        run(scenario())


def test_file_uri_receives_both_streams(tmp_path):
    log_file = tmp_path / "logs" / "deeper" / "c1.log"  # directories are created

    async def scenario():
        async with reaping() as reaper:
            uri = f"file://{log_file}"
            io = await ProcessIO.create(StdioConfig("", uri, uri), reaper=reaper, **ME, **IDS)
            try:
                status = await run_child(reaper, ["sh", "-c", "echo to-out; echo to-err >&2"], io.runtime_stdio)
                io.close_after_start()
                assert await io.wait_drained(2)
                return status
            finally:
                io.close()

    assert run(scenario()) == 0
    assert sorted(log_file.read_text().splitlines()) == ["to-err", "to-out"]


def test_close_is_idempotent_and_releases_the_fifos(tmp_path):
    stdin, stdout = fifos(tmp_path, "in", "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig(stdin, stdout, ""), reaper=reaper, **ME, **IDS)
            io.close()
            io.close()

    run(scenario())
    # Opening the stdin fifo for writing without a reader fails: the shim's reader is closed.
    with pytest.raises(OSError):
        os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_close_releases_every_fd(tmp_path):
    stdin, stdout, stderr = fifos(tmp_path, "in", "out", "err")

    async def scenario():
        async with reaping() as reaper:
            before = open_fds()
            io = await ProcessIO.create(StdioConfig(stdin, stdout, stderr), reaper=reaper, **ME, **IDS)
            opened = open_fds() - before
            await run_child(reaper, ["sh", "-c", "echo out; echo err >&2"], io.runtime_stdio)
            io.close_after_start()
            await io.wait_drained(1)
            io.close()
            return opened, open_fds() - before

    opened, left = run(scenario())
    # stdin: fifo reader + shim writer + pipe (2); stdout and stderr: fifo writer + shim reader + pipe (2)
    assert len(opened) == 12
    assert left == set()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a pipe to another user needs root")
def test_runtime_ends_belong_to_io_uid_and_gid(tmp_path):
    stdin, stdout = fifos(tmp_path, "in", "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig(stdin, stdout, ""), reaper=reaper, uid=1234, gid=5678, **IDS)
            try:
                return [(os.fstat(fd).st_uid, os.fstat(fd).st_gid) for fd in io.runtime_stdio[:2]]
            finally:
                io.close()

    assert run(scenario()) == [(1234, 5678), (1234, 5678)]

"""Terminal IO: the test plays runc, which connects to --console-socket and sends the pty master."""

import asyncio
import os
import socket

import pytest

from shim.background import BackgroundTasks
from shim.stdio import ProcessIO, StdioConfig, StdioError
from shim.stdio.console import window_size
from tests.stdio.helpers import fifos, read_to_eof, reaping, run

IDS = {"container_id": "c1", "namespace": "default", "background": BackgroundTasks()}


def send_master(path: str) -> int:
    """What runc does: allocate a pty, send the master (named) over the socket, keep the slave."""
    master, slave = os.openpty()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        socket.send_fds(sock, [os.ttyname(slave).encode()], [master])
    os.close(master)
    return slave


async def read_until(fd: int, marker: bytes, timeout: float = 2) -> bytes:
    """Read a pty slave (canonical mode: line by line) until marker shows up."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    seen = b""
    async with asyncio.timeout(timeout):
        while marker not in seen:
            ready = loop.create_future()
            loop.add_reader(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            seen += os.read(fd, 4096)
    return seen


def test_console_copies_both_ways_and_resizes(tmp_path):
    stdin, stdout = fifos(tmp_path, "in", "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig(stdin, stdout, "", terminal=True), reaper=reaper, **IDS)
            try:
                assert io.runtime_stdio == (None, None, None)
                socket_dir = os.path.dirname(io.console_socket)
                assert os.stat(socket_dir).st_mode & 0o777 == 0o700
                slave = await asyncio.to_thread(send_master, io.console_socket)
                await io.receive_console(timeout=2)
                assert not os.path.exists(socket_dir)  # one connection only, then it is gone
                copied: list[bytes] = []
                out = asyncio.ensure_future(read_to_eof(stdout, copied))

                io.resize(132, 43)
                size = window_size(slave)

                # stdin stays open until the process is done: its end would hang the console up
                # (as upstream does), racing the output this test wants to see
                with open(stdin, "wb", buffering=0) as client:
                    client.write(b"typed by the user\n")
                    typed = await read_until(slave, b"typed by the user")
                    os.write(slave, b"printed by the process\n")
                    # The hangup of the slave's last close may discard what the tty still buffers (the kernel's
                    # doing, the same under any shim): close once the copy has it, as a process's exit comes later.
                    for _ in range(200):
                        if b"printed by the process" in b"".join(copied):
                            break
                        await asyncio.sleep(0.01)
                    os.close(slave)  # the process exits: EIO on the master ends the copy
                    assert await io.wait_drained(2)
                return size, typed, await out
            finally:
                io.close()

    size, typed, out = run(scenario())
    assert size == (132, 43)
    assert typed.startswith(b"typed by the user")
    assert b"printed by the process\r\n" in out  # through the line discipline (ONLCR)
    assert b"typed by the user" in out  # the tty's echo


def test_end_of_stdin_releases_the_console_like_upstream(tmp_path):
    stdin, stdout = fifos(tmp_path, "in", "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig(stdin, stdout, "", terminal=True), reaper=reaper, **IDS)
            try:
                slave = await asyncio.to_thread(send_master, io.console_socket)
                await io.receive_console(timeout=2)
                out = asyncio.ensure_future(read_to_eof(stdout))
                io.close_stdin()  # no client writer left: stdin reaches end of file
                # The shim closed the master although the slave is still open: a hangup, no EOT.
                assert await io.wait_drained(2)
                hung_up = await asyncio.to_thread(_read_slave_after_hangup, slave)
                os.close(slave)
                return hung_up, await out
            finally:
                io.close()

    hung_up, out = run(scenario())
    assert hung_up and out == b""


def _read_slave_after_hangup(slave: int) -> bool:
    try:
        return os.read(slave, 100) == b""
    except OSError:  # EIO: the master is gone
        return True


def test_no_console_within_the_timeout_names_the_socket(tmp_path):
    (stdout,) = fifos(tmp_path, "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig("", stdout, "", terminal=True), reaper=reaper, **IDS)
            path = io.console_socket
            try:
                with pytest.raises(StdioError, match=f"sent no console on {path} within 0.2s"):
                    await io.receive_console(timeout=0.2)
            finally:
                io.close()
            assert not os.path.exists(os.path.dirname(path))

    run(scenario())

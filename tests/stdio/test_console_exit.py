"""The end of a terminal process's output at its exit, as upstream shuts the console down: what the pty holds is
copied, then the copy ends although something the process left behind (a background job) still holds the slave."""

import asyncio
import os
import select

from shim.stdio import ProcessIO, StdioConfig
from shim.stdio.pump import Pump
from tests.stdio.helpers import fifos, reaping, run
from tests.stdio.test_console import IDS, send_master


def test_process_exited_copies_what_the_pty_holds_then_ends_the_output(tmp_path):
    stdin, stdout = fifos(tmp_path, "in", "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig(stdin, stdout, "", terminal=True), reaper=reaper, **IDS)
            try:
                slave = await asyncio.to_thread(send_master, io.console_socket)  # a background job's copy
                await io.receive_console(timeout=2)
                client = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)  # ctr's reader, open before the exit
                out = asyncio.ensure_future(asyncio.to_thread(_read_to_eof, client))
                os.write(slave, b"last words\n")
                io.process_exited()
                drained = await io.wait_drained(1)
                os.write(slave, b"too late\n")  # nobody copies this any more, as upstream
                await asyncio.sleep(0.1)
                io.resize(100, 30)  # the master stays until Delete: resizing still works
                os.close(slave)
                return drained, await asyncio.wait_for(out, 2)
            finally:
                io.close()

    drained, out = run(scenario())
    assert drained
    assert out == b"last words\r\n"


def test_process_exited_without_a_terminal_leaves_the_pipes_alone(tmp_path):
    (stdout,) = fifos(tmp_path, "out")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig("", stdout, ""), reaper=reaper, **IDS)
            try:
                io.process_exited()
                return await io.wait_drained(0.2)  # the runtime's end is still open: no end of file
            finally:
                io.close()

    assert run(scenario()) is False


def _read_to_eof(fd):
    os.set_blocking(fd, True)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _pipe(nonblocking_read=True, nonblocking_write=True):
    r, w = os.pipe()
    os.set_blocking(r, not nonblocking_read)
    os.set_blocking(w, not nonblocking_write)
    return r, w


def test_finish_copies_what_is_there_and_stops_at_the_first_empty_read():
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()

    async def scenario():
        pump = Pump("test", src_r, dst_w)
        pump.start()
        os.write(src_w, b"a" * 1000)
        pump.finish()
        await asyncio.wait_for(pump.done, 2)  # the writer is still open: no end of file
        return pump, os.read(dst_r, 4096)

    try:
        pump, copied = run(scenario())
        assert copied == b"a" * 1000 and pump.copied == 1000
        assert not pump.eof and pump.error is None
    finally:
        for fd in (src_r, src_w, dst_r, dst_w):
            os.close(fd)


def test_finish_on_an_idle_pump_stops_it():
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()

    async def scenario():
        pump = Pump("test", src_r, dst_w)
        pump.start()
        await asyncio.sleep(0.05)
        pump.finish()
        await asyncio.wait_for(pump.done, 2)
        return pump

    try:
        assert run(scenario()).copied == 0
    finally:
        for fd in (src_r, src_w, dst_r, dst_w):
            os.close(fd)


def test_finish_while_the_destination_is_full_still_delivers_what_was_there():
    src_r, src_w = _pipe()
    dst_r, dst_w = _pipe()
    # Fits in the two pipes plus the chunk the stalled pump holds, so the producer finishes while nobody reads.
    payload = os.urandom(160 * 1024)

    async def scenario():
        pump = Pump("test", src_r, dst_w)
        pump.start()
        await asyncio.wait_for(asyncio.to_thread(_write_all, src_w, payload), 2)
        assert pump.stalls > 0
        pump.finish()
        received = bytearray()
        while not pump.done.done() or _readable(dst_r):
            try:
                received += os.read(dst_r, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        return pump, bytes(received)

    try:
        pump, received = run(scenario())
        assert received == payload and pump.copied == len(payload)
    finally:
        for fd in (src_r, src_w, dst_r, dst_w):
            os.close(fd)


def _write_all(fd, data):
    os.set_blocking(fd, True)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _readable(fd):
    return bool(select.select([fd], [], [], 0)[0])

import asyncio
import fcntl
import hashlib
import os
import threading

from shim.stdio.pump import CHUNK, Pump
from tests.stdio.helpers import run

F_GETPIPE_SZ = 1032
TOTAL = 10 * 1024 * 1024


def test_ten_mib_to_a_slow_reader_arrive_intact_with_bounded_buffering():
    payload = os.urandom(TOTAL)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    os.set_blocking(src_r, False)
    os.set_blocking(dst_w, False)
    capacity = fcntl.fcntl(src_w, F_GETPIPE_SZ) + fcntl.fcntl(dst_w, F_GETPIPE_SZ)
    written = 0

    def produce():  # the container: blocking writes, 64 KiB at a time
        nonlocal written
        view = memoryview(payload)
        while view:
            n = os.write(src_w, view[:65536])
            written += n
            view = view[n:]
        os.close(src_w)

    def consume() -> bytes:  # the client, reading in small pieces
        chunks = []
        while chunk := os.read(dst_r, 16384):
            chunks.append(chunk)
        return b"".join(chunks)

    async def scenario():
        finished = []
        pump = Pump("test", src_r, dst_w, on_done=lambda: finished.append(True))
        pump.start()
        producer = threading.Thread(target=produce)
        producer.start()
        await asyncio.sleep(0.3)  # nobody reads: the pump must pause, the producer must block
        held_back = written
        reader = asyncio.ensure_future(asyncio.to_thread(consume))
        await pump.done
        os.close(dst_w)
        received = await reader
        producer.join()
        return pump, finished, held_back, received

    pump, finished, held_back, received = run(scenario())
    try:
        assert held_back <= capacity + CHUNK, (held_back, capacity)
        assert pump.stalls > 0
        assert pump.eof and pump.error is None and finished == [True]
        assert pump.copied == TOTAL
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    finally:
        os.close(src_r)
        os.close(dst_r)


def test_a_destination_that_goes_away_ends_the_copy():
    async def scenario():
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        os.set_blocking(src_r, False)
        os.set_blocking(dst_w, False)
        os.close(dst_r)  # the process closed its stdin
        pump = Pump("test", src_r, dst_w)
        pump.start()
        os.write(src_w, b"lost")
        await asyncio.wait_for(pump.done, 2)
        for fd in (src_r, src_w, dst_w):
            os.close(fd)
        return pump

    pump = run(scenario())
    assert isinstance(pump.error, BrokenPipeError) and not pump.eof

"""binary:// loggers: arguments, environment, fds 3/4/5 and readiness."""

import asyncio
import os
import time

import pytest

from shim.background import BackgroundTasks
from shim.stdio import ProcessIO, StdioConfig, StdioError
from tests.stdio.helpers import gone, reaping, run, run_child, until

IDS = {"container_id": "c1", "namespace": "ns1", "uid": os.getuid(), "gid": os.getgid(),
       "background": BackgroundTasks()}

# $1..$6 = out <file> err <file> meta <file> (the URI's query, in order). The copies run in
# the background with fd 5 closed, so that the shell's own "exec 5>&-" is what signals ready.
LOGGER = """#!/bin/sh
sleep 0.2
/bin/cat <&3 >"$2" 5>&- &
/bin/cat <&4 >"$4" 5>&- &
echo "$CONTAINER_ID $CONTAINER_NAMESPACE $LEVEL" >"$6"
touch "$6.ready"
exec 5>&-
wait
"""


def script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_logger_gets_both_streams_after_signalling_ready(tmp_path):
    logger = script(tmp_path, "logger.sh", LOGGER)
    out, err, meta = tmp_path / "out", tmp_path / "err", tmp_path / "meta"
    uri = f"binary://{logger}?out={out}&err={err}&meta={meta}&env.LEVEL=debug"

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig("", uri, uri), reaper=reaper, **IDS)
            try:
                # create() returned only after the logger closed fd 5
                assert (tmp_path / "meta.ready").exists()
                pid = io.logger_pid
                status = await run_child(reaper, ["sh", "-c", "echo to-out; echo to-err >&2"], io.runtime_stdio)
                io.close_after_start()
                # The process is gone and the shim holds no write end: the logger sees EOF and exits.
                await until(lambda: gone(pid))
                return status
            finally:
                io.close()

    assert run(scenario()) == 0
    assert out.read_text() == "to-out\n"
    assert err.read_text() == "to-err\n"
    assert meta.read_text() == "c1 ns1 debug\n"


def test_logger_that_never_signals_fails_within_the_bound_and_is_killed(tmp_path):
    pidfile = tmp_path / "pid"
    logger = script(tmp_path, "stuck.sh", f'#!/bin/sh\necho $$ >{pidfile}\nexec /bin/sleep 30\n')

    async def scenario():
        async with reaping() as reaper:
            started = time.monotonic()
            with pytest.raises(StdioError, match=f"logger {logger} did not signal readiness within 0.5s"):
                await ProcessIO.create(StdioConfig("", f"binary://{logger}", ""), reaper=reaper,
                                       ready_timeout=0.5, **IDS)
            elapsed = time.monotonic() - started
            await until(lambda: gone(int(pidfile.read_text())), timeout=1)
            return elapsed

    assert 0.5 <= run(scenario()) < 2


def test_logger_is_terminated_on_close(tmp_path):
    logger = script(tmp_path, "daemon.sh", "#!/bin/sh\nexec 5>&-\nexec /bin/sleep 30\n")

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig("", f"binary://{logger}", ""), reaper=reaper, **IDS)
            pid = io.logger_pid
            assert pid and not gone(pid)
            io.close()
            await until(lambda: gone(pid), timeout=2)  # SIGTERM, then reaped by the reaper

    run(scenario())


def test_missing_logger_binary_is_reported(tmp_path):
    async def scenario():
        async with reaping() as reaper:
            await ProcessIO.create(StdioConfig("", f"binary://{tmp_path}/none", ""), reaper=reaper, **IDS)

    with pytest.raises(StdioError, match=f"cannot start logger {tmp_path}/none"):
        run(scenario())


def test_binary_v2_needs_an_explicit_ready_byte(tmp_path):
    logger = script(tmp_path, "quits.sh", "#!/bin/sh\nexit 3\n")

    async def scenario():
        async with reaping() as reaper:
            await ProcessIO.create(StdioConfig("", f"binary-v2://{logger}", ""), reaper=reaper, **IDS)

    with pytest.raises(StdioError, match="exited with status 3 without signalling readiness"):
        run(scenario())


def test_terminal_output_goes_to_the_logger(tmp_path):
    from tests.stdio.test_console import send_master

    logger = script(tmp_path, "tty-logger.sh", LOGGER)
    out, err, meta = tmp_path / "out", tmp_path / "err", tmp_path / "meta"
    uri = f"binary://{logger}?out={out}&err={err}&meta={meta}"

    async def scenario():
        async with reaping() as reaper:
            io = await ProcessIO.create(StdioConfig("", uri, "", terminal=True), reaper=reaper, **IDS)
            try:
                pid = io.logger_pid
                slave = await asyncio.to_thread(send_master, io.console_socket)
                await io.receive_console(timeout=2)
                os.write(slave, b"on the tty\n")
                os.close(slave)
                assert await io.wait_drained(2)
                await until(lambda: gone(pid))  # EOF on fd 3 (the copy ended) and on fd 4 (unused)
            finally:
                io.close()

    run(scenario())
    assert out.read_bytes() == b"on the tty\r\n"
    assert err.read_bytes() == b""

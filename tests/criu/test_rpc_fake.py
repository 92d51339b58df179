"""The client's protocol paths against a fake CRIU (tests/criu/fake_criu.py): fds that come
with notifications, fds passed to CRIU, CRIU dying or talking nonsense, no criu at all."""

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
from pycriu import rpc_pb2

from shim.criu.errors import CriuFailed, CriuMissing, CriuTimeout
from shim.criu.rpc import CriuRpc

from .helpers import reaping, run

FAKE = Path(__file__).with_name("fake_criu.py")


@pytest.fixture
def fake(tmp_path):
    """A `criu` executable that runs fake_criu.py with this interpreter (pycriu included)."""
    wrapper = tmp_path / "criu"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def env(mode: str) -> dict:
    return {**os.environ, "FAKE_CRIU_MODE": mode, "PYTHONPATH": os.pathsep.join(sys.path)}


def dump_req() -> rpc_pb2.criu_req:
    req = rpc_pb2.criu_req(type=rpc_pb2.DUMP)
    req.opts.images_dir_fd = -1
    return req


@pytest.mark.parametrize("keep", [False, True], ids=["left", "taken"])
def test_notification_fds_reach_the_handler_and_leftovers_are_closed(fake, keep):
    seen = []

    async def notify(script, pid, fds):
        seen.append((script, pid, len(fds), os.path.exists(f"/proc/self/fd/{fds[0]}")))
        if keep:
            seen.append(fds.pop())  # the handler takes the pty master: it is its to close

    async def scenario():
        async with reaping() as reaper:
            before = set(os.listdir("/proc/self/fd"))
            resp = await CriuRpc(reaper, criu=fake, env=env("pty")).call(dump_req(), notify=notify)
            return resp, set(os.listdir("/proc/self/fd")) - before

    resp, new_fds = run(scenario())
    assert seen[0] == ("orphan-pts-master", 0, 1, True)
    # nothing of the call stays open here (socket, output memfd, pidfd, the received fd)...
    assert new_fds == ({str(seen[1])} if keep else set())  # ...but what the handler took
    # the ack CRIU waits for: NOTIFY (6) with notify_success, sent after leftovers were closed
    assert resp.cr_errmsg == f"ack=6/True writer={'open' if keep else 'closed'}"
    if keep:
        os.close(seen[1])


def test_pass_fds_become_criu_fds(fake, tmp_path):
    (tmp_path / "payload").write_text("from fd 5")
    fd = os.open(tmp_path / "payload", os.O_RDONLY)

    async def scenario():
        async with reaping() as reaper:
            return await CriuRpc(reaper, criu=fake, env=env("pass-fds")).call(dump_req(), pass_fds={5: fd})

    try:
        assert run(scenario()).cr_errmsg == "from fd 5"
    finally:
        os.close(fd)
    with pytest.raises(ValueError):
        run(CriuRpc(None).call(dump_req(), pass_fds={3: 0}))  # fd 3 is the RPC socket


def test_exit_without_final_response_reports_status_and_output(fake):
    async def scenario():
        async with reaping() as reaper:
            with pytest.raises(CriuFailed) as failed:
                await CriuRpc(reaper, criu=fake, env=env("crash")).call(dump_req())
            return failed.value, reaper.exits

    err, exits = run(scenario())
    assert err.exit_status == 3 and (err.pid, 3) in [(e.pid, e.status) for e in exits]
    assert "without a final response" in str(err)
    assert "fake criu: giving up before answering" in str(err)  # CRIU's stderr is quoted


def test_unreadable_answer_aborts(fake):
    async def scenario():
        async with reaping() as reaper:
            with pytest.raises(CriuFailed) as failed:
                await CriuRpc(reaper, criu=fake, env=env("garbage")).call(dump_req())
            return failed.value

    err = run(scenario())
    assert "unreadable answer from criu" in str(err) and err.exit_status == 0


def test_deadline_kills_a_silent_criu(fake):
    async def scenario():
        async with reaping() as reaper:
            start = time.monotonic()
            with pytest.raises(CriuTimeout) as timed_out:
                await CriuRpc(reaper, criu=fake, env=env("hang")).call(dump_req(), timeout=0.5)
            return timed_out.value, time.monotonic() - start, reaper.exits

    err, elapsed, exits = run(scenario())
    assert 0.5 <= elapsed < 2
    assert (err.pid, 128 + 9) in [(e.pid, e.status) for e in exits]
    assert "timed out after 0.5s while waiting for CRIU's answer" in str(err)


def test_cancelling_the_call_kills_and_reaps_criu(fake):
    async def scenario():
        async with reaping() as reaper:
            call = asyncio.ensure_future(CriuRpc(reaper, criu=fake, env=env("hang")).call(dump_req()))
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            return [e.status for e in reaper.exits]

    assert run(scenario()) == [128 + 9]  # CRIU's exit, seen before the cancelled call returned


def test_missing_binary(tmp_path):
    async def scenario():
        async with reaping() as reaper:
            await CriuRpc(reaper, criu=str(tmp_path / "no-criu")).version()

    with pytest.raises(CriuMissing, match="cannot start"):
        run(scenario())

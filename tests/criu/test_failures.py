"""Dumps that fail: a handler refusing a notification, the deadline, a pid that is not there.
Each time CRIU must be gone and the target must be running as before (not frozen, not
ptrace-stopped, not killed)."""

import asyncio
import errno
import os
import re
import time

import pytest
from pycriu import rpc_pb2

from shim.children.spawn import spawn
from shim.criu.errors import CriuFailed, CriuTimeout
from shim.criu.rpc import CriuRpc

from .helpers import images_dir, needs_criu, reaping, run, state, target

pytestmark = needs_criu


def dump_req(images: int, pid: int) -> rpc_pb2.criu_req:
    req = rpc_pb2.criu_req(type=rpc_pb2.DUMP)
    req.opts.images_dir_fd = images
    req.opts.pid = pid
    req.opts.log_level = 4
    req.opts.log_file = "dump.log"
    req.opts.notify_scripts = True
    req.opts.network_lock = rpc_pb2.SKIP
    return req  # leave_running unset: a successful dump would kill the target


# pre-dump comes before CRIU seizes the tree; network-lock and post-dump while it is seized
# (ptrace-stopped, state 't'); post-dump is the last moment before CRIU would kill it.
@pytest.mark.parametrize("refused", ["pre-dump", "network-lock", "post-dump"])
def test_refused_notification_aborts_and_leaves_the_tree_running(tmp_path, refused):
    images = images_dir(tmp_path)
    states = {}

    async def notify(script, pid, fds):
        states[script] = state(target_pid)
        if script == refused:
            raise RuntimeError("not today")

    async def scenario():
        nonlocal target_pid
        async with reaping() as reaper:
            async with target(reaper, "unshare", "-n", "sleep", "1000") as (target_pid, _):
                with pytest.raises(CriuFailed) as failed:
                    await CriuRpc(reaper).call(dump_req(images, target_pid), notify=notify, timeout=10)
                return failed.value, state(target_pid), list(reaper.exits)

    target_pid = 0
    err, after, exits = run(scenario())
    os.close(images)
    assert err.notification == refused and isinstance(err.__cause__, RuntimeError)
    assert f"the {refused!r} notification handler failed: RuntimeError: not today" in str(err)
    assert list(states)[-1] == refused  # no notification after the refusal: no answer, CRIU aborted
    assert states["pre-dump"] in "RS" and states.get("network-lock", "t") == "t"
    assert after in "RS"  # running again, not left stopped
    assert target_pid not in [e.pid for e in exits]  # and not killed
    assert (err.pid, err.exit_status) in [(e.pid, e.status) for e in exits] and err.exit_status != 0
    # quoted from dump.log: CRIU's errors before "Dumping FAILED", not the rlimit error every run logs
    assert "Error (" in str(err) and "RLIMIT_NOFILE" not in str(err)


def test_timeout_in_a_frozen_moment_kills_criu_and_releases_the_tree(tmp_path):
    """The handler sleeps through post-dump, when CRIU has the tree seized: the kernel detaches
    a dead tracer's tracees, so the target must run on."""
    images = images_dir(tmp_path)
    seen = {}

    async def notify(script, pid, fds):
        if script == "post-dump":
            seen["frozen"] = state(target_pid)
            await asyncio.sleep(30)

    async def scenario():
        nonlocal target_pid
        async with reaping() as reaper:
            async with target(reaper, "sleep", "1000") as (target_pid, _):
                start = time.monotonic()
                with pytest.raises(CriuTimeout) as timed_out:
                    await CriuRpc(reaper).call(dump_req(images, target_pid), notify=notify, timeout=1.0)
                elapsed = time.monotonic() - start
                return timed_out.value, elapsed, state(target_pid), list(reaper.exits)

    target_pid = 0
    err, elapsed, after, exits = run(scenario())
    os.close(images)
    assert seen["frozen"] == "t"
    assert 1.0 <= elapsed < 3.0
    assert (err.pid, 128 + 9) in [(e.pid, e.status) for e in exits]  # CRIU SIGKILLed and reaped
    assert not os.path.exists(f"/proc/{err.pid}")
    assert after in "RS" and target_pid not in [e.pid for e in exits]
    text = str(err)
    assert "timed out after 1s while in the 'post-dump' notification handler; criu was killed" in text
    last = (tmp_path / "images" / "dump.log").read_text().strip().splitlines()[-1]
    assert last.replace("\t", " ").strip()[-30:] in text  # the log's last line says where CRIU was killed


def test_dump_of_a_missing_pid_quotes_the_log(tmp_path):
    images = images_dir(tmp_path)

    async def scenario():
        async with reaping() as reaper:
            with reaper.subscribe() as exits:  # a pid that surely existed and is now free
                gone = spawn(["true"])
                await exits.wait(gone)
            with pytest.raises(CriuFailed) as failed:
                await CriuRpc(reaper).call(dump_req(images, gone), timeout=10)
            return failed.value, gone

    err, gone = run(scenario())
    os.close(images)
    text = str(err)
    assert err.action == "dump" and err.cr_errno == errno.ESRCH and err.response.success is False
    assert err.log_path == str(tmp_path / "images" / "dump.log")
    log = (tmp_path / "images" / "dump.log").read_text()
    quoted = [line for line in log.splitlines() if re.search(r"(Error|Warn) ", line) and line in text]
    assert quoted, text
    assert f"/proc/{gone}/" in text  # the line that names the cause
    assert "\n" not in text  # one paragraph

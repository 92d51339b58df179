"""The conversation between a shim server and its checkpoint worker (shim.criu.offload, shim.criu.worker): framing,
errors raised again as their kind, and a worker that dies before answering."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

from shim import errors
from shim.background import BackgroundTasks
from shim.children.spawn import python_argv
from shim.criu import offload, worker
from shim.criu.checkpoint import CheckpointFailed

from .helpers import run


def stream(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_messages_round_trip_and_eof_is_none():
    async def scenario():
        reader = stream(offload.encode({"hello": 7, "protocol": offload.PROTOCOL}) + offload.encode({"x": [1]}))
        return [await offload.read_message(reader) for _ in range(3)]

    assert run(scenario()) == [{"hello": 7, "protocol": offload.PROTOCOL}, {"x": [1]}, None]


@pytest.mark.parametrize("data, message", [
    ((offload.MAX_MESSAGE + 1).to_bytes(4, "big"), "exceeds"),
    ((10).to_bytes(4, "big") + b"{}", "mid-message"),
    (b"\x00\x00", "mid-message"),
    ((2).to_bytes(4, "big") + b"[]", "not an object"),
])
def test_malformed_messages_are_errors(data, message):
    async def scenario():
        return await offload.read_message(stream(data))

    with pytest.raises(ValueError, match=message):
        run(scenario())


def test_a_worker_error_keeps_its_kind():
    assert worker._error(errors.InvalidArgument("bad path")) == {"kind": "InvalidArgument", "message": "bad path"}
    assert worker._error(CheckpointFailed("criu said no")) == {"kind": "ShimError", "message": "criu said no"}
    unexpected = worker._error(KeyError("x"))
    assert unexpected["kind"] == "ShimError" and "KeyError" in unexpected["message"]


class FakeRuntime:
    def __init__(self):
        self.calls = []

    async def pause(self, container_id):
        self.calls.append(("pause", container_id))

    async def resume(self, container_id):
        self.calls.append(("resume", container_id))


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_worker_that_dies_fails_the_checkpoint_kills_its_session_and_resumes_the_task():
    # A stand-in worker: a session of its own with a child (as CRIU would be), killed without answering.
    victim = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); os.fork(); time.sleep(60)"])
    try:
        async def scenario():
            await asyncio.sleep(0.3)  # setsid and fork done
            members = offload.session_members(victim.pid)
            ours, theirs = socket.socketpair()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            gone = offload.Worker(reader, writer, victim.pid, "a test's stand-in", None)
            theirs.close()  # EOF: it "died"
            runtime = FakeRuntime()
            checkpointer = offload.OffloadedCheckpointer(None, BackgroundTasks())
            with pytest.raises(offload.WorkerGone) as caught:
                await checkpointer._answer(gone, {"container_id": "c1", "bundle": "/nonexistent", "pid": 1}, None,
                                           runtime, lambda: False)
            gone.close()
            return members, runtime.calls, str(caught.value)

        members, calls, message = run(scenario())
        assert len(members) == 1
        assert victim.wait(timeout=5) == -9
        assert calls == [("resume", "c1")]
        assert f"checkpoint worker pid {victim.pid}" in message and "the task resumed" in message
        for pid in members:
            # SIGKILL is delivered asynchronously: on a loaded host the member can still show running for a moment.
            for _ in range(100):
                if _gone_or_zombie(pid):
                    break
                time.sleep(0.05)
            assert _gone_or_zombie(pid)
            try:
                # Killed, it was re-parented to us if an earlier test made this process a subreaper: reap it, or
                # a later reaper test would see its exit.
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_a_started_worker_takes_the_servers_place_and_answers_a_job_it_cannot_do(tmp_path):
    # A real worker, started the way a server starts one (offload.WORKER_STATEMENT, the socket as fd 3), given a job
    # whose bundle has no config.json: it must set itself up as the server (environment, cwd, logging with the server's
    # namespace) and answer with the failure, not die on the way (a worker that died showed only as EOF).
    from shim.criu.options import CheckpointOptions, as_record

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    ours, theirs = socket.socketpair()

    def as_fd_3():
        os.dup2(theirs.fileno(), offload.WORKER_FD)

    child = subprocess.Popen(python_argv(offload.WORKER_STATEMENT),
                             preexec_fn=as_fd_3, pass_fds=(offload.WORKER_FD,), stderr=subprocess.PIPE)
    theirs.close()
    job = {"protocol": offload.PROTOCOL, "container_id": "c1", "bundle": str(bundle), "pid": os.getpid(),
           "options": as_record(CheckpointOptions(image_path=str(tmp_path / "images"))), "extra": {},
           "runtime": {"binary": "runc", "root": str(tmp_path / "root"), "log": "", "systemd_cgroup": False},
           "paused": False, "env": {"PATH": os.environ.get("PATH", "")}, "server_pid": os.getpid(), "umask": 0o022,
           "namespace": "ns1", "debug": True, "criu_version": [4, 2, 1, ""]}
    try:
        async def scenario():
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            hello = await offload._hello(reader)
            writer.write(offload.encode({"job": job}))
            answer = await asyncio.wait_for(offload.read_message(reader), 10)
            writer.close()
            return hello, answer

        hello, answer = run(scenario())
        assert hello == child.pid
        assert answer is not None, f"the worker died: {child.communicate(timeout=10)[1].decode()[-2000:]}"
        assert "config.json" in answer["error"]["message"]
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        ours.close()


def test_a_worker_sees_whether_the_server_closed_behind_the_job():
    # The server sends the job with the connection and closes it when the hello does not come in time: the worker
    # must then leave the job to the worker started instead.
    ours, theirs = socket.socketpair()
    try:
        assert not worker._closed(theirs)
        ours.sendall(b"x")
        assert not worker._closed(theirs)
        assert theirs.recv(1) == b"x"
        ours.close()
        assert worker._closed(theirs)
    finally:
        theirs.close()

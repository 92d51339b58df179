"""The fork server's checkpoint spare (shim/forkserver/criu_spare.py), run for real in a forked child: a worker is
waiting on its socket and says hello at once, the next one is forked after it, nobody else may connect, and when the
fork server goes (EOF) the spare removes its socket and its waiting worker dies with it."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest

from shim.criu import offload
from shim.forkserver import criu_spare, server


def hello(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    try:
        length = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))[0]
        import json

        message = json.loads(sock.recv(length, socket.MSG_WAITALL))
        assert message["protocol"] == offload.PROTOCOL
        return int(message["hello"])
    finally:
        sock.close()  # the worker sees EOF instead of a job and exits


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)
    return value


@pytest.fixture
def spare(tmp_path):
    ours, theirs = socket.socketpair()
    path = str(tmp_path / "forkserver-k-criu.sock")
    pid = os.fork()
    if pid == 0:
        ours.close()
        # What the fork server's _detach does, its command line left as it is.
        os.setsid()
        server._close_all_but({0, 1, 2, theirs.fileno()})
        os.chdir("/")
        criu_spare.main(theirs, path)
    theirs.close()
    try:
        yield pid, path, ours
    finally:
        ours.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_a_waiting_worker_answers_and_the_next_one_is_forked(spare):
    pid, path, _ = spare
    wait_until(lambda: os.path.exists(path) and children(pid), timeout=30)  # imports done, a worker waiting
    assert os.stat(path).st_mode & 0o777 == 0o600
    first = hello(path)
    assert first in children(pid) or not os.path.exists(f"/proc/{first}")
    second = hello(path)
    assert second != first


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_gets_no_worker(spare, tmp_path):
    pid, path, _ = spare
    wait_until(lambda: os.path.exists(path) and children(pid), timeout=30)
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o777)  # only the peer check is left to refuse it
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(path)
            code = 0 if sock.recv(4) == b"" else 3  # closed without a hello
        except (ConnectionResetError, PermissionError):
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hello(path) > 0  # and the next caller, ours, still gets one


def test_the_spare_and_its_waiting_worker_end_with_the_fork_server(spare):
    pid, path, ours = spare
    waiting = wait_until(lambda: os.path.exists(path) and children(pid), timeout=30)[0]
    ours.close()  # the fork server is gone
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not os.path.exists(path)
    wait_until(lambda: not os.path.exists(f"/proc/{waiting}") or
               open(f"/proc/{waiting}/stat").read().split()[2] == "Z", timeout=5)

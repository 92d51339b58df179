"""The lazy restore's page-fault daemon: who asks for it, when it counts as ready, and that it
never outlives its bound (a fake `criu lazy-pages` on PATH stands in for CRIU)."""

import asyncio
import os
import signal

import pytest

from shim.criu.restore import LazyPages, RestoreFailed, lazy_request

from .helpers import reaping, run

# A stand-in for `criu lazy-pages ... --status-fd 3`: says ready (a NUL on fd 3), or dies first.
READY_THEN_SLEEP = '#!/bin/sh\necho "$@" > "$ARGS_FILE"\nprintf "\\0" >&3\nexec 3>&-\nexec sleep 1000\n'
DIES = '#!/bin/sh\necho "Error (criu/uffd.c:1): uffd: cannot listen" > "$LOG"\nexit 1\n'


@pytest.fixture
def fake_criu(tmp_path, monkeypatch):
    def install(script: str) -> None:
        path = tmp_path / "bin" / "criu"
        path.parent.mkdir(exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
        monkeypatch.setenv("PATH", f"{path.parent}:{os.environ['PATH']}")

    return install


def test_only_the_restoring_containers_annotations_ask_for_it(monkeypatch):
    monkeypatch.setattr("shim.criu.restore.from_host_config", lambda: {})
    assert lazy_request({}) is None
    assert lazy_request({"io.pyshim.checkpoint.lazy-pages": "false"}) is None
    local = lazy_request({"io.pyshim.checkpoint.lazy-pages": "true"})
    assert local is not None and local.page_server_address is None
    remote = lazy_request({"io.pyshim.checkpoint.lazy-pages": "true",
                           "io.pyshim.checkpoint.page-server": "10.0.0.2:27"})
    assert remote.page_server_address == ("10.0.0.2", 27)


def test_ready_daemon_serves_then_is_killed_at_its_bound(tmp_path, fake_criu, monkeypatch):
    fake_criu(READY_THEN_SLEEP)
    monkeypatch.setenv("ARGS_FILE", str(tmp_path / "args"))

    async def scenario():
        async with reaping() as reaper:
            daemon = await LazyPages.start(reaper, image_path="/img", work=str(tmp_path), log_file="/b/lazy.log",
                                           page_server=("10.0.0.2", 27))
            await daemon.serve_for(0.3)
            return daemon.exited.result().status, daemon.pidfd

    status, pidfd = run(scenario())
    assert status == 128 + signal.SIGKILL and pidfd == -1  # killed at the bound, its pidfd closed
    assert (tmp_path / "args").read_text().split() == [
        "lazy-pages", "--images-dir", "/img", "--work-dir", str(tmp_path), "--log-file", "/b/lazy.log", "-v4",
        "--status-fd", "3", "--page-server", "--address", "10.0.0.2", "--port", "27"]


def test_daemon_dying_before_ready_fails_the_restore_with_its_log(tmp_path, fake_criu, monkeypatch):
    fake_criu(DIES)
    log = tmp_path / "lazy.log"
    monkeypatch.setenv("LOG", str(log))

    async def scenario():
        async with reaping() as reaper:
            with pytest.raises(RestoreFailed) as failed:
                await LazyPages.start(reaper, image_path="/img", work=str(tmp_path), log_file=str(log))
            return str(failed.value), [e.status for e in reaper.exits]

    message, statuses = run(scenario())
    assert "criu lazy-pages exited" in message and "uffd: cannot listen" in message
    assert statuses == [1]  # reaped before the error was raised


def test_a_daemon_failing_during_the_restore_ends_it_now(tmp_path, fake_criu, monkeypatch):
    # The daemon says ready, then dies as when its page server hangs up; the restore (runc, here a
    # coroutine) would wait for page faults nobody serves: its CRIU is killed, and runc fails.
    fake_criu('#!/bin/sh\nprintf "\\0" >&3\nexec 3>&-\nsleep 0.2\n'
              'echo "Error (criu/page-xfer.c:1660): page-xfer: Remote side closed connection" > "$LOG"\nexit 1\n')
    log = tmp_path / "lazy.log"
    monkeypatch.setenv("LOG", str(log))
    killed = []

    async def scenario():
        criu_gone = asyncio.Event()

        def kill_criu(container_id: str) -> None:  # what kill_restoring_criu does to runc's CRIU
            killed.append(container_id)
            criu_gone.set()

        async def runc_restore():
            await asyncio.wait_for(criu_gone.wait(), 10)
            raise RuntimeError("runc restore failed: criu failed: type NOTIFY errno 0")

        async with reaping() as reaper:
            daemon = await LazyPages.start(reaper, image_path="/img", work=str(tmp_path), log_file=str(log))
            with pytest.raises(RuntimeError, match="criu failed"):
                await daemon.guard(runc_restore(), "c2", stop_restore=kill_criu)
            await daemon.stop()
            return daemon.failed

    failed = run(scenario())
    assert killed == ["c2"]
    assert "criu lazy-pages exited with 1 during the restore" in failed and "Remote side closed" in failed

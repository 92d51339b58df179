"""The lazy restore's page-fault daemon: who asks for it, when it counts as ready, and that it
never outlives its bound (a fake on PATH stands in for `criu lazy-pages`, and for pyshim's daemon where a page server
is named)."""

import asyncio
import os
import signal
import socket

import pytest

from shim.criu import restore as restore_module
from shim.criu.options import resolve
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
        monkeypatch.setattr(restore_module, "lazy_daemon_command", lambda: [str(path), "pyshim-daemon"])

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
        "pyshim-daemon", "--images-dir", "/img", "--work-dir", str(tmp_path), "--log-file", "/b/lazy.log",
        "--status-fd", "3", "--address", "10.0.0.2", "--port", "27"]


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


# --- after the restore: the container ends when its memory stops coming ---------------------------------------------

def serve_and_watch(tmp_path, timeout: float, **start):
    """Start the fake daemon, let it serve; what end_container was called with, and the daemon's exit status."""
    ended: list[str] = []

    async def end_container(reason: str) -> None:
        ended.append(reason)

    async def scenario():
        async with reaping() as reaper:
            daemon = await LazyPages.start(reaper, image_path="/img", work=str(tmp_path), log_file=str(start.pop(
                "log", "/b/lazy.log")), **start)
            await daemon.serve_for(timeout, "c3", end_container)
            return daemon.exited.result().status

    return ended, run(scenario())


def test_a_daemon_failing_after_the_restore_ends_the_container_with_its_log(tmp_path, fake_criu, monkeypatch):
    fake_criu('#!/bin/sh\nprintf "\\0" >&3\nexec 3>&-\nsleep 0.2\n'
              'echo "Error (criu/page-xfer.c:1623): page-xfer: Error reading data from page server" > "$LOG"\n'
              'exit 1\n')
    log = tmp_path / "lazy.log"
    monkeypatch.setenv("LOG", str(log))
    ended, status = serve_and_watch(tmp_path, 10, log=log)
    assert status == 1 and len(ended) == 1
    assert "post-copy of c3 failed: criu lazy-pages exited with 1" in ended[0]
    assert "Error reading data from page server" in ended[0]


def test_a_daemon_past_its_bound_is_killed_and_the_container_ended(tmp_path, fake_criu, monkeypatch):
    fake_criu(READY_THEN_SLEEP)
    monkeypatch.setenv("ARGS_FILE", str(tmp_path / "args"))
    ended, status = serve_and_watch(tmp_path, 0.3)
    assert status == 128 + signal.SIGKILL
    assert len(ended) == 1 and "had not moved every page after 0.3s" in ended[0]


def test_a_daemon_done_leaves_the_container_alone(tmp_path, fake_criu):
    fake_criu('#!/bin/sh\nprintf "\\0" >&3\nexec 3>&-\nsleep 0.1\nexit 0\n')
    ended, status = serve_and_watch(tmp_path, 10)
    assert status == 0 and ended == []


def test_a_page_server_on_a_unix_socket_is_connected_and_handed_over(tmp_path, fake_criu, monkeypatch):
    # The fake daemon says what its fd 4 is and answers through it, as the daemon uses --ps-socket 4.
    fake_criu('#!/bin/sh\necho "$@" > "$ARGS_FILE"\nreadlink /proc/self/fd/4 >> "$ARGS_FILE"\n'
              'printf "\\0" >&3\nexec 3>&-\necho hello >&4\nexit 0\n')
    monkeypatch.setenv("ARGS_FILE", str(tmp_path / "args"))
    path = str(tmp_path / "ps.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    async def scenario():
        async with reaping() as reaper:
            daemon = await LazyPages.start(reaper, image_path="/img", work=str(tmp_path), log_file="/b/l.log",
                                           page_server_unix=path)
            conn, _ = listener.accept()
            with conn:
                said = await asyncio.to_thread(conn.recv, 16)
            await daemon.stop()
            return said

    try:
        said = run(scenario())
    finally:
        listener.close()
    args, fd = (tmp_path / "args").read_text().splitlines()
    assert args.split()[0] == "pyshim-daemon" and args.split()[-2:] == ["--ps-socket", "4"]
    assert fd.startswith("socket:[")
    assert said == b"hello\n"


def test_an_unreachable_unix_page_server_fails_the_restore_before_criu(tmp_path, fake_criu):
    fake_criu(DIES)

    async def scenario():
        async with reaping() as reaper:
            with pytest.raises(RestoreFailed, match="cannot reach the page server at unix:"):
                await LazyPages.start(reaper, image_path="/img", work=str(tmp_path), log_file="/b/l.log",
                                      page_server_unix=str(tmp_path / "none.sock"))
            return reaper.exits

    assert run(scenario()) == []  # no daemon was started


def test_unix_page_servers_are_for_restores_only(monkeypatch):
    monkeypatch.setattr("shim.criu.restore.from_host_config", lambda: {})
    asked = lazy_request({"io.pyshim.checkpoint.lazy-pages": "true",
                          "io.pyshim.checkpoint.page-server": "unix:/run/pyshim/ps.sock"})
    assert asked.page_server_unix == "/run/pyshim/ps.sock" and asked.page_server_address is None
    with pytest.raises(Exception, match="absolute"):
        lazy_request({"io.pyshim.checkpoint.lazy-pages": "true", "io.pyshim.checkpoint.page-server": "unix:ps"})


def test_split_images_without_a_page_server_are_refused(monkeypatch):
    monkeypatch.setattr("shim.criu.restore.from_host_config", lambda: {})
    record = {"post_copy": {"lazy_pages": 7}}
    with pytest.raises(Exception, match="leaves 7 pages on the page server"):
        restore_module._refuse_partial_images("c4", "/img", record, None)
    restore_module._refuse_partial_images("c4", "/img", record, resolve({"lazy_pages": True,
                                                                          "page_server": "unix:/p"}))
    # the migration names its page server in the record: that is the lazy restore asked for
    assert restore_module.post_copy_request(record) is None
    named = restore_module.post_copy_request({"post_copy": {"lazy_pages": 7, "page_server": "unix:/w/pages.sock"}})
    assert named is not None and named.lazy_pages and named.page_server_unix == "/w/pages.sock"

"""The fork server: its framing and descriptor passing, the digest that keeps stale servers unused, and a
server run for real (in a subprocess, with its socket in a temporary directory) forking a shim server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from shim.forkserver import wire
from shim.forkserver.server import Request

REPO = Path(__file__).resolve().parents[1]


# --- framing ---------------------------------------------------------------------------------------------------

def test_encode_decode_round_trip_keeps_order_repeats_and_binary_values():
    fields = [("argv", b"/bin/shim"), ("argv", b"-id"), ("env", b"A=1"), ("env", b""), ("options", bytes(range(256)))]
    frame = wire.encode(fields)
    assert int(frame[:wire.HEADER], 16) == len(frame) - wire.HEADER
    assert wire.decode(frame[wire.HEADER:]) == fields
    assert wire.every(fields, "argv") == [b"/bin/shim", b"-id"]
    assert wire.first(fields, "env") == b"A=1"
    assert wire.first(fields, "missing", b"x") == b"x"
    with pytest.raises(wire.ProtocolError):
        wire.first(fields, "missing")


@pytest.mark.parametrize("payload", [
    b"something else\n",
    wire.MAGIC + b"argv",  # no length
    wire.MAGIC + b"argv 10\nshort",  # runs past the end
    wire.MAGIC + b"argv x\n",  # not a number
    wire.MAGIC + b" 1\nx",  # no name
])
def test_malformed_payloads_are_refused(payload):
    with pytest.raises(wire.ProtocolError):
        wire.decode(payload)


@pytest.mark.parametrize("name", ["", "a b", "a\nb"])
def test_bad_field_names_are_refused(name):
    with pytest.raises(wire.ProtocolError):
        wire.encode([(name, b"")])


def test_oversized_messages_are_refused_both_ways():
    with pytest.raises(wire.ProtocolError):
        wire.encode([("x", b"\0" * wire.MAX_FRAME)])
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"%08x" % (wire.MAX_FRAME + 1))
        with pytest.raises(wire.ProtocolError):
            wire.recv_frame(b)


def test_a_listening_socket_travels_with_the_frame_and_arrives_close_on_exec(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "shim.sock"))
    listener.listen(1)
    a, b = socket.socketpair()
    with a, b, listener:
        wire.send_frame(a, wire.encode([("status", b"one")]), [listener.fileno()])
        wire.send_frame(a, wire.encode([("status", b"two")]))
        fields, fds = wire.recv_frame(b, max_fds=wire.MAX_FDS)
        assert fields == [("status", b"one")] and len(fds) == 1
        received = socket.socket(fileno=fds[0])
        with received:
            assert received.getsockname() == str(tmp_path / "shim.sock")
            assert not os.get_inheritable(received.fileno())
            assert received.fileno() != listener.fileno()
        # The second frame was not read with the first.
        assert wire.recv_frame(b) == ([("status", b"two")], [])


def test_more_descriptors_than_allowed_are_closed_and_refused():
    a, b = socket.socketpair()
    extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    try:
        with a, b:
            wire.send_frame(a, wire.encode([("x", b"")]), extra)
            before = set(os.listdir("/proc/self/fd"))
            with pytest.raises(wire.ProtocolError):
                wire.recv_frame(b, max_fds=1)
            assert set(os.listdir("/proc/self/fd")) <= before
    finally:
        for fd in extra:
            os.close(fd)


def test_a_large_frame_arrives_whole_and_a_closed_peer_is_an_error():
    env = [("env", b"K%d=" % i + b"v" * 200) for i in range(2000)]  # ~400 KiB, many recv calls
    a, b = socket.socketpair()
    with b:
        with a:
            sender = __import__("threading").Thread(target=wire.send_frame, args=(a, wire.encode(env)))
            sender.start()
            assert wire.recv_frame(b)[0] == env
            sender.join()
        with pytest.raises(wire.ProtocolError):
            wire.recv_frame(b)


def test_peer_credentials_are_the_kernels():
    a, b = socket.socketpair()
    with a, b:
        assert wire.peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
    assert wire.trusted_uid(os.geteuid()) and wire.trusted_uid(0)


# --- which server: digest and key -------------------------------------------------------------------------------

def test_digest_follows_source_files_only(tmp_path):
    package = tmp_path / "shim"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    first = wire.source_digest(str(package))
    assert wire.source_digest(str(package)) == first
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (package / "notes.txt").write_text("ignored")
    assert wire.source_digest(str(package)) == first
    st = (package / "sub" / "b.py").stat()
    os.utime(package / "sub" / "b.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    touched = wire.source_digest(str(package))
    assert touched != first
    (package / "sub" / "b.py").write_text("y = 22\n")  # size
    resized = wire.source_digest(str(package))
    assert resized not in (first, touched)
    (package / "c.py").write_text("")
    assert wire.source_digest(str(package)) not in (first, touched, resized)


def test_digest_covers_the_interpreter_and_sys_path(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("")
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.setattr(wire, "LAUNCH_PATH", (*sys.path, str(site)))
    first = wire.source_digest(str(tmp_path))
    assert wire.source_digest(str(tmp_path)) == first
    (site / "newpkg-1.0.dist-info").mkdir()  # pip installed something there
    assert wire.source_digest(str(tmp_path)) != first
    first = wire.source_digest(str(tmp_path))
    monkeypatch.setattr(wire, "LAUNCH_PATH", (*wire.LAUNCH_PATH, "/elsewhere"))
    assert wire.source_digest(str(tmp_path)) != first
    # What imports do to sys.path later (pycriu appends to it) is not a change of the code.
    first = wire.source_digest(str(tmp_path))
    monkeypatch.setattr(sys, "path", [*sys.path, "/appended/by/an/import"])
    assert wire.source_digest(str(tmp_path)) == first
    monkeypatch.undo()
    first = wire.source_digest(str(tmp_path))
    monkeypatch.setattr(sys, "executable", "/other/python")
    assert wire.source_digest(str(tmp_path)) != first


def test_key_names_one_containerd_process():
    key = wire.server_key("d", 100, 5)
    assert len({key, wire.server_key("d", 101, 5), wire.server_key("d", 100, 6), wire.server_key("e", 100, 5)}) == 4
    assert wire.process_start_time(os.getpid()) == wire.process_start_time(os.getpid()) > 0
    assert wire.process_start_time(2**22 + 1) is None
    assert wire.socket_path("/run/pyshim", key) == f"/run/pyshim/forkserver-{key}.sock"
    assert len(wire.socket_path("/run/pyshim", key)) < 100


def test_switch(monkeypatch):
    monkeypatch.delenv("PYSHIM_FORKSERVER", raising=False)
    assert wire.enabled()
    for off in ("0", "off", "false", "No"):
        monkeypatch.setenv("PYSHIM_FORKSERVER", off)
        assert not wire.enabled()


def test_request_parsing_needs_exactly_the_listener():
    fields = [("digest", b"d"), ("cwd", b"/b"), ("containerd_pid", b"1"), ("argv", b"shim"), ("env", b"A=1"),
              ("env", b"=weird"), ("env", b"noequals")]
    request = Request.parse(fields, [7])
    assert (request.cwd, request.argv, request.env, request.cmdline, request.listener_fd) == (
        "/b", ["shim"], [b"A=1"], [b"shim"], 7)
    with pytest.raises(wire.ProtocolError):
        Request.parse(fields, [])
    with pytest.raises(wire.ProtocolError):
        Request.parse(fields, [7, 8])
    with pytest.raises(wire.ProtocolError):
        Request.parse([("digest", b"d"), ("cwd", b"relative"), ("containerd_pid", b"1"), ("argv", b"x")], [7])


# --- a real fork server, in a subprocess -------------------------------------------------------------------------

# Runs with the launcher's interpreter flags and sys.path (so its digest is the fork server's): plays
# containerd (its pid is the fork server's containerd pid) and `start` (hand_over, launch).
DRIVER = textwrap.dedent("""
    import asyncio, json, os, socket, sys, time
    from shim.forkserver import client, wire

    def wait_for(predicate, timeout=15.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def exited(pid):  # gone, or a zombie (of whichever subreaper adopted it)
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    mode, work = sys.argv[2], sys.argv[3]
    out = {}
    bundle = os.path.join(work, "bundle")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(work, "shim.sock"))
    listener.listen(8)
    target = client.Target(os.getpid())
    out["socket"], out["lock"] = target.socket_path, target.lock_path
    out["before"] = client.hand_over(target, listener, bundle, b"")
    server = client.launch(target)
    out["server"] = server
    out["second_launch"] = client.launch(target)  # the lock is held: nothing started
    out["up"] = wait_for(lambda: os.path.exists(target.socket_path))

    def spares():
        found = []
        for entry in os.listdir("/proc"):
            try:
                argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\\0")
            except (OSError, ValueError):
                continue
            if b"forkserver-spare" in argv and os.fsencode(sys.argv[0]) in argv and not exited(entry):
                found.append(int(entry))
        return found

    out["spare_ready"] = wait_for(lambda: len(spares()) == 1, 10)
    out["first_spares"] = spares()
    if mode == "serve":
        os.chdir(bundle)
        sys.argv = [sys.argv[0], "-namespace", "ns1", "-address", "/run/x.sock", "-id", "c1", "start"]
        sys.orig_argv = [sys.executable, "-IS", *sys.argv]  # as if containerd had run this `start`
        out["expected_cmdline"] = sys.orig_argv
        pid = client.hand_over(target, listener, bundle, b"")
        out["pid"] = pid
        out["cmdline"] = open(f"/proc/{pid}/cmdline", "rb").read().decode()
        out["environ"] = open(f"/proc/{pid}/environ", "rb").read().decode()
        out["cwd"] = os.readlink(f"/proc/{pid}/cwd")
        out["ppid_is_server"] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == server
        out["fds"] = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))

        def server_sockets():
            fds = []
            for fd in os.listdir(f"/proc/{server}/fd"):
                try:
                    fds.append(os.readlink(f"/proc/{server}/fd/{fd}"))
                except OSError:  # closed meanwhile
                    pass
            return [fd for fd in fds if fd.startswith("socket:")]

        # The fork server holds what a hand-over passed it (the bound listener, the connection) until its spare has
        # them: wait until it has let go, bounded; a fork server that kept them shares them for good.
        wait_for(lambda: not set(server_sockets()) & set(out["fds"]), 5)
        out["server_sockets"] = server_sockets()

        async def talk():
            from shim.api.containerd.task.v2 import shim_pb2 as task
            from shim.ttrpc import Client, TtrpcError, ConnectionLost
            c = await Client.connect("unix://" + os.path.join(work, "shim.sock"), timeout=5.0)
            stub = c.stub(task.DESCRIPTOR.services_by_name["Task"], timeout=5.0)
            try:
                await stub.State(task.StateRequest(id="c1"))
            except TtrpcError as exc:
                out["state"] = exc.code.name
            try:
                await stub.Shutdown(task.ShutdownRequest(id="c1"))
            except ConnectionLost:
                pass
            c.close()
        asyncio.run(talk())
        out["shim_exited"] = wait_for(lambda: exited(pid), 10)
        out["spare_after"] = wait_for(lambda: len(spares()) == 1, 10)  # the next one
        out["spares"] = spares()
        # Intermediates come and go in a moment; once the next spare is there, none is left.
        out["server_children"] = open(f"/proc/{server}/task/{server}/children").read().split()
    elif mode == "stale":
        path = os.path.join(os.path.dirname(wire.__file__), "..", "cli.py")
        with open(path, "a") as f:
            f.write("# changed\\n")
        newer = client.Target(os.getpid())
        out["new_socket"] = newer.socket_path
        out["after_change"] = client.hand_over(newer, listener, bundle, b"")
        out["old_exited"] = wait_for(lambda: not os.path.exists(target.socket_path), 10)
    elif mode == "idle":
        out["idle_exited"] = wait_for(lambda: not os.path.exists(target.socket_path), 10)
        out["lock_removed"] = not os.path.exists(target.lock_path)
    os.waitpid(server, os.WNOHANG)
    print(json.dumps(out))
""")


@pytest.fixture
def installed(tmp_path):
    """A copy of the shim package and a launcher for it, as install.sh writes one (python -IS, own sys.path)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "shim", src / "shim", ignore=shutil.ignore_patterns("__pycache__"))
    paths = [str(src)] + [p for p in sys.path if p and "site-packages" in p or "dist-packages" in p]
    launcher = tmp_path / "bin" / "containerd-shim-pyshim-v2"
    launcher.parent.mkdir()
    driver = str(tmp_path / "driver.py")
    launcher.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path[1:1] = {paths!r}\n"
                        f"if sys.argv[1:2] == ['drive']:\n    exec(compile(open({driver!r}).read(), "
                        "'driver', 'exec'))\nelse:\n    from shim.__main__ import main\n    sys.exit(main())\n")
    launcher.chmod(0o755)
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "bundle").mkdir()
    # Socket paths are limited to 107 bytes: the run dir must be short, like /run/pyshim.
    run = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    (tmp_path / "run").symlink_to(run)
    yield launcher
    shutil.rmtree(run, ignore_errors=True)


def drive(launcher: Path, mode: str, **env: str) -> dict:
    work = launcher.parent.parent
    result = subprocess.run([str(launcher), "drive", mode, str(work)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYSHIM_FORKSERVER_DIR": os.readlink(work / "run"), **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """pid has exited. If this process is a child subreaper (other tests make it one) the driver's orphans
    (the fork server, the shim server) are our children then: reaped here, so no zombie is left behind."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not ours: init (or another subreaper) reaps it
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
            except FileNotFoundError:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_fork_server_forks_a_shim_server_that_looks_forked_by_start(installed):
    out = drive(installed, "serve")
    work = installed.parent.parent
    assert out["before"] is None and out["server"] and out["second_launch"] is None and out["up"]
    assert out["cmdline"].split("\0") == [*out["expected_cmdline"], ""]
    assert "PYSHIM_FORKSERVER_DIR=" in out["environ"]
    assert out["cwd"] == str(work / "bundle")
    assert out["state"] == "NOT_FOUND"  # the server answers: no such task
    assert not out["ppid_is_server"] and out["server_children"] == []  # double fork: nothing to reap
    assert not set(out["server_sockets"]) & set(out["fds"])  # the fork server's listener stays there
    assert not any(fd.endswith(".lock") for fd in out["fds"])
    assert out["shim_exited"] and gone(out["pid"])
    assert out["spare_ready"] and out["spare_after"] and out["pid"] not in out["spares"]
    # The driver (its "containerd") is gone: the server removes its socket and lock and exits, and so does
    # its spare.
    assert gone(out["server"]) and all(gone(pid) for pid in out["spares"] + out["first_spares"])
    assert not os.path.exists(out["socket"]) and not os.path.exists(out["lock"])


def test_changed_code_never_reaches_the_old_server_which_exits(installed):
    out = drive(installed, "stale", PYSHIM_FORKSERVER_CHECK="0.1")
    assert out["up"] and out["new_socket"] != out["socket"]
    assert out["after_change"] is None  # a new digest names a socket nobody serves yet
    assert out["old_exited"]
    assert gone(out["server"]) and all(gone(pid) for pid in out["first_spares"])


def test_idle_server_exits(installed):
    out = drive(installed, "idle", PYSHIM_FORKSERVER_IDLE="0.3")
    assert out["up"] and out["idle_exited"] and out["lock_removed"]
    assert gone(out["server"]) and all(gone(pid) for pid in out["first_spares"])

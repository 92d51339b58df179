"""The `delete` action: clean up after a shim that is gone, and report the task as killed.

containerd runs it whenever a shim connection ends (normal end, crash, failed reload) with
a 5 s limit that includes interpreter start-up. It therefore imports only small standard
modules — no subprocess, json, dataclasses or protobuf — and writes its DeleteResponse by hand.
"""

from __future__ import annotations

import os
import sys
import time

from shim.actions.cmdline import ShimArgs
from shim.bundle.layout import ADDRESS_FILE, INIT_PID_FILE, RESTORE_MARKER, RUNTIME_FILE, read_settings
from shim.oci import commands
from shim.protowire import encode_varint
from shim.rootfs.unmount import unmount_all

RUNTIME_DELETE_TIMEOUT = 3.0  # with shim.criu.unfinished.GONE_WAIT (1 s) before it: within containerd's 5 s
KILLED = 128 + 9


def encode_delete_response(pid: int, exit_status: int, exited_at: float) -> bytes:
    """containerd.task.v2.DeleteResponse{pid 1, exit_status 2, exited_at 3} in protobuf wire form."""
    seconds, nanos = divmod(int(exited_at * 1e9), 10**9)
    stamp = (b"\x08" + encode_varint(seconds) if seconds else b"") + (b"\x10" + encode_varint(nanos) if nanos else b"")
    out = b""
    if pid:
        out += b"\x08" + encode_varint(pid)
    if exit_status:
        out += b"\x10" + encode_varint(exit_status)
    return out + b"\x1a" + encode_varint(len(stamp)) + stamp


def run_quietly(argv: list[str], timeout: float) -> int | None:
    """Run argv with no stdio; its exit code, or None if it could not run or was killed at the timeout."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)])
    except OSError:
        return None
    finally:
        os.close(null)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def remove_dead_socket(bundle: str) -> None:
    """Remove the socket file of a shim that died (kill -9 leaves it behind; the Go shim does
    too, containerd#11292). A socket something still listens on — a shim serving a group of
    containers — is left alone."""
    try:
        with open(os.path.join(bundle, ADDRESS_FILE)) as f:
            address = f.read().strip()
    except OSError:
        return
    if not address.startswith("unix:///"):
        return  # an abstract socket has no file
    import _socket
    import errno
    import stat

    path = address[len("unix://"):]
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK)
    try:
        dead = probe.connect_ex(path) == errno.ECONNREFUSED
    finally:
        probe.close()
    if dead:
        try:
            os.unlink(path)
        except OSError:
            pass


def delete(args: ShimArgs) -> int:
    bundle = args.bundle or os.getcwd()
    settings = read_settings(os.path.join(bundle, RUNTIME_FILE))
    runtime = commands.RuntimeConfig(binary=settings.get("binary") or "runc",
                                     root=commands.runtime_root(settings.get("root", ""), args.namespace),
                                     systemd_cgroup=settings.get("systemd_cgroup") == "1")
    # A restore the server did not see through (it died mid-restore) left its marker: end runc and CRIU, unmount
    # criu-root, before anything else (shim.criu.unfinished). One stat when there is none, the common case.
    marker = os.path.join(bundle, RESTORE_MARKER)
    restoring = os.path.exists(marker)
    if restoring:
        from shim.criu import unfinished

        facts = unfinished.load(marker)
        unfinished.end(facts)
        unfinished.release_network_lock(facts)
    # runc and crun keep a container's state in <root>/<id>. Without it `delete --force` finds nothing to do, but
    # costs a runtime start-up (6 ms here) on containerd's path after every shim exit: the common case, since the
    # task's Delete already removed it.
    if os.path.lexists(os.path.join(runtime.root, args.id)):
        # A wedged runtime: unmounting and reporting still matter.
        run_quietly(commands.delete(runtime, args.id, force=True), RUNTIME_DELETE_TIMEOUT)
    if restoring:
        unfinished.remove_leftovers(facts, marker)
    unmount_all(os.path.join(bundle, "rootfs"))
    remove_dead_socket(bundle)
    try:
        with open(os.path.join(bundle, INIT_PID_FILE)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    sys.stdout.buffer.write(encode_delete_response(pid, KILLED, time.time()))
    sys.stdout.flush()
    return 0

"""CRIU's network lock under pyshim: each method with a live TCP connection, and no lock left behind.

The server (busybox `nc -ll -e /bin/cat`) runs in a network namespace given by path (a server "host" of
harness.netns_hosts), a Python client in the client host keeps a connection to it. The lock method is the container's
annotation io.pyshim.checkpoint.network-lock (iptables, nftables, skip; none: the default, iptables with
tcp-established).

- Each method, checkpoint with exit and tcp-established, the client sending while the server is down, the restore
  made in the same namespace BEFORE the original task is deleted: with iptables or nftables the lock (CRIU's chain,
  or its table `inet CRIU-<run id>`) holds the namespace meanwhile and the data sent then is echoed after the
  restore, on the same connection; with skip the namespace answers the client with a reset. The restore removes the
  lock (CRIU), the original's Delete finds nothing of its own left; nothing is left.
- Delete of a task whose checkpoint (exit) left the lock removes it (both methods, both engines: pyshim's CRIU
  requests and `runc checkpoint`); the same namespace still takes the restore, and the connection goes on.
- keep-network-lock: Delete leaves the lock; a restore in the same namespace removes it, with data sent between
  Delete and restore echoed; a restore elsewhere (tcp-close, another namespace) has pyshim remove it from the source.
- A dump killed by pyshim's timeout (a CRIU action script that sleeps at post-dump: the lock is taken, the dump never
  ends) leaves the lock with the task running behind it, cut off: pyshim removes it and the task serves new
  connections (the established one does not survive CRIU's death, lock or none). A dump that fails on its own (the
  script fails) has CRIU unlock and the connection goes on. Nothing is left either way.
- A restore that fails (a CRIU action script failing at post-setup-namespaces) leaves the lock CRIU put on the
  namespace it restored into: pyshim removes what the failed restore added; a lock kept (keep-network-lock) for the
  restore stays, and the next restore there succeeds, the connection going on, and removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from harness.containerd import PYSHIM, Containerd
from harness.grpc_client import ContainerdClient
from harness.image import TestImage
from harness.netns_hosts import Host, Hosts, criu_locks
from test_tcp_restore import OPTION, PORT, annotations, echo, no_echo, remove, restore, start_server, status

from shim.api.containerd.runc.options import oci_pb2

METHODS = ("iptables", "nftables", "skip", "")  # "": the default


@pytest.fixture
def hosts():
    with Hosts() as made:  # each removed at the end; a test that passed fails if anything was left in them
        yield made


def lock_kind(locks: list[str]) -> str:
    """What kind of CRIU lock a namespace holds: "iptables" (its chain, in iptables and ip6tables), "nftables" (its
    table), "none"; anything else verbatim."""
    if not locks:
        return "none"
    if all(lock.startswith(("iptables:", "ip6tables:")) for lock in locks):
        return "iptables"
    if len(locks) == 1 and locks[0].startswith("nftables: table inet CRIU-"):
        return "nftables"
    return " | ".join(locks)


def server_flags(containerd: Containerd, images: Path, *pairs: str) -> list[str]:
    return annotations(f"{OPTION}tcp-established=true", *pairs)


def checkpoint_exit(containerd: Containerd, container_id: str, images: Path):
    """Tasks.Checkpoint with exit and an image path, what `ctr task checkpoint --exit --image-path` sends on 2.x
    (ctr 1.6/1.7 send it to io.containerd.runc.* only, and then store an empty checkpoint in the content store,
    whose second copy in one containerd fails with "already exists"). The result as (returncode, stderr), and
    how long it took."""
    started = time.monotonic()
    with ContainerdClient(containerd.address, containerd.namespace) as api:
        try:
            api.checkpoint(container_id, oci_pb2.CheckpointOptions(exit=True, image_path=str(images)))
            outcome = Done(0, "")
        except grpc.RpcError as exc:
            outcome = Done(1, exc.details() or "")
    return outcome, time.monotonic() - started


@dataclass
class Done:
    returncode: int
    stderr: str


def method_pairs(method: str) -> list[str]:
    return [f"{OPTION}network-lock={method}"] if method else []


@dataclass
class Outcome:
    checkpoint: str = ""
    lock_while_down: str = ""
    restore: str = ""
    while_down: str = ""  # what the client got for what it sent while the server was down
    after: str = ""
    lock_after_restore: str = ""
    lock_after_delete: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def read_line(sock, timeout: float = 5.0) -> str:
    sock.settimeout(timeout)
    received = b""
    try:
        while not received.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                return received.decode() + "EOF" if received else "EOF"
            received += chunk
    except OSError as exc:
        return type(exc).__name__
    return received.decode().rstrip("\n")


def each_method(containerd: Containerd, image: TestImage, hosts: Hosts, server: Host, method: str) -> Outcome:
    outcome = Outcome()
    images = containerd.tmp / f"checkpoint-{server.name}"
    original = start_server(containerd, image, PYSHIM, server, server_flags(containerd, images, *method_pairs(method)))
    restored = None
    try:
        with hosts.connect(server, PORT) as client:
            assert echo(client, "before") == "before"
            result, outcome.timings["checkpoint"] = checkpoint_exit(containerd, original, images)
            outcome.checkpoint = "ok" if result.returncode == 0 else result.stderr.strip()
            outcome.lock_while_down = lock_kind(criu_locks(server.name))
            client.sendall(b"while down\n")
            time.sleep(0.3)  # the segment reaches the namespace (and its lock) before the restore
            restored, result, outcome.timings["restore"] = restore(containerd, image, images, server)
            outcome.restore = "ok" if result.returncode == 0 else result.stderr.strip()
            outcome.while_down = read_line(client)
            outcome.after = no_echo(client, "after")
            outcome.lock_after_restore = lock_kind(criu_locks(server.name))
        remove(containerd, original)
        original = None
        outcome.lock_after_delete = lock_kind(criu_locks(server.name))
        return outcome
    finally:
        if restored:
            remove(containerd, restored, started=outcome.restore == "ok")
        if original:
            remove(containerd, original)


def serves_again(result: subprocess.CompletedProcess, client, server: Host) -> None:
    """The restore (its ctr result) succeeded, the client's connection is served again, no CRIU lock is left."""
    assert result.returncode == 0, result.stderr
    assert echo(client, "after") == "after"
    assert criu_locks(server.name) == []


def test_each_lock_method_with_a_connection_sending_while_the_server_is_down(containerd: Containerd,
                                                                            test_image: TestImage, hosts: Hosts):
    outcomes = {method or "default": each_method(containerd, test_image, hosts, hosts.server(n), method)
                for n, method in enumerate(METHODS)}
    for method, o in outcomes.items():
        print(f"containerd {containerd.version} network-lock={method}: {o}")
    for method, kind in (("iptables", "iptables"), ("nftables", "nftables"), ("default", "iptables")):
        o = outcomes[method]
        assert (o.checkpoint, o.lock_while_down, o.restore) == ("ok", kind, "ok"), (method, o)
        # the same connection: what was sent while the server was down, then more
        assert (o.while_down, o.after) == ("while down", "answered 'after'"), (method, o)
    skip = outcomes["skip"]
    assert (skip.checkpoint, skip.lock_while_down, skip.restore) == ("ok", "none", "ok"), skip
    assert skip.while_down in ("ConnectionResetError", "EOF"), skip  # the namespace answered with a reset
    for method, o in outcomes.items():
        assert (o.lock_after_restore, o.lock_after_delete) == ("none", "none"), (method, o)


def checkpointed(containerd: Containerd, image: TestImage, hosts: Hosts, server: Host, *pairs: str):
    """A server in `server` with a client connection, checkpointed with exit: (original id, client, images)."""
    images = containerd.tmp / f"checkpoint-{server.name}"
    original = start_server(containerd, image, PYSHIM, server, server_flags(containerd, images, *pairs))
    client = hosts.connect(server, PORT)
    assert echo(client, "before") == "before"
    result, _ = checkpoint_exit(containerd, original, images)
    assert result.returncode == 0, result.stderr
    return original, client, images


@pytest.mark.parametrize("method,engine", [("iptables", "criu"), ("nftables", "criu"), ("", "runc")],
                         ids=["iptables", "nftables", "runc-engine"])
def test_delete_removes_the_lock_a_checkpoint_with_exit_left(containerd: Containerd, test_image: TestImage,
                                                             hosts: Hosts, method: str, engine: str):
    server = hosts.server(0)
    pairs = [*method_pairs(method), f"{OPTION}engine={engine}"]
    original, client, images = checkpointed(containerd, test_image, hosts, server, *pairs)
    restored = None
    with client:
        try:
            assert lock_kind(criu_locks(server.name)) == (method or "iptables")  # runc: CRIU's default
            remove(containerd, original)
            assert criu_locks(server.name) == [], "Delete removed the lock"
            # The namespace still takes the restore: with no traffic in between, the connection goes on.
            restored, result, _ = restore(containerd, test_image, images, server)
            serves_again(result, client, server)
        finally:
            if restored:
                remove(containerd, restored)


def test_keep_network_lock_holds_across_delete_until_a_restore_there(containerd: Containerd,
                                                                     test_image: TestImage, hosts: Hosts):
    server = hosts.server(0)
    original, client, images = checkpointed(containerd, test_image, hosts, server, f"{OPTION}network-lock=nftables",
                                            f"{OPTION}keep-network-lock=true")
    restored = None
    with client:
        try:
            remove(containerd, original)
            assert lock_kind(criu_locks(server.name)) == "nftables", "kept past Delete"
            client.sendall(b"between delete and restore\n")
            time.sleep(0.3)
            restored, result, _ = restore(containerd, test_image, images, server)
            assert result.returncode == 0, result.stderr
            assert read_line(client) == "between delete and restore"
            assert criu_locks(server.name) == [], "the restore there removed it"
        finally:
            if restored:
                remove(containerd, restored)


def test_a_kept_lock_is_removed_by_a_restore_elsewhere(containerd: Containerd, test_image: TestImage,
                                                       hosts: Hosts):
    source, destination = hosts.server(0), hosts.server(1)
    original, client, images = checkpointed(containerd, test_image, hosts, source, f"{OPTION}keep-network-lock=true")
    restored = None
    with client:
        try:
            remove(containerd, original)
            assert lock_kind(criu_locks(source.name)) == "iptables", "kept past Delete"
            restored, result, _ = restore(containerd, test_image, images, destination, f"{OPTION}tcp-close=true")
            assert result.returncode == 0, result.stderr
            assert criu_locks(source.name) == [], "restored elsewhere: the source's lock removed"
            assert criu_locks(destination.name) == []
            with hosts.connect(destination, PORT) as fresh:
                assert echo(fresh, "new") == "new"
        finally:
            if restored:
                remove(containerd, restored)


# --- dumps that fail ---------------------------------------------------------------------------------------------

POST_DUMP_SCRIPT = """#!/bin/sh
# CRIU action script: at post-dump the network is locked and the images written; {what}.
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
echo $$ > {pid_file}
{action}
"""


@pytest.mark.parametrize("how", ["killed", "failed"])
@pytest.mark.parametrize("method", ["iptables", "nftables"])
def test_a_failed_or_killed_dump_leaves_no_lock_and_the_task_answering(containerd: Containerd,
                                                                       test_image: TestImage, hosts: Hosts,
                                                                       method: str, how: str):
    server = hosts.server(0)
    script, pid_file = containerd.tmp / "post-dump.sh", containerd.tmp / "post-dump.pid"
    script.write_text(POST_DUMP_SCRIPT.format(
        what="sleep past pyshim's timeout" if how == "killed" else "fail", pid_file=pid_file,
        action="exec sleep 30" if how == "killed" else "exit 1"))
    script.chmod(0o755)
    criu_config = containerd.tmp / "criu-dump.conf"
    criu_config.write_text(f"action-script {script}\n")
    images = containerd.tmp / "checkpoint"
    original = start_server(containerd, test_image, PYSHIM, server, server_flags(
        containerd, images, f"{OPTION}network-lock={method}", f"{OPTION}timeout=3", f"org.criu.config={criu_config}"))
    try:
        with hosts.connect(server, PORT) as client:
            assert echo(client, "before") == "before"
            result, took = checkpoint_exit(containerd, original, images)
            assert result.returncode != 0
            message = " ".join(result.stderr.split())
            if how == "killed":
                assert "did not finish within 3" in message or "killed" in message, message
            else:
                assert "One of more action scripts failed" in message or "Dumping FAILED" in message, message
            assert criu_locks(server.name) == [], "no lock left"
            assert status(containerd, original) == "RUNNING"
            assert not images.exists()
            # pyshim removed what the killed CRIU left; a failing CRIU unlocked on its own
            removed = f"removed CRIU's {method} network lock from {server.path} (the dump failed)"
            assert (removed in containerd.log_path.read_text(errors="replace")) == (how == "killed")
            if how == "failed":  # CRIU unlocked and put the connection back: it goes on
                assert echo(client, "still here") == "still here"
            else:
                # The connection's own process (the `cat` nc started for it) does not survive a CRIU killed after
                # dumping it, lock or none (the same with network-lock=skip); the namespace, unlocked, serves.
                print(f"{method}, killed: the established connection gives {no_echo(client, 'still here')}")
            with hosts.connect(server, PORT, timeout=5) as fresh:
                assert echo(fresh, "a new connection") == "a new connection"
    finally:
        if pid_file.exists():  # the script CRIU left sleeping when pyshim killed it
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        remove(containerd, original)
    assert criu_locks(server.name) == []


def session_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2:].split()[3])  # state ppid pgrp session


@pytest.mark.parametrize("method", ["iptables", "nftables"])
def test_a_worker_killed_after_criu_locked_leaves_no_lock_and_the_task_answering(containerd: Containerd,
                                                                                 test_image: TestImage, hosts: Hosts,
                                                                                 method: str):
    """The checkpoint worker (comm pyshim-ckpt) SIGKILLed while its CRIU holds the network lock (a CRIU action
    script sleeping at post-dump, with a client connection established): the server kills the worker's session,
    finds the lock in the dead CRIU's log, removes it, and the task serves new connections."""
    server = hosts.server(0)
    script, pid_file = containerd.tmp / "post-dump.sh", containerd.tmp / "post-dump.pid"
    script.write_text(POST_DUMP_SCRIPT.format(what="sleep until the test kills the worker", pid_file=pid_file,
                                              action="exec sleep 60"))
    script.chmod(0o755)
    criu_config = containerd.tmp / "criu-dump.conf"
    criu_config.write_text(f"action-script {script}\n")
    images = containerd.tmp / "checkpoint"
    original = start_server(containerd, test_image, PYSHIM, server, server_flags(
        containerd, images, f"{OPTION}network-lock={method}", f"{OPTION}timeout=120",
        f"org.criu.config={criu_config}"))
    try:
        with hosts.connect(server, PORT) as client:
            assert echo(client, "before") == "before"
            ctr = subprocess.Popen([*containerd.ctr_argv(), "task", "checkpoint", "--image-path", str(images),
                                    original], env=containerd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            try:
                deadline = time.monotonic() + 60
                while not pid_file.exists() and ctr.poll() is None:
                    assert time.monotonic() < deadline, "CRIU never reached post-dump"
                    time.sleep(0.02)
                locked = lock_kind(criu_locks(server.name))
                worker = session_of(int(pid_file.read_text()))
                assert Path(f"/proc/{worker}/comm").read_text().strip() == "pyshim-ckpt"
                os.kill(worker, signal.SIGKILL)
                _, stderr = ctr.communicate(timeout=60)
            finally:
                if ctr.poll() is None:
                    ctr.kill()
                    ctr.wait()
            message = " ".join(stderr.split())
            print(f"{method}: lock while CRIU slept: {locked}; ctr: {message[-300:]}")
            assert locked == method
            assert ctr.returncode != 0 and f"checkpoint worker pid {worker}" in message, message
            assert "ended without an answer" in message, message
            assert criu_locks(server.name) == [], "no lock left"
            assert status(containerd, original) == "RUNNING"
            assert not images.exists()
            log = containerd.log_path.read_text(errors="replace")
            assert f"removed CRIU's {method} network lock from {server.path} (its checkpoint worker died)" in log
            print(f"{method}, worker killed: the established connection gives {no_echo(client, 'still here')}")
            with hosts.connect(server, PORT, timeout=5) as fresh:
                assert echo(fresh, "a new connection") == "a new connection"
            # Nothing of the dead worker's dump stays: its work dir and partial image.
            bundle = containerd.bundle(original)
            assert not list(bundle.glob("criu-work-*")), list(bundle.glob("criu-work-*"))
            assert not list(images.parent.glob(f".{images.name}.pyshim-partial-*"))
    finally:
        if pid_file.exists():  # the script, if the session kill missed it
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        remove(containerd, original)
    assert criu_locks(server.name) == []


FAILING_RESTORE_SCRIPT = """#!/bin/sh
# CRIU action script: the restore fails after the namespaces are set up (and locked).
[ "$CRTOOLS_SCRIPT_ACTION" = post-setup-namespaces ] || exit 0
exit 1
"""


@pytest.mark.parametrize("method,keep", [("iptables", False), ("nftables", False), ("iptables", True),
                                         ("nftables", True)], ids=["iptables", "nftables", "iptables-kept",
                                                                   "nftables-kept"])
def test_a_failed_restore_leaves_no_lock_but_a_kept_one(containerd: Containerd, test_image: TestImage,
                                                        hosts: Hosts, method: str, keep: bool):
    """CRIU locks the namespace it restores into and does not unlock when the restore fails: pyshim removes what
    the failed restore added, and a lock kept for the restore stays for the next one, which removes it."""
    server = hosts.server(0)
    pairs = [f"{OPTION}network-lock={method}"] + ([f"{OPTION}keep-network-lock=true"] if keep else [])
    original, client, images = checkpointed(containerd, test_image, hosts, server, *pairs)
    script = containerd.tmp / "fail-restore.sh"
    script.write_text(FAILING_RESTORE_SCRIPT)
    script.chmod(0o755)
    criu_config = containerd.tmp / "criu-restore.conf"
    criu_config.write_text(f"action-script {script}\n")
    failed = restored = None
    with client:
        try:
            remove(containerd, original)
            kept = criu_locks(server.name)
            assert lock_kind(kept) == (method if keep else "none")
            failed, result, _ = restore(containerd, test_image, images, server, f"org.criu.config={criu_config}")
            assert result.returncode != 0 and "One of more action scripts failed" in result.stderr, result.stderr
            assert criu_locks(server.name) == kept, "what the failed restore added is gone, a kept lock stays"
            remove(containerd, failed, started=False)
            failed = None
            # what pyshim removed: the failed restore's own lock (with iptables, its jumps beside the kept ones; with
            # nftables a kept lock is the very table the restore used)
            removed = f"network lock from {server.path} (the restore failed)" in containerd.log_path.read_text(
                errors="replace")
            assert removed == (not keep or method == "iptables")
            restored, result, _ = restore(containerd, test_image, images, server)
            serves_again(result, client, server)
        finally:
            if failed:
                remove(containerd, failed, started=False)
            if restored:
                remove(containerd, restored)


HOLDING_RESTORE_SCRIPT = """#!/bin/sh
# CRIU action script: the restore stops after the namespaces are set up (and locked) until it is killed; READY says so.
[ "$CRTOOLS_SCRIPT_ACTION" = post-setup-namespaces ] || exit 0
touch {ready}
exec sleep 120
"""


@pytest.mark.parametrize("method", ["iptables", "nftables"])
def test_a_shim_killed_mid_restore_leaves_no_lock(containerd: Containerd, test_image: TestImage, hosts: Hosts,
                                                  method: str):
    """The shim SIGKILLed while CRIU, restoring into a namespace given by path, holds its lock there: containerd runs
    the dead shim's `delete`, which ends runc and CRIU (shim.criu.unfinished) and removes the lock the restore took
    (recorded in the restore's marker with what the namespace held before); the namespace serves a restore again."""
    server = hosts.server(0)
    original, client, images = checkpointed(containerd, test_image, hosts, server, f"{OPTION}network-lock={method}")
    ready = containerd.tmp / f"restore-holding-{method}"
    script = containerd.tmp / f"hold-restore-{method}.sh"
    script.write_text(HOLDING_RESTORE_SCRIPT.format(ready=ready))
    script.chmod(0o755)
    criu_config = containerd.tmp / f"criu-hold-{method}.conf"
    criu_config.write_text(f"action-script {script}\n")
    held = restored = None
    with client:
        try:
            remove(containerd, original)
            assert criu_locks(server.name) == []  # the dump's lock went with the original's Delete
            held = containerd.new_id("held")
            options = containerd.tmp / f"{held}.toml"
            options.write_text(f'Root = "{containerd.runc_root}"\nCriuImagePath = "{images}"\n')
            containerd.ctr("containers", "create", "--runtime", PYSHIM, "--runtime-config-path", str(options),
                           "--with-ns", f"network:{server.path}",
                           *annotations(f"{OPTION}network-lock={method}", f"org.criu.config={criu_config}"),
                           test_image.ref, held, "sh")
            starting = subprocess.Popen([*containerd.ctr_argv(), "task", "start", "-d", "--fifo-dir",
                                         str(containerd.fifo_dir), held], env=containerd.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + 60
                while not ready.exists():
                    assert time.monotonic() < deadline and starting.poll() is None, "the restore never held"
                    time.sleep(0.02)
                assert lock_kind(criu_locks(server.name)) == method  # CRIU's restore lock, as the shim dies
                shim = containerd.shim_pid(held)
                assert shim is not None
                containerd.kill_adopted(shim, signal.SIGKILL)
                _, error = starting.communicate(timeout=60)
            finally:
                if starting.poll() is None:
                    starting.kill()
                    starting.wait()
            assert starting.returncode != 0
            # containerd runs the dead shim's `delete` when it sees the connection close: bounded wait for its work
            deadline = time.monotonic() + 20
            while criu_locks(server.name) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert criu_locks(server.name) == [], "the killed restore's lock is gone"
            remove(containerd, held, started=False)
            held = None
            restored, result, _ = restore(containerd, test_image, images, server, f"{OPTION}network-lock={method}")
            serves_again(result, client, server)
        finally:
            if held:
                remove(containerd, held, started=False)
            if restored:
                remove(containerd, restored)

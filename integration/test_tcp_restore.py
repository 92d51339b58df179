"""A live TCP connection across checkpoint and restore, for a container whose network namespace is given by path.

Every "host" is a network namespace the test made (harness.netns_hosts): the server host holds the container's
namespace (`ctr run --with-ns network:<path>`, as CNI does) with 10.123.<n>.1, the client host a Python socket with
10.123.<n>.2, a veth between them. The server is busybox `nc -ll -e /bin/cat`: one echoing cat per connection.

Same namespace, pyshim against the Go runc shim, two ways of asking for established TCP:
- ctr: `ctr task checkpoint --exit --image-path`, tcp-established by the annotation
  io.pyshim.checkpoint.tcp-established=true (ctr has no flag for it; ctr 1.6/1.7 send checkpoint options to
  io.containerd.runc.* runtimes only, so there exit and image path are annotations too). The Go shim ignores the
  annotation: CRIU refuses its dump ("Connected TCP socket, consider using --tcp-established").
- containerd's API: Tasks.Checkpoint with exit and open_tcp, Tasks.Create from the image path, Tasks.Start: the same
  calls to both shims. The Go shim dumps with --tcp-established but does not pass it to `runc restore`: CRIU fails
  ("Connected TCP socket in image"), the connection is lost and CRIU's network lock stays in the namespace.
Under pyshim, both ways, the very same client socket keeps echoing after the restore.

A new namespace with another address (pyshim): the restore is refused before runc runs, naming the connection and
suggesting tcp-close (CRIU's own failure there is "Can't bind inet socket back", with its lock left behind), and
the same checkpoint then restores where it came from; with tcp-close on the restoring container the connection is
closed and the server serves new connections at its new address.

Nothing is left behind: no namespace, veth or iptables rule (Hosts.close(), asserted after every test). A namespace
removed on purpose with CRIU's lock in it is asserted as such by the test that removes it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from harness.containerd import PYSHIM, RUNC_V2, RUNTIMES, Containerd
from harness.grpc_client import ContainerdClient
from harness.image import TestImage
from harness.netns_hosts import Host, Hosts, echo, iptables_rules, no_echo

from shim.api.containerd.runc.options import oci_pb2

PORT = 7000
SERVER = ("nc", "-ll", "-p", str(PORT), "-e", "/bin/cat")
OPTION = "io.pyshim.checkpoint."
TCP_ESTABLISHED_STATE = "01"  # /proc/net/tcp's st column


@pytest.fixture
def hosts():
    with Hosts() as made:  # each removed at the end; a test that passed fails if anything was left in them
        yield made


# --- helpers ---------------------------------------------------------------------------------------------------

def annotations(*pairs: str) -> list[str]:
    return [flag for pair in pairs for flag in ("--annotation", pair)]


def checkpoint_annotations(containerd: Containerd, images: Path) -> list[str]:
    pairs = [f"{OPTION}tcp-established=true"]
    if containerd.version != "2":  # ctr 1.6/1.7 send --exit and --image-path to runc runtimes only
        pairs += [f"{OPTION}leave-running=false", f"{OPTION}image-path={images}"]
    return annotations(*pairs)


def task_line(containerd: Containerd, container_id: str) -> list[str]:
    for line in containerd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return fields
    return [container_id, "0", "ABSENT"]


def status(containerd: Containerd, container_id: str) -> str:
    return task_line(containerd, container_id)[2]


def remove(containerd: Containerd, container_id: str, *, started: bool = True) -> None:
    # A task whose restore never started has no process: plain `task rm` deletes it, as containerd allows for a
    # created task without pid. `rm -f` would first wait for an exit that cannot come (forever with ctr 1.6).
    containerd.ctr("task", "rm", *(["-f"] if started else []), container_id, check=False)
    containerd.ctr("containers", "rm", container_id, check=False)


def has_criu_lock(host: Host) -> bool:
    return any("CRIU" in rule for rule in iptables_rules(host.name))


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def start_server(containerd: Containerd, image: TestImage, runtime: str, host: Host, flags: list[str]) -> str:
    container_id = containerd.new_id("srv")
    containerd.run(container_id, image, *SERVER, runtime=runtime, extra=["--with-ns", f"network:{host.path}", *flags])
    return container_id


def checkpoint_exit(containerd: Containerd, container_id: str, images: Path):
    started = time.monotonic()
    result = containerd.ctr("task", "checkpoint", "--exit", "--image-path", str(images), container_id, check=False,
                            timeout=60)
    return result, time.monotonic() - started


def restore(containerd: Containerd, image: TestImage, images: Path, host: Host, *pairs: str):
    """A new pyshim container from the checkpoint (CriuImagePath in its runtime options file), in host's
    namespace: its id, `ctr task start`'s result and how long that took."""
    container_id = containerd.new_id("restored")
    options = containerd.tmp / f"{container_id}.toml"
    options.write_text(f'Root = "{containerd.runc_root}"\nCriuImagePath = "{images}"\n')
    containerd.ctr("containers", "create", "--runtime", PYSHIM, "--runtime-config-path", str(options),
                   "--with-ns", f"network:{host.path}", *annotations(*pairs), image.ref, container_id, *SERVER)
    started = time.monotonic()
    result = containerd.ctr("task", "start", "-d", "--fifo-dir", str(containerd.fifo_dir), container_id,
                            check=False, timeout=60)
    return container_id, result, time.monotonic() - started


def established_in(containerd: Containerd, container_id: str) -> int:
    """Established TCP sockets in the task's network namespace, from its init's /proc."""
    pid = task_line(containerd, container_id)[1]
    count = 0
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        count += sum(1 for line in lines if line.split()[3] == TCP_ESTABLISHED_STATE)
    return count


# --- the same namespace, pyshim against the Go shim ------------------------------------------------------------

@dataclass
class Outcome:
    before: str = ""
    checkpoint: str = ""  # "ok", or what the caller was told
    status_after_checkpoint: str = ""
    lock_after_checkpoint: bool = False  # CRIU's iptables lock in the server's namespace while nothing runs
    restore: str = ""  # "ok", what the caller was told, or "" when there was nothing to restore
    restored_status: str = ""
    same_connection: list[str] = field(default_factory=list)  # what the ORIGINAL client socket gets afterwards
    new_connection: str = ""
    rules_after: list[str] = field(default_factory=list)  # in the server's namespace at the end
    criu_log: str = ""  # the failing dump's or restore's CRIU log
    timings: dict[str, float] = field(default_factory=dict)


def after_restore(containerd: Containerd, hosts: Hosts, server: Host, restored: str, client: socket.socket,
                  outcome: Outcome) -> None:
    if outcome.restore == "ok":
        outcome.restored_status = status(containerd, restored)
        outcome.same_connection = [echo(client, f"after the restore {i}") for i in range(3)]
        with hosts.connect(server, PORT) as fresh:
            outcome.new_connection = echo(fresh, "a new connection")
    else:
        outcome.same_connection = [no_echo(client, "after a failed restore")]
    outcome.rules_after = iptables_rules(server.name)


def through_ctr(containerd: Containerd, image: TestImage, hosts: Hosts, server: Host, runtime: str) -> Outcome:
    """`ctr task checkpoint --exit` with tcp-established asked for by annotation; pyshim restores through its
    runtime options file (ctr cannot name an image path for the Go shim, whose dump is refused anyway)."""
    outcome = Outcome()
    images = containerd.tmp / f"checkpoint-{server.name}"
    original = start_server(containerd, image, runtime, server, checkpoint_annotations(containerd, images))
    restored = None
    try:
        with hosts.connect(server, PORT) as client:
            outcome.before = echo(client, "before")
            result, outcome.timings["checkpoint"] = checkpoint_exit(containerd, original, images)
            outcome.status_after_checkpoint = status(containerd, original)
            if result.returncode != 0:
                outcome.checkpoint = result.stderr.strip()
                outcome.criu_log = read_log(containerd.bundle(original) / "criu-dump.log")
                outcome.same_connection = [echo(client, "after a refused checkpoint")]
                return outcome
            outcome.checkpoint = "ok"
            outcome.lock_after_checkpoint = has_criu_lock(server)
            remove(containerd, original)
            restored, result, outcome.timings["restore"] = restore(containerd, image, images, server)
            outcome.restore = "ok" if result.returncode == 0 else result.stderr.strip()
            after_restore(containerd, hosts, server, restored, client, outcome)
        return outcome
    finally:
        if restored:
            remove(containerd, restored, started=outcome.restore == "ok")
        remove(containerd, original)


def through_the_api(containerd: Containerd, image: TestImage, hosts: Hosts, server: Host, runtime: str) -> Outcome:
    """Tasks.Checkpoint with exit, open_tcp and an image path (what a client asking for established TCP sends),
    then Tasks.Create of a new container from that path (runc Options' CriuImagePath) and Tasks.Start."""
    outcome = Outcome()
    images = containerd.tmp / f"checkpoint-{server.name}"
    original = start_server(containerd, image, runtime, server, [])
    restored = None
    with ContainerdClient(containerd.address, containerd.namespace) as api:
        try:
            with hosts.connect(server, PORT) as client:
                outcome.before = echo(client, "before")
                started = time.monotonic()
                api.checkpoint(original, oci_pb2.CheckpointOptions(exit=True, open_tcp=True, image_path=str(images)))
                outcome.timings["checkpoint"] = time.monotonic() - started
                outcome.checkpoint = "ok"
                outcome.status_after_checkpoint = status(containerd, original)
                outcome.lock_after_checkpoint = has_criu_lock(server)
                remove(containerd, original)

                restored = containerd.new_id("restored")
                runtime_flags = ["--runtime", runtime]
                if runtime == PYSHIM:
                    runtime_flags += ["--runtime-config-path", str(containerd.pyshim_config())]
                containerd.ctr("containers", "create", *runtime_flags, "--with-ns", f"network:{server.path}",
                               image.ref, restored, *SERVER)
                api.create_task(restored, options=oci_pb2.Options(root=str(containerd.runc_root),
                                                                  criu_image_path=str(images)))
                started = time.monotonic()
                try:
                    api.start_task(restored)
                    outcome.restore = "ok"
                except grpc.RpcError as exc:
                    outcome.restore = exc.details()
                    bundle = containerd.bundle(restored)  # the Go shim's CRIU work dir is <bundle>/work
                    outcome.criu_log = read_log(bundle / "work" / "restore.log") or read_log(
                        bundle / "criu-restore.log")
                outcome.timings["restore"] = time.monotonic() - started
                after_restore(containerd, hosts, server, restored, client, outcome)
            return outcome
        finally:
            if restored:
                remove(containerd, restored, started=outcome.restore == "ok")
            remove(containerd, original)


def report(containerd: Containerd, how: str, outcomes: dict[str, Outcome]) -> None:
    print(f"containerd {containerd.version}, {how}: " + "; ".join(
        f"{runtime} " + ", ".join(f"{k} {v:.3f}s" for k, v in o.timings.items()) for runtime, o in outcomes.items()))


def assert_pyshim_kept_the_connection(pyshim: Outcome) -> None:
    assert (pyshim.before, pyshim.checkpoint, pyshim.status_after_checkpoint) == ("before", "ok", "STOPPED")
    assert pyshim.lock_after_checkpoint, "CRIU's network lock should hold the namespace until the restore"
    assert (pyshim.restore, pyshim.restored_status) == ("ok", "RUNNING")
    # the same client socket, data both ways: the connection itself was restored
    assert pyshim.same_connection == [f"after the restore {i}" for i in range(3)]
    assert pyshim.new_connection == "a new connection"
    assert pyshim.rules_after == [], "the restore released CRIU's network lock"


def test_live_connection_continues_after_restore_through_ctr(containerd: Containerd, test_image: TestImage,
                                                             hosts: Hosts):
    outcomes = {runtime: through_ctr(containerd, test_image, hosts, hosts.server(n), runtime)
                for n, runtime in enumerate(RUNTIMES)}
    report(containerd, "ctr task checkpoint --exit", outcomes)
    assert_pyshim_kept_the_connection(outcomes[PYSHIM])

    # The Go shim is never asked for tcp-established: CRIU refuses the dump, the task and its connection go on.
    go = outcomes[RUNC_V2]
    assert (go.before, go.status_after_checkpoint, go.restore) == ("before", "RUNNING", "")
    assert "criu failed" in go.checkpoint, go.checkpoint
    assert "Connected TCP socket, consider using --tcp-established option" in go.criu_log, go.criu_log[-2000:]
    assert go.same_connection == ["after a refused checkpoint"]


def test_live_connection_continues_after_restore_through_the_api(containerd: Containerd, test_image: TestImage,
                                                                 hosts: Hosts):
    servers = {runtime: hosts.server(n) for n, runtime in enumerate(RUNTIMES)}
    outcomes = {runtime: through_the_api(containerd, test_image, hosts, servers[runtime], runtime)
                for runtime in RUNTIMES}
    report(containerd, "Tasks.Checkpoint exit+open_tcp", outcomes)
    assert_pyshim_kept_the_connection(outcomes[PYSHIM])

    # The Go shim dumps with --tcp-established but restores without it: CRIU cannot restore the connection, the
    # restore fails, the client's connection is gone, and CRIU's lock is left in the namespace (twice over).
    go = outcomes[RUNC_V2]
    assert (go.before, go.checkpoint, go.status_after_checkpoint, go.lock_after_checkpoint) == (
        "before", "ok", "STOPPED", True)
    assert "OCI runtime restore failed" in go.restore, go.restore
    assert "Connected TCP socket in image" in go.criu_log, go.criu_log[-2000:]
    assert go.same_connection == ["TimeoutError"], go.same_connection  # its packets dropped by the lock
    assert go.rules_after and all("CRIU" in rule for rule in go.rules_after)
    # the Go shim's namespace goes with its lock in it (recorded above), so that nothing is left behind
    assert hosts.remove(servers[RUNC_V2]) == go.rules_after


# --- another namespace, another address (pyshim) ------------------------------------------------------------

def checkpointed_server(containerd: Containerd, image: TestImage, hosts: Hosts, source: Host):
    """A pyshim server in `source` with a live client connection, checkpointed with exit and removed."""
    images = containerd.tmp / "checkpoint"
    original = start_server(containerd, image, PYSHIM, source, checkpoint_annotations(containerd, images))
    client = hosts.connect(source, PORT)
    assert echo(client, "before") == "before"
    result, _ = checkpoint_exit(containerd, original, images)
    assert result.returncode == 0, result.stderr
    remove(containerd, original)
    return client, images


def test_restore_into_another_address_is_refused_and_the_checkpoint_stays_usable(containerd: Containerd,
                                                                                 test_image: TestImage, hosts: Hosts):
    source, elsewhere = hosts.server(0), hosts.server(1)
    client, images = checkpointed_server(containerd, test_image, hosts, source)
    refused = restored = None
    with client:
        try:
            refused, result, _ = restore(containerd, test_image, images, elsewhere)
            assert result.returncode != 0
            message = " ".join(result.stderr.split())
            for expected in ("refused: 1 established TCP connection(s) (10.123.0.1:7000 <-> 10.123.0.2:",
                             f"cannot be restored into the network namespace {elsewhere.path}: it lacks 10.123.0.1 "
                             "(its addresses: 10.123.1.1)",
                             "or close these connections on restore with tcp-close (annotation "
                             "io.pyshim.checkpoint.tcp-close=true on the restoring container)"):
                assert expected in message, message
            assert iptables_rules(elsewhere.name) == [], "a refused restore must not touch the namespace"
            remove(containerd, refused, started=False)
            refused = None

            # Nothing was lost: the same checkpoint restores where it came from, the connection goes on.
            restored, result, _ = restore(containerd, test_image, images, source)
            assert result.returncode == 0, result.stderr
            assert echo(client, "still here") == "still here"
        finally:
            if refused:
                remove(containerd, refused, started=False)
            if restored:
                remove(containerd, restored)


def test_tcp_close_restores_into_another_address_and_serves_new_connections(containerd: Containerd,
                                                                            test_image: TestImage, hosts: Hosts):
    source, destination = hosts.server(0), hosts.server(1)
    client, images = checkpointed_server(containerd, test_image, hosts, source)
    restored = None
    with client:
        try:
            # The source host goes away, as a migrated container's does. CRIU's lock held its namespace until
            # the original task was deleted: pyshim removed it then (shim.criu.netlock), so nothing is left.
            assert hosts.remove(source) == []

            restored, result, _ = restore(containerd, test_image, images, destination, f"{OPTION}tcp-close=true")
            assert result.returncode == 0, result.stderr
            assert status(containerd, restored) == "RUNNING"
            assert established_in(containerd, restored) == 0, "tcp-close restores no established connection"
            assert not no_echo(client, "anyone?").startswith("answered")
            for i in range(2):
                with hosts.connect(destination, PORT) as fresh:
                    assert echo(fresh, f"new {i}") == f"new {i}"
            assert iptables_rules(destination.name) == []
        finally:
            if restored:
                remove(containerd, restored)

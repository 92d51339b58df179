"""External unix sockets across checkpoint/restore under pyshim, on containerd 2.x and 1.6.

The container runs unixpeer (harness/unixpeer.c): a datagram socket connected to `dg.sock` and a stream socket
connected to `st.sock`, both bound by the test in a directory bind-mounted into the container at the same path.
Asked "ping N" on the stream, it answers "pong N" there and sends "dgram N" on the datagram socket, so one
exchange shows messages flowing on both. Options come as `io.pyshim.checkpoint.*` annotations (ctr has no flag
for external unix sockets, and 1.6 sends none of its checkpoint flags to pyshim).

1. Without ext-unix-sk the checkpoint is refused before the task is touched: the error names both sockets (pid,
   fd, type, inode, peer path); the task is RUNNING, no image is written, the same connections still carry
   messages.
2. With ext-unix-sk, the peers in the container's network namespace (a namespace the test made, given to the
   container by path as a pod sandbox is; or the host's): checkpoint with exit, restore under a new id, and
   messages flow on both afterwards. CRIU reconnects the datagram socket to dg.sock, and the stream socket anew
   to st.sock: the host listener accepts a new connection, the old one saw EOF at the dump.
3. With ext-unix-sk, the container in a private network namespace and the peers in the host's: CRIU 4.2.1 looks
   unix sockets up in the container's namespace only, so it cannot dump the datagram socket (its peer is in the
   host's), and reconnects by the peer's path inside the container (the directory must be mounted at the same
   path): pyshim refuses both beforehand, each with its reason, the task untouched. The stream socket alone is
   fine there (the kernel created its accepting end in the container's namespace): checkpoint and restore work.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from harness import ids, unixpeer
from harness.containerd import PYSHIM, Containerd
from harness.image import TestImage
from harness.tasks import task_pid, task_status, wait_status

from shim.netns import named
from shim.netns.enter import socket_in
from shim.netns.refs import path_of

pytestmark = pytest.mark.parametrize("containerd_version", ["2", "1.6"], ids=lambda v: f"containerd-{v}")

ANNOTATION = "io.pyshim.checkpoint."
HELPER_DIR = "/opt/unixpeer"
TIMEOUT = 10.0


@pytest.fixture(scope="session")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reason := unixpeer.unavailable_reason():
        pytest.skip(reason)
    return unixpeer.build_unixpeer(tmp_path_factory.mktemp("unixpeer"))


class Peers:
    """The host's ends: a datagram socket bound to <directory>/dg.sock and a stream listener at st.sock, created in
    the network namespace `netns` (a /var/run/netns name; None: the test's own)."""

    def __init__(self, directory: Path, netns: str | None = None):
        directory.mkdir(mode=0o755)
        self.directory = directory
        self.dgram_path, self.stream_path = str(directory / "dg.sock"), str(directory / "st.sock")
        self.dgram = socket_in(netns, socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dgram.bind(self.dgram_path)
        self.dgram.settimeout(TIMEOUT)
        self.listener = socket_in(netns, socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.stream_path)
        self.listener.listen(4)
        self.listener.settimeout(TIMEOUT)
        self.connections: list[socket.socket] = []

    def accept(self, with_dgram: bool = True) -> socket.socket:
        """The container's stream connection, once it said hello on both sockets."""
        connection, _ = self.listener.accept()
        connection.settimeout(TIMEOUT)
        self.connections.append(connection)
        assert read_line(connection) == "hello"
        if with_dgram:
            assert self.dgram.recv(100) == b"dgram hello"
        return connection

    def exchange(self, connection: socket.socket, word: str, with_dgram: bool = True) -> tuple[str, str | None]:
        """Ask "ping word": the stream's answer and what came on the datagram socket."""
        connection.sendall(f"ping {word}\n".encode())
        reply = read_line(connection)
        return reply, self.dgram.recv(100).decode() if with_dgram else None

    def close(self) -> None:
        for sk in (self.dgram, self.listener, *self.connections):
            sk.close()


def read_line(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(100)
        if not chunk:
            return data.decode() + "<EOF>"
        data += chunk
    return data.decode().rstrip("\n")


def container_flags(peers: Peers, helper: Path, images: Path, *, ext_unix_sk: bool, netns: str | None = None,
                    net_host: bool = False, inside: str | None = None) -> list[str]:
    """Mounts (the peers' directory at `inside`, by default its own path; the helper), network, annotations."""
    flags = ["--mount", f"type=bind,src={peers.directory},dst={inside or peers.directory},options=rbind:rw",
             "--mount", f"type=bind,src={helper.parent},dst={HELPER_DIR},options=rbind:ro",
             "--annotation", f"{ANNOTATION}leave-running=false", "--annotation", f"{ANNOTATION}image-path={images}"]
    if ext_unix_sk:
        flags += ["--annotation", f"{ANNOTATION}ext-unix-sk=true"]
    if netns:
        flags += ["--with-ns", f"network:{path_of(netns)}"]
    if net_host:
        flags.append("--net-host")
    return flags


def command(peers: Peers, *, inside: str | None = None, dgram: bool = True) -> list[str]:
    directory = inside or str(peers.directory)
    return [f"{HELPER_DIR}/unixpeer", f"{directory}/dg.sock" if dgram else "-", f"{directory}/st.sock"]


def socket_inode(pid: int, fd: int) -> int:
    return int(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1])


def checkpoint(containerd: Containerd, container_id: str, images: Path):
    # --exit and --image-path reach pyshim from 2.x's ctr only; the annotations say the same for 1.6
    return containerd.ctr("task", "checkpoint", "--exit", "--image-path", str(images), container_id, check=False,
                          timeout=60)


def restore(containerd: Containerd, image: TestImage, images: Path, flags: list[str], argv: list[str]) -> str:
    """A new container with the same mounts and namespaces, started from the checkpoint."""
    restored = containerd.new_id("restored")
    options = containerd.tmp / f"restore-{restored}.toml"
    options.write_text(f'Root = "{containerd.runc_root}"\nCriuImagePath = "{images}"\n')
    containerd.ctr("containers", "create", "--runtime", PYSHIM, "--runtime-config-path", str(options), *flags,
                   image.ref, restored, *argv)
    containerd.ctr("task", "start", "-d", "--fifo-dir", str(containerd.fifo_dir), restored, timeout=60)
    return restored


def remove(containerd: Containerd, *container_ids: str) -> None:
    for container_id in container_ids:
        containerd.ctr("task", "rm", "-f", container_id, check=False)
        containerd.ctr("containers", "rm", container_id, check=False)


# --- 1. without ext-unix-sk ----------------------------------------------------------------------------------------

def test_without_ext_unix_sk_the_preflight_names_both_sockets(containerd: Containerd, test_image: TestImage,
                                                               helper: Path):
    peers = Peers(containerd.tmp / "peers")
    images = containerd.tmp / "images"
    container_id = containerd.new_id("unix")
    try:
        containerd.run(container_id, test_image, *command(peers), runtime=PYSHIM,
                       extra=container_flags(peers, helper, images, ext_unix_sk=False))
        connection = peers.accept()
        assert peers.exchange(connection, "1") == ("pong 1", "dgram 1")
        pid = task_pid(containerd, container_id)
        dgram, stream = socket_inode(pid, 3), socket_inode(pid, 4)

        refused = checkpoint(containerd, container_id, images)
        assert refused.returncode != 0
        error = refused.stderr
        assert (f"checkpoint of {container_id}: 2 unix socket(s) of the container are connected to peers outside"
                in error)
        assert (f"pid {pid} (unixpeer) fd 3: datagram socket {dgram} connected to {peers.dgram_path} (peer inode "
                in error)
        assert (f"pid {pid} (unixpeer) fd 4: stream socket {stream} connected to {peers.stream_path} (peer inode "
                in error)
        assert "io.pyshim.checkpoint.ext-unix-sk=true" in error
        # before touching the task: running, nothing written, the same connections work
        assert (task_status(containerd, container_id), images.exists()) == ("RUNNING", False)
        assert peers.exchange(connection, "2") == ("pong 2", "dgram 2")
    finally:
        remove(containerd, container_id)
        peers.close()


# --- 2. with ext-unix-sk, the peers in the container's network namespace --------------------------------------------

@pytest.mark.parametrize("network", ["pod-netns", "host-netns"])
def test_ext_unix_sk_checkpoint_and_restore_reconnect_both(containerd: Containerd, test_image: TestImage,
                                                           helper: Path, network: str):
    netns = ids.unique("pyshim-ux") if network == "pod-netns" else None
    if netns:
        named.create(netns)
    peers = Peers(containerd.tmp / "peers", netns)
    images = containerd.tmp / "images"
    flags = container_flags(peers, helper, images, ext_unix_sk=True, netns=netns, net_host=netns is None)
    original, restored = containerd.new_id("unix"), None
    try:
        containerd.run(original, test_image, *command(peers), runtime=PYSHIM, extra=flags)
        connection = peers.accept()
        assert peers.exchange(connection, "1") == ("pong 1", "dgram 1")

        dumped = checkpoint(containerd, original, images)
        assert dumped.returncode == 0, dumped.stderr
        assert wait_status(containerd, original, "STOPPED", TIMEOUT) == "STOPPED"
        assert read_line(connection) == "<EOF>"  # the dump ended the container's end of it
        record = json.loads((images / "pyshim-checkpoint.json").read_text())
        assert (record["options"]["ext_unix_sk"], record["options"]["leave_running"]) == (True, False)

        restored = restore(containerd, test_image, images, flags, command(peers))
        assert task_status(containerd, restored) == "RUNNING"
        reconnected, _ = peers.listener.accept()  # CRIU connected the stream socket anew to st.sock
        reconnected.settimeout(TIMEOUT)
        peers.connections.append(reconnected)
        # no second hello: the restored process goes on where it was, with both sockets connected
        assert peers.exchange(reconnected, "2") == ("pong 2", "dgram 2")
        assert peers.exchange(reconnected, "3") == ("pong 3", "dgram 3")
    finally:
        remove(containerd, *filter(None, (original, restored)))
        peers.close()
        if netns:
            named.remove(netns, missing_ok=True)


# --- 3. with ext-unix-sk, a private network namespace and the peers in the host's -----------------------------------

def test_private_netns_refuses_datagram_and_other_path_beforehand(containerd: Containerd, test_image: TestImage,
                                                                  helper: Path):
    peers = Peers(containerd.tmp / "peers")
    images = containerd.tmp / "images"
    inside = "/ext"  # the peers' directory somewhere else inside the container
    container_id = containerd.new_id("unix")
    try:
        containerd.run(container_id, test_image, *command(peers, inside=inside), runtime=PYSHIM,
                       extra=container_flags(peers, helper, images, ext_unix_sk=True, inside=inside))
        connection = peers.accept()
        pid = task_pid(containerd, container_id)
        dgram, stream = socket_inode(pid, 3), socket_inode(pid, 4)

        refused = checkpoint(containerd, container_id, images)
        assert refused.returncode != 0
        error = refused.stderr
        assert (f"checkpoint of {container_id} with ext-unix-sk: CRIU cannot checkpoint and restore 2 external unix "
                "socket(s)") in error
        assert (f"fd 3: datagram socket {dgram} connected to {peers.dgram_path}" in error
                and f"(it fails with 'Unix socket {dgram} without peer " in error)
        assert (f"fd 4: stream socket {stream} connected to {peers.stream_path}" in error
                and f"restore reconnects it to {peers.stream_path} inside the container, where that path does not "
                    "lead to the peer" in error)
        assert (task_status(containerd, container_id), images.exists()) == ("RUNNING", False)
        assert peers.exchange(connection, "1") == ("pong 1", "dgram 1")
    finally:
        remove(containerd, container_id)
        peers.close()


def test_private_netns_stream_socket_checkpoint_and_restore(containerd: Containerd, test_image: TestImage,
                                                            helper: Path):
    peers = Peers(containerd.tmp / "peers")
    images = containerd.tmp / "images"
    flags = container_flags(peers, helper, images, ext_unix_sk=True)
    argv = command(peers, dgram=False)
    original, restored = containerd.new_id("unix"), None
    try:
        containerd.run(original, test_image, *argv, runtime=PYSHIM, extra=flags)
        connection = peers.accept(with_dgram=False)
        assert peers.exchange(connection, "1", with_dgram=False) == ("pong 1", None)

        dumped = checkpoint(containerd, original, images)
        assert dumped.returncode == 0, dumped.stderr
        assert read_line(connection) == "<EOF>"

        restored = restore(containerd, test_image, images, flags, argv)
        reconnected, _ = peers.listener.accept()
        reconnected.settimeout(TIMEOUT)
        peers.connections.append(reconnected)
        assert peers.exchange(reconnected, "2", with_dgram=False) == ("pong 2", None)
        assert task_status(containerd, restored) == "RUNNING"
    finally:
        remove(containerd, *filter(None, (original, restored)))
        peers.close()

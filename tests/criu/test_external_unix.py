"""External unix sockets found with real sockets: a child holding a datagram socket and a stream
socket connected to sockets the test bound, a socketpair end whose other end the test keeps,
and pairs internal to its own tree (one end in a grandchild). Then what a checkpoint makes of
them: the error without ext-unix-sk, the refusals and the inodes to declare with it.
The namespace test needs root (a child in its own network namespace)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace

import pycriu.rpc_pb2 as rpc
import pytest

from shim.background import BackgroundTasks
from shim.bundle.config import Bundle
from shim.criu import external_unix
from shim.criu.checkpoint import Checkpointer
from shim.criu.external_unix import ExternalUnixSocket, Holder, check, find
from shim.criu.options import CheckpointOptions
from shim.criu.plan import ContainerFacts, dump_request
from shim.errors import FailedPrecondition

from .helpers import needs_criu, reaping, run

# The child: connects to the test's sockets, keeps the socketpair end it was given, makes two
# internal pairs (one shared with a grandchild), reports its fds and waits for stdin to close.
CHILD = r"""
import json, os, signal, socket, sys
dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
dgram.connect(sys.argv[1])
stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
stream.connect(sys.argv[2])
a, b = socket.socketpair()
c, d = socket.socketpair()
grandchild = os.fork()
if grandchild == 0:
    os.close(0)
    while True:
        signal.pause()
d.close()
print(json.dumps({"dgram": dgram.fileno(), "stream": stream.fileno(), "pair": int(sys.argv[3]),
                  "internal": [a.fileno(), b.fileno(), c.fileno()], "grandchild": grandchild}), flush=True)
sys.stdin.read()
"""


class Host:
    """The test's side: a bound datagram socket, a stream listener, a socketpair end; and the child."""

    def __init__(self, directory, prefix: list[str] = ()):
        self.dgram_path, self.stream_path = str(directory / "dg.sock"), str(directory / "st.sock")
        self.dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dgram.bind(self.dgram_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.stream_path)
        self.listener.listen(1)
        self.ours, theirs = socket.socketpair()
        self.child = subprocess.Popen(
            [*prefix, sys.executable, "-c", CHILD, self.dgram_path, self.stream_path, str(theirs.fileno())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=[theirs.fileno()])
        theirs.close()
        self.accepted, _ = self.listener.accept()
        self.fds = json.loads(self.child.stdout.readline())

    def inode(self, fd: int) -> int:
        return int(os.readlink(f"/proc/{self.child.pid}/fd/{fd}")[8:-1])

    def close(self) -> None:
        try:
            os.kill(self.fds["grandchild"], signal.SIGKILL)
        except (ProcessLookupError, KeyError, AttributeError):
            pass
        self.child.stdin.close()
        self.child.wait(10)
        for sk in (self.dgram, self.listener, self.ours, self.accepted):
            sk.close()


@pytest.fixture
def host(tmp_path):
    instance = Host(tmp_path)
    yield instance
    instance.close()


def by_fd(found: list[ExternalUnixSocket], pid: int) -> dict[int, ExternalUnixSocket]:
    """The sockets by the fd the child (pid) has them as."""
    return {h.fd: e for e in found for h in e.holders if h.pid == pid}


def test_finds_the_sockets_whose_peer_is_outside_the_tree(host):
    found = by_fd(find(host.child.pid), host.child.pid)
    fds = host.fds
    assert set(found) == {fds["dgram"], fds["stream"], fds["pair"]}  # no internal pair
    with open(f"/proc/{host.child.pid}/comm") as f:
        comm = f.read().strip()
    for fd, external in found.items():
        # the grandchild inherited them at fork, as the same fds: both hold each socket
        assert external.holders == (Holder(host.child.pid, comm, fd), Holder(fds["grandchild"], comm, fd))

    dgram = found[fds["dgram"]]
    assert (dgram.kind, dgram.socket.inode, dgram.socket.state, dgram.socket.name) == (
        "datagram", host.inode(fds["dgram"]), external_unix.ESTABLISHED, "")
    assert (dgram.socket.peer, dgram.peer_address) == (os.fstat(host.dgram.fileno()).st_ino, host.dgram_path)
    st = os.stat(host.dgram_path)
    assert dgram.peer.vfs == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)

    stream = found[fds["stream"]]
    # the accepting end carries the listener's address: restore reconnects to it
    assert (stream.kind, stream.socket.peer, stream.peer_address, stream.peer.peer) == (
        "stream", os.fstat(host.accepted.fileno()).st_ino, host.stream_path, host.inode(fds["stream"]))

    pair = found[fds["pair"]]
    assert (pair.kind, pair.socket.peer, pair.peer_address) == ("stream", os.fstat(host.ours.fileno()).st_ino, "")

    assert stream.describe() == (f"pid {host.child.pid} ({comm}) fd {fds['stream']}, pid {fds['grandchild']} ({comm}) "
                                 f"fd {fds['stream']}: stream socket {stream.socket.inode} connected to "
                                 f"{host.stream_path} (peer inode {stream.socket.peer})")
    assert "connected to an unbound peer" in pair.describe()


def test_a_tree_without_sockets_needs_no_netlink():
    child = subprocess.Popen(["sleep", "100"])
    try:
        assert find(child.pid) == []
    finally:
        child.kill()
        child.wait()


def test_without_ext_unix_sk_the_error_names_each_socket(host):
    found = find(host.child.pid)
    with pytest.raises(FailedPrecondition) as refused:
        check(found, container_id="c1", init_pid=host.child.pid, ext_unix_sk=False, engine="criu")
    message = str(refused.value)
    assert message.startswith("checkpoint of c1: 3 unix socket(s) of the container are connected to peers outside")
    for external in found:
        assert external.describe() in message
    assert "io.pyshim.checkpoint.ext-unix-sk=true" in message
    assert check([], container_id="c1", init_pid=host.child.pid, ext_unix_sk=False, engine="criu") == ()


def test_with_ext_unix_sk_stream_sockets_are_declared_and_the_unreachable_refused(host):
    found = by_fd(find(host.child.pid), host.child.pid)
    fds = host.fds
    reachable = [found[fds["dgram"]], found[fds["stream"]]]
    assert check(reachable, container_id="c1", init_pid=host.child.pid, ext_unix_sk=True,
                 engine="criu") == (found[fds["stream"]].socket.inode,)

    with pytest.raises(FailedPrecondition) as refused:
        check(list(found.values()), container_id="c1", init_pid=host.child.pid, ext_unix_sk=True, engine="criu")
    message = str(refused.value)
    assert message.startswith("checkpoint of c1 with ext-unix-sk: CRIU cannot checkpoint and restore 1 external")
    assert found[fds["pair"]].describe() + ": its peer has no address" in message

    with pytest.raises(FailedPrecondition) as refused:
        check(reachable, container_id="c1", init_pid=host.child.pid, ext_unix_sk=True, engine="runc")
    assert (found[fds["stream"]].describe() + ": `runc checkpoint --ext-unix-sk` cannot declare a stream socket"
            in str(refused.value))
    assert found[fds["dgram"]].describe() not in str(refused.value)


def test_refused_when_restore_would_not_find_the_peer_at_its_path(host):
    dgram = by_fd(find(host.child.pid), host.child.pid)[host.fds["dgram"]]
    moved = replace(dgram, peer=replace(dgram.peer, vfs=(0, 0, 1)))  # another file at that path
    relative = replace(dgram, peer=replace(dgram.peer, name="dg.sock"))
    elsewhere = replace(dgram, peer=replace(dgram.peer, netns=1))  # the peer in another network namespace
    reasons = [external_unix.obstacle(e, init_pid=host.child.pid, engine="criu") for e in (moved, relative, elsewhere)]
    assert reasons[0].startswith(f"restore reconnects it to {host.dgram_path} inside the container, where that "
                                 "path does not lead to the peer")
    assert reasons[1] == "its peer is bound to the relative path 'dg.sock', which restore cannot resolve"
    assert f"'Unix socket {dgram.socket.inode} without peer {dgram.socket.peer}'" in reasons[2]
    assert external_unix.obstacle(dgram, init_pid=host.child.pid, engine="criu") == ""


def test_dump_request_declares_the_inodes_external():
    facts = ContainerFacts(rootfs="/r", pid=1, external_unix_sockets=(1234, 5678))
    opts = dump_request(rpc, CheckpointOptions(ext_unix_sk=True), facts, images_dir_fd=3).opts
    assert list(opts.external) == ["unix[1234]", "unix[5678]"]
    assert opts.ext_unix_sk


@needs_criu
def test_checkpoint_refuses_before_touching_anything(host, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    images = tmp_path / "images"

    async def scenario():
        async with reaping() as reaper:
            await Checkpointer(reaper, BackgroundTasks()).checkpoint(
                container_id="c1", bundle=Bundle(str(bundle), {}), pid=host.child.pid, runtime=None, paused=False,
                options=CheckpointOptions(image_path=str(images)))

    with pytest.raises(FailedPrecondition, match="3 unix socket"):
        run(scenario())
    assert not images.exists() and sorted(os.listdir(bundle)) == ["config.json", "rootfs"]  # no work dir either
    assert host.child.poll() is None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root (a network namespace)")
def test_a_child_in_its_own_network_namespace(tmp_path):
    """Sockets are found in the child's namespace (entered by a thread); the datagram peer in the
    test's own. The stream's accepting end lives in the child's namespace: the kernel creates it
    in the connecting socket's. CRIU would find the stream's peer and not the datagram's."""
    host = Host(tmp_path, prefix=["unshare", "-n"])
    try:
        found = by_fd(find(host.child.pid), host.child.pid)
        child_netns = os.stat(f"/proc/{host.child.pid}/ns/net").st_ino
        own = os.stat("/proc/self/ns/net").st_ino
        assert child_netns != own
        dgram, stream = found[host.fds["dgram"]], found[host.fds["stream"]]
        assert (dgram.socket.netns, dgram.peer.netns, dgram.peer_address) == (child_netns, own, host.dgram_path)
        assert (stream.socket.netns, stream.peer.netns, stream.peer_address) == (
            child_netns, child_netns, host.stream_path)
        assert "without peer" in external_unix.obstacle(dgram, init_pid=host.child.pid, engine="criu")
        assert external_unix.obstacle(stream, init_pid=host.child.pid, engine="criu") == ""
    finally:
        host.close()

"""A container's external unix sockets: those whose peer no process of the container holds.

CRIU dumps a unix socket together with its peer. A peer outside the dumped tree is
"external": CRIU refuses to dump it unless asked (ext-unix-sk), and on restore reconnects
the container's end by the peer's address. What CRIU 4.2.1 can do with one (criu/sk-unix.c,
and what pyshim's tests see it do):

- it looks sockets and peers up with sock_diag in the container's network namespace only
  (and in its own when the container shares it): a socket or peer in any other namespace
  fails the dump ("Unix socket X without peer Y"). A datagram socket connected to a host
  socket in the host's namespace is such a case; a stream socket connected to a host
  listener is not (the kernel creates the accepting end in the connecting socket's
  namespace);
- a datagram socket is reconnected to its peer's path on restore;
- a stream or seqpacket socket is refused ("Can't dump half of stream unix connection")
  unless its inode is declared external (`unix[<inode>]`); on restore it is connected
  anew to its peer's address (the listener's path), so the peer's server accepts a new
  connection in place of the one that ended with the dump;
- either way the peer's address is looked up inside the restored container's root, so it
  must name the same socket there as on the host (a bind mount at the same path).

`find(init_pid)` lists them (the container is init and its descendants, as CRIU dumps it);
`check(...)` turns the list into the error a checkpoint without ext-unix-sk fails with, or,
with it, into the inodes to declare external, refusing beforehand what CRIU would fail on.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from shim.children.proctree import children_by_parent
from shim.errors import FailedPrecondition
from shim.netns.enter import run_in

TYPES: dict[int, str] = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram",
                         socket.SOCK_SEQPACKET: "seqpacket"}
# The TCP states unix_diag reports for unix sockets.
ESTABLISHED, CLOSE, LISTEN = 1, 7, 10
# sock_diag: match any cookie when looking a socket up by inode (INET_DIAG_NOCOOKIE, twice).
NO_COOKIE = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class UnixSocket:
    """One unix socket as sock_diag reports it."""

    inode: int
    type: int
    state: int
    name: str  # the bound address: a path, "@name" for an abstract one, "" when unbound
    peer: int  # the peer's inode, 0 when there is none
    vfs: tuple[int, int, int] | None  # (major, minor, inode) of the socket file of a path
    netns: int  # inode of the network namespace it was found in


@dataclass(frozen=True)
class Holder:
    """A process of the container that has the socket open, and as which fd."""

    pid: int
    comm: str
    fd: int

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm}) fd {self.fd}"


@dataclass(frozen=True)
class ExternalUnixSocket:
    """A socket the container's processes hold whose peer is outside the container."""

    holders: tuple[Holder, ...]
    socket: UnixSocket
    peer: UnixSocket | None  # None: found neither in the container's namespace nor in the shim's

    @property
    def kind(self) -> str:
        return TYPES.get(self.socket.type, f"type-{self.socket.type}")

    @property
    def peer_address(self) -> str:
        return self.peer.name if self.peer is not None else ""

    def describe(self) -> str:
        own = f" bound to {self.socket.name}" if self.socket.name else ""
        target = self.peer_address or "an unbound peer"
        return (f"{', '.join(map(str, self.holders))}: {self.kind} socket {self.socket.inode}{own} "
                f"connected to {target} (peer inode {self.socket.peer})")


# -- the container's processes and their sockets -----------------------------------------------


def process_tree(init_pid: int) -> list[int]:
    """init_pid and its descendants: the tree CRIU dumps."""
    children = children_by_parent()
    tree, pending = [], [init_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def socket_fds(pid: int) -> dict[int, int]:
    """fd -> socket inode for every socket pid holds (vanished processes hold none)."""
    found: dict[int, int] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(fd)] = int(target[8:-1])
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _netns(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


# -- sock_diag, in a given network namespace ----------------------------------------------------


class _Diag:
    """pyroute2's sock_diag over a netlink socket of a given network namespace (its own
    DiagSocket always creates the socket in the calling thread's namespace). pyroute2 is
    imported here, on first use (~100 ms): a container holding no socket never pays it."""

    def __init__(self, netns_path: str | None) -> None:
        import pyroute2.netlink as netlink
        import pyroute2.netlink.diag as diag
        from pyroute2.netlink.nlsocket import NetlinkSocket

        # pyroute2 logs every netlink message at debug level: a host's every socket, in the shim's log
        logging.getLogger("pyroute2").setLevel(logging.INFO)
        self.netlink, self.diag = netlink, diag
        protocol = netlink.NETLINK_SOCK_DIAG
        # A socket belongs to the namespace of the thread that creates it: run_in's own thread.
        created = run_in(netns_path, socket.socket, socket.AF_NETLINK, socket.SOCK_DGRAM, protocol)
        self.netns = os.stat(netns_path or "/proc/self/ns/net").st_ino
        self.nl = NetlinkSocket(protocol, fileno=created.detach())
        self.nl.set_marshal(diag.MarshalDiag())
        self.nl.bind()

    def __enter__(self) -> _Diag:
        return self

    def __exit__(self, *exc) -> None:
        self.nl.close()

    def _ask(self, inode: int = 0):
        """UNIX_DIAG messages: every socket of the namespace, or the one with this inode."""
        request = self.diag.unix_diag_req()
        request["sdiag_family"] = socket.AF_UNIX
        request["udiag_states"] = 0xFFFFFFFF
        request["udiag_show"] = self.diag.UDIAG_SHOW_NAME | self.diag.UDIAG_SHOW_VFS | self.diag.UDIAG_SHOW_PEER
        request["udiag_ino"] = inode
        request["udiag_cookie"] = NO_COOKIE if inode else 0
        flags = self.netlink.NLM_F_REQUEST | (0 if inode else self.netlink.NLM_F_DUMP)
        for message in self.nl.nlm_request(request, self.diag.SOCK_DIAG_BY_FAMILY, flags):
            if "udiag_ino" in message and (not inode or message["udiag_ino"] == inode):  # not an NLMSG_ERROR
                yield message

    def _decode(self, message) -> UnixSocket:
        name = message.get_attr("UNIX_DIAG_NAME") or ""
        if name.startswith("\0"):
            name = "@" + name[1:]
        vfs = message.get_attr("UNIX_DIAG_VFS")
        if vfs is not None:
            dev = vfs["udiag_vfs_dev"]  # the kernel's dev_t: 12 bits of major, 20 of minor
            vfs = (dev >> 20, dev & 0xFFFFF, vfs["udiag_vfs_ino"])
        return UnixSocket(inode=message["udiag_ino"], type=message["udiag_type"], state=message["udiag_state"],
                          name=name, peer=message.get_attr("UNIX_DIAG_PEER") or 0, vfs=vfs, netns=self.netns)

    def all(self) -> dict[int, UnixSocket]:
        return {message["udiag_ino"]: self._decode(message) for message in self._ask()}

    def by_inode(self, inodes) -> dict[int, UnixSocket]:
        """Exact look-ups: cheaper than listing a host's every socket for a few of them."""
        return {inode: self._decode(message) for inode in inodes for message in self._ask(inode)}


# -- finding them -------------------------------------------------------------------------------


Holders = tuple[dict[int, list[tuple[int, int]]], dict[int, int]]


def socket_holders(init_pid: int) -> Holders:
    """Which of the container's processes hold which sockets: (socket inode -> [(pid, fd)], network namespace
    inode -> a pid in it). procfs reads only (a few ms at most): a checkpoint calls it inline, and asks the kernel
    about the sockets (find(), netlink, in a thread) only when there are some."""
    holders: dict[int, list[tuple[int, int]]] = {}
    namespaces: dict[int, int] = {}
    for pid in process_tree(init_pid):
        fds = socket_fds(pid)
        for fd, inode in fds.items():
            holders.setdefault(inode, []).append((pid, fd))
        if fds:
            try:
                namespaces.setdefault(_netns(pid), pid)
            except OSError:
                pass  # gone meanwhile
    return holders, namespaces


def find(init_pid: int, held: Holders | None = None) -> list[ExternalUnixSocket]:
    """The container's unix sockets whose peer is outside it (held: socket_holders(init_pid), when known already).
    Blocking (procfs, netlink, a thread per foreign network namespace): call it from a worker thread."""
    holders, namespaces = held if held is not None else socket_holders(init_pid)
    if not holders:
        return []  # nothing to ask the kernel (and pyroute2 is not even imported)
    own = _netns("self")
    known: dict[int, UnixSocket] = {}
    for netns, pid in namespaces.items():
        with _Diag(None if netns == own else f"/proc/{pid}/ns/net") as diag:
            known.update(diag.all())
    # Sockets and peers in a namespace none of the container's processes is in (the host's,
    # typically: a host client's connection accepted by the container lives there) are looked
    # up in the shim's own namespace: the container's unknown sockets, then their peers.
    if own not in namespaces:
        with _Diag(None) as diag:
            known.update(diag.by_inode(sorted(holders.keys() - known.keys())))
            peers = {known[inode].peer for inode in holders if inode in known}
            known.update(diag.by_inode(sorted(peers - {0} - known.keys())))
    external = []
    for inode in sorted(holders.keys() & known.keys()):  # the unix ones
        sk = known[inode]
        if sk.peer and sk.peer not in holders:
            by = tuple(Holder(pid, _comm(pid), fd) for pid, fd in sorted(holders[inode]))
            external.append(ExternalUnixSocket(holders=by, socket=sk, peer=known.get(sk.peer)))
    return sorted(external, key=lambda e: (e.holders[0].pid, e.holders[0].fd))


# -- what a checkpoint does with them -----------------------------------------------------------


def _restore_reaches_peer(external: ExternalUnixSocket, init_pid: int) -> bool:
    """Whether the peer's path, looked up inside the container's root as CRIU does on
    restore, is the peer's socket file."""
    peer = external.peer
    if peer is None or peer.vfs is None:
        return False
    try:
        st = os.stat(f"/proc/{init_pid}/root{peer.name}")
    except OSError:
        return False
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == peer.vfs


def obstacle(external: ExternalUnixSocket, *, init_pid: int, engine: str) -> str:
    """Why CRIU (through this engine) cannot dump and restore this socket, or ""."""
    container_netns = _netns(init_pid)
    peer = external.peer
    if external.socket.netns != container_netns or peer is None or peer.netns != container_netns:
        return ("it or its peer is in another network namespace than the container's init, and CRIU looks "
                "unix sockets up in the container's namespace only (it fails with 'Unix socket "
                f"{external.socket.inode} without peer {external.socket.peer}'): the socket and its peer must "
                "both be in the container's network namespace")
    if not peer.name:
        return "its peer has no address (a socketpair end or an unbound socket), and restore reconnects by address"
    if not peer.name.startswith(("/", "@")):
        return f"its peer is bound to the relative path {peer.name!r}, which restore cannot resolve"
    if peer.name.startswith("/") and not _restore_reaches_peer(external, init_pid):
        return (f"restore reconnects it to {peer.name} inside the container, where that path does not lead to "
                "the peer: mount the peer's directory at the same path inside the container")
    if external.socket.type != socket.SOCK_DGRAM and engine == "runc":
        return ("`runc checkpoint --ext-unix-sk` cannot declare a stream socket external (CRIU: \"Can't dump "
                "half of stream unix connection\"): use the criu engine")
    return ""


def check(externals: list[ExternalUnixSocket], *, container_id: str, init_pid: int, ext_unix_sk: bool,
         engine: str) -> tuple[int, ...]:
    """The inodes of the sockets to declare external to CRIU (`unix[<inode>]`: the stream and
    seqpacket ones), or FailedPrecondition naming every socket the checkpoint cannot take."""
    if not externals:
        return ()
    if not ext_unix_sk:
        raise FailedPrecondition(
            f"checkpoint of {container_id}: {len(externals)} unix socket(s) of the container are connected to "
            f"peers outside it: {'; '.join(e.describe() for e in externals)}. Checkpoint with ext-unix-sk (the "
            "annotation io.pyshim.checkpoint.ext-unix-sk=true, or external unix sockets in the checkpoint "
            "options) to dump them and have restore reconnect them to their peers' addresses")
    refused = [(e, why) for e in externals if (why := obstacle(e, init_pid=init_pid, engine=engine))]
    if refused:
        raise FailedPrecondition(
            f"checkpoint of {container_id} with ext-unix-sk: CRIU cannot checkpoint and restore "
            f"{len(refused)} external unix socket(s): "
            + "; ".join(f"{e.describe()}: {why}" for e, why in refused))
    return tuple(sorted({e.socket.inode for e in externals if e.socket.type != socket.SOCK_DGRAM}))

"""Established TCP connections across checkpoint and restore, for a container whose network
namespace is external (given by path, as CNI and nerdctl do).

CRIU restores an established connection by binding it again to its local address, so it can
only come back in a network namespace that has that address. The checkpoint records which
connections it holds (from its images: every connected TCP socket has a tcp-stream image) and
whether the namespace was external; a restore that would bring them back (tcp-established,
no tcp-close) into a namespace lacking one of their addresses is refused before runc is run,
with the connections named. CRIU's own failure there is "Can't bind inet socket back", and it
leaves its network lock behind in the namespace it failed in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
from dataclasses import asdict, dataclass

from shim.criu import bindings, images
from shim.criu.options import ANNOTATION_PREFIX, CheckpointOptions
from shim.errors import FailedPrecondition, InvalidArgument

TCP = 6
AF_INET = 2
STREAM_IMAGE = "tcp-stream-{inode:x}.img"


@dataclass(frozen=True)
class Connection:
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int

    def __str__(self) -> str:
        return f"{_endpoint(self.local_ip, self.local_port)} <-> {_endpoint(self.remote_ip, self.remote_port)}"


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _ip(family: int, words: list[int]) -> str:
    """An address as CRIU's images hold it (32-bit words in host order) in text; IPv4-mapped IPv6
    addresses (an AF_INET6 socket talking IPv4) as plain IPv4."""
    raw = b"".join(struct.pack("=I", word) for word in words)
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    address = ipaddress.IPv6Address(raw[:16])
    return str(address.ipv4_mapped or address)


def established(image_dir: str) -> list[Connection]:
    """The connected TCP sockets of a checkpoint (empty without any tcp-stream image)."""
    names = set(os.listdir(image_dir))
    if not any(name.startswith("tcp-stream-") for name in names):
        return []
    codec = bindings.image_codec()
    entries: list[dict] = []  # CRIU's inet socket entries, as pycriu decodes them
    for name, wrapped in (("files.img", True), ("inetsk.img", False)):  # CRIU >= 3.15 / older
        if name in names:
            with open(os.path.join(image_dir, name), "rb") as f:
                loaded = codec.load(f).get("entries") or []
            entries += [e["isk"] for e in loaded if e.get("type") == "INETSK"] if wrapped else loaded
    return sorted({Connection(_ip(s["family"], s["src_addr"]), s["src_port"], _ip(s["family"], s["dst_addr"]),
                              s["dst_port"])
                   for s in entries
                   if s.get("proto") == TCP and STREAM_IMAGE.format(inode=s["ino"]) in names},
                  key=str)


def network_record(image_dir: str, *, external_netns: int | None, options: CheckpointOptions) -> dict:
    """What the checkpoint record keeps for a restore to check against."""
    connections = established(image_dir) if options.tcp_established else []
    return {"external_namespace": external_netns, "established": [asdict(c) for c in connections]}


def unrestorable(connections: list[Connection], addresses: set[str]) -> list[Connection]:
    """The connections whose local address `addresses` lacks (loopback is in every namespace)."""
    return [c for c in connections
            if c.local_ip not in addresses and not ipaddress.ip_address(c.local_ip).is_loopback]


def network_namespace_path(config: dict) -> str:
    for ns in (config.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return ns.get("path") or ""
    return ""


async def refuse_lost_connections(*, container_id: str, image_path: str, config: dict,
                                  options: CheckpointOptions) -> None:
    """Raise FailedPrecondition when the restore would bring back established connections into a
    network namespace that lacks their local addresses."""
    if not options.tcp_established or options.tcp_close:
        return
    network = (images.read_record(image_path) or {}).get("network") or {}
    if not network.get("external_namespace"):
        return  # a private namespace is made by the restore itself (set up by hooks): nothing to compare yet
    connections = [Connection(**c) for c in network.get("established") or []]
    if not connections:
        return
    path = network_namespace_path(config)
    present: set[str] = set()
    if path:
        from shim.netns.addresses import addresses

        try:
            present = {a.address for a in await asyncio.to_thread(addresses, path, all_scopes=True)}
        except FileNotFoundError:
            raise InvalidArgument(f"restore of {container_id}: network namespace {path} does not exist") from None
    lost = unrestorable(connections, present)
    if lost:
        raise FailedPrecondition(refusal(container_id, image_path, path, lost, present))


def _local_only(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_link_local


def refusal(container_id: str, image_path: str, path: str, lost: list[Connection], present: set[str]) -> str:
    where = f"the network namespace {path}" if path else "a new private network namespace (no path in config.json)"
    has = ", ".join(sorted(a for a in present if not _local_only(a))) or "no global address"
    needed = ", ".join(sorted({c.local_ip for c in lost}))
    return (f"restore of {container_id} from {image_path} refused: {len(lost)} established TCP connection(s) "
            f"({'; '.join(map(str, lost))}) cannot be restored into {where}: it lacks {needed} (its addresses: "
            f"{has}). Restore into a network namespace with the checkpoint's addresses, or close these "
            f"connections on restore with tcp-close (annotation {ANNOTATION_PREFIX}tcp-close=true on the "
            "restoring container)")

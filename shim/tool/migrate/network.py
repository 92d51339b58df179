"""The container's network identity: the namespace given by path it runs in, the addresses that namespace holds,
and whether the destination's namespace can take them (checked on the destination before anything stops).

A container with a namespace of its own (ctr's default) has no identity to move: CRIU brings it back as a new
namespace on the destination. One given by path (CNI's, `ctr run --with-ns network:PATH`) is restored into the
destination's pre-made namespace, which must hold the same addresses and be used by nobody else, else established
connections could not be restored (or would answer from the wrong place).
"""

from __future__ import annotations

import os


def namespace_path(spec: dict) -> str | None:
    """The network namespace path of a container's spec; None for one of its own or the host's."""
    for entry in (spec.get("linux") or {}).get("namespaces") or []:
        if entry.get("type") == "network":
            return entry.get("path") or None
    return None


def has_network_namespace(spec: dict) -> bool:
    return any(entry.get("type") == "network" for entry in (spec.get("linux") or {}).get("namespaces") or [])


def addresses_of(path: str) -> list[str]:
    """The global addresses (CIDR) a namespace holds, e.g. ["10.123.1.2/24"]."""
    from shim.netns.addresses import addresses

    return [address.cidr for address in addresses(path)]


def users_of(path: str) -> list[str]:
    """Processes running in the namespace at path ("pid (command)"), at most five."""
    from shim.netns.inodes import inode_of

    try:
        inode = inode_of(path)
    except OSError:
        return []
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if inode_of(f"/proc/{name}/ns/net") != inode:
                continue
            with open(f"/proc/{name}/comm") as f:
                found.append(f"{name} ({f.read().strip()})")
        except OSError:
            continue
        if len(found) == 5:
            break
    return found


def destination_problem(path: str, wanted: list[str], *, tcp_close: bool) -> str | None:
    """Why the namespace at path (on this host, the destination) cannot take a container that held `wanted`
    addresses, or None. With tcp_close no connection is restored, so only the namespace's existence matters."""
    if not os.path.exists(path):
        return (f"the network namespace {path} does not exist on the destination: make it there first (as CNI does; "
                "`ip netns add NAME` and the container's address), or name the one to use with --dest-netns")
    try:
        have = addresses_of(path)
    except Exception as exc:  # noqa: BLE001 - pyroute2's errors: the reason is what matters
        return f"{path} on the destination is not a network namespace pyshim can read ({exc})"
    if tcp_close:
        return None
    missing = sorted(set(_ip(c) for c in wanted) - set(_ip(c) for c in have))
    if missing:
        return (f"the destination's network namespace {path} lacks the container's address"
                f"{'es' if len(missing) > 1 else ''} {', '.join(missing)} (it has {', '.join(have) or 'none'}): its "
                "established connections could not be restored there; add the address to that namespace, or "
                "migrate with --tcp-close")
    users = users_of(path)
    if users:
        return (f"the destination's network namespace {path} is already used by {', '.join(users)}: the container's "
                "address is taken there; give it a namespace of its own (--dest-netns), or migrate with --tcp-close")
    return None


def _ip(cidr: str) -> str:
    return cidr.split("/", 1)[0]

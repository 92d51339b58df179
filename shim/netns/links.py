"""Links: veth pairs with an end moved into another namespace, links up, removed, listed."""

from __future__ import annotations

import os

from shim.netns.refs import NamespaceRef, open_namespace
from shim.netns.rtnl import index_of, with_rtnl

MAX_IFNAME = 15  # IFNAMSIZ - 1


def _check_name(ifname: str) -> None:
    if not ifname or len(ifname) > MAX_IFNAME or "/" in ifname or any(c.isspace() for c in ifname):
        raise ValueError(f"interface name {ifname!r}: 1-{MAX_IFNAME} characters, no '/' or spaces")


def add_veth(name: str, peer: str, *, namespace: NamespaceRef = None, peer_namespace: NamespaceRef = None) -> None:
    """A veth pair: `name` in `namespace`, `peer` moved to `peer_namespace` (None: the caller's)."""
    _check_name(name)
    _check_name(peer)
    # The peer's namespace is opened by the caller: None means the caller's, not the worker thread's.
    peer_fd = (open_namespace(peer_namespace) if peer_namespace is not None
               else os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
    try:
        def work(ipr) -> None:
            ipr.link("add", ifname=name, kind="veth", peer=peer)
            if peer_namespace != namespace:
                try:
                    ipr.link("set", index=index_of(ipr, peer, namespace), net_ns_fd=peer_fd)
                except BaseException:
                    ipr.link("del", index=index_of(ipr, name, namespace))  # takes the peer with it
                    raise

        with_rtnl(namespace, work)
    finally:
        os.close(peer_fd)


def set_up(ifname: str, namespace: NamespaceRef = None) -> None:
    with_rtnl(namespace, lambda ipr: ipr.link("set", index=index_of(ipr, ifname, namespace), state="up"))


def delete(ifname: str, namespace: NamespaceRef = None, *, missing_ok: bool = False) -> bool:
    """Remove a link (a veth takes its peer with it); whether there was one."""
    def work(ipr) -> bool:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            if missing_ok:
                return False
            index_of(ipr, ifname, namespace)  # raises LinkNotFound
        ipr.link("del", index=found[0])
        return True

    return with_rtnl(namespace, work)


def names(namespace: NamespaceRef = None) -> list[str]:
    """The links in a namespace, sorted by name."""
    return sorted(link.get_attr("IFLA_IFNAME") for link in with_rtnl(namespace, lambda ipr: list(ipr.get_links())))


def is_up(ifname: str, namespace: NamespaceRef = None) -> bool:
    def work(ipr) -> bool:
        (link,) = ipr.get_links(index_of(ipr, ifname, namespace))
        return bool(link["flags"] & 1)  # IFF_UP

    return with_rtnl(namespace, work)

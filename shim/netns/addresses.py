"""IP addresses: added to a link, and the global ones a namespace holds (what a peer can connect to)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from shim.netns.refs import NamespaceRef
from shim.netns.rtnl import index_of, with_rtnl

SCOPE_UNIVERSE = 0  # link-local (253) and host (254) addresses are not a namespace's identity


@dataclass(frozen=True, order=True)
class Address:
    address: str  # "10.123.0.1", "fd00::1"
    prefixlen: int
    ifname: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


def add_address(ifname: str, cidr: str, namespace: NamespaceRef = None) -> None:
    """Add e.g. "10.123.0.1/24" to a link."""
    interface = ipaddress.ip_interface(cidr)
    with_rtnl(namespace, lambda ipr: ipr.addr("add", index=index_of(ipr, ifname, namespace),
                                              address=str(interface.ip), prefixlen=interface.network.prefixlen))


def addresses(namespace: NamespaceRef = None, *, all_scopes: bool = False) -> list[Address]:
    """The namespace's IPv4 and IPv6 addresses, sorted: global ones only, or with all_scopes
    link-local and host ones too."""
    def work(ipr) -> list[Address]:
        links = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        found = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for message in ipr.get_addr(family=family):
                if message["scope"] != SCOPE_UNIVERSE and not all_scopes:
                    continue
                found.append(Address(message.get_attr("IFA_ADDRESS"), message["prefixlen"],
                                     links.get(message["index"], "")))
        return sorted(found)

    return with_rtnl(namespace, work)

"""Routes in a namespace."""

from __future__ import annotations

from shim.netns.refs import NamespaceRef
from shim.netns.rtnl import index_of, with_rtnl


def add_route(destination: str, *, gateway: str | None = None, ifname: str | None = None,
              namespace: NamespaceRef = None) -> None:
    """A route to `destination` ("default" or a CIDR) through a gateway and/or out of a link."""
    if gateway is None and ifname is None:
        raise ValueError(f"route to {destination}: give a gateway, a link, or both")

    def work(ipr) -> None:
        spec: dict[str, str | int] = {"dst": destination}
        if gateway is not None:
            spec["gateway"] = gateway
        if ifname is not None:
            spec["oif"] = index_of(ipr, ifname, namespace)
        ipr.route("add", **spec)

    with_rtnl(namespace, work)


def routes(namespace: NamespaceRef = None) -> list[tuple[str, str | None]]:
    """(destination CIDR or "default", gateway) of the main table's IPv4 routes."""
    def work(ipr) -> list[tuple[str, str | None]]:
        found = []
        for message in ipr.get_routes(family=2, table=254):
            dst = message.get_attr("RTA_DST")
            found.append((f"{dst}/{message['dst_len']}" if dst else "default", message.get_attr("RTA_GATEWAY")))
        return sorted(found, key=lambda r: (r[0], r[1] or ""))

    return with_rtnl(namespace, work)

"""One rtnetlink socket (pyroute2's IPRoute) inside a namespace, for one piece of work."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from shim.netns.enter import run_in
from shim.netns.refs import NamespaceRef

T = TypeVar("T")


class LinkNotFound(LookupError):
    pass


def with_rtnl(ref: NamespaceRef, work: Callable[..., T]) -> T:
    """work(ipr) with an IPRoute opened inside `ref` (the socket belongs to the namespace it was made in)."""
    # Imported on first use: pyroute2 adds ~12 MB to the shim's memory.
    from pyroute2 import IPRoute

    def inside() -> T:
        with IPRoute() as ipr:
            return work(ipr)

    return run_in(ref, inside)


def index_of(ipr, ifname: str, ref: NamespaceRef = None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LinkNotFound(f"no link {ifname} in network namespace {ref or '(own)'}")
    return found[0]

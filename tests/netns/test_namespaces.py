"""Named namespaces, veths, addresses, routes and sockets inside namespaces (root)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from shim.netns import addresses, enter, inodes, links, named, routes
from shim.netns.rtnl import LinkNotFound

from .conftest import host_links, needs_root, unique, veth_name

pytestmark = needs_root


def test_create_list_remove(scratch):
    name = scratch()
    assert name in named.names() and named.exists(name)
    assert links.names(name) == ["lo"]
    assert inodes.inode_of(f"/var/run/netns/{name}") != inodes.inode_of("/proc/self/ns/net")
    named.remove(name)
    assert name not in named.names()
    named.remove(name, missing_ok=True)
    with pytest.raises(FileNotFoundError):
        named.remove(name)


def test_an_existing_name_is_refused(scratch):
    name = scratch()
    with pytest.raises(FileExistsError):
        named.create(name)


def test_creating_moves_no_thread_of_the_caller():
    before = inodes.inode_of("/proc/thread-self/ns/net")
    name = unique()
    named.create(name)
    try:
        assert inodes.inode_of("/proc/thread-self/ns/net") == before
    finally:
        named.remove(name)


def test_entered_switches_the_calling_thread_and_back(scratch):
    name = scratch()
    home = inodes.inode_of("/proc/thread-self/ns/net")
    with enter.entered(name):
        assert inodes.inode_of("/proc/thread-self/ns/net") == inodes.inode_of(f"/var/run/netns/{name}")
    assert inodes.inode_of("/proc/thread-self/ns/net") == home


def test_run_in_runs_inside_and_hands_exceptions_back(scratch):
    name = scratch()
    assert enter.run_in(name, inodes.inode_of, "/proc/thread-self/ns/net") == inodes.inode_of(
        f"/var/run/netns/{name}")
    with pytest.raises(FileNotFoundError):
        enter.run_in(name, os.stat, "/no/such/file")
    with pytest.raises(FileNotFoundError):
        enter.run_in("pyshim-t-never-made", threading.get_ident)


def test_two_hosts_joined_by_a_veth_talk_tcp(scratch):
    server, client = scratch(), scratch()
    a, b = veth_name(), veth_name()
    links.add_veth(a, b, namespace=server, peer_namespace=client)
    assert a in links.names(server) and b in links.names(client)
    assert a not in host_links() and b not in host_links()
    for ns, ifname, cidr in ((server, a, "10.123.0.1/24"), (client, b, "10.123.0.2/24")):
        addresses.add_address(ifname, cidr, ns)
        links.set_up(ifname, ns)
        links.set_up("lo", ns)
    assert links.is_up(a, server)
    assert addresses.addresses(server) == [addresses.Address("10.123.0.1", 24, a)]
    assert "127.0.0.1" in {x.address for x in addresses.addresses(server, all_scopes=True)}

    listener = enter.socket_in(server)
    peer = enter.socket_in(client)
    with listener, peer:
        listener.bind(("10.123.0.1", 0))
        listener.listen()
        peer.settimeout(5)
        peer.connect(listener.getsockname())
        accepted, (remote, _) = listener.accept()
        with accepted:
            assert remote == "10.123.0.2"
            peer.sendall(b"ping")
            assert accepted.recv(4) == b"ping"
            accepted.sendall(b"pong")
            assert peer.recv(4) == b"pong"


def test_a_veth_with_its_peer_in_the_callers_namespace_and_a_route(scratch):
    inside = scratch()
    a, b = veth_name(), veth_name()
    links.add_veth(a, b, namespace=inside)  # b comes back here
    try:
        assert b in host_links()
        addresses.add_address(a, "10.123.5.1/24", inside)
        links.set_up(a, inside)
        routes.add_route("10.124.0.0/16", gateway="10.123.5.2", namespace=inside)
        assert ("10.124.0.0/16", "10.123.5.2") in routes.routes(inside)
        assert ("10.123.5.0/24", None) in routes.routes(inside)
    finally:
        assert links.delete(b, missing_ok=True)
    assert b not in host_links() and links.names(inside) == ["lo"]  # the pair went together


def test_unknown_links_are_named_in_the_error(scratch):
    name = scratch()
    with pytest.raises(LinkNotFound, match=f"no link nope0 in network namespace {name}"):
        links.set_up("nope0", name)
    assert links.delete("nope0", name, missing_ok=True) is False


def test_bad_interface_names_are_refused_before_anything_is_made():
    with pytest.raises(ValueError):
        links.add_veth("a" * 16, "b")
    with pytest.raises(ValueError):
        links.add_veth("ok0", "bad name")


def test_a_route_needs_a_gateway_or_a_link():
    with pytest.raises(ValueError):
        routes.add_route("10.0.0.0/8")


def test_a_socket_in_a_namespace_stays_there(scratch):
    name = scratch()
    links.set_up("lo", name)
    with enter.socket_in(name, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        # the port is free in our own namespace: the socket is not here
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as here:
            here.bind(("127.0.0.1", port))

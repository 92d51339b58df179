"""Established TCP connections in a checkpoint, and the restore that would lose them refused."""

from __future__ import annotations

import asyncio
import json
import os
import struct

import pycriu.images
import pytest

from shim.criu.images import RECORD
from shim.criu.options import CheckpointOptions
from shim.criu.tcp import (
    Connection,
    established,
    network_namespace_path,
    network_record,
    refuse_lost_connections,
    unrestorable,
)
from shim.errors import FailedPrecondition

SOCKET_OPTS = {"so_sndbuf": 1, "so_rcvbuf": 1, "so_snd_tmo_sec": 0, "so_snd_tmo_usec": 0, "so_rcv_tmo_sec": 0,
               "so_rcv_tmo_usec": 0}
FOWN = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}


def words(raw: bytes) -> list[int]:
    """An address as CRIU's images hold it: 32-bit words in host order."""
    return list(struct.unpack(f"={len(raw) // 4}I", raw))


def v4_mapped(dotted: str) -> list[int]:
    return words(bytes(10) + b"\xff\xff" + bytes(int(x) for x in dotted.split(".")))


def inet_socket(ino: int, family: int, src: list[int], sport: int, dst: list[int], dport: int, state: int = 1):
    return {"type": "INETSK", "id": ino, "isk": {
        "id": ino, "ino": ino, "family": family, "type": 1, "proto": 6, "state": state, "src_port": sport,
        "dst_port": dport, "flags": 2, "backlog": 0, "src_addr": src, "dst_addr": dst, "fown": FOWN,
        "opts": SOCKET_OPTS}}


def write_images(directory, sockets, streams):
    with open(directory / "files.img", "wb") as f:
        pycriu.images.dump({"magic": "FILES", "entries": sockets}, f)
    for ino in streams:
        (directory / f"tcp-stream-{ino:x}.img").write_bytes(b"")


def test_connected_sockets_are_the_ones_with_a_stream_image(tmp_path):
    write_images(tmp_path, [
        inet_socket(0x10, 10, v4_mapped("10.123.0.1"), 7000, v4_mapped("10.123.0.2"), 40000),  # IPv4 on AF_INET6
        inet_socket(0x11, 2, words(bytes([10, 123, 0, 1])), 7001, words(bytes([10, 123, 0, 3])), 40001),
        inet_socket(0x12, 10, words(bytes.fromhex("fd000000000000000000000000000001")), 80,
                    words(bytes.fromhex("fd000000000000000000000000000002")), 40002),
        inet_socket(0x13, 10, [0, 0, 0, 0], 7000, [0, 0, 0, 0], 0, state=10),  # the listener: no stream
    ], streams=[0x10, 0x11, 0x12])
    assert [str(c) for c in established(str(tmp_path))] == [
        "10.123.0.1:7000 <-> 10.123.0.2:40000", "10.123.0.1:7001 <-> 10.123.0.3:40001",
        "[fd00::1]:80 <-> [fd00::2]:40002"]


def test_no_stream_image_means_no_connection_and_no_decoding(tmp_path):
    (tmp_path / "files.img").write_bytes(b"not an image at all")
    assert established(str(tmp_path)) == []


def test_the_record_holds_connections_only_for_tcp_established(tmp_path):
    write_images(tmp_path, [inet_socket(0x10, 10, v4_mapped("10.123.0.1"), 7000, v4_mapped("10.123.0.2"), 4)], [0x10])
    with_tcp = network_record(str(tmp_path), external_netns=77, options=CheckpointOptions(tcp_established=True))
    assert with_tcp == {"external_namespace": 77, "established": [
        {"local_ip": "10.123.0.1", "local_port": 7000, "remote_ip": "10.123.0.2", "remote_port": 4}]}
    assert network_record(str(tmp_path), external_netns=None, options=CheckpointOptions())["established"] == []


def test_loopback_connections_are_restorable_anywhere():
    loop = Connection("127.0.0.1", 6379, "127.0.0.1", 50000)
    away = Connection("10.123.0.1", 7000, "10.123.0.2", 40000)
    assert unrestorable([loop, away], {"10.123.1.1"}) == [away]
    assert unrestorable([loop, away], {"10.123.0.1", "10.123.1.1"}) == []


def test_the_network_namespace_path_from_a_config():
    config = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]}}
    assert network_namespace_path(config) == "/var/run/netns/x"
    assert network_namespace_path({"linux": {"namespaces": [{"type": "network"}]}}) == ""


def checkpoint_with(tmp_path, network):
    image = tmp_path / "image"
    image.mkdir()
    (image / RECORD).write_text(json.dumps({"network": network}))
    return str(image)


CONNECTION = {"local_ip": "10.123.0.1", "local_port": 7000, "remote_ip": "10.123.0.2", "remote_port": 40000}
PRIVATE_NETNS = {"linux": {"namespaces": [{"type": "network"}]}}


def refuse(image, options, config=PRIVATE_NETNS):
    return asyncio.run(refuse_lost_connections(container_id="c1", image_path=image, config=config, options=options))


def test_established_connections_into_a_namespace_without_their_address_are_refused(tmp_path):
    image = checkpoint_with(tmp_path, {"external_namespace": 4026532255, "established": [CONNECTION]})
    with pytest.raises(FailedPrecondition) as refused:
        refuse(image, CheckpointOptions(tcp_established=True))
    message = str(refused.value)
    assert "restore of c1" in message and "10.123.0.1:7000 <-> 10.123.0.2:40000" in message
    assert "a new private network namespace" in message and "it lacks 10.123.0.1" in message
    assert "tcp-close" in message and "io.pyshim.checkpoint.tcp-close=true" in message


@pytest.mark.parametrize("network,options", [
    ({"external_namespace": 1, "established": [CONNECTION]}, CheckpointOptions(tcp_established=True, tcp_close=True)),
    ({"external_namespace": 1, "established": [CONNECTION]}, CheckpointOptions()),
    ({"external_namespace": None, "established": [CONNECTION]}, CheckpointOptions(tcp_established=True)),
    ({"external_namespace": 1, "established": []}, CheckpointOptions(tcp_established=True)),
    (None, CheckpointOptions(tcp_established=True)),
], ids=["tcp-close", "no-tcp-established", "private-netns", "no-connection", "no-record"])
def test_what_is_not_refused(tmp_path, network, options):
    refuse(checkpoint_with(tmp_path, network), options)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (run the suite as root)")
def test_a_real_namespace_is_refused_or_not_by_its_addresses(tmp_path):
    import secrets

    from shim.netns import addresses, links, named

    image = checkpoint_with(tmp_path, {"external_namespace": 1, "established": [CONNECTION]})
    name = "pyshim-t-" + secrets.token_hex(4)
    path = named.create(name)
    try:
        links.add_veth("pst" + secrets.token_hex(4), "psp" + secrets.token_hex(4), namespace=name,
                       peer_namespace=name)
        ifname = next(n for n in links.names(name) if n.startswith("pst"))
        addresses.add_address(ifname, "10.123.1.1/24", name)
        config = {"linux": {"namespaces": [{"type": "network", "path": path}]}}
        with pytest.raises(FailedPrecondition, match=f"into the network namespace {path}: it lacks 10.123.0.1 "
                                                     r"\(its addresses: 10.123.1.1\)"):
            refuse(image, CheckpointOptions(tcp_established=True), config)
        addresses.add_address(ifname, "10.123.0.1/24", name)
        refuse(image, CheckpointOptions(tcp_established=True), config)
    finally:
        named.remove(name)

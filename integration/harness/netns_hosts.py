"""Test "hosts" made of network namespaces: one client host, and server hosts each joined to it by a veth.

Server host n has 10.123.<n>.1/24 and the client 10.123.<n>.2/24 on the veth between them, so traffic only ever
flows between namespaces a test made. `Hosts.close()` removes everything and reports what was left behind: an
iptables rule or a CRIU nftables table inside a namespace before its removal (CRIU's network lock is one of them), a
namespace or a veth of ours still on the host, a CRIU rule added on the host meanwhile.
"""

from __future__ import annotations

import functools
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from shim.criu import netlock
from shim.netns import addresses, enter, links, named, refs

SUBNET = "10.123.{n}.{host}"
BUILTIN_CHAINS = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}


@dataclass(frozen=True)
class Host:
    name: str
    path: str
    address: str  # on its link towards the client ("" for the client host itself)


def iptables_rules(namespace: str | None) -> list[str]:
    """Rules and user chains in a namespace's (None: the host's) iptables and ip6tables rulesets."""
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        # A child forked by the thread run_in() moved into the namespace starts there.
        dump = enter.run_in(namespace, functools.partial(subprocess.run, [tool], capture_output=True, text=True,
                                                         timeout=20, check=True))
        for line in dump.stdout.splitlines():
            chain = line[1:].split()[0] if line.startswith(":") else ""
            if line.startswith("-A") or (chain and chain not in BUILTIN_CHAINS):
                found.append(f"{tool.split('-')[0]}: {line}")
    return found


def _run_in(namespace: str | None, argv: list[str]) -> str:
    # A child forked by the thread run_in() moved into the namespace starts there.
    return enter.run_in(namespace, functools.partial(subprocess.run, argv, capture_output=True, text=True, timeout=20,
                                                     check=True)).stdout


def nft_tables(namespace: str | None) -> list[tuple[str, str]]:
    """(family, name) of the nftables tables in a namespace (None: the host's): `nft list tables`, or netlink
    (pyroute2) where nft is not installed."""
    if shutil.which("nft"):
        return netlock.nft_tables(_run_in(namespace, ["nft", "list", "tables"]))
    return netlock.nft_list(refs.path_of(namespace) if namespace else "/proc/self/ns/net")


def criu_locks(namespace: str | None) -> list[str]:
    """CRIU's network locks in a namespace: its iptables and ip6tables rules and chain, its nftables tables."""
    found = [f"{tool.split('-')[0]}: {line}" for tool in ("iptables-save", "ip6tables-save")
             for line in netlock.iptables_lines(_run_in(namespace, [tool]))]
    return found + [f"nftables: table {family} {name}" for family, name in nft_tables(namespace)
                    if netlock.is_criu_table(family, name)]


def _host_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout


class Hosts:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self._host_criu_before = self._host_criu_rules()
        self.servers: dict[str, Host] = {}
        self._veths: list[str] = []
        self.client = self._namespace("client", "")

    def _namespace(self, role: str, address: str) -> Host:
        name = f"pyshim-it-{self.tag}-{role}"
        return Host(name, named.create(name), address)

    def server(self, n: int) -> Host:
        """Server host n, its veth to the client up, addresses on both ends."""
        host = self._namespace(f"srv{n}", SUBNET.format(n=n, host=1))
        self.servers[host.name] = host
        near, far = f"pv{self.tag}s{n}", f"pv{self.tag}c{n}"
        self._veths += [near, far]
        links.add_veth(near, far, namespace=host.name, peer_namespace=self.client.name)
        for namespace, ifname, address in ((host.name, near, host.address),
                                           (self.client.name, far, SUBNET.format(n=n, host=2))):
            addresses.add_address(ifname, f"{address}/24", namespace)
            links.set_up(ifname, namespace)
            links.set_up("lo", namespace)
        return host

    def hook_link(self, n: int) -> tuple[str, str]:
        """Names for a veth an OCI hook makes between the client host and a container's own namespace, on subnet
        10.123.<n>: (client end, container end). Remembered, so that close() reports either if left behind."""
        near, far = f"pv{self.tag}h{n}", f"pv{self.tag}k{n}"
        self._veths += [near, far]
        return near, far

    def connect(self, host: Host, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from the client host to host:port, retried until the server listens."""
        deadline = time.monotonic() + timeout
        while True:
            sock = enter.socket_in(self.client.name)
            sock.settimeout(2)
            try:
                sock.connect((host.address, port))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def remove(self, host: Host) -> list[str]:
        """Remove a server host; the iptables rules and CRIU's nftables tables it held just before (empty when
        clean)."""
        rules = iptables_rules(host.name) + [lock for lock in criu_locks(host.name) if lock.startswith("nftables")]
        named.remove(host.name)
        self.servers.pop(host.name, None)
        return rules

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        """Every host removed; a test that ended well fails if anything was left behind in them."""
        left = self.close()
        if kind is None:
            assert not left, f"left behind: {left}"

    def close(self) -> list[str]:
        """Remove every host; what was left behind, each as a note (empty when everything was tidy)."""
        notes = []
        for host in [*self.servers.values(), self.client]:
            if not named.exists(host.name):
                continue
            try:
                notes += [f"{host.name}: {rule}" for rule in iptables_rules(host.name)]
                notes += [f"{host.name}: {lock}" for lock in criu_locks(host.name) if lock.startswith("nftables")]
            except Exception as exc:  # noqa: BLE001 - the namespace goes whatever its rules
                notes.append(f"{host.name}: iptables or nftables not readable: {exc}")
            finally:
                named.remove(host.name)
        self.servers.clear()
        notes += [f"namespace left: {name}" for name in named.names() if self.tag in name]
        listing = _host_links()
        notes += [f"veth left on the host: {veth}" for veth in self._veths if f" {veth}@" in listing
                  or f" {veth}:" in listing]
        notes += [f"host: {rule}" for rule in sorted(set(self._host_criu_rules()) - set(self._host_criu_before))]
        return notes

    @staticmethod
    def _host_criu_rules() -> list[str]:
        return [rule for rule in iptables_rules(None) if "CRIU" in rule or "10.123." in rule]

def echo(sock: socket.socket, text: str) -> str:
    """Send a line, return what came back (up to a newline; bounded by the socket's timeout)."""
    sock.sendall(text.encode() + b"\n")
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        received += chunk
    return received.decode().rstrip("\n")


def no_echo(sock: socket.socket, text: str) -> str:
    """What using a dead connection gives: the error's name, "EOF", or what it answered after all."""
    sock.settimeout(1)
    try:
        answer = echo(sock, text)
    except OSError as exc:  # socket.timeout included
        return type(exc).__name__
    return f"answered {answer!r}" if answer else "EOF"

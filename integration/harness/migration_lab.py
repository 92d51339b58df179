"""A two-host network lab for live migration: host A and host B, a client reaching a container's address through
whichever host serves it.

Every piece is a network namespace the lab makes (names `pyshim-lab-<tag>-...`); no link or rule ever touches the
host's own namespace:

    client ns                 host A ns                         container ns on A (as CNI makes it)
    10.125.1.2 to-a  <veth>   up0 10.125.1.1   br0 10.125.0.1 <veth> eth0 10.125.0.10/24, default via 10.125.0.1
    10.125.2.2 to-b  <veth>   up0 10.125.2.1   br0 10.125.0.1 <veth> eth0 10.125.0.10/24 (pre-made on B)
                              host B ns                         container ns on B

Both hosts own the container subnet 10.125.0.0/24 on their bridge (the address moves, the subnet does not) and route
everything else to the client, which is "the network": it routes each container address (a /32) to the host that
serves it. `serve(address, host)` moves that route (`ip route replace`, one atomic change), which is what a real
network does when the destination announces the address (BGP, an SDN controller); the migrate command knows nothing
of it. `RouteFollower` does it at the moment the destination's containerd publishes /tasks/start for the container,
i.e. once the restored task runs and before the source's network lock is released.

`close()` removes every namespace and returns what was left behind: an iptables rule or CRIU nftables table inside
one of them, a namespace of the lab still present, a host rule naming the lab's subnet.
"""

from __future__ import annotations

import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from shim.netns import enter, named

from . import commands
from .containerd import Containerd
from .netns_hosts import criu_locks, iptables_rules

CONTAINER_SUBNET = "10.125.0.0/24"
GATEWAY = "10.125.0.1"
CONTAINER_ADDRESS = "10.125.0.10"
UPLINK = "10.125.{n}.{end}"  # end 1: the host, 2: the client
LAB_SUBNET_PREFIX = "10.125."


@dataclass
class LabHost:
    """One "host": its namespace, its uplink address, the client's address on that link."""

    letter: str
    name: str
    path: str
    address: str
    client_address: str
    container_namespaces: dict[str, str] = field(default_factory=dict)  # name -> its bridge port on this host
    made: int = 0  # container namespaces made so far (their index)


def _ip(*args: str) -> None:
    commands.run(["ip", *args], timeout=20)


def _sysctl(namespace: str, *settings: str) -> None:
    commands.run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *settings], timeout=20)


class MigrationLab:
    """Client, host A and host B; container namespaces made on demand. Use as a context manager or call close()."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self._namespaces: list[str] = []
        self._host_rules_before = self._host_lab_rules()
        self.client = self._namespace("client")
        _sysctl(self.client, "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        _ip("-n", self.client, "link", "set", "lo", "up")
        self.a = self._host("a", 1)
        self.b = self._host("b", 2)

    def __enter__(self) -> MigrationLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _namespace(self, role: str) -> str:
        name = f"pyshim-lab-{self.tag}-{role}"
        named.create(name)
        self._namespaces.append(name)
        return name

    def _host(self, letter: str, n: int) -> LabHost:
        name = self._namespace(letter)
        host = LabHost(letter, name, f"/var/run/netns/{name}", UPLINK.format(n=n, end=1), UPLINK.format(n=n, end=2))
        _ip("-n", name, "link", "add", "up0", "type", "veth", "peer", "name", f"to-{letter}", "netns", self.client)
        _ip("-n", name, "address", "add", f"{host.address}/24", "dev", "up0")
        _ip("-n", self.client, "address", "add", f"{host.client_address}/24", "dev", f"to-{letter}")
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
        _ip("-n", name, "address", "add", f"{GATEWAY}/24", "dev", "br0")
        for ifname in ("lo", "up0", "br0"):
            _ip("-n", name, "link", "set", ifname, "up")
        _ip("-n", self.client, "link", "set", f"to-{letter}", "up")
        _ip("-n", name, "route", "add", "default", "via", host.client_address)
        _sysctl(name, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        return host

    def host(self, letter: str) -> LabHost:
        return {"a": self.a, "b": self.b}[letter]

    def container_netns(self, host: LabHost, address: str = CONTAINER_ADDRESS) -> str:
        """A container's network namespace on host, as a CNI bridge plugin makes it: a veth into the host's bridge,
        `address`/24 on eth0, default route via the bridge. Its path (for `ctr run --with-ns network:PATH`)."""
        index, host.made = host.made, host.made + 1
        name = self._namespace(f"{host.letter}-ctr{index}")
        port = f"vc{index}"
        host.container_namespaces[name] = port
        _ip("-n", host.name, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("-n", host.name, "link", "set", port, "master", "br0")
        _ip("-n", host.name, "link", "set", port, "up")
        _ip("-n", name, "address", "add", f"{address}/24", "dev", "eth0")
        for ifname in ("lo", "eth0"):
            _ip("-n", name, "link", "set", ifname, "up")
        _ip("-n", name, "route", "add", "default", "via", GATEWAY)
        return f"/var/run/netns/{name}"

    def remove_container_netns(self, path: str) -> list[str]:
        """Remove a container namespace and its bridge port, as CNI DEL does (two namespaces holding one address on
        one bridge would fight over it); the rules it held just before (empty when clean)."""
        name = path.rsplit("/", 1)[1]
        host = next(h for h in (self.a, self.b) if name in h.container_namespaces)
        rules = self.rules_in(name)
        _ip("-n", host.name, "link", "del", host.container_namespaces.pop(name))
        named.remove(name)
        self._namespaces.remove(name)
        return rules

    # --- the network: who serves an address --------------------------------------------------------------------

    def serve(self, address: str, host: LabHost) -> None:
        """Route the client's traffic for address to host (one atomic route replacement)."""
        _ip("-n", self.client, "route", "replace", f"{address}/32", "via", host.address)

    def served_by(self, address: str) -> str | None:
        """Which host ("a", "b") the client's route for address points at, or None."""
        out = commands.run(["ip", "-n", self.client, "route", "show", f"{address}/32"], timeout=20).stdout
        match = re.search(r"via (\S+)", out)
        if not match:
            return None
        return next((h.letter for h in (self.a, self.b) if h.address == match.group(1)), match.group(1))

    def connect(self, address: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from the client namespace, retried (bounded) until the server listens."""
        deadline = time.monotonic() + timeout
        while True:
            sock = enter.socket_in(self.client)
            sock.settimeout(2)
            try:
                sock.connect((address, port))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    # --- what a namespace holds ---------------------------------------------------------------------------------

    def rules_in(self, namespace: str) -> list[str]:
        """iptables rules and user chains, and CRIU's nftables tables, in one of the lab's namespaces."""
        return iptables_rules(namespace) + [lock for lock in criu_locks(namespace) if lock.startswith("nftables")]

    def close(self) -> list[str]:
        """Remove every namespace of the lab; what was left behind (empty when everything was tidy)."""
        notes = []
        for name in reversed(self._namespaces):
            if not named.exists(name):
                continue
            try:
                notes += [f"{name}: {rule}" for rule in self.rules_in(name)]
            except Exception as exc:  # noqa: BLE001 - the namespace goes whatever its rules
                notes.append(f"{name}: iptables or nftables not readable: {exc}")
            finally:
                named.remove(name)
        self._namespaces.clear()
        notes += [f"namespace left: {name}" for name in named.names() if f"-{self.tag}-" in name]
        notes += [f"host rule: {rule}" for rule in sorted(set(self._host_lab_rules()) - set(self._host_rules_before))]
        return notes

    @staticmethod
    def _host_lab_rules() -> list[str]:
        return [rule for rule in iptables_rules(None) if LAB_SUBNET_PREFIX in rule or "CRIU" in rule]


class RouteFollower:
    """Moves the client's route for a container's address to the destination host as soon as the destination's
    containerd says the container's task started (its /tasks/start event): the network following the container.
    Use as a context manager around the migration; `flipped_at` is the time.monotonic() of the move, or None."""

    def __init__(self, lab: MigrationLab, destination: Containerd, container_id: str, address: str,
                 host: LabHost, timeout: float = 300.0):
        self.lab, self.container_id, self.address, self.host = lab, container_id, address, host
        self.timeout = timeout
        self.flipped_at: float | None = None
        self.error: BaseException | None = None
        self._events = destination.events()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="route-follower", daemon=True)

    def __enter__(self) -> RouteFollower:
        self._events.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._events.stop()

    def _follow(self) -> None:
        pattern = rf"/tasks/start .*\"container_id\":\"{re.escape(self.container_id)}\""
        deadline = time.monotonic() + self.timeout
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if self._events.wait_for(pattern, timeout=0.2, raising=False):
                    self.lab.serve(self.address, self.host)
                    self.flipped_at = time.monotonic()
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to the test through .error
            self.error = exc

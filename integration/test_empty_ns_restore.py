"""Restore into an empty network namespace, networked at CRIU's setup-namespaces notification by an OCI hook.

The container has a network namespace of its own (no path in config.json, as `ctr run` makes it); an OCI
createRuntime hook in its spec (written through containerd's Containers.Update: ctr cannot add hooks) gives it a veth
from the client host with 10.123.<n>.1, as a CNI plugin would. The server is busybox `nc -ll -e /bin/cat`.

runc dumps with an empty network namespace (runc and pyshim always do), so a restore comes back in a NEW namespace
with nothing in it; `runc restore` runs the bundle's prestart and createRuntime hooks at CRIU's setup-namespaces
notification with the restored root's pid, before any socket is restored. pyshim runs `runc restore`, so the hook
runs there under pyshim too: nothing for pyshim to add but `lo` (raised by its own CRIU action script at that stage).

Shown, pyshim against the Go runc shim through containerd's API (Tasks.Checkpoint exit + open_tcp, Tasks.Create from
the image path, Tasks.Start; the same calls to both):
- both: the hook ran at create and again at the restore, with the restored task's pid, in a namespace that is not
  the original's; the restored namespace holds exactly what the hook made (its veth, its address; lo).
- pyshim: the client's established connection continues through the re-made veth, data both ways; new connections
  are served; `lo` is up.
- the Go shim dumps with --tcp-established but restores without it: CRIU refuses ("Connected TCP socket in image")
  after the hook ran. Without a connection to restore, its restore works and the hook's network is there, but
  `lo` is down (containerd#4683).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest
from harness.containerd import PYSHIM, RUNC_V2, RUNTIMES, Containerd
from harness.grpc_client import ContainerdClient
from harness.image import TestImage
from harness.netns_hosts import SUBNET, Host, Hosts, echo, iptables_rules, no_echo
from harness.oci_hooks import NetworkHook, write_hook

from shim.api.containerd.runc.options import oci_pb2
from shim.netns import addresses, links

PORT = 7000
SERVER = ("nc", "-ll", "-p", str(PORT), "-e", "/bin/cat")


@pytest.fixture
def hosts():
    with Hosts() as made:  # each removed at the end; a test that passed fails if anything was left in them
        yield made


def remove(containerd: Containerd, container_id: str, *, started: bool = True) -> None:
    containerd.ctr("task", "rm", *(["-f"] if started else []), container_id, check=False)
    containerd.ctr("containers", "rm", container_id, check=False)


def network_hook(containerd: Containerd, hosts: Hosts, n: int) -> NetworkHook:
    near, far = hosts.hook_link(n)
    return NetworkHook(path=write_hook(containerd.tmp), log=containerd.tmp / f"hook-{n}.log",
                       host_netns=hosts.client.name, host_ifname=near, container_ifname=far,
                       container_cidr=f"{SUBNET.format(n=n, host=1)}/24", host_cidr=f"{SUBNET.format(n=n, host=2)}/24")


def create_with_hook(containerd: Containerd, api: ContainerdClient, image: TestImage, runtime: str, hook: NetworkHook,
                     prefix: str) -> str:
    """A container (its own network namespace) whose spec has the hook; `ctr` makes it, the API adds the hook."""
    container_id = containerd.new_id(prefix)
    flags = ["--runtime", runtime]
    if runtime == PYSHIM:
        flags += ["--runtime-config-path", str(containerd.pyshim_config())]
    containerd.ctr("containers", "create", *flags, image.ref, container_id, *SERVER)
    spec = api.spec(container_id)
    assert not any(ns.get("path") for ns in spec["linux"]["namespaces"] if ns["type"] == "network")
    api.update_spec(container_id, {**spec, "hooks": hook.spec_hooks()})
    return container_id


@dataclass
class Outcome:
    before: str = ""
    original_pid: int = 0
    restore: str = ""  # "ok" or what the caller was told
    restored_pid: int = 0
    hook_runs: list = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # in the restored namespace
    addresses: list[str] = field(default_factory=list)
    lo_up: bool | None = None
    same_connection: list[str] = field(default_factory=list)
    new_connection: str = ""
    rules: list[str] = field(default_factory=list)  # iptables rules in the restored namespace
    criu_log: str = ""


def checkpoint_and_restore(containerd: Containerd, image: TestImage, hosts: Hosts, runtime: str, n: int, *,
                           with_connection: bool) -> Outcome:
    outcome = Outcome()
    hook = network_hook(containerd, hosts, n)
    server = Host("container", "", hook.container_address)
    images = containerd.tmp / f"checkpoint-{n}"
    root = str(containerd.runc_root)
    original = restored = None
    with ContainerdClient(containerd.address, containerd.namespace) as api:
        try:
            original = create_with_hook(containerd, api, image, runtime, hook, "srv")
            api.create_task(original, options=oci_pb2.Options(root=root))
            outcome.original_pid = api.start_task(original)
            client = hosts.connect(server, PORT) if with_connection else None
            try:
                if client is not None:
                    outcome.before = echo(client, "before")
                api.checkpoint(original, oci_pb2.CheckpointOptions(exit=True, open_tcp=with_connection,
                                                                    image_path=str(images)))
                remove(containerd, original)
                original = None

                restored = create_with_hook(containerd, api, image, runtime, hook, "restored")
                api.create_task(restored, options=oci_pb2.Options(root=root, criu_image_path=str(images)))
                try:
                    outcome.restored_pid = api.start_task(restored)
                    outcome.restore = "ok"
                except grpc.RpcError as exc:
                    outcome.restore = exc.details()
                    bundle = containerd.bundle(restored)
                    outcome.criu_log = ((bundle / "work" / "restore.log").read_text(errors="replace")
                                        if (bundle / "work" / "restore.log").exists() else "")
                outcome.hook_runs = hook.runs()
                if outcome.restore == "ok":
                    netns = f"/proc/{outcome.restored_pid}/ns/net"
                    outcome.links = links.names(netns)
                    outcome.addresses = [a.cidr + " " + a.ifname for a in addresses.addresses(netns)]
                    outcome.lo_up = links.is_up("lo", netns)
                    outcome.rules = iptables_rules(netns)
                    if client is not None:
                        outcome.same_connection = [echo(client, f"after the restore {i}") for i in range(3)]
                    with hosts.connect(server, PORT) as fresh:
                        outcome.new_connection = echo(fresh, "a new connection")
                elif client is not None:
                    outcome.same_connection = [no_echo(client, "after a failed restore")]
            finally:
                if client is not None:
                    client.close()
            return outcome
        finally:
            if restored:
                remove(containerd, restored, started=outcome.restore == "ok")
            if original:
                remove(containerd, original)


def assert_hook_networked_the_restore(outcome: Outcome, hook: tuple[str, int]) -> None:
    far, n = hook
    assert outcome.restore == "ok", outcome.restore
    runs = outcome.hook_runs
    assert [r.pid for r in runs] == [outcome.original_pid, outcome.restored_pid], runs
    assert [r.before for r in runs] == [("lo",), ("lo",)], "both times a new, empty namespace"
    assert outcome.links == sorted(["lo", far]), outcome.links
    assert outcome.addresses == [f"{SUBNET.format(n=n, host=1)}/24 {far}"], outcome.addresses
    assert outcome.new_connection == "a new connection"
    assert outcome.rules == [], "no network lock left in the restored namespace"


def report(containerd: Containerd, outcomes: dict[str, Outcome]) -> None:
    for runtime, o in outcomes.items():
        print(f"containerd {containerd.version} {runtime}: restore {o.restore[:120]!r}; hook runs "
              f"{[(r.pid, r.status, r.before) for r in o.hook_runs]}; restored pid {o.restored_pid}; links {o.links}; "
              f"addresses {o.addresses}; lo up {o.lo_up}; same connection {o.same_connection}")


def far_end(hosts: Hosts, n: int) -> str:
    return f"pv{hosts.tag}k{n}"


def test_established_connection_restored_into_a_namespace_the_hook_networks(containerd: Containerd,
                                                                           test_image: TestImage, hosts: Hosts):
    outcomes = {runtime: checkpoint_and_restore(containerd, test_image, hosts, runtime, n, with_connection=True)
                for n, runtime in enumerate(RUNTIMES)}
    report(containerd, outcomes)

    pyshim = outcomes[PYSHIM]
    assert pyshim.before == "before"
    assert_hook_networked_the_restore(pyshim, (far_end(hosts, 0), 0))
    assert pyshim.same_connection == [f"after the restore {i}" for i in range(3)]
    assert pyshim.lo_up is True

    # The Go shim: the hook ran at setup-namespaces (runc runs it), then CRIU refused the connection: the Go shim
    # restores without --tcp-established.
    go = outcomes[RUNC_V2]
    assert go.before == "before"
    assert "OCI runtime restore failed" in go.restore, go.restore
    assert [r.pid for r in go.hook_runs][:1] == [go.original_pid] and len(go.hook_runs) == 2, go.hook_runs
    assert "Connected TCP socket in image" in go.criu_log, go.criu_log[-2000:]
    assert go.same_connection == ["TimeoutError"], go.same_connection  # its namespace went with the failed restore


def test_restore_without_connections_into_a_namespace_the_hook_networks(containerd: Containerd,
                                                                       test_image: TestImage, hosts: Hosts):
    outcomes = {runtime: checkpoint_and_restore(containerd, test_image, hosts, runtime, n, with_connection=False)
                for n, runtime in enumerate(RUNTIMES)}
    report(containerd, outcomes)
    for n, runtime in enumerate(RUNTIMES):
        assert_hook_networked_the_restore(outcomes[runtime], (far_end(hosts, n), n))
    assert outcomes[PYSHIM].lo_up is True
    assert outcomes[RUNC_V2].lo_up is False, "the Go shim's restore leaves lo down (containerd#4683)"

"""`pyshim migrate` keeps a container's network identity: one TCP connection survives the move between two hosts.

Two hosts (harness.migration): a source and a destination containerd 2.x, the destination reached through a private
sshd; the network is harness.migration_lab: host A and host B each a namespace with a bridge, the container's
namespace on A made as CNI makes it (veth into A's bridge, 10.125.0.10/24), a namespace made the same way on B for the
destination (`--dest-netns`), and a client namespace that routes the container's address to the host that serves it.
The network follows the container (RouteFollower): the client's route moves to B when B's containerd publishes the
restored task's start. The server is busybox `nc -ll -e /bin/cat` (one echoing cat per connection).

- Each mode the command offers (stop-copy, stream, post-copy; a mode it does not offer is skipped with the reason):
  the client's ONE connection echoes before and after (lines, then 64 KiB both ways), the address is served from B,
  the task runs in B's namespace, the source's task is gone, no CRIU lock is left in either namespace, and the
  report names the mode with its figures.
- B's namespace cannot take the address (it holds 10.125.0.11): refused with the reason, the source runs on and its
  connection echoes, nothing was added on B. With --tcp-close the move proceeds: the old connection is closed, new
  ones reach the container at its new address.
- Each mode: memfill (harness/memfill.c) filled 256 MiB with a known pattern; after the move every word checks and
  its request counter goes on from its value, over the same connection.
- The lab itself, without the command: the sshd runs the pyshim under test for the test's key, the address is
  answered by whichever host the client's route names, and the route follows the destination's /tasks/start.
Everything is removed at the end and asserted removed (lab namespaces and rules, containerds, sshd).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from harness import memfill
from harness import sshd as sshd_module
from harness.containerd import PYSHIM
from harness.environment import Environment
from harness.image import TestImage
from harness.migration import TwoHosts, added, mode_skip_reason
from harness.migration_lab import CONTAINER_ADDRESS, MigrationLab, RouteFollower
from harness.netns_hosts import criu_locks, echo, no_echo
from harness.tasks import remove, task_pid, task_status
from harness.waiting import wait_until

PORT = 7000
SERVER = ("nc", "-ll", "-p", str(PORT), "-e", "/bin/cat")
OTHER_ADDRESS = "10.125.0.11"
REPORT_FIELDS = {"mode", "container", "frozen_ms", "blackout_ms", "bytes_moved", "total_ms", "phases"}


@pytest.fixture
def two_hosts(request, environment: Environment, test_image: TestImage, containerd_log_dir: Path, tmp_path: Path):
    """Source and destination containerd (2.x unless the test or $PYSHIM_TWO_HOSTS_CONTAINERD says: conftest's
    two_host_versions) with the test image, the network lab, the destination's sshd. Everything is torn down
    afterwards and the lab asserted empty."""
    from conftest import two_containerds

    if reason := sshd_module.unavailable_reason():
        pytest.skip(reason)
    lab = MigrationLab()
    sshd = sshd_module.Sshd(tmp_path / "sshd", tool=environment.tool)
    hosts: TwoHosts | None = None
    try:
        with two_containerds(request, environment, test_image, containerd_log_dir) as instances:
            try:
                sshd.start()
                work = tmp_path / "work"
                work.mkdir()
                hosts = TwoHosts(instances[0], instances[1], lab, sshd, environment.tool, work)
                yield hosts
            finally:  # before the containerds stop
                notes = hosts.end_leftover_processes() if hosts else []
                notes += sshd.stop()
                if notes:
                    print("teardown notes:", notes)  # shown with a failing test's output
    finally:
        left = lab.close()
    assert not left, f"left behind by the lab: {left}"


@pytest.fixture
def offered_mode(request: pytest.FixtureRequest, environment: Environment) -> str:
    """The test's mode (its `mode` parameter, else stop-copy), skipped with the reason before any host is set up
    when the command under test does not offer it."""
    callspec = getattr(request.node, "callspec", None)
    mode = callspec.params.get("mode", "stop-copy") if callspec else "stop-copy"
    if reason := mode_skip_reason(environment.tool, mode):
        print(f"SKIP --{mode}: {reason}")
        pytest.skip(reason)
    return mode


def start_server(hosts: TwoHosts, image: TestImage, netns: str, network_lock: str = "") -> str:
    """The echo server in netns on host A; network_lock: its checkpoints' CRIU lock method ("": the default)."""
    container_id = hosts.source.new_id("web")
    lock = ["--annotation", f"io.pyshim.checkpoint.network-lock={network_lock}"] if network_lock else []
    hosts.source.run(container_id, image, *SERVER, runtime=PYSHIM, extra=["--with-ns", f"network:{netns}", *lock])
    return container_id


def in_namespace(pid: int, netns_path: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns_path).st_ino


def echo_bulk(sock, size: int = 64 * 1024) -> bool:
    """size bytes of a known pattern sent and read back whole (data both ways, beyond one segment)."""
    payload = bytes(33 + (i * 7) % 90 for i in range(size))  # printable, varied
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received == payload


@pytest.mark.parametrize("mode, network_lock", [("stop-copy", ""), ("stream", ""), ("post-copy", ""),
                                                ("stop-copy", "nftables")])
def test_one_tcp_connection_survives_the_move_and_the_address_is_served_from_b(offered_mode: str,
                                                                               two_hosts: TwoHosts,
                                                                               test_image: TestImage, mode: str,
                                                                               network_lock: str):
    """network_lock nftables: CRIU's lock on A is an nftables table, which the command removes after the commit."""
    lab = two_hosts.lab
    on_a = lab.container_netns(lab.a)
    on_b = lab.container_netns(lab.b)
    lab.serve(CONTAINER_ADDRESS, lab.a)
    container_id = start_server(two_hosts, test_image, on_a, network_lock)
    try:
        with lab.connect(CONTAINER_ADDRESS, PORT) as client:
            client.settimeout(20)  # retransmissions across the blackout
            assert echo(client, "before the move") == "before the move"
            assert echo_bulk(client)
            with RouteFollower(lab, two_hosts.destination, container_id, CONTAINER_ADDRESS, lab.b) as follower:
                run = two_hosts.migrate(container_id, f"--{mode}", "--dest-netns", on_b)
            print(f"--{mode}: exit {run.returncode} in {run.seconds:.2f}s; report {run.report}\n{run.stderr[-3000:]}")
            assert run.returncode == 0, run.stderr
            assert follower.error is None and follower.flipped_at is not None, "B's containerd published no start"
            assert lab.served_by(CONTAINER_ADDRESS) == "b"
            assert task_status(two_hosts.destination, container_id) == "RUNNING"
            assert in_namespace(task_pid(two_hosts.destination, container_id), on_b)
            assert task_status(two_hosts.source, container_id) == "ABSENT"

            # the same connection, data both ways, now through host B
            assert [echo(client, f"after the move {i}") for i in range(3)] == [f"after the move {i}" for i in range(3)]
            assert echo_bulk(client)
        with lab.connect(CONTAINER_ADDRESS, PORT) as fresh:
            assert echo(fresh, "a new connection") == "a new connection"
        assert criu_locks(on_b.rsplit("/", 1)[1]) == [] and criu_locks(on_a.rsplit("/", 1)[1]) == []
        assert REPORT_FIELDS <= set(run.report), run.report
        assert run.report["mode"] == mode and run.report["container"] == container_id
        assert run.report["bytes_moved"] > 0 and run.report["total_ms"] > 0
    finally:
        remove(two_hosts.destination, container_id)
        remove(two_hosts.source, container_id)


def test_a_destination_namespace_without_the_address_is_refused_and_tcp_close_moves_anyway(
        offered_mode: str, two_hosts: TwoHosts, test_image: TestImage):
    lab = two_hosts.lab
    on_a = lab.container_netns(lab.a)
    on_b = lab.container_netns(lab.b, OTHER_ADDRESS)  # B's namespace cannot take 10.125.0.10
    lab.serve(CONTAINER_ADDRESS, lab.a)
    lab.serve(OTHER_ADDRESS, lab.b)
    container_id = start_server(two_hosts, test_image, on_a)
    try:
        with lab.connect(CONTAINER_ADDRESS, PORT) as client:
            client.settimeout(20)
            assert echo(client, "before") == "before"
            before = two_hosts.residue()
            refused = two_hosts.migrate(container_id, "--dest-netns", on_b)
            print(f"refused: exit {refused.returncode}: {refused.stderr[-2000:]}")
            assert refused.returncode != 0
            assert CONTAINER_ADDRESS in refused.message and "--tcp-close" in refused.message, refused.stderr
            assert task_status(two_hosts.source, container_id) == "RUNNING"
            assert echo(client, "still on A") == "still on A"
            assert added(before, two_hosts.residue()) == {}
            assert lab.rules_in(on_b.rsplit("/", 1)[1]) == [] and lab.rules_in(on_a.rsplit("/", 1)[1]) == []

            moved = two_hosts.migrate(container_id, "--tcp-close", "--dest-netns", on_b)
            print(f"--tcp-close: exit {moved.returncode} in {moved.seconds:.2f}s: {moved.stderr[-2000:]}")
            assert moved.returncode == 0, moved.stderr
            assert task_status(two_hosts.destination, container_id) == "RUNNING"
            assert task_status(two_hosts.source, container_id) == "ABSENT"
            # the old connection is closed (a reset or an end of file; never an answer)
            assert not no_echo(client, "anyone?").startswith("answered")
        for i in range(2):
            with lab.connect(OTHER_ADDRESS, PORT) as fresh:
                assert echo(fresh, f"new {i}") == f"new {i}"
        assert lab.rules_in(on_b.rsplit("/", 1)[1]) == []
    finally:
        remove(two_hosts.destination, container_id)
        remove(two_hosts.source, container_id)


def test_the_lab_routes_the_address_to_whichever_host_serves_it(two_hosts: TwoHosts, test_image: TestImage):
    """The lab itself, without migrate: the sshd lets the client key in and runs the pyshim under test; a server on
    A answers through A; after serve(B), the same address is answered by a server in B's namespace; the route flip
    follows B's /tasks/start."""
    which = subprocess.run(two_hosts.sshd.ssh_argv("command", "-v", "pyshim"), capture_output=True, text=True,
                           timeout=60)
    assert which.returncode == 0, which.stderr
    assert which.stdout.strip() == str(two_hosts.sshd.directory / "bin" / "pyshim")
    lab = two_hosts.lab
    on_a, on_b = lab.container_netns(lab.a), lab.container_netns(lab.b)
    lab.serve(CONTAINER_ADDRESS, lab.a)
    on_source = start_server(two_hosts, test_image, on_a)
    on_destination = two_hosts.destination.new_id("web-b")
    try:
        with lab.connect(CONTAINER_ADDRESS, PORT) as client:
            assert echo(client, "via A") == "via A"
        assert lab.served_by(CONTAINER_ADDRESS) == "a"
        with RouteFollower(lab, two_hosts.destination, on_destination, CONTAINER_ADDRESS, lab.b) as follower:
            two_hosts.destination.run(on_destination, test_image, *SERVER, runtime=PYSHIM,
                                      extra=["--with-ns", f"network:{on_b}"])
            wait_until(lambda: follower.flipped_at, timeout=15, what="the route to follow B's task start")
        assert lab.served_by(CONTAINER_ADDRESS) == "b"
        remove(two_hosts.source, on_source)  # only B can answer now
        with lab.connect(CONTAINER_ADDRESS, PORT) as client:
            assert echo(client, "via B") == "via B"
        assert lab.remove_container_netns(on_a) == [], "no rule was left in A's container namespace"
    finally:
        remove(two_hosts.source, on_source)
        remove(two_hosts.destination, on_destination)


@pytest.fixture(scope="module")
def memfill_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    if reason := memfill.unavailable_reason():
        pytest.skip(reason)
    return memfill.build_memfill_image(tmp_path_factory.mktemp("memfill"), busybox=environment.busybox)


@pytest.mark.parametrize("mode", ["stop-copy", "stream", "post-copy"])
def test_256_mib_of_a_known_pattern_arrive_intact(offered_mode: str, two_hosts: TwoHosts, memfill_image: TestImage,
                                                  mode: str):
    """memfill (harness/memfill.c) filled 256 MiB with a known pattern; after the move, over the same connection,
    it checks every word (`ok 256`) and its request counter went on from its value."""
    lab = two_hosts.lab
    for host in (two_hosts.source, two_hosts.destination):
        host.import_image(memfill_image)
    on_a, on_b = lab.container_netns(lab.a), lab.container_netns(lab.b)
    lab.serve(CONTAINER_ADDRESS, lab.a)
    container_id = two_hosts.source.new_id("memfill")
    two_hosts.source.run(container_id, memfill_image, *memfill.command(256, PORT), runtime=PYSHIM,
                         extra=["--with-ns", f"network:{on_a}"])
    try:
        with memfill.wait_ready(lambda: lab.connect(CONTAINER_ADDRESS, PORT, timeout=2)) as client:
            client.settimeout(60)
            count = memfill.pongs(client)
            with RouteFollower(lab, two_hosts.destination, container_id, CONTAINER_ADDRESS, lab.b):
                run = two_hosts.migrate(container_id, f"--{mode}", "--dest-netns", on_b)
            print(f"--{mode} 256 MiB: exit {run.returncode} in {run.seconds:.2f}s; report {run.report}")
            assert run.returncode == 0, run.stderr
            assert memfill.pongs(client) == count + 1
            assert memfill.ask(client, "check") == "ok 256"
    finally:
        remove(two_hosts.destination, container_id)
        remove(two_hosts.source, container_id)

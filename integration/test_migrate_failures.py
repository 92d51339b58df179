"""`pyshim migrate` failing part-way: the source container runs on with its state, nothing is left on either host.

The two hosts and the network of test_migrate_network.py; the workload is memfill (harness/memfill.c) in the
container's namespace on host A: MIB MiB filled with a known pattern, a request counter in its memory, one client
connection from the client namespace. Each failure is injected into a `--stop-copy` migration (and `--stream` where
the transfer runs during the dump):
- the destination containerd is down (its process stopped, its socket dir kept);
- the transport is cut mid-transfer: the destination's ssh session, or the source's ssh client, killed by pid once
  the destination's store holds part of the transfer;
- the destination's disk is full: DEST's store= is a 32 MiB tmpfs, the container holds 256 MiB (stop-copy: the
  archive does not fit; stream: the page server's images do not), the command's --timeout at 120 s;
- CRIU is killed (SIGKILL, by pid) on the source while it writes the workload's pages, or on the destination while
  it restores.
Each: the command fails with a message naming the cause, the source's task is RUNNING, its counter goes on from its
value and its memory checks intact, its connection still answers (a dump whose CRIU was killed loses the connection,
as with any checkpoint: then a new connection must work), no CRIU lock is left in either namespace, and compared with
before the migration neither host holds a new container, task, snapshot, content blob, image, lease, mount, ssh
session, process or work file.

What no runtime can bring back, shown instead: the workload itself killed while CRIU dumps it (as the OOM killer
would). The command then says the source's task did not survive (with its exit status) rather than that it runs on,
and the same "nothing left on either host" holds. (A CRIU SIGKILLed in the fraction of a millisecond while it steps
a process through its injected code takes that process with it, the same outcome; the shim reports it the same way,
with the signal the process died of: unit tests in tests/task/test_checkpoint_fate.py.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import memfill, processes
from harness.containerd import PYSHIM
from harness.image import TestImage
from harness.migration import TwoHosts, added, descendants_named
from harness.migration_lab import CONTAINER_ADDRESS
from harness.tasks import remove, task_pid, task_status
from harness.waiting import wait_until
from test_migrate_network import memfill_image, offered_mode, two_hosts  # noqa: F401 - the fixtures

PORT = 7001
MIB = 256
SMALL_DISK_MIB = 32
MIGRATE_TIMEOUT = 120  # seconds: --timeout of the command where a failure could leave it waiting
PAGES_BEFORE_KILL = 32 << 20  # bytes of the workload's memory CRIU has written when it (or the workload) is killed


class Workload:
    """memfill in a CNI-made namespace on host A, a client connection to it, and the residue before the move."""

    def __init__(self, hosts: TwoHosts, image: TestImage, mib: int = MIB):
        self.hosts = hosts
        lab = hosts.lab
        hosts.source.import_image(image)
        hosts.destination.import_image(image)
        self.on_a = lab.container_netns(lab.a)
        self.on_b = lab.container_netns(lab.b)
        lab.serve(CONTAINER_ADDRESS, lab.a)
        self.id = hosts.source.new_id("memfill")
        hosts.source.run(self.id, image, *memfill.command(mib, PORT), runtime=PYSHIM,
                         extra=["--with-ns", f"network:{self.on_a}"])
        self.client = memfill.wait_ready(lambda: lab.connect(CONTAINER_ADDRESS, PORT, timeout=2))
        self.client.settimeout(30)
        self.count = memfill.pongs(self.client)
        hosts.source_store.mkdir(exist_ok=True)
        hosts.destination_store.mkdir(exist_ok=True)
        self.before = hosts.residue()

    def flags(self, mode: str = "stop-copy") -> list[str]:
        return [f"--{mode}", "--dest-netns", self.on_b]

    def assert_source_runs_on(self, *, connection_kept: bool = True) -> None:
        hosts = self.hosts
        assert task_status(hosts.source, self.id) == "RUNNING"
        assert task_status(hosts.destination, self.id) == "ABSENT"
        if connection_kept:
            sock = self.client
        else:
            self.client.close()
            sock = self.client = hosts.lab.connect(CONTAINER_ADDRESS, PORT, timeout=10)
            sock.settimeout(30)
        assert memfill.pongs(sock) > self.count, "the counter went on from its value"
        assert memfill.ask(sock, "check") == f"ok {MIB}", "the memory's pattern is intact"
        self.assert_nothing_added()

    def assert_source_lost(self, stderr: str, exit_status: int) -> None:
        """The source's task ended during the dump: said so, with its exit status; the container and its stopped
        task kept on the source for the user; nothing on the destination; nothing else left on either host."""
        hosts = self.hosts
        assert task_status(hosts.source, self.id) == "STOPPED"
        assert task_status(hosts.destination, self.id) == "ABSENT"
        assert f"{self.id}'s task here did not survive the failed dump (exit status {exit_status})" in stderr, stderr
        assert "runs on" not in stderr, stderr
        self.assert_nothing_added(but={"source tasks": [f"{self.id} STOPPED"]})

    def assert_nothing_added(self, but: dict[str, list[str]] | None = None) -> None:
        """No CRIU lock in either namespace; compared with before the migration, nothing new on either host (but
        what `but` names)."""
        hosts = self.hosts
        for netns in (self.on_a, self.on_b):
            assert hosts.lab.rules_in(netns.rsplit("/", 1)[1]) == [], f"rules left in {netns}"
        # processes and sessions end on their own once the command has: bounded wait for that outcome
        left: dict[str, list[str]] = {}

        def nothing_left() -> bool:
            nonlocal left
            left = added(self.before, hosts.residue())
            return left == (but or {})

        try:
            wait_until(nothing_left, timeout=20, what="nothing left on either host")
        except AssertionError:
            raise AssertionError(f"left behind on the hosts: {left}") from None

    def close(self) -> None:
        self.client.close()
        remove(self.hosts.destination, self.id)
        remove(self.hosts.source, self.id)


@pytest.fixture
def workload(offered_mode: str, two_hosts: TwoHosts, memfill_image: TestImage):  # noqa: F811 - imported fixtures
    made = Workload(two_hosts, memfill_image)
    try:
        yield made
    finally:
        made.close()


def assert_clear_error(stderr: str) -> None:
    """The command's failure is its own one-line error (`pyshim: ...`), not a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("pyshim: ") and "Traceback" not in stderr, stderr[-3000:]


def report(name: str, run) -> None:
    print(f"{name}: exit {run.returncode} after {run.seconds:.2f}s\nstderr: {run.stderr[-3000:]}")


def migrate_while(hosts: TwoHosts, container_id: str, flags: list[str], inject: Callable[[subprocess.Popen], str],
                  timeout: float = 300) -> tuple[int, str, str]:
    """The migration in the background, inject(process) called while it runs (it returns what it did); the exit
    status, stderr and that note."""
    process = hosts.start_migrate(container_id, *flags)
    try:
        note = inject(process)
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()  # our child, by pid
            process.wait(10)
    return process.returncode, stderr, note


def bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.exists() else 0


def wait_for_transfer(hosts: TwoHosts, process: subprocess.Popen, at_least: int = 1 << 20) -> int:
    """Bounded wait until the destination's store holds at_least bytes of the transfer (or the command ended).
    Early and often: the whole 256 MiB cross in about half a second since the data path went native (sendfile)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        held = bytes_in(hosts.destination_store)
        if held >= at_least:
            return held
        time.sleep(0.005)
    raise AssertionError(f"the transfer never reached {at_least} bytes in {hosts.destination_store} "
                         f"(command exit {process.poll()})")


# --- the destination containerd is down --------------------------------------------------------------------

def test_destination_containerd_down(offered_mode: str, two_hosts: TwoHosts, workload: Workload):  # noqa: F811
    outcome = {}

    def while_down() -> None:
        outcome["run"] = two_hosts.migrate(workload.id, *workload.flags())

    two_hosts.destination.restart(while_down=while_down)
    run = outcome["run"]
    report("destination containerd down", run)
    assert run.returncode != 0
    assert_clear_error(run.stderr)
    # the socket is gone (containerd removes it on exit) or does not answer
    assert (f"{two_hosts.destination.address} does not exist" in run.message
            or "reaching containerd" in run.message), run.stderr
    workload.assert_source_runs_on()


# --- the transport cut mid-transfer ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["stop-copy", "stream"])
@pytest.mark.parametrize("cut", ["sshd-session", "ssh-client"])
def test_transport_cut_mid_transfer(offered_mode: str, two_hosts: TwoHosts, workload: Workload,  # noqa: F811
                                    mode: str, cut: str):

    def cut_transport(process: subprocess.Popen) -> str:
        held = wait_for_transfer(two_hosts, process)
        if cut == "sshd-session":
            killed = two_hosts.sshd.kill_sessions()
        else:
            killed = descendants_named([process.pid], "ssh")
            for pid in killed:
                processes.kill_child_of(process.pid, pid)
        assert killed, f"nothing to cut ({cut})"
        return f"{cut} {killed} killed with {held} bytes in the destination's store"

    returncode, stderr, note = migrate_while(two_hosts, workload.id, workload.flags(mode), cut_transport)
    print(f"transport cut ({mode}, {note}): exit {returncode}\nstderr: {stderr[-3000:]}")
    assert returncode != 0
    assert_clear_error(stderr)
    workload.assert_source_runs_on()


# --- the destination's disk is full --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["stop-copy", "stream"])
def test_destination_disk_full(offered_mode: str, two_hosts: TwoHosts, workload: Workload,  # noqa: F811
                               mode: str):
    store = two_hosts.destination_store
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_MIB}m,mode=0700", "pyshim-lab-full",
                    str(store)], check=True, timeout=20)
    try:
        # the command's own deadline well inside the test's: a stuck transfer must end in its rollback
        run = two_hosts.migrate(workload.id, *workload.flags(mode), "--timeout", str(MIGRATE_TIMEOUT),
                                timeout=MIGRATE_TIMEOUT + 120)
        report(f"destination disk full ({mode})", run)
        assert run.returncode != 0
        assert_clear_error(run.stderr)
        assert any(word in run.message for word in ("No space", "ENOSPC", "space")), run.stderr
        assert bytes_in(store) == 0, f"the destination's store keeps {bytes_in(store)} bytes"
        workload.assert_source_runs_on()
    finally:
        subprocess.run(["umount", str(store)], check=False, timeout=20)
    assert str(store) not in Path("/proc/self/mountinfo").read_text()


# --- CRIU killed on either side ------------------------------------------------------------------------------

def tracer_of(pid: int) -> int:
    """The pid ptrace-attached to pid (CRIU seizes the tasks it dumps), 0 when none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pages_written(criu: int) -> int:
    """Bytes in the pages-*.img files CRIU has open (0 when none): how far it is into writing memory."""
    total = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{criu}/fd"):
            with contextlib.suppress(OSError):
                if re.search(r"/pages-\d+\.img$", os.readlink(f"/proc/{criu}/fd/{fd}")):
                    total += os.stat(f"/proc/{criu}/fd/{fd}").st_size
    return total


def restoring_from_the_store(criu: int) -> bool:
    """Whether CRIU has something of the migration's staging directory (.migrate-*) open: the restore's."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{criu}/fd"):
            with contextlib.suppress(OSError):
                if "/.migrate-" in os.readlink(f"/proc/{criu}/fd/{fd}"):
                    return True
    return False


def kill_first_criu(roots: Callable[[], list[int]], process: subprocess.Popen, parent: str | None,
                    dumping: int | None = None, timeout: float = 120) -> str:
    """SIGKILL the first CRIU below roots (with parent: whose parent is called that) that restores from the
    migration's staging directory, or with dumping: the CRIU that
    has seized that pid (not the idle `criu swrk` a waiting checkpoint worker starts ahead), once it has written
    PAGES_BEFORE_KILL bytes of its memory: CRIU then waits on its parasite in the task, which puts the task back as
    it was when CRIU's end of their socket closes. (Killed while it steps the task through its injected code, a few
    tenths of a millisecond around infection and cure, CRIU takes the task with it: see the module's docstring.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        for pid in descendants_named(roots(), "criu", parent=parent):
            if dumping is not None and (tracer_of(dumping) != pid or pages_written(pid) < PAGES_BEFORE_KILL):
                continue
            if dumping is None and not restoring_from_the_store(pid):
                continue  # the short `criu swrk` runc starts first to ask CRIU's version, not the restore
            return kill_by_pid(pid, f"criu {pid} ({' '.join(processes.cmdline(pid))[:120]})")
        time.sleep(0.005)
    raise AssertionError(f"no CRIU process seen (command exit {process.poll()})")


def kill_by_pid(pid: int, what: str) -> str:
    pidfd = processes.open_pidfd(pid)
    if pidfd is None:
        raise AssertionError(f"{what} was gone before it could be killed")
    try:
        processes.send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    return f"{what} killed"


@pytest.mark.parametrize("side", ["source", "destination"])
def test_criu_killed(offered_mode: str, two_hosts: TwoHosts, workload: Workload, side: str):  # noqa: F811
    # the source: the dump's CRIU (the shim's checkpoint worker runs it); the destination: the restore's, which
    # `runc restore` runs under the destination's shim
    roots = two_hosts.source.adopted if side == "source" else two_hosts.destination.adopted
    parent = None if side == "source" else "runc"
    # on the source, the CRIU dumping the workload (it has seized the task's init)
    dumping = task_pid(two_hosts.source, workload.id) if side == "source" else None
    returncode, stderr, note = migrate_while(two_hosts, workload.id, workload.flags(),
                                             lambda process: kill_first_criu(roots, process, parent, dumping))
    print(f"CRIU killed on the {side} ({note}): exit {returncode}\nstderr: {stderr[-3000:]}")
    assert returncode != 0
    assert_clear_error(stderr)
    if side == "source":
        assert "the task runs on" in stderr and "CRIU was killed before it finished" in stderr, stderr
    # CRIU dies holding the source's TCP connection in repair mode: the connection does not survive a killed dump
    workload.assert_source_runs_on(connection_kept=side != "source")


def test_source_task_killed_mid_dump(offered_mode: str, two_hosts: TwoHosts, workload: Workload):  # noqa: F811
    """The workload SIGKILLed while CRIU writes its pages: nothing to roll back to; the command says so."""
    init = task_pid(two_hosts.source, workload.id)

    def kill_the_workload(process: subprocess.Popen) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            criu = tracer_of(init)
            if criu and pages_written(criu) >= PAGES_BEFORE_KILL:
                return kill_by_pid(init, f"the workload's init {init}")
            time.sleep(0.005)
        raise AssertionError(f"CRIU never wrote {PAGES_BEFORE_KILL} bytes of pages (command exit {process.poll()})")

    returncode, stderr, note = migrate_while(two_hosts, workload.id, workload.flags(), kill_the_workload)
    print(f"workload killed mid-dump ({note}): exit {returncode}\nstderr: {stderr[-3000:]}")
    assert returncode == 1
    assert_clear_error(stderr)
    assert "the task did not survive it: its init was killed by SIGKILL (exit status 137)" in stderr, stderr
    workload.assert_source_lost(stderr, 137)

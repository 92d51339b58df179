"""Each checkpoint option shown by its effect under pyshim, not just accepted (containerd 2.x; 1.6 where cheap).

Options reach pyshim the ways a user has: `ctr task checkpoint --exit --image-path` (2.x sends CheckpointOptions to
any runtime; 1.6 only to io.containerd.runc.*), `io.pyshim.checkpoint.<flag>` annotations on the container (every
runc flag, and the only way on 1.6), and containerd's gRPC API. A restore is a new container whose pyshim runtime
options file names the image (CriuImagePath): its Start restores, honouring the options the checkpoint recorded.

The workload counts in a shell variable and writes each value in place (`1<>`, fixed width, so the file never changes
size: CRIU checks the size of every open file) to /data/counter, a host directory bind-mounted into the container
and into the one restored from it. A restored counter that goes on from the checkpointed value proves the memory came
back.

- leave-running: a checkpoint leaves the task RUNNING and counting; exit (ctr --exit, or the annotation
  leave-running=false on 1.6) stops it.
- file-locks: a container holding a flock (harness/lockhold.c) cannot be dumped without it (CRIU says so, the task
  runs on); with it, the restored process still holds the lock: it reports so from /proc/self/fdinfo, and neither
  the host nor a process in the container can take it.
- shell-job: a tty container (`ctr run -d -t` in tmux) checkpointed with shell-job and restored with a tty: keys
  typed into `ctr task attach` reach the restored shell, which still has the variable set before the checkpoint.
- manage-cgroups-mode, each value, for a container with a memory limit restored into one without: the dump records
  the limit (not with ignore); the restore puts the task in the new container's cgroup; only full brings the limit
  back; strict is refused by CRIU (runc always makes the container's cgroup first).
- auto-dedup: the restore punches the pages it has read out of the image (allocated size ~0).
- page-server: the pages go over a veth to `criu page-server` in a network namespace the test made; the local image
  has none; the images plus the pages received there restore.
- lazy-pages: a lazy restore (annotation on the restoring container): `criu lazy-pages` serves the page faults
  through userfaultfd, the counter resumes, the daemon exits once every page is in.
- a lazy dump serving its own pages fails inside CRIU here ("page-pipe: splice: -1: Bad file descriptor" once a lazy
  restore asks for pages): the checkpoint error quotes CRIU's log, the task runs on, no image is left, and the lazy
  restore that asked fails at once, quoting the daemon's log. (CRIU's lazy page server listens on every address,
  whatever it is given; only loopback connects to it.)
- pre-dump and parent-path: refused before the task is touched (no soft-dirty tracking on these kernels).
- failure injection: an unsupported option value (annotation, and CheckpointOptions through the API) is an
  InvalidArgument naming it; CRIU SIGKILLed in the middle of dumping 800 MiB; an image path under a file or on a
  read-only mount. Each time the task is RUNNING (not frozen) and counting afterwards, and no image is left.
- interchange: pyshim's image restores with plain `runc restore`; the Go shim's image restores under pyshim.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pycriu.images
import pytest
from harness import commands, lockhold, mounts, processes
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.grpc_client import ContainerdClient
from harness.image import TestImage
from harness.runc import Runc
from harness.waiting import wait_until

from shim.api.containerd.runc.options import oci_pb2

ANNOTATION = "io.pyshim.checkpoint."
COUNTER = "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /data/counter; sleep 0.05; done"
MiB = 1 << 20
WAIT = 10.0
HELPER_DIR = "/opt/lockhold"


# --- containers, counters, checkpoints --------------------------------------------------------------------------------

class Lab:
    """One test's containers on one containerd: each with its own host directory at /data; all removed at the end
    (tasks, containers, data and image directories)."""

    def __init__(self, containerd: Containerd, image: TestImage) -> None:
        self.containerd = containerd
        self.image = image
        self.containers: list[str] = []
        self.paths: list[Path] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        for container_id in reversed(self.containers):
            self.containerd.ctr("task", "rm", "-f", container_id, check=False, timeout=30)
            self.containerd.ctr("containers", "rm", container_id, check=False)
        for path in self.paths:
            shutil.rmtree(path, ignore_errors=True)

    def path(self, name: str) -> Path:
        """A fresh path in the containerd's temp dir (not created), removed at the end."""
        path = self.containerd.tmp / f"{name}-{secrets.token_hex(3)}"
        self.paths.append(path)
        return path

    def flags(self, data: Path, annotations: dict[str, str], mounts: tuple[str, ...]) -> list[str]:
        flags = [f"--mount=type=bind,src={data},dst=/data,options=rbind:rw"]
        flags += [f"--mount={mount}" for mount in mounts]
        for name, value in annotations.items():
            flags += ["--annotation", f"{ANNOTATION}{name}={value}"]
        return flags

    def run(self, *command: str, annotations: dict[str, str] | None = None, mounts: tuple[str, ...] = (),
            extra: tuple[str, ...] = (), runtime: str = PYSHIM) -> tuple[str, Path]:
        """A detached container running command, with a new /data; (its id, its /data on the host)."""
        container_id = self.containerd.new_id("opt")
        data = self.path(f"{container_id}-data")
        data.mkdir()
        self.containers.append(container_id)
        self.containerd.run(container_id, self.image, *command, runtime=runtime,
                            extra=[*self.flags(data, annotations or {}, mounts), *extra])
        return container_id, data

    def restore_config(self, images: Path, container_id: str) -> Path:
        config = self.containerd.tmp / f"{container_id}.toml"
        config.write_text(f'BinaryName = "runc"\nRoot = "{self.containerd.runc_root}"\nCriuImagePath = "{images}"\n')
        return config

    def restore_argv(self, images: Path, data: Path, container_id: str, *, annotations: dict[str, str],
                     mounts: tuple[str, ...], tty: bool) -> list[str]:
        return [*self.containerd.ctr_argv(), "run", "-d", *(["-t"] if tty else []), "--runtime", PYSHIM,
                "--fifo-dir", str(self.containerd.fifo_dir),
                "--runtime-config-path", str(self.restore_config(images, container_id)),
                *self.flags(data, annotations, mounts), self.image.ref, container_id, "sh"]

    def restore(self, images: Path, data: Path, *, annotations: dict[str, str] | None = None,
                mounts: tuple[str, ...] = (), check: bool = True) -> tuple[str, subprocess.CompletedProcess[str]]:
        """A new container whose Start restores images, with data at /data again; (its id, ctr's result)."""
        container_id = self.containerd.new_id("rst")
        self.containers.append(container_id)
        argv = self.restore_argv(images, data, container_id, annotations=annotations or {}, mounts=mounts,
                                 tty=False)
        return container_id, commands.run(argv, env=self.containerd.env, check=check, timeout=60)

    def checkpoint(self, container_id: str, images: Path | None, *, exit: bool = False,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr task checkpoint [--exit] [--image-path images]`."""
        args = ["task", "checkpoint", *(["--exit"] if exit else []),
                *(["--image-path", str(images)] if images else []), container_id]
        return self.containerd.ctr(*args, check=check, timeout=120)

    def task(self, container_id: str) -> tuple[int, str]:
        """(pid, status) as `ctr task ls` shows them; (0, "ABSENT") without a task."""
        for line in self.containerd.ctr("task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return int(fields[1]), fields[2]
        return 0, "ABSENT"

    def wait_status(self, container_id: str, wanted: str) -> str:
        deadline = time.monotonic() + WAIT
        while (status := self.task(container_id)[1]) != wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        return status

    def bundle(self, container_id: str) -> Path:
        return self.containerd.bundle(container_id)


def counter(data: Path) -> int | None:
    try:
        return int((data / "counter").read_text())
    except (OSError, ValueError):
        return None


def counting(data: Path, at_least: int = 3) -> int:
    """Wait until the counter reaches at_least; its value then."""
    return wait_until(lambda: (value := counter(data)) is not None and value >= at_least and value,
                      WAIT, f"counter in {data} reaching {at_least}")


def still_counting(data: Path) -> bool:
    """The counter moves on (the task is neither stopped nor frozen)."""
    start = counting(data, 1)
    counting(data, start + 3)
    return True


def resumes(data: Path, checkpointed: int) -> bool:
    """After a restore: the counter moves on from the checkpointed value (never starting again at 1)."""
    first = wait_until(lambda: (value := counter(data)) is not None and value != checkpointed and value,
                       WAIT, "restored counter writing")
    counting(data, first + 3)
    return checkpointed < first <= checkpointed + 20


def stopped_counting(data: Path) -> bool:
    before = counter(data)
    time.sleep(0.3)
    return counter(data) == before


def record(images: Path) -> dict:
    return json.loads((images / "pyshim-checkpoint.json").read_text())


def partial_images(images: Path) -> list[Path]:
    """pyshim's private directories a dump writes into before the image is put in place (shim/criu/images.py)."""
    return sorted(images.parent.glob(f".{images.name}.pyshim-partial-*"))


def task_pids(lab: Lab, container_id: str) -> list[int]:
    return [int(line.split()[0]) for line in lab.containerd.ctr("task", "ps", container_id).stdout.splitlines()[1:]]


def not_frozen(lab: Lab, container_id: str) -> bool:
    """No process of the task is stopped or frozen (T, t or D: a ptrace stop or the freezer); the counter's
    short-lived `sleep`s may be gone by the time they are looked at."""
    states = [fields[0] for pid in task_pids(lab, container_id)
              if (fields := _stat_fields(pid)) is not None]
    return bool(states) and all(state in "RS" for state in states)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def helper_mount(binary: Path) -> str:
    return f"type=bind,src={binary.parent},dst={HELPER_DIR},options=rbind:ro"


@pytest.fixture(scope="module")
def containerd2(environment, test_image, containerd_log_dir) -> Iterator[Containerd]:
    """One containerd 2.x for the tests of this module that need no other version."""
    with Containerd("2", environment, log_dir=containerd_log_dir).serving(test_image) as instance:
        yield instance


@pytest.fixture
def lab(containerd2: Containerd, test_image: TestImage) -> Iterator[Lab]:
    with Lab(containerd2, test_image) as instance:
        yield instance


@pytest.fixture(scope="module")
def lockhold_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reason := lockhold.unavailable_reason():
        pytest.skip(reason)
    return lockhold.build_lockhold(tmp_path_factory.mktemp("lockhold"))


# --- leave-running ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("containerd_version", ["1.6", "2"], ids=lambda v: f"containerd-{v}")
def test_leave_running_keeps_the_task_running_and_exit_stops_it(containerd: Containerd, test_image: TestImage):
    with Lab(containerd, test_image) as lab:
        ended = lab.path("ended")
        # Two containers: ctr names each checkpoint's image by the container and the second.
        if containerd.version == "2":  # ctr's own flags reach pyshim
            kept = lab.path("kept")
            running, data = lab.run("sh", "-c", COUNTER)
            exiting, exiting_data = lab.run("sh", "-c", COUNTER)
        else:  # 1.6's ctr sends them only to io.containerd.runc.*: exit and the image path as annotations
            kept = None  # into containerd's content store, where 1.6 asks
            running, data = lab.run("sh", "-c", COUNTER)
            exiting, exiting_data = lab.run("sh", "-c", COUNTER, annotations={
                "image-path": str(ended), "leave-running": "false"})
        counting(data)

        lab.checkpoint(running, kept)
        assert lab.task(running)[1] == "RUNNING" and still_counting(data)
        if kept is not None:
            assert record(kept)["options"]["leave_running"] is True

        counting(exiting_data)
        lab.checkpoint(exiting, ended if containerd.version == "2" else None, exit=containerd.version == "2")
        assert lab.wait_status(exiting, "STOPPED") == "STOPPED" and stopped_counting(exiting_data)
        assert record(ended)["options"]["leave_running"] is False and (ended / "inventory.img").is_file()


# --- file-locks -------------------------------------------------------------------------------------------------------

def host_can_lock(path: Path) -> bool:
    """Whether a process on the host gets the flock now (released again at once)."""
    with open(path, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def lock_status(data: Path) -> tuple[int, str]:
    try:
        count, word = (data / "status").read_text().split()
        return int(count), word
    except (OSError, ValueError):
        return 0, ""


def test_file_locks_restored_process_still_holds_its_lock(lab: Lab, lockhold_binary: Path):
    mounts = (helper_mount(lockhold_binary),)
    holder = (f"{HELPER_DIR}/lockhold", "/data/lock", "/data/status")

    # Without file-locks CRIU refuses a task holding a lock; the task keeps it and runs on.
    refused, refused_data = lab.run(*holder, mounts=mounts)
    wait_until(lambda: lock_status(refused_data)[0] >= 3, WAIT, "lockhold holding")
    failed = lab.checkpoint(refused, lab.path("refused"), check=False)
    assert failed.returncode != 0 and "--file-locks" in failed.stderr, failed.stderr
    assert lab.task(refused)[1] == "RUNNING" and not host_can_lock(refused_data / "lock")
    count = lock_status(refused_data)[0]
    wait_until(lambda: lock_status(refused_data) >= (count + 3, "held"), WAIT, "lockhold counting after the refusal")

    images = lab.path("locked")
    original, data = lab.run(*holder, annotations={"file-locks": "true"}, mounts=mounts)
    wait_until(lambda: lock_status(data)[0] >= 3, WAIT, "lockhold holding")
    lab.checkpoint(original, images, exit=True)
    assert lab.wait_status(original, "STOPPED") == "STOPPED" and record(images)["options"]["file_locks"] is True
    checkpointed = lock_status(data)
    assert checkpointed[1] == "held" and host_can_lock(data / "lock")  # its holder is gone

    restored, _ = lab.restore(images, data, mounts=mounts)
    after = wait_until(lambda: (status := lock_status(data))[0] > checkpointed[0] + 3 and status,
                       WAIT, "restored lockhold counting on")
    assert after[1] == "held" and after[0] <= checkpointed[0] + 40  # the same count, going on: restored, not rerun
    assert not host_can_lock(data / "lock")
    tried = lab.containerd.ctr("task", "exec", "--exec-id", "try", restored, f"{HELPER_DIR}/lockhold", "-t",
                               "/data/lock", check=False)
    assert (tried.returncode, tried.stdout.strip()) == (1, "busy")


# --- shell-job: a tty container ---------------------------------------------------------------------------------------

class Tmux:
    """A private tmux server (socket in the containerd's temp dir), one session per command."""

    def __init__(self, containerd: Containerd) -> None:
        self.socket = containerd.tmp / f"tmux-{secrets.token_hex(3)}.sock"
        self.env = {**containerd.env, "TERM": "xterm"}

    def tmux(self, *args: str) -> str:
        return commands.run(["tmux", "-S", str(self.socket), "-f", "/dev/null", *args], env=self.env,
                            timeout=10).stdout

    def start(self, name: str, argv: list[str]) -> None:
        self.tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24",
                  f"{shlex.join(argv)}; echo EXIT=$?; exec sleep 3600")

    def screen(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", name)

    def wait_for(self, name: str, pattern: str) -> re.Match:
        try:
            return wait_until(lambda: re.search(pattern, self.screen(name), re.MULTILINE), WAIT,
                              f"{pattern!r} in {name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen:\n{self.screen(name)}") from None

    def type(self, name: str, text: str) -> None:
        self.tmux("send-keys", "-t", name, "-l", text)
        self.tmux("send-keys", "-t", name, "Enter")

    def kill_command(self, name: str) -> None:
        """SIGKILL the command a session runs (ctr; not its shell): a signal ctr can neither forward nor act on."""
        shell = int(self.tmux("display-message", "-p", "-t", name, "#{pane_pid}").strip())
        for pid in processes.children_of(shell):
            processes.kill_child_of(shell, pid)
        wait_until(lambda: not processes.children_of(shell) or self.screen(name).rstrip().endswith("EXIT=137"),
                   WAIT, f"the command of {name} killed")

    def kill(self) -> None:
        commands.run(["tmux", "-S", str(self.socket), "kill-server"], env=self.env, check=False, timeout=10)
        self.socket.unlink(missing_ok=True)


def test_shell_job_tty_container_round_trips(lab: Lab):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is needed to drive ctr's terminal")
    containerd = lab.containerd
    tmux = Tmux(containerd)
    original, restored = containerd.new_id("tty"), containerd.new_id("ttyr")
    lab.containers += [original, restored]
    images, data = lab.path("tty"), lab.path("tty-data")
    data.mkdir()
    try:
        tmux.start("run", [*containerd.ctr_argv(), "run", "-d", "-t", *containerd.runtime_flags(PYSHIM),
                           *lab.flags(data, {"shell-job": "true"}, ()), lab.image.ref, original, "sh"])
        tmux.wait_for("run", r"EXIT=0$")  # after whatever the shell printed first
        tmux.start("attach", [*containerd.ctr_argv(), "task", "attach", original])
        time.sleep(0.3)  # ctr attaches the pane's terminal before it reads keys
        tmux.type("attach", "MARK=kept-$((6*7))")
        tmux.type("attach", "echo $MARK")
        tmux.wait_for("attach", r"^kept-42$")
        # Detached first: an attached ctr deletes the task when it ends, and containerd then drops the shim's
        # connection, the checkpoint's answer with it.
        tmux.kill_command("attach")

        lab.checkpoint(original, images, exit=True)
        assert lab.wait_status(original, "STOPPED") == "STOPPED" and record(images)["options"]["shell_job"] is True

        tmux.start("restore", lab.restore_argv(images, data, restored, annotations={}, mounts=(), tty=True))
        tmux.wait_for("restore", r"EXIT=0$")
        assert lab.task(restored)[1] == "RUNNING"
        tmux.start("again", [*containerd.ctr_argv(), "task", "attach", restored])
        time.sleep(0.3)
        tmux.type("again", "echo $MARK $((7*6))")
        tmux.wait_for("again", r"^kept-42 42$")  # the restored shell, its variable and its terminal
    finally:
        tmux.kill()


# --- manage-cgroups-mode ----------------------------------------------------------------------------------------------

def cgroup_properties(images: Path) -> dict[str, str]:
    """The cgroup properties a dump recorded in cgroup.img, by name."""
    with open(images / "cgroup.img", "rb") as f:
        image = pycriu.images.load(f)
    return {prop["name"]: prop["value"] for entry in image["entries"] for controller in entry.get("controllers", [])
            for directory in controller.get("dirs", []) for prop in directory.get("properties", [])}


def memory_cgroup(pid: int) -> tuple[str, Path]:
    """(the memory cgroup's path as /proc/<pid>/cgroup names it, its memory limit file)."""
    entries = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    for _, controllers, path in entries:
        if "memory" in controllers.split(","):
            return path, Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
    path = next(path for hierarchy, _, path in entries if hierarchy == "0")
    return path, Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max")


@pytest.mark.parametrize("mode", ["", "soft", "full", "strict", "ignore"], ids=lambda m: m or "default")
def test_manage_cgroups_mode(lab: Lab, mode: str):
    limit = 64 * MiB
    images = lab.path(f"cg-{mode or 'default'}")
    original, data = lab.run("sh", "-c", COUNTER, annotations={"manage-cgroups-mode": mode} if mode else {},
                             extra=("--memory-limit", str(limit)))
    counting(data)
    lab.checkpoint(original, images, exit=True)
    checkpointed = counter(data)
    assert record(images)["options"]["manage_cgroups_mode"] == mode
    recorded = cgroup_properties(images)
    if mode == "ignore":
        assert recorded == {}  # CRIU leaves cgroups alone: nothing of them in the image
    else:
        assert recorded.get("memory.limit_in_bytes", recorded.get("memory.max")) == str(limit)
        assert "freezer.state" not in recorded  # containerd paused the task first; a restore must not freeze it

    restored, result = lab.restore(images, data, check=False)
    if mode == "strict":  # "restore all cgroups, requiring them not to exist": runc has made the container's
        assert result.returncode != 0 and "Abort restore of existing cgroups" in result.stderr, result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert resumes(data, checkpointed)
    path, limit_file = memory_cgroup(lab.task(restored)[0])
    assert path.endswith(f"/{restored}")  # the new container's cgroup, whatever the mode
    assert (int(limit_file.read_text().strip()) == limit) is (mode == "full"), limit_file.read_text()


# --- auto-dedup -------------------------------------------------------------------------------------------------------

def pages_sizes(images: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of the image's pages files."""
    stats = [p.stat() for p in images.glob("pages-*.img")]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def test_auto_dedup_restore_punches_what_it_read_out_of_the_image(lab: Lab):
    images = lab.path("dedup")
    # 64 MiB of written memory held by a blocked dd, and the counter
    original, data = lab.run("sh", "-c", f"dd if=/dev/zero bs=64M count=1 2>/dev/null | sleep 3600 & {COUNTER}",
                             annotations={"auto-dedup": "true"})
    counting(data)
    lab.checkpoint(original, images, exit=True)
    checkpointed = counter(data)
    apparent, allocated = pages_sizes(images)
    assert apparent >= 64 * MiB and allocated >= 0.9 * apparent
    assert record(images)["options"]["auto_dedup"] is True

    lab.restore(images, data)
    assert resumes(data, checkpointed)
    assert pages_sizes(images)[0] == apparent  # same files, same apparent size...
    assert pages_sizes(images)[1] <= 0.05 * apparent  # ...with the restored pages punched out


# --- page-server: pages sent to another "host" ------------------------------------------------------------------------

@contextlib.contextmanager
def network_host(tag: str) -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to the host by a veth pair: (namespace, host address, its address).
    The namespace and both veth ends are gone afterwards."""
    namespace, near, far = f"pyshim-it-{tag}-ps", f"ps{tag}h", f"ps{tag}n"
    subnet = f"10.124.{int(tag[:2], 16)}"
    host_address, its_address = f"{subnet}.1", f"{subnet}.2"
    ip = ["ip"]
    commands.run([*ip, "netns", "add", namespace])
    try:
        commands.run([*ip, "link", "add", near, "type", "veth", "peer", "name", far, "netns", namespace])
        commands.run([*ip, "addr", "add", f"{host_address}/30", "dev", near])
        commands.run([*ip, "link", "set", near, "up"])
        commands.run([*ip, "-n", namespace, "addr", "add", f"{its_address}/30", "dev", far])
        commands.run([*ip, "-n", namespace, "link", "set", far, "up"])
        commands.run([*ip, "-n", namespace, "link", "set", "lo", "up"])
        yield namespace, host_address, its_address
    finally:
        commands.run([*ip, "netns", "del", namespace], check=False)  # takes the veth pair with it
        commands.run([*ip, "link", "del", near], check=False)


def listening(pid: int, port: int) -> bool:
    """Whether the network namespace of pid has a TCP socket listening on port (/proc/<pid>/net is that netns')."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(fields[1].endswith(f":{port:04X}") and fields[3] == "0A" for fields in map(str.split, lines))


def test_page_server_in_another_host_then_restore_there(lab: Lab):
    tag, port = secrets.token_hex(3), 27100
    local, remote = lab.path("ps-local"), lab.path("ps-remote")
    remote.mkdir()
    with network_host(tag) as (namespace, _, address):
        server = subprocess.Popen(["ip", "netns", "exec", namespace, "criu", "page-server", "--images-dir",
                                   str(remote), "--address", address, "--port", str(port), "--log-file",
                                   "page-server.log", "-v4"], env=lab.containerd.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: listening(server.pid, port) or server.poll() is not None, WAIT, "criu page-server up")
            original, data = lab.run("sh", "-c", COUNTER, annotations={"page-server": f"{address}:{port}"})
            counting(data)
            lab.checkpoint(original, local, exit=True)
            checkpointed = counter(data)
            assert server.wait(WAIT) == 0  # the dump closed its session; the server is done
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(WAIT)
    assert not list(local.glob("pages-*.img")) and list(remote.glob("pages-*.img"))  # the pages went over the veth
    assert record(local)["options"]["page_server"] == f"{address}:{port}"
    # Restore "there": the images with the pages the page server received.
    shutil.copytree(local, remote, dirs_exist_ok=True)
    lab.restore(remote, data)
    assert resumes(data, checkpointed)


# --- lazy pages -------------------------------------------------------------------------------------------------------

def test_lazy_restore_served_by_the_lazy_pages_daemon(lab: Lab):
    images = lab.path("lazy")
    original, data = lab.run("sh", "-c", f"dd if=/dev/zero bs=16M count=1 2>/dev/null | sleep 3600 & {COUNTER}")
    counting(data)
    lab.checkpoint(original, images, exit=True)
    checkpointed = counter(data)

    restored, _ = lab.restore(images, data, annotations={"lazy-pages": "true"})
    assert resumes(data, checkpointed)
    log = lab.bundle(restored) / "lazy-pages.log"
    shim = lab.containerd.shim_pid(restored)
    wait_until(lambda: not [pid for pid in processes.children_of(shim) if "lazy-pages" in processes.cmdline(pid)],
               WAIT, "criu lazy-pages gone once every page is in")
    text = log.read_text()
    assert "#PF" in text  # page faults served through userfaultfd, not pages copied in by the restore
    progress = {task: (int(done), int(total))  # the last word for each restored task
                for task, done, total in re.findall(r"uffd: (\S+): UFFD transferred pages: \((\d+)/(\d+)\)", text)}
    # The process holding the dd's 16 MiB got every page (a counter's `sleep` may end before all of its own).
    done, total = max(progress.values(), key=lambda pages: pages[1])
    assert done == total >= 16 * MiB // 4096, progress


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# CRIU's remote lazy dump enlarges a pipe to this many bytes with F_SETPIPE_SZ and ignores the refusal (CRIU 4.2.1,
# strace-confirmed): above fs.pipe-max-size only CAP_SYS_RESOURCE may, and root here lacks it (docs/migrate.md).
CRIU_LAZY_PIPE_BYTES = 3354624
CAP_SYS_RESOURCE = 24


def lazy_dump_can_serve_pages() -> bool:
    """Whether CRIU's own remote lazy dump can work on this host: its pipe size allowed, or root may exceed it."""
    capabilities = next(int(line.split()[1], 16) for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("CapEff:"))
    return bool(capabilities >> CAP_SYS_RESOURCE & 1) or int(PIPE_MAX_SIZE.read_text()) >= CRIU_LAZY_PIPE_BYTES


PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


@contextlib.contextmanager
def pipe_max_size(size: int | None) -> Iterator[None]:
    """fs.pipe-max-size set to size for the block (None: left as found), and set back."""
    found = PIPE_MAX_SIZE.read_text().strip()
    if size is not None:
        PIPE_MAX_SIZE.write_text(str(size))
    try:
        yield
    finally:
        PIPE_MAX_SIZE.write_text(found)


@pytest.mark.parametrize("pipe_limit", [None, 4 << 20], ids=["pipe-max-size-as-found", "pipe-max-size-4MiB"])
def test_lazy_dump_serving_its_own_pages(lab: Lab, pipe_limit: int | None):
    """Checkpoint returns once the dump's page server is ready (the readiness runc users get from --status-fd), and
    a lazy restore takes the pages from it. Where CRIU cannot size its page pipe (this machine's fs.pipe-max-size,
    root without CAP_SYS_RESOURCE) the dump then fails in CRIU's page transfer, after the RPC has answered: the
    failure is reported in the shim's log (containerd's log), quoting CRIU, the task runs on and the restore fails at
    once saying why. With the limit raised for the test, the same commands migrate the counter lazily."""
    with pipe_max_size(pipe_limit):
        works = lazy_dump_can_serve_pages()
        print(f"fs.pipe-max-size {PIPE_MAX_SIZE.read_text().strip()}: CRIU's lazy dump "
              f"{'can' if works else 'cannot'} serve its pages")
        port = free_loopback_port()
        images, copy = lab.path("lazy-dump"), lab.path("lazy-dump-copy")
        lazy = {"lazy-pages": "true", "page-server": f"127.0.0.1:{port}"}
        original, data = lab.run("sh", "-c", COUNTER, annotations={**lazy, "timeout": "60"})
        counting(data)
        # Where the pages can be served this is a migration: the original ends once its pages have moved (--exit).
        ready = lab.containerd.ctr("task", "checkpoint", *(["--exit"] if works else []), "--image-path", str(images),
                                   original, check=False, timeout=60)
        # Ready: CRIU has written everything but the pages and serves those on the port.
        assert ready.returncode == 0, ready.stderr
        assert listening(os.getpid(), port)
        assert not images.exists()  # not complete until the pages have been served
        checkpointed = counter(data)
        shutil.copytree(partial_images(images)[0], copy)
        restored, restore = lab.restore(copy, data, annotations=lazy, check=False)
        if works:
            assert restore.returncode == 0, restore.stderr
            assert checkpointed is not None and resumes(data, checkpointed)
            wait_until(lambda: images.is_dir() and (images / "pyshim-checkpoint.json").is_file(), 60,
                       "the lazy dump's image complete once its pages were served")
            assert lab.wait_status(original, "STOPPED") == "STOPPED"  # ended by its dump, as asked
            assert resumes(data, counter(data) or 0)  # the restored counter alone writes on
            return
        failure = "failed after its page server was ready"
        wait_until(lambda: failure in lab.containerd.log_tail(400), 60, "the shim reporting the failed lazy dump")
        reported = next(line for line in lab.containerd.log_tail(400).splitlines() if failure in line)
        # CRIU's cause, quoted from before its "Lazy pages transfer FAILED" (shim/criu/log.py), not the rlimit error
        assert "page-pipe: splice: -1: Bad file descriptor" in reported and "RLIMIT_NOFILE" not in reported
        assert lab.task(original)[1] == "RUNNING" and not_frozen(lab, original) and still_counting(data)
        assert not images.exists() and not partial_images(images)
        # The restore that asked for the pages failed at once (not at its timeout), saying why.
        assert restore.returncode != 0 and "lazy-pages daemon exited" in restore.stderr, restore.stderr
        assert "Error: the page server closed the connection" in restore.stderr, restore.stderr
        # and its killed CRIU's cgroup yard (the hierarchies' roots, mounted in the work dir) is not left mounted
        assert not [point for point in mounts.mounts_under(lab.containerd.tmp) if ".criu.cgyard." in point]


# --- pre-dump and parent-path -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("containerd_version", ["1.6", "2"], ids=lambda v: f"containerd-{v}")
@pytest.mark.parametrize("option", [{"pre-dump": "true"}, {"parent-path": "../base"}], ids=["pre-dump", "parent-path"])
def test_incremental_checkpoints_refused_for_lack_of_soft_dirty(containerd: Containerd, test_image: TestImage,
                                                                option: dict[str, str]):
    with Lab(containerd, test_image) as lab:
        images = lab.path("incremental")
        container_id, data = lab.run("sh", "-c", COUNTER, annotations={**option, "image-path": str(images)})
        counting(data)
        refused = lab.checkpoint(container_id, None, check=False)
        assert refused.returncode != 0 and "soft-dirty" in refused.stderr, refused.stderr
        assert next(iter(option)) in refused.stderr  # says which option needs it
        assert lab.task(container_id)[1] == "RUNNING" and still_counting(data)
        assert not images.exists() and not partial_images(images)


# --- failure injection ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("containerd_version", ["1.6", "2"], ids=lambda v: f"containerd-{v}")
def test_unsupported_option_value_is_an_invalid_argument_naming_it(containerd: Containerd, test_image: TestImage):
    with Lab(containerd, test_image) as lab:
        images = lab.path("loose")
        container_id, data = lab.run("sh", "-c", COUNTER,
                                     annotations={"manage-cgroups-mode": "loose", "image-path": str(images)})
        counting(data)
        refused = lab.checkpoint(container_id, None, check=False)
        assert refused.returncode != 0 and "manage-cgroups-mode 'loose'" in refused.stderr, refused.stderr
        assert lab.task(container_id)[1] == "RUNNING" and still_counting(data) and not images.exists()
        if containerd.version == "2":  # the same value in CheckpointOptions, through containerd's API
            plain, plain_data = lab.run("sh", "-c", COUNTER)
            with ContainerdClient(containerd.address, containerd.namespace) as api:
                with pytest.raises(grpc.RpcError) as rejected:
                    api.checkpoint(plain, oci_pb2.CheckpointOptions(cgroups_mode="loose",
                                                                   image_path=str(lab.path("api"))))
            assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "manage-cgroups-mode 'loose'" in rejected.value.details()
            assert lab.task(plain)[1] == "RUNNING" and still_counting(plain_data)


def criu_child(shim: int, bundle: Path) -> tuple[int, int] | None:
    """(CRIU, its parent) for a checkpoint of the container in bundle: CRIU (named criu or its loader, through the
    criu wrapper's exec) is a child of the checkpoint worker (comm pyshim-ckpt, working in the bundle; see
    docs/forkserver.md), or of the shim itself when it checkpoints in its own process."""
    parents = [shim] + [int(e) for e in os.listdir("/proc") if e.isdigit() and _comm(int(e)) == "pyshim-ckpt"
                        and _cwd(int(e)) == str(bundle)]
    for parent in parents:
        for pid in processes.children_of(parent):
            if any("criu" in arg for arg in processes.cmdline(pid)[:4]):
                return pid, parent
    return None


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def _cwd(pid: int) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/cwd")
    return ""


def test_criu_killed_mid_dump_leaves_the_task_running(lab: Lab):
    images = lab.path("killed")
    # 800 MiB of written memory: the dump takes long enough to be caught writing pages.
    original, data = lab.run("sh", "-c", f"dd if=/dev/zero bs=800M count=1 2>/dev/null | sleep 3600 & {COUNTER}")
    counting(data)
    wait_until(lambda: _rss_kib(lab, original) > 700 * 1024, WAIT, "800 MiB written")
    shim = lab.containerd.shim_pid(original)
    dumping = subprocess.Popen([*lab.containerd.ctr_argv(), "task", "checkpoint", "--image-path", str(images),
                                original], env=lab.containerd.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Killed while it writes dd's pages, 64 MiB into them: CRIU dumps the tree's root (the counting shell, the
    # container's init) first and has cured it by then. A process CRIU is stepping through its injected code by
    # ptrace when it dies (infection, cure) cannot survive: only CRIU held its original registers. Killing at the
    # first written page could land in the init's cure (seen once in CI: "16417 is going to execute the syscall 15",
    # then the init died); no shim can bring such a process back (docs/checkpoint.md).
    try:
        criu, parent = wait_until(lambda: (found := criu_child(shim, lab.bundle(original))) and sum(
            p.stat().st_size for part in partial_images(images) for p in part.glob("pages-*.img")) > 64 << 20
            and found, 30, "CRIU writing dd's pages", poll=0.02)
        processes.kill_child_of(parent, criu)  # only while it is still its parent's child
        _, error = dumping.communicate(timeout=60)
    finally:
        if dumping.poll() is None:
            dumping.kill()
            dumping.communicate()
    assert dumping.returncode != 0 and "exited with status 137" in error, error  # SIGKILL, said as CRIU's exit
    assert lab.wait_status(original, "RUNNING") == "RUNNING" and not_frozen(lab, original) and still_counting(data)
    assert not images.exists() and not partial_images(images)
    assert (lab.bundle(original) / "criu-dump.log").is_file() and str(lab.bundle(original) / "criu-dump.log") in error


def _rss_kib(lab: Lab, container_id: str) -> int:
    total = 0
    for pid in task_pids(lab, container_id):
        with contextlib.suppress(OSError):
            total += sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                         if line.startswith("VmRSS:"))
    return total


def test_unwritable_image_dir_is_refused_clearly_and_the_task_runs_on(lab: Lab):
    container_id, data = lab.run("sh", "-c", COUNTER)
    counting(data)
    a_file = lab.path("a-file")
    a_file.write_text("")
    read_only = lab.path("read-only")
    read_only.mkdir()
    commands.run(["mount", "--bind", str(read_only), str(read_only)])
    try:
        commands.run(["mount", "-o", "remount,bind,ro", str(read_only)])
        for images, cause in ((a_file / "image", f"parent directory {a_file}"),
                              (read_only / "image", "Read-only file system")):
            refused = lab.checkpoint(container_id, images, check=False)
            assert refused.returncode != 0 and str(images) in refused.stderr and cause in refused.stderr, \
                refused.stderr
            assert lab.task(container_id)[1] == "RUNNING" and still_counting(data)
        assert list(read_only.iterdir()) == []  # not even a partial image
    finally:
        commands.run(["umount", str(read_only)], check=False)


# --- interchange ------------------------------------------------------------------------------------------------------

def test_pyshim_image_restores_with_plain_runc(lab: Lab):
    images = lab.path("to-runc")
    container_id, data = lab.run("sh", "-c", COUNTER)
    counting(data)
    lab.checkpoint(container_id, images, exit=True)
    assert lab.wait_status(container_id, "STOPPED") == "STOPPED"
    checkpointed = counter(data)
    # runc on a root of its own, in the stopped task's bundle (its rootfs still mounted by pyshim)
    scratch = lab.path("plain-runc")
    scratch.mkdir()
    runc = Runc(scratch / "root", lab.containerd.env)
    with open(scratch / "stdio", "wb") as stdio:
        restored = runc.restore_detached(container_id, bundle=lab.bundle(container_id), image_path=images,
                                         work_path=scratch / "work", pid_file=scratch / "pid", run_dir=scratch,
                                         stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio)
    try:
        assert runc.state(container_id)["status"] == "running"
        assert resumes(data, checkpointed)
    finally:
        runc.kill(container_id, "KILL", check=False)
        restored.wait(WAIT)
        runc.delete(container_id, force=True, check=False)


def test_go_shim_image_restores_under_pyshim(lab: Lab):
    images = lab.path("from-go")
    container_id, data = lab.run("sh", "-c", COUNTER, runtime=RUNC_V2)
    counting(data)
    lab.checkpoint(container_id, images, exit=True)
    assert lab.wait_status(container_id, "STOPPED") == "STOPPED"
    checkpointed = counter(data)
    assert (images / "inventory.img").is_file() and not (images / "pyshim-checkpoint.json").exists()  # runc's own
    restored, _ = lab.restore(images, data)
    assert resumes(data, checkpointed)
    info = json.loads(lab.containerd.ctr("containers", "info", restored).stdout)
    assert info["Runtime"]["Name"] == PYSHIM and lab.task(restored)[1] == "RUNNING"

"""`pyshim migrate CONTAINER DEST` between two containerds of one version on this machine (2.x; the counter also on
1.7), the destination reached through a private sshd on 127.0.0.1 (harness.sshd: its own host key, config and
authorized_keys in the test's directory, started and ended by pid), whose sessions run the `pyshim` under test.

Shown, in --stop-copy, --stream and --post-copy:
- a busybox counter (its count in a shell variable: only the moved memory knows it) with rootfs changes goes on
  counting on the destination under the same id, with its file and its deletion; gone from the source;
- redis with 20,000 keys in memory only answers DBSIZE 20000 and the values on the destination.
--pre-copy on this kernel (no soft-dirty tracking): exit 2 naming CONFIG_MEM_SOFT_DIRTY and the modes that work,
before anything is dumped or sent; the source runs on with its pid and count, nothing on the destination (its rounds
cannot run here). Refusals before anything stops (the destination containerd's socket wrong, the container missing):
exit 1 with the reason, the source running on, nothing on the destination. A failure after the dump (the destination's
work directory on a full tmpfs): the container is restored on the source and counts on from its own value, nothing on
the destination (--post-copy: from the full images it kept in /dev/shm, not the split ones it sent). --post-copy's
pages go to the destination's lazy restore through the same ssh connection after the container runs there (its report
says how many and how long); nothing is left in /dev/shm once they have all moved.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import commands, memfill, processes
from harness.containerd import PYSHIM, Containerd
from harness.environment import Environment, load_environment
from harness.image import TestImage
from harness.redis_image import build_redis_image
from harness.sshd import Sshd, unavailable_reason
from harness.tasks import remove, task_pid, task_status, wait_status
from test_postcopy import PORT, ask, processes_naming, wait_answering
from test_tool_migrate import COUNTER, KEYS, REDIS_SERVER, read_counter, redis_cli, wait_counter_above, wait_for_pong

MODES = ("stop-copy", "stream", "post-copy")
REPORT_KEYS = {"mode", "container", "frozen_ms", "blackout_ms", "bytes_moved", "total_ms", "phases"}


def tool_argv() -> list[str]:
    tool = load_environment().tool
    return [str(tool)] if tool else ["/opt/pyshim/venv/bin/python", "-m", "shim.tool"]


@pytest.fixture
def sshd(tmp_path: Path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path / "sshd", tool=load_environment().tool)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hosts(request, environment: Environment, test_image: TestImage, containerd_log_dir: Path):
    """A source and a destination containerd (2.x unless the test or $PYSHIM_TWO_HOSTS_CONTAINERD says: conftest's
    two_host_versions), the test image imported into both."""
    from conftest import two_containerds

    with two_containerds(request, environment, test_image, containerd_log_dir) as instances:
        yield instances


class Migrate:
    def __init__(self, source: Containerd, destination: Containerd, sshd: Sshd, work: Path) -> None:
        self.source, self.destination, self.sshd, self.work = source, destination, sshd, work
        self.dest_store = work / "dest-store"
        self.source_store = work / "source-store"

    def dest(self, socket: str | None = None, **query: str) -> str:
        params = {"namespace": self.destination.namespace, "store": str(self.dest_store),
                  "runtime-config": str(self.destination.pyshim_config()), **query}
        url = self.sshd.destination(socket or self.destination.address)
        return url + "?" + "&".join(f"{key}={value}" for key, value in params.items())

    def run(self, container_id: str, *flags: str, dest: str | None = None,
            timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
        report = self.work / f"report-{container_id}.json"
        report.unlink(missing_ok=True)
        options = [flag for option in self.sshd.ssh_options() for flag in ("--ssh-option", option)]
        argv = [*tool_argv(), "--address", self.source.address, "--namespace", self.source.namespace, "--store",
                str(self.source_store), "migrate", container_id, dest or self.dest(), *flags, *options,
                "--report-json", str(report)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        print(f"$ {' '.join(argv)}\n{result.stderr}{result.stdout}")  # shown for a failing test (and with -s)
        return result, (json.loads(report.read_text()) if report.exists() else {})

    def nothing_on_destination(self) -> None:
        assert self.destination.ctr("containers", "ls", "-q").stdout.split() == []
        assert self.destination.ctr("tasks", "ls", "-q").stdout.split() == []
        leftovers = [p for p in self.dest_store.rglob("*")] if self.dest_store.exists() else []
        assert leftovers == [], leftovers

    def nothing_left_here(self, container_id: str = "") -> None:
        leftovers = [p for p in self.source_store.rglob("*")] if self.source_store.exists() else []
        assert leftovers == [], leftovers
        if container_id:  # --post-copy's dump in memory
            memory = list(Path("/dev/shm").glob(f"pyshim-postcopy-{container_id}-*"))
            assert memory == [], memory


@pytest.fixture
def migrate(hosts, sshd, tmp_path: Path) -> Migrate:
    return Migrate(hosts[0], hosts[1], sshd, tmp_path)


def check_report(report: dict, mode: str, container_id: str) -> None:
    assert REPORT_KEYS <= set(report), report
    assert (report["mode"], report["container"]) == (mode, container_id)
    assert 0 < report["frozen_ms"] <= report["blackout_ms"] <= report["total_ms"]
    assert report["bytes_moved"] > 0
    assert {"preflight", "dump", "transfer", "restore", "commit"} <= set(report["phases"])


# 2.x; 1.7 and 1.6 on both hosts; 1.7 to 2.x, a rolling upgrade's move
@pytest.mark.parametrize("hosts", ["2", "1.7", "1.6", "1.7-to-2"], indirect=True, ids=lambda v: f"containerd-{v}")
@pytest.mark.parametrize("mode", MODES)
def test_counter_moves_with_its_memory_and_rootfs_changes(migrate: Migrate, test_image: TestImage, mode: str):
    source, destination = migrate.source, migrate.destination
    flags = [f"--{mode}"]
    if mode == "post-copy":
        # This counter forks a `sleep` every 50 ms while its pages move: with CRIU's own lazy-pages daemon it wedged
        # 3 times in about 60 runs (docs/migrate.md). The timeout bounds a hang should one come back.
        flags += ["--timeout", "90"]
    container_id = source.new_id("counter")
    source.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        wait_counter_above(source, container_id, 5)
        result, report = migrate.run(container_id, *flags)
        assert result.returncode == 0, result.stderr
        last = read_counter(source, container_id) if source.bundle(container_id).exists() else None
        check_report(report, mode, container_id)
        assert json.loads(result.stdout) == report
        # the destination runs the same container, counting on from its own value
        assert task_status(destination, container_id) == "RUNNING"
        moved_from = read_counter(destination, container_id)
        assert moved_from is not None and moved_from > 5
        wait_counter_above(destination, container_id, moved_from)
        rootfs = destination.bundle(container_id) / "rootfs"
        assert (rootfs / "root/marker").read_text() == "written-before-checkpoint\n"
        assert not (rootfs / "etc/group").exists()
        # gone from the source: no task, no container; nothing left in either work directory
        assert source.ctr("containers", "ls", "-q").stdout.split() == []
        assert last is None
        migrate.nothing_left_here(container_id)
        assert not migrate.dest_store.exists() or list(migrate.dest_store.iterdir()) == []
        if mode == "post-copy":  # the memory followed the running container
            assert report["post_copy"]["pages"] > 0 and "pages" in report["phases"], report
    finally:
        remove(source, container_id)
        remove(destination, container_id)
        for kept in Path("/dev/shm").glob(f"pyshim-postcopy-{container_id}-*"):  # what a failed post-copy keeps
            shutil.rmtree(kept, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_redis_image(tmp_path_factory.mktemp("redis-image-cache"), environment.redis,
                             busybox=environment.busybox)


@pytest.mark.parametrize("mode", MODES)
def test_redis_with_20k_keys_moves(migrate: Migrate, redis_image: TestImage, mode: str):
    source, destination = migrate.source, migrate.destination
    for host in (source, destination):
        host.import_image(redis_image)
    container_id = source.new_id("redis")
    source.run(container_id, redis_image, *REDIS_SERVER, runtime=PYSHIM)
    try:
        wait_for_pong(source, container_id)
        assert redis_cli(source, container_id, "DEBUG", "POPULATE", str(KEYS), "key", exec_id="populate") == "OK"
        result, report = migrate.run(container_id, f"--{mode}")
        assert result.returncode == 0, result.stderr
        check_report(report, mode, container_id)
        assert report["bytes_moved"] > 1 << 20  # the keys are megabytes of heap
        assert redis_cli(destination, container_id, "DBSIZE", exec_id="size") == str(KEYS)
        assert redis_cli(destination, container_id, "GET", "key:12345", exec_id="get") == "value:12345"
        assert source.ctr("containers", "ls", "-q").stdout.split() == []
    finally:
        remove(source, container_id)
        remove(destination, container_id)


def test_a_restricted_key_migrates_within_its_settings_and_refuses_the_rest(migrate: Migrate, test_image: TestImage):
    """The destination's authorized_keys lets the key run only `pyshim ... migrate-receive --forced` with the
    destination's socket, namespace, store and runtime options (docs/migrate.md, Restricted keys)."""
    source, destination = migrate.source, migrate.destination
    migrate.sshd.restrict(shlex.join([
        "pyshim", "--address", destination.address, "--namespace", destination.namespace, "--store",
        str(migrate.dest_store), "migrate-receive", "--runtime-config", str(destination.pyshim_config()), "--forced"]))
    container_id = source.new_id("counter")
    source.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        before = wait_counter_above(source, container_id, 2)
        refused, _ = migrate.run(container_id, "--stop-copy", dest=migrate.dest(namespace="elsewhere"))
        assert refused.returncode == 1, refused.stderr
        assert "this ssh key only migrates into containerd" in refused.stderr, refused.stderr
        assert "the source asked for namespace 'elsewhere'" in refused.stderr, refused.stderr
        assert task_status(source, container_id) == "RUNNING"
        wait_counter_above(source, container_id, before)
        migrate.nothing_on_destination()

        result, _ = migrate.run(container_id, "--stop-copy")
        assert result.returncode == 0, result.stderr
        assert task_status(destination, container_id) == "RUNNING"
        assert source.ctr("containers", "ls", "-q").stdout.split() == []
    finally:
        remove(source, container_id)
        remove(destination, container_id)


def test_refusals_before_anything_stops(migrate: Migrate, test_image: TestImage, tmp_path: Path):
    source = migrate.source
    container_id = source.new_id("counter")
    source.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        before = wait_counter_above(source, container_id, 2)
        wrong_socket = str(tmp_path / "no-such-containerd.sock")
        result, report = migrate.run(container_id, dest=migrate.dest(wrong_socket))
        assert result.returncode == 1
        assert f"the destination's containerd socket {wrong_socket} does not exist" in result.stderr
        assert "nothing was stopped" in result.stderr and report == {}
        missing, _ = migrate.run("no-such-container")
        assert missing.returncode == 1 and "no container 'no-such-container'" in missing.stderr
        bad_dest, _ = migrate.run(container_id, dest="tcp://host/run/containerd.sock")
        assert bad_dest.returncode == 1 and "the scheme must be ssh" in bad_dest.stderr
        # the source counted on through all of it; nothing reached the destination
        assert task_status(source, container_id) == "RUNNING"
        wait_counter_above(source, container_id, before + 1)
        migrate.nothing_on_destination()
        migrate.nothing_left_here()
    finally:
        remove(source, container_id)


def test_pre_copy_without_dirty_tracking_is_refused_before_anything_is_dumped(migrate: Migrate,
                                                                                 test_image: TestImage):
    """The rounds need CRIU's dirty memory tracking, which this kernel lacks (CONFIG_MEM_SOFT_DIRTY off): what can be
    checked here is the refusal, and that it touched nothing."""
    criu = subprocess.run(["criu", "check", "--feature", "mem_dirty_track"], capture_output=True, text=True,
                          timeout=60)
    if criu.returncode == 0:
        pytest.skip("CRIU here tracks dirty memory: --pre-copy is not refused on this kernel (its rounds are not "
                    "tested by this file)")
    source = migrate.source
    container_id = source.new_id("counter")
    source.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        before = wait_counter_above(source, container_id, 2)
        pid = task_pid(source, container_id)
        out_of_range, _ = migrate.run(container_id, "--pre-copy", "9")
        assert out_of_range.returncode == 2 and "--pre-copy 9: give 1 to 8 rounds" in out_of_range.stderr
        result, report = migrate.run(container_id, "--pre-copy")
        assert result.returncode == 2, result.stderr
        refusal = result.stderr.strip().splitlines()[-1]
        for words in ("CONFIG_MEM_SOFT_DIRTY", "soft-dirty", "mem_dirty_track", "--stream", "--post-copy",
                      f"{container_id} runs on here untouched", "nothing was sent to the destination"):
            assert words in refusal, refusal
        assert report == {} and result.stdout == ""
        # untouched: the same process, counting on from its own value; nothing here, nothing there
        assert task_status(source, container_id) == "RUNNING"
        assert task_pid(source, container_id) == pid
        wait_counter_above(source, container_id, before + 1)
        migrate.nothing_on_destination()
        migrate.nothing_left_here()
    finally:
        remove(source, container_id)


@pytest.mark.parametrize("mode", MODES)
def test_restore_failing_on_the_destination_restores_the_container_here(migrate: Migrate, test_image: TestImage,
                                                                         mode: str, tmp_path: Path):
    """The destination's OCI runtime fails every restore (a runc wrapper refusing `restore`, named by the runtime
    options in DEST): everything moves, the restore there fails. The container is restored on the source from its own
    images (in --stream, from the recorded page stream: its pages were never written on the source) and counts on
    from its own value; nothing is left on the destination."""
    source = migrate.source
    runc = tmp_path / "runc-refusing-restore"
    runc.write_text('#!/bin/sh\nfor arg; do [ "$arg" = restore ] && { echo "restore refused by the test" >&2; exit 1; }'
                    f'; done\nexec {load_environment().runc} "$@"\n')
    runc.chmod(0o755)
    broken = tmp_path / "broken-runtime.toml"
    broken.write_text(f'BinaryName = "{runc}"\nRoot = "{migrate.destination.runc_root}"\n')
    container_id = source.new_id("counter")
    source.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        wait_counter_above(source, container_id, 3)
        result, report = migrate.run(container_id, f"--{mode}", dest=migrate.dest(**{"runtime-config": str(broken)}))
        assert result.returncode == 1, result.stdout
        assert f"restoring {container_id} here" in result.stderr and "runs on here again" in result.stderr
        assert report == {}
        assert task_status(source, container_id) == "RUNNING"
        value = read_counter(source, container_id)
        assert value is not None and value > 3  # its own memory, not a fresh start at 1
        wait_counter_above(source, container_id, value)
        migrate.nothing_on_destination()
        migrate.nothing_left_here()
    finally:
        remove(source, container_id)


@pytest.mark.parametrize("mode", MODES)
def test_failure_after_the_dump_restores_the_container_here(migrate: Migrate, test_image: TestImage, mode: str):
    """The destination's work directory on a 64 KiB tmpfs: the archive (or the page stream) does not fit. The
    container is restored on the source from its own images and counts on from where it was."""
    source = migrate.source
    migrate.dest_store.mkdir()
    commands.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(migrate.dest_store)], timeout=10)
    container_id = source.new_id("counter")
    source.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        wait_counter_above(source, container_id, 3)
        result, report = migrate.run(container_id, f"--{mode}")
        assert result.returncode == 1, result.stdout
        assert "no space left on device" in result.stderr.lower(), result.stderr
        assert report == {}
        assert task_status(source, container_id) == "RUNNING"
        value = read_counter(source, container_id)
        assert value is not None and value > 3  # its own memory, not a fresh start at 1
        wait_counter_above(source, container_id, value)
        migrate.nothing_on_destination()
        migrate.nothing_left_here(container_id)
    finally:
        remove(source, container_id)
        commands.run(["umount", str(migrate.dest_store)], timeout=10, check=False)


@pytest.fixture(scope="module")
def memfill_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    if reason := memfill.unavailable_reason():
        pytest.skip(reason)
    return memfill.build_memfill_image(tmp_path_factory.mktemp("memfill"), busybox=environment.busybox)


def test_post_copy_cut_after_the_container_runs_there_ends_it_with_its_cause(migrate: Migrate,
                                                                              memfill_image: TestImage):
    """--post-copy past its point of no return: the container runs on the destination, 64 MiB of its memory still
    on the source (--bandwidth 4: 16 s of pages), when the ssh connection is cut (the ssh client SIGKILLed). The
    destination's shim kills the container rather than let it read zeros (its log says why), no CRIU process is
    left there, and the command fails naming the checkpoint it kept, whole, and how to restore it; restored so, the
    container has all its memory."""
    source, destination = migrate.source, migrate.destination
    for host in (source, destination):
        host.import_image(memfill_image)
    container_id = source.new_id("memfill")
    source.run(container_id, memfill_image, *memfill.command(64, PORT), runtime=PYSHIM)
    kept: list[Path] = []
    try:
        wait_answering(source, container_id)
        options = [flag for option in migrate.sshd.ssh_options() for flag in ("--ssh-option", option)]
        process = subprocess.Popen(
            [*tool_argv(), "--address", source.address, "--namespace", source.namespace, "--store",
             str(migrate.source_store), "migrate", container_id, migrate.dest(), "--post-copy", "--bandwidth", "4",
             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        deadline = time.monotonic() + 120
        committed = f"pyshim migrate: {container_id} runs on "  # the source's line, after the commit
        while not any(line.startswith(committed) for line in lines) and time.monotonic() < deadline:
            assert process.poll() is None, "".join(lines)
            time.sleep(0.05)
        ssh = [pid for pid in processes.children_of(process.pid) if processes.cmdline(pid)[:1] == ["ssh"]]
        assert len(ssh) == 1, "".join(lines)
        os.kill(ssh[0], signal.SIGKILL)  # the transport, cut
        try:
            status = process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()  # our child, by pid
            reader.join(10)
            print("".join(lines))
        said = " ".join("".join(lines).split())
        print(said)
        assert status == 1 and f"post-copy of {container_id} failed after it started" in said, said
        assert not list(Path("/dev/shm").glob(f"pyshim-postcopy-{container_id}-*"))
        kept = list(migrate.source_store.glob(f".migrate-{container_id}-*"))
        assert len(kept) == 1 and f"`pyshim restore {kept[0]} --name {container_id}`" in said, said
        assert (kept[0] / "checkpoint" / "pages-1.img").stat().st_size >= 64 << 20  # whole: every page is here
        assert wait_status(destination, container_id, "STOPPED", 60) == "STOPPED"
        assert wait_for_log(destination, f"post-copy of {container_id} failed")
        assert not processes_naming(str(migrate.dest_store))  # no lazy-pages, no receiver: nothing of the migration
        # what the command said brings it back here, its memory whole
        restored = subprocess.run([*tool_argv(), "--address", source.address, "--namespace", source.namespace,
                                   "--store", str(migrate.source_store), "restore", str(kept[0]), "--name",
                                   container_id, "--runtime-config", str(source.pyshim_config())],
                                  capture_output=True, text=True, timeout=180)
        assert restored.returncode == 0, restored.stderr
        assert ask(source, container_id, "check") == "ok 64"
    finally:
        for directory in kept:
            shutil.rmtree(directory, ignore_errors=True)
        remove(source, container_id)
        remove(destination, container_id)


def wait_for_log(containerd: Containerd, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = next((line for line in containerd.log_tail(400).splitlines() if text in line), None)
        if line:
            return line
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the log of {containerd.tmp} within {timeout}s")

"""Post-copy on one machine: the container runs on the destination before its memory has moved.

Two private containerds of one version (2.x, 1.7, 1.6) stand for the two hosts. On the "source" a container runs
harness/memfill.c (its own image), which fills 256 MiB (64 MiB on 1.6 and 1.7) of anonymous memory with a known
pattern (word i = i * K ^ SEED) and answers `ping` and `check` on a TCP port in the container's network namespace
(the test connects from inside it, through nsenter). It is checkpointed with exit into a tmpfs (the source's
memory); shim.criu.lazy_images.split makes the images the destination restores from (every page CRIU marks lazy
left out: ~300 KiB instead of 257 MiB); pyshim's page server (python -m shim.criu.page_server, rate-limited as a
network link would be) serves the rest on 127.0.0.1 from the tmpfs. The "destination" restores through pyshim with
the annotations lazy-pages=true and page-server=127.0.0.1:PORT: the shim runs its lazy-pages daemon
(shim.criu.lazy_daemon) beside `runc restore --lazy-pages`.

- The task is RUNNING while most of its pages are still on the source (the page server's progress lines, with
  times, against the time the restore returned), memfill reads all its memory back intact (`check` -> `ok 256`,
  computed inside the container) and still knows how many requests it had served, every page was served, the page
  server removed the source's images and the lazy-pages daemon is gone.
- A process that drops memory (madvise) and forks while its pages move gets every page it keeps, in the parent
  and in the child (the REMOVE and FORK events of userfaultfd, which wedge CRIU 4.2's own lazy-pages daemon).
- The page server killed mid-transfer, or the destination's lazy-pages daemon: the destination's task ends
  (SIGKILL, exit status 137 in the /tasks/exit event) with the cause in the shim's log ("post-copy of ID failed",
  quoting the daemon's log), no CRIU process is left, nothing is left mounted, and the source's images are kept
  (pages never moved: the container can still be restored from them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import commands, memfill, mounts
from harness.containerd import PYSHIM, Containerd
from harness.environment import Environment
from harness.grpc_client import ContainerdClient
from harness.image import TestImage
from harness.tasks import remove, task_status, wait_status

from shim.api.containerd.runc.options import oci_pb2

REPO = Path(__file__).resolve().parent.parent
MIB = 256  # on containerd 2.x; on 1.6 and 1.7 (and two versions) SMALL_MIB, to keep CI short
SMALL_MIB = 64
# Each test on 2.x, and on 1.7 and 1.6 with SMALL_MIB: what differs between containerd versions is the shim's
# restore and exit path, not the amount of memory.
VERSIONS = pytest.mark.parametrize("hosts", ["2", "1.7", "1.6"], indirect=True, ids=lambda v: f"containerd-{v}")
PORT = 7070
PAGE = os.sysconf("SC_PAGE_SIZE")
ANNOTATION = "io.pyshim.checkpoint."
# One request from inside a network namespace (run under nsenter): the answer line, or the error.
ASK = ("import socket, sys\n"
       "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=float(sys.argv[3]))\n"
       "s.sendall(sys.argv[2].encode() + b'\\n')\n"
       "data = b''\n"
       "while not data.endswith(b'\\n'):\n"
       "    chunk = s.recv(256)\n"
       "    if not chunk: break\n"
       "    data += chunk\n"
       "print(data.decode().strip())\n")


@pytest.fixture
def hosts(request, environment: Environment, test_image: TestImage, containerd_log_dir: Path):
    """A source and a destination containerd (2.x unless the test or $PYSHIM_TWO_HOSTS_CONTAINERD says: conftest's
    two_host_versions), the test image imported into both."""
    from conftest import two_containerds

    with two_containerds(request, environment, test_image, containerd_log_dir) as instances:
        yield instances


@pytest.fixture(scope="module")
def memfill_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    if reason := memfill.unavailable_reason():
        pytest.skip(reason)
    return memfill.build_memfill_image(tmp_path_factory.mktemp("memfill"), busybox=environment.busybox)


@pytest.fixture
def mib(hosts: list[Containerd]) -> int:
    """The memory memfill fills: MIB between two containerds 2.x, SMALL_MIB otherwise."""
    return MIB if all(host.version == "2" for host in hosts) else SMALL_MIB


@pytest.fixture
def tmpfs(tmp_path: Path, mib: int):
    """The source host's memory: a tmpfs the checkpoint is written into."""
    path = tmp_path / "source-memory"
    path.mkdir()
    commands.run(["mount", "-t", "tmpfs", "-o", f"size={mib + 256}m,mode=0700", "pyshim-postcopy", str(path)])
    try:
        yield path
    finally:
        mounts.unmount_all_under(path)
        commands.run(["umount", str(path)], check=False)


class PageServer:
    """`python -m shim.criu.page_server` from this checkout, its JSON lines collected with the time they came."""

    def __init__(self, images: Path, *, rate: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shim.criu.page_server", "--images", str(images), "--listen", "127.0.0.1:0",
             "--rate", str(rate), "--remove-when-done", "--timeout", "300"],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_for(lambda e: e["event"] in ("listening", "done"), 30)
        assert listening["event"] == "listening", listening
        self.address = listening["address"]
        self.total = listening["total"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.append(json.loads(line))

    def wait_for(self, wanted, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if wanted(event):
                    return event
            time.sleep(0.02)
        raise AssertionError(f"page server: nothing wanted within {timeout}s; said {self.events[-3:]}")

    def served_at(self, moment: float) -> int:
        """Pages served by the time moment (the last progress line before it)."""
        return max((e["served"] for e in self.events if e["event"] == "progress" and e["t"] <= moment), default=0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(10)


def ask(containerd: Containerd, container_id: str, request: str, timeout: float = 120) -> str:
    """memfill's answer to one request, from inside the container's network namespace."""
    pid = int(containerd.ctr("task", "ls").stdout.split(container_id, 1)[1].split()[0])
    done = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", ASK, str(PORT), request,
                           str(timeout)], capture_output=True, text=True, timeout=timeout + 30)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def wait_answering(containerd: Containerd, container_id: str, timeout: float = 60) -> int:
    """memfill's request count once it answers (filling 256 MiB takes a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = ask(containerd, container_id, "ping", 5)
        if answer.startswith("pong "):
            return int(answer.split()[1])
        time.sleep(0.1)
    raise AssertionError(f"memfill in {container_id} did not answer within {timeout}s")


def checkpointed_memfill(source: Containerd, image: TestImage, tmpfs: Path, mib: int) -> tuple[str, int]:
    """memfill of mib MiB run on the source and checkpointed with exit into the tmpfs: (its images, requests it
    served)."""
    container_id = source.new_id("fill")
    source.run(container_id, image, *memfill.command(mib, PORT), runtime=PYSHIM)
    try:
        for _ in range(3):
            served = wait_answering(source, container_id)
        images = tmpfs / "images"
        # Tasks.Checkpoint as ctr 2.x sends it: ctr 1.6/1.7 drop --exit and --image-path for a runtime not named
        # io.containerd.runc.* (docs/registration.md), so the task would run on and nothing be dumped there.
        with ContainerdClient(source.address, source.namespace) as api:
            api.checkpoint(container_id, oci_pb2.CheckpointOptions(exit=True, image_path=str(images)), timeout=180)
        assert wait_status(source, container_id, "STOPPED", 30) == "STOPPED"
    finally:
        remove(source, container_id)
    return str(images), served


def restore_lazily(target: Containerd, image: TestImage, images: Path, page_server: str,
                   mib: int) -> tuple[str, float]:
    """A container on the destination whose Start restores images lazily; (its id, when the restore returned)."""
    container_id = target.new_id("postcopy")
    config = target.tmp / f"{container_id}.toml"
    config.write_text(f'BinaryName = "runc"\nRoot = "{target.runc_root}"\nCriuImagePath = "{images}"\n')
    annotations = ["--annotation", f"{ANNOTATION}lazy-pages=true", "--annotation",
                   f"{ANNOTATION}page-server={page_server}", "--annotation", f"{ANNOTATION}timeout=300"]
    target.ctr("run", "-d", "--runtime", PYSHIM, "--fifo-dir", str(target.fifo_dir), "--runtime-config-path",
               str(config), *annotations, image.ref, container_id, *memfill.command(mib, PORT), timeout=120)
    return container_id, time.time()


def split_for(target: Containerd, images: str) -> tuple[Path, dict]:
    """What is copied to the destination: the images without their lazy pages."""
    sys.path.insert(0, str(REPO))
    try:
        from shim.criu.lazy_images import split
    finally:
        sys.path.remove(str(REPO))
    moved = target.tmp / "moved-images"
    result = split(images, str(moved))
    sizes = {"source": du(Path(images)), "moved": du(moved), "lazy_pages": result.lazy_pages,
             "eager_pages": result.eager_pages}
    return moved, sizes


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
                    found.append(int(entry))
                    queue.append(int(entry))
    return found


def processes_naming(text: str) -> list[int]:
    """Processes whose command line mentions text (our images' path: CRIU started for this test)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def wait_until(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


def prepared(hosts: list[Containerd], image: TestImage, tmpfs: Path, mib: int) -> tuple[str, int, Path, dict]:
    """memfill checkpointed on the source and its images split for the destination: (the full images, requests
    memfill had served, the images moved, their sizes)."""
    for host in hosts:
        host.import_image(image)
    images, served = checkpointed_memfill(hosts[0], image, tmpfs, mib)
    moved, sizes = split_for(hosts[1], images)
    return images, served, moved, sizes


@VERSIONS
def test_the_memory_moves_after_the_container_runs_and_comes_back_intact(hosts, memfill_image: TestImage,
                                                                         tmpfs: Path, mib: int):
    target = hosts[1]
    images, served, moved, sizes = prepared(hosts, memfill_image, tmpfs, mib)
    assert sizes["lazy_pages"] >= mib * 1024 * 1024 // PAGE and sizes["moved"] < 8 << 20, sizes
    # 256 MiB at 48 MiB/s (a 400 Mbit/s link), ~5.5 s; 64 MiB at 24 MiB/s, ~2.7 s: seconds after the task runs
    server = PageServer(Path(images), rate=(48 if mib == MIB else 24) << 20)
    container_id = ""
    try:
        started = time.time()
        container_id, running_at = restore_lazily(target, memfill_image, moved, server.address, mib)
        assert task_status(target, container_id) == "RUNNING"
        before = server.served_at(running_at)
        # memfill reads all its memory back: page faults, beside the background transfer
        result = ask(target, container_id, "check")
        done = server.wait_for(lambda e: e["event"] == "done", 180)
        after = [e for e in server.events if e["event"] == "progress" and e["t"] > running_at]
        print(f"post-copy of {mib} MiB: images moved before the restore {sizes['moved']} bytes "
              f"(source {sizes['source']}); running {running_at - started:.2f}s after the restore began with "
              f"{before} of {server.total} lazy pages served; last page {done['t'] - started:.2f}s after it")
        assert result == f"ok {mib}"  # every word as memfill wrote it
        assert ask(target, container_id, "ping", 10) == f"pong {served + 2}"  # its own count, on from the source's
        assert before < server.total // 4, (before, server.total)  # it ran with most of its memory still away
        assert after and done["t"] > running_at, "no page served after the task was running"
        assert done["served"] == done["total"] == server.total and done["closed"] and done["removed"], done
        assert server.process.wait(10) == 0
        assert not Path(images).exists()  # removed once every page moved
        shim = target.shim_pid(container_id)
        assert shim is not None
        wait_until(lambda: not [p for p in descendants(shim) if b"lazy" in Path(f"/proc/{p}/cmdline")
                                .read_bytes()], "the lazy-pages daemon gone once every page moved", 30)
        assert task_status(target, container_id) == "RUNNING"
    finally:
        server.stop()
        if container_id:
            remove(target, container_id)


def test_memory_dropped_and_a_child_forked_while_the_pages_move_come_out_intact(hosts, memfill_image: TestImage,
                                                                               tmpfs: Path, mib: int):
    # memfill gives back one page in every 64 KiB (madvise: a REMOVE event for each), so that pages being fetched
    # are dropped under every request in flight; CRIU 4.2's `criu lazy-pages` then leaves the rest of such a
    # request stuck and a later fault there waits forever (docs/migrate.md). Then a forked child reads everything
    # through its own userfaultfd (a FORK event), and the parent too.
    target = hosts[1]
    images, _, moved, sizes = prepared(hosts, memfill_image, tmpfs, mib)
    server = PageServer(Path(images), rate=48 << 20)
    container_id = ""
    try:
        container_id, _ = restore_lazily(target, memfill_image, moved, server.address, mib)
        dropped = ask(target, container_id, "drop", 60)
        assert dropped == f"dropped {mib * 16}", dropped
        assert ask(target, container_id, "forkcheck", 120) == f"child ok {mib}"
        assert ask(target, container_id, "check", 120) == f"ok {mib}"
        done = server.wait_for(lambda e: e["event"] == "done", 180)
        assert done["closed"] and not done["error"], done
        log = target.bundle(container_id) / "lazy-pages.log"
        summary = wait_until(lambda: next((line for line in log.read_text().splitlines() if " done in " in line),
                                          None), "the lazy-pages daemon's last line", 30)
        gone, moved = (int(n) for n in re.findall(r"(\d+) dropped.* (\d+) bytes from the page server", summary)[0])
        print(f"post-copy with drops and a fork: {summary}")
        assert gone > 0, summary  # pages were dropped before they came
        # No page came twice (the child's faults and the parent's share the answers): at most the whole memory,
        # pages dropped while on their way included
        assert moved <= sizes["lazy_pages"] * PAGE, summary
        assert task_status(target, container_id) == "RUNNING"
    finally:
        server.stop()
        if container_id:
            remove(target, container_id)


@VERSIONS
@pytest.mark.parametrize("lost", ["page-server", "lazy-pages-daemon"])
def test_a_page_server_lost_mid_transfer_ends_the_container_with_its_cause(hosts, memfill_image: TestImage,
                                                                           tmpfs: Path, mib: int, lost: str):
    target = hosts[1]
    images, _, moved, _ = prepared(hosts, memfill_image, tmpfs, mib)
    server = PageServer(Path(images), rate=8 << 20)  # ~32 s for 256 MiB, 8 s for 64: killed long before the end
    container_id = ""
    try:
        with target.events() as events:
            container_id, _ = restore_lazily(target, memfill_image, moved, server.address, mib)
            shim = target.shim_pid(container_id)
            assert shim is not None
            server.wait_for(lambda e: e["event"] == "progress" and e["served"] >= 2048, 60)
            pid = int(target.ctr("task", "ls").stdout.split(container_id, 1)[1].split()[0])
            checking = subprocess.Popen(  # memfill faults on pages the page server will never send
                ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", ASK, str(PORT), "check", "120"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if lost == "page-server":
                os.kill(server.process.pid, signal.SIGKILL)
            else:  # the destination's side of the same loss: its daemon killed (the OOM killer, a bug)
                daemon = [p for p in descendants(shim) if b"shim.criu.lazy_daemon" in
                          Path(f"/proc/{p}/cmdline").read_bytes()]
                assert len(daemon) == 1, daemon
                os.kill(daemon[0], signal.SIGKILL)
            server.process.wait(10)
            served = server.served_at(time.time())
            exited = events.wait_for(rf"/tasks/exit .*{container_id}.*\"exit_status\":137", 60)
            assert wait_status(target, container_id, "STOPPED", 30) == "STOPPED", exited
        log = wait_until(lambda: next((line for line in target.log_tail(400).splitlines()
                                       if f"post-copy of {container_id} failed" in line), None),
                         "the shim's log saying why the container ended", 30)
        if lost == "page-server":
            assert "lazy-pages daemon exited with 1" in log and "Error: the page server" in log, log
        else:
            assert "lazy-pages daemon exited with 137" in log, log
        checked, _ = checking.communicate(timeout=60)
        assert not checked.startswith("ok"), checked  # memfill never finished reading zeros as its memory
        assert served < server.total
        # nothing of CRIU is left: no lazy-pages, no restore; nothing mounted from the restore
        assert not processes_naming(str(moved)), [Path(f"/proc/{p}/cmdline").read_bytes()
                                                  for p in processes_naming(str(moved))]
        assert not [p for p in descendants(shim) if b"criu" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert not [point for point in mounts.mounts_under(target.tmp) if "criu-root" in point or ".criu." in point]
        assert (target.bundle(container_id) / "rootfs/bin/busybox").exists()  # the rootfs is intact
        assert Path(images).exists() and (Path(images) / "pages-1.img").exists()  # kept: pages never moved
    finally:
        server.stop()
        if container_id:
            remove(target, container_id)

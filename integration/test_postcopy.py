"""Post-copy on one machine: the container runs on the destination before its memory has moved.

Two private containerds stand for the two hosts. On the "source" a container runs harness/memfill.c, which fills
256 MiB of anonymous memory with a known pattern (word i = i * K ^ SEED) and writes its checksum. It is checkpointed
with exit into a tmpfs (the source's memory); shim.criu.lazy_images.split makes the images the destination restores
from (every page CRIU marks lazy left out: ~1 MiB instead of 257); pyshim's page server (python -m
shim.criu.page_server, rate-limited as a network link would be) serves the rest on 127.0.0.1 from the tmpfs. The
"destination" restores through pyshim with the annotations lazy-pages=true and page-server=127.0.0.1:PORT: the shim
runs `criu lazy-pages --page-server` beside `runc restore --lazy-pages`.

- The task is RUNNING while most of its pages are still on the source (the page server's progress lines, with
  times, against the time the restore returned), memfill reads all 256 MiB back intact (no mismatch, same checksum,
  computed inside the container), every page was served, the page server removed the source's images and the
  lazy-pages daemon is gone.
- The page server killed mid-transfer: the destination's task ends (SIGKILL, exit status 137 in the /tasks/exit
  event) with the cause in the shim's log ("post-copy of ID failed", quoting CRIU's lazy-pages log), no CRIU process
  is left, nothing is left mounted, and the source's images are kept (pages never moved: the container can still be
  restored from them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import cbuild, commands, mounts
from harness.containerd import PYSHIM, Containerd
from harness.environment import Environment
from harness.image import TestImage
from harness.tasks import remove, task_status, wait_status

REPO = Path(__file__).resolve().parent.parent
MIB = 256
PAGE = os.sysconf("SC_PAGE_SIZE")
ANNOTATION = "io.pyshim.checkpoint."
FLAGS = ("-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror")


@pytest.fixture
def hosts(request, environment: Environment, test_image: TestImage, containerd_log_dir: Path):
    """Two started containerds 2.x, the test image imported into both."""
    from conftest import track_containerd

    instances = []
    try:
        for _ in range(2):
            instance = Containerd("2", environment, log_dir=containerd_log_dir)
            track_containerd(request, instance)
            instances.append(instance)
            instance.start()
            instance.import_image(test_image)
        yield instances
    finally:
        for instance in instances:
            instance.stop()


@pytest.fixture(scope="module")
def memfill(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reason := cbuild.unavailable_reason("memfill"):
        pytest.skip(reason)
    return cbuild.build("memfill", tmp_path_factory.mktemp("memfill"), FLAGS)


@pytest.fixture
def tmpfs(tmp_path: Path):
    """The source host's memory: a tmpfs the checkpoint is written into."""
    path = tmp_path / "source-memory"
    path.mkdir()
    commands.run(["mount", "-t", "tmpfs", "-o", f"size={MIB + 256}m,mode=0700", "pyshim-postcopy", str(path)])
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


def filled(data: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = (data / "state").read_text().split()
            if state[0] == "filled":
                return state[1]
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"memfill did not fill its memory within {timeout}s")


def mount_flags(data: Path, helper: Path) -> list[str]:
    return [f"--mount=type=bind,src={data},dst=/data,options=rbind:rw",
            f"--mount=type=bind,src={helper.parent},dst=/helper,options=rbind:ro"]


def checkpointed_memfill(source: Containerd, test_image: TestImage, memfill: Path, tmpfs: Path,
                         tmp_path: Path) -> tuple[str, Path, str]:
    """memfill run on the source and checkpointed with exit into the tmpfs: (its images, its /data, checksum)."""
    container_id = source.new_id("fill")
    data = tmp_path / "source-data"
    data.mkdir()
    source.run(container_id, test_image, "/helper/memfill", str(MIB), "/data", runtime=PYSHIM,
               extra=mount_flags(data, memfill))
    try:
        checksum = filled(data)
        images = tmpfs / "images"
        source.ctr("task", "checkpoint", "--exit", "--image-path", str(images), container_id, timeout=180)
        assert wait_status(source, container_id, "STOPPED", 30) == "STOPPED"
    finally:
        remove(source, container_id)
    return str(images), data, checksum


def restore_lazily(target: Containerd, test_image: TestImage, images: Path, data: Path, memfill: Path,
                   page_server: str) -> tuple[str, float]:
    """A container on the destination whose Start restores images lazily; (its id, when the restore returned)."""
    container_id = target.new_id("postcopy")
    config = target.tmp / f"{container_id}.toml"
    config.write_text(f'BinaryName = "runc"\nRoot = "{target.runc_root}"\nCriuImagePath = "{images}"\n')
    annotations = ["--annotation", f"{ANNOTATION}lazy-pages=true", "--annotation",
                   f"{ANNOTATION}page-server={page_server}", "--annotation", f"{ANNOTATION}timeout=300"]
    target.ctr("run", "-d", "--runtime", PYSHIM, "--fifo-dir", str(target.fifo_dir), "--runtime-config-path",
               str(config), *mount_flags(data, memfill), *annotations, test_image.ref, container_id, "sh",
               timeout=120)
    return container_id, time.time()


def split_for(target: Containerd, images: str, source_data: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    """What is copied to the destination: the images without their lazy pages, and memfill's /data."""
    sys.path.insert(0, str(REPO))
    try:
        from shim.criu.lazy_images import split
    finally:
        sys.path.remove(str(REPO))
    moved = target.tmp / "moved-images"
    result = split(images, str(moved))
    data = tmp_path / "destination-data"
    shutil.copytree(source_data, data)
    sizes = {"source": du(Path(images)), "moved": du(moved), "lazy_pages": result.lazy_pages,
             "eager_pages": result.eager_pages}
    return moved, data, sizes


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


def test_256_mib_move_after_the_container_runs_and_come_back_intact(hosts, test_image: TestImage, memfill: Path,
                                                                     tmpfs: Path, tmp_path: Path):
    source, target = hosts
    images, source_data, checksum = checkpointed_memfill(source, test_image, memfill, tmpfs, tmp_path)
    moved, data, sizes = split_for(target, images, source_data, tmp_path)
    assert sizes["lazy_pages"] >= MIB * 1024 * 1024 // PAGE and sizes["moved"] < 8 << 20, sizes
    server = PageServer(Path(images), rate=48 << 20)  # ~5.5 s for the 256 MiB, as a 400 Mbit/s link
    container_id = ""
    try:
        started = time.time()
        container_id, running_at = restore_lazily(target, test_image, moved, data, memfill, server.address)
        assert task_status(target, container_id) == "RUNNING"
        before = server.served_at(running_at)
        (data / "verify").touch()  # memfill reads all its memory back: page faults, beside the background transfer
        done = server.wait_for(lambda e: e["event"] == "done", 180)
        result = wait_until(lambda: (data / "result").exists() and (data / "result").read_text().split(),
                            "memfill's check of its memory", 120)
        after = [e for e in server.events if e["event"] == "progress" and e["t"] > running_at]
        print(f"post-copy of {MIB} MiB: images moved before the restore {sizes['moved']} bytes "
              f"(source {sizes['source']}); running {running_at - started:.2f}s after the restore began with "
              f"{before} of {server.total} lazy pages served; last page {done['t'] - started:.2f}s after it")
        assert result == ["verified", "0", checksum]  # every word as memfill wrote it
        assert before < server.total // 4, (before, server.total)  # it ran with most of its memory still away
        assert after and done["t"] > running_at, "no page served after the task was running"
        assert done["served"] == done["total"] == server.total and done["closed"] and done["removed"], done
        assert server.process.wait(10) == 0
        assert not Path(images).exists()  # removed once every page moved
        shim = target.shim_pid(container_id)
        assert shim is not None
        wait_until(lambda: not [p for p in descendants(shim) if b"lazy-pages" in Path(f"/proc/{p}/cmdline")
                                .read_bytes()], "criu lazy-pages gone once every page moved", 30)
        assert task_status(target, container_id) == "RUNNING"
        beat = (data / "beat").read_text()
        wait_until(lambda: (data / "beat").read_text() != beat, "memfill still beating")
    finally:
        server.stop()
        if container_id:
            remove(target, container_id)


def test_a_page_server_lost_mid_transfer_ends_the_container_with_its_cause(hosts, test_image: TestImage,
                                                                           memfill: Path, tmpfs: Path,
                                                                           tmp_path: Path):
    source, target = hosts
    images, source_data, _ = checkpointed_memfill(source, test_image, memfill, tmpfs, tmp_path)
    moved, data, _ = split_for(target, images, source_data, tmp_path)
    server = PageServer(Path(images), rate=8 << 20)  # ~32 s for the 256 MiB: killed long before the end
    container_id = ""
    try:
        with target.events() as events:
            container_id, _ = restore_lazily(target, test_image, moved, data, memfill, server.address)
            shim = target.shim_pid(container_id)
            assert shim is not None
            server.wait_for(lambda e: e["event"] == "progress" and e["served"] >= 2048, 60)
            (data / "verify").touch()  # memfill faults on pages the page server will never send
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
            served = server.served_at(time.time())
            exited = events.wait_for(rf"/tasks/exit .*{container_id}.*\"exit_status\":137", 60)
            assert wait_status(target, container_id, "STOPPED", 30) == "STOPPED", exited
        log = wait_until(lambda: next((line for line in target.log_tail(400).splitlines()
                                       if f"post-copy of {container_id} failed" in line), None),
                         "the shim's log saying why the container ended", 30)
        assert "criu lazy-pages exited with" in log and "page-xfer" in log, log
        assert not (data / "result").exists()  # memfill never got to read zeros where its memory was
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

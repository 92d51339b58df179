"""Checkpoints that lose their ground under them, on containerd 2.x, pyshim beside the Go runc shim.

- The image directory's file system fills up (a 2 MiB tmpfs, a container holding 16 MiB): pyshim's Checkpoint
  fails naming "No space left on device", the task is RUNNING and counting, and nothing is left in the image
  directory (the partial image is removed). The Go shim's outcome is printed beside it; only its failure is asserted.
- the shim server is SIGKILLed while CRIU dumps: under pyshim the checkpoint call fails, no CRIU or worker process
  of that container is left once containerd has cleaned up after the dead shim, and no complete image is reported
  where the checkpoint was asked for; the Go shim's outcome is printed beside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.image import TestImage
from harness.tasks import remove, task_status
from test_checkpoint import counter, read_counter, wait_counter

pytestmark = pytest.mark.parametrize("containerd_version", ["2"], ids=lambda v: f"containerd-{v}")
MiB = 1 << 20
# 16 MiB that CRIU must write (busybox awk keeps the string), and a counter beside it.
HOLDER = (f'awk \'BEGIN {{ n = {16 * MiB}; s = "x"; while (length(s) < n) s = s s; system("exec sleep 3600") }}\' & '
          "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done")


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "pyshim-test-full", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_a_full_disk_fails_the_checkpoint_with_the_cause_and_leaves_the_task_running(
        containerd: Containerd, test_image: TestImage, small_tmpfs: Path):
    outcomes = {}
    for runtime in (PYSHIM, RUNC_V2):
        container_id = containerd.new_id("full")
        containerd.run(container_id, test_image, "sh", "-c", HOLDER, runtime=runtime)
        try:
            path = counter(containerd, container_id)
            wait_counter(path, lambda v: v >= 3)
            images = small_tmpfs / f"images-{container_id}"
            result = containerd.ctr("task", "checkpoint", "--image-path", str(images), container_id, check=False,
                                    timeout=120)
            before = read_counter(path) or 0
            outcomes[runtime] = {
                "failed": result.returncode != 0,
                "says no space": "No space left on device" in result.stderr,
                "status": task_status(containerd, container_id),
                "counting": wait_counter(path, lambda v, floor=before: v > floor + 3) > before,
                "left in the file system": sorted(str(p.relative_to(small_tmpfs)) for p in small_tmpfs.rglob("*")),
            }
            print(f"{runtime}: {outcomes[runtime]} ({result.stderr.strip()[:300]})")
            for leftover in small_tmpfs.iterdir():  # the next shim gets the whole 2 MiB
                subprocess.run(["rm", "-rf", str(leftover)], check=True)
        finally:
            remove(containerd, container_id)
    assert outcomes[PYSHIM] == {"failed": True, "says no space": True, "status": "RUNNING", "counting": True,
                                "left in the file system": []}
    assert outcomes[RUNC_V2]["failed"] is True  # the reference fails too; what it leaves is printed above


def _criu_of(container_id: str) -> list[int]:
    """CRIU, checkpoint-worker or runc processes working on container_id (a path naming it open: the bundle, the
    images)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            cwd_and_fds = " ".join(os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd"))
        except OSError:
            continue
        if comm in ("criu", "pyshim-ckpt", "runc") and container_id in cwd_and_fds:
            found.append(int(entry))
    return found


def shim_killed_mid_checkpoint(containerd: Containerd, image: TestImage, runtime: str, tmp_path: Path) -> dict:
    """SIGKILL the shim while CRIU dumps 256 MiB: ctr's outcome, the CRIU / worker / runc processes of the container
    still there once containerd has cleaned up (bounded wait), whether an image was left where it was asked for."""
    container_id = containerd.new_id("shimkill")
    hog = HOLDER.replace(str(16 * MiB), str(256 * MiB))
    containerd.run(container_id, image, "sh", "-c", hog, runtime=runtime)
    images = tmp_path / f"images-{container_id}"  # named after the id: CRIU's open images name it (_criu_of)
    try:
        wait_counter(counter(containerd, container_id), lambda v: v >= 3)
        time.sleep(0.5)  # the awk's 256 MiB: doubling a string to that size takes a moment; bounded by the dump below
        shim = containerd.shim_pid(container_id)
        assert shim is not None
        ctr = subprocess.Popen([*containerd.ctr_argv(), "task", "checkpoint", "--image-path", str(images),
                                container_id], env=containerd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        try:
            deadline = time.monotonic() + 30
            while not _criu_of(container_id) and ctr.poll() is None:
                assert time.monotonic() < deadline, "no CRIU ever worked on the container"
                time.sleep(0.01)
            interrupted = ctr.poll() is None
            containerd.kill_adopted(shim, signal.SIGKILL)
            _, stderr = ctr.communicate(timeout=60)
        finally:
            if ctr.poll() is None:
                ctr.kill()
                ctr.wait()
        deadline = time.monotonic() + 30
        while (left := _criu_of(container_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"interrupted": interrupted, "ctr failed": ctr.returncode != 0, "left": left,
                "image where asked": (images / "inventory.img").exists(),
                "task": task_status(containerd, container_id), "error": " ".join(stderr.split())[-160:]}
    finally:
        remove(containerd, container_id)


def test_a_shim_killed_mid_checkpoint_leaves_no_criu_and_no_image(containerd: Containerd, test_image: TestImage,
                                                                  tmp_path: Path):
    outcomes = {runtime: shim_killed_mid_checkpoint(containerd, test_image, runtime, tmp_path)
                for runtime in (PYSHIM, RUNC_V2)}
    for runtime, outcome in outcomes.items():
        print(f"{runtime}: {outcome}")
    pyshim = outcomes[PYSHIM]
    assert (pyshim["interrupted"], pyshim["ctr failed"]) == (True, True), pyshim
    assert pyshim["left"] == [], f"CRIU/worker processes left: {pyshim}"
    assert not pyshim["image where asked"], pyshim  # never a checkpoint reported where none completed

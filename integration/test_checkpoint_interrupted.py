"""A task frozen by a checkpoint whose caller died: containerd killed (SIGKILL) while CRIU dumps, under pyshim on
containerd 2.x, with the Go shim's outcome beside it.

containerd's client checkpoints a running task as State, Pause, Checkpoint, then a Resume deferred in the client:
containerd killed during the Checkpoint never sends that Resume. The workload holds ~150 MB in a shell variable so
the dump lasts long enough to be interrupted; containerd is killed once CRIU has the checkpoint's image directory
open, and started again on the same state. A second task, paused by the user (`ctr task pause`) before, is killed
with the same containerd: it must stay paused.

Seen: pyshim resumes the task once the cancelled dump has cleaned up (its log says so): RUNNING after the restart,
its counter advancing, and it checkpoints again. The Go shim leaves it PAUSED (issue 12, containerd 2.1.9).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.image import TestImage
from harness.tasks import remove, task_status, wait_status

# ~150 MB of the shell's memory that only a dump of it can carry, then a counter in /tmp/count.
BIG = ("x=$(head -c 150000000 /dev/zero | tr '\\0' a); "
       "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done")
SMALL = "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done"


def counter(containerd: Containerd, container_id: str) -> int | None:
    try:
        return int((containerd.bundle(container_id) / "rootfs" / "tmp" / "count").read_text())
    except (OSError, ValueError):
        return None


def wait_counting(containerd: Containerd, container_id: str, timeout: float = 20) -> bool:
    """True once the counter advances by 3 within the timeout (the task runs)."""
    deadline = time.monotonic() + timeout
    first = None
    while time.monotonic() < deadline:
        value = counter(containerd, container_id)
        if first is None and value:
            first = value
        elif first is not None and value is not None and value >= first + 3:
            return True
        time.sleep(0.05)
    return False


def dumping_into(directory: Path) -> bool:
    """Whether some process has a file open under directory (CRIU writing the image there)."""
    prefix = str(directory)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(prefix):
                    return True
            except OSError:
                pass
    return False


def interrupted_checkpoint(containerd: Containerd, test_image: TestImage, runtime: str) -> dict:
    big, paused = containerd.new_id("big"), containerd.new_id("userpaused")
    images = containerd.tmp / f"checkpoints-{runtime}"
    images.mkdir()
    try:
        containerd.run(big, test_image, "sh", "-c", BIG, runtime=runtime)
        containerd.run(paused, test_image, "sh", "-c", SMALL, runtime=runtime)
        assert wait_counting(containerd, big) and wait_counting(containerd, paused)
        containerd.ctr("task", "pause", paused)
        checkpoint = subprocess.Popen(containerd.ctr_argv() + ["task", "checkpoint", "--image-path",
                                                               str(images / "image"), big],
                                      env=containerd.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not dumping_into(images) and checkpoint.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            interrupted = checkpoint.poll() is None
            containerd.restart(kill=True)
        finally:
            checkpoint.kill()
            checkpoint.wait()
        outcome = {"interrupted mid-dump": interrupted,
                   "checkpointed task": wait_status(containerd, big, "RUNNING", timeout=15),
                   "user-paused task": task_status(containerd, paused)}
        outcome["counting"] = wait_counting(containerd, big, timeout=5)
        again = containerd.ctr("task", "checkpoint", "--image-path", str(images / "again"), big, check=False)
        outcome["checkpoints again"] = (again.returncode, task_status(containerd, big))
        return outcome
    finally:
        remove(containerd, big)
        remove(containerd, paused)


@pytest.mark.parametrize("containerd_version", ["2"], indirect=True)
def test_containerd_killed_mid_checkpoint_leaves_the_task_running(containerd: Containerd, test_image: TestImage):
    pyshim = interrupted_checkpoint(containerd, test_image, PYSHIM)
    log = containerd.log_path.read_text()
    go = interrupted_checkpoint(containerd, test_image, RUNC_V2)
    print(f"pyshim: {pyshim}\nGo shim: {go}")
    assert pyshim == {"interrupted mid-dump": True, "checkpointed task": "RUNNING", "user-paused task": "PAUSED",
                      "counting": True, "checkpoints again": (0, "RUNNING")}
    assert "containerd paused it for a checkpoint and its checkpoint ended after containerd's connection closed" in log
    # The Go shim, recorded: the task stays frozen (issue 12).
    assert go["interrupted mid-dump"] and go["user-paused task"] == "PAUSED"

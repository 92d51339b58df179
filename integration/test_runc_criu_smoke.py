"""Plain runc checkpoint/restore of a container the Go runc shim started: the baseline the project builds on.

A busybox shell counts in memory and writes each value to /tmp/counter. It is checkpointed with `runc checkpoint`
(which kills it), the file is overwritten, and `runc restore --detach` brings it back in the same bundle: the
counter must continue from the checkpointed value, which only the restored memory can know.
"""

from __future__ import annotations

import contextlib
import subprocess

from harness.containerd import Containerd
from harness.image import TestImage
from test_checkpoint import read_counter, wait_counter

# Written aside and renamed: a dump between the truncation and the write would leave an empty file.
COUNTER_SCRIPT = ("i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; "
                  "sleep 0.05; done")
SENTINEL = "sentinel"


def test_runc_checkpoint_and_restore_keep_in_memory_state(containerd: Containerd, test_image: TestImage):
    container_id = containerd.new_id("smoke")
    runc = containerd.runc()
    bundle = containerd.bundle(container_id)
    counter = bundle / "rootfs" / "tmp" / "counter"
    images, scratch = containerd.tmp / f"{container_id}-images", containerd.tmp / f"{container_id}-scratch"
    scratch.mkdir()

    with contextlib.ExitStack() as cleanup:
        containerd.run(container_id, test_image, "sh", "-c", COUNTER_SCRIPT)
        cleanup.callback(containerd.ctr, "containers", "rm", container_id)
        cleanup.callback(containerd.ctr, "tasks", "rm", "-f", container_id)
        wait_counter(counter, lambda v: v >= 10)

        # Without --leave-running runc kills the container after the dump and deletes its runc state, so the same
        # id is free for the restore; the shim sees its task exit but keeps the rootfs mounted until `tasks rm`.
        runc.checkpoint(container_id, images, scratch / "dump-work")
        assert container_id not in {c["id"] for c in runc.list()}
        checkpointed = read_counter(counter)
        assert checkpointed is not None and checkpointed >= 10
        counter.write_text(SENTINEL + "\n")

        stdio = cleanup.enter_context(open(scratch / "restored-stdio", "wb"))
        restored = runc.restore_detached(
            container_id, bundle=bundle, image_path=images, work_path=scratch / "restore-work",
            pid_file=scratch / "restored.pid", run_dir=scratch,
            stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio,
        )
        cleanup.callback(restored.terminate)
        cleanup.callback(runc.delete, container_id, force=True, check=False)
        assert runc.state(container_id)["status"] == "running"

        # The shell held i == checkpointed (or checkpointed + 1 if the dump hit between increment and echo).
        first = wait_counter(counter, lambda v: True)
        assert checkpointed <= first <= checkpointed + 5, (checkpointed, first)
        wait_counter(counter, lambda v: v >= first + 5)

        runc.kill(container_id, "KILL")
        restored.wait(10)  # the subreaper ends once the restored container has been reaped
        runc.delete(container_id)

"""A host without pycriu: containers run under pyshim, and a checkpoint fails before it touches the task, naming the
fix.

The installed shim does not carry pycriu on its import path: shim.criu.bindings looks for it in the package's prefix
and where distributions install it, or only in PYSHIM_PYCRIU_PATH when containerd's environment sets that. This test's
containerd sets it to an empty directory, so the shims it starts see no pycriu at all.
"""

from __future__ import annotations

import time

import grpc
import pytest
from harness.containerd import PYSHIM, Containerd
from harness.grpc_client import ContainerdClient
from harness.image import TestImage
from harness.tasks import remove, task_status

from shim.api.containerd.runc.options import oci_pb2

COUNTER = "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.05; done"


def read_count(containerd: Containerd, container_id: str) -> int:
    try:
        return int((containerd.bundle(container_id) / "rootfs/tmp/count").read_text())
    except (OSError, ValueError):
        return -1


def wait_count_above(containerd: Containerd, container_id: str, value: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (seen := read_count(containerd, container_id)) <= value and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen > value, f"the counter of {container_id} stayed at {seen}"
    return seen


@pytest.fixture
def containerd_without_pycriu(environment, test_image: TestImage, containerd_log_dir, tmp_path, request):
    from conftest import track_containerd

    instance = Containerd("2", environment, log_dir=containerd_log_dir)
    track_containerd(request, instance)
    empty = tmp_path / "no-pycriu"
    empty.mkdir()
    # Inherited by `start`, the fork server and every shim server this containerd starts.
    instance.env["PYSHIM_PYCRIU_PATH"] = str(empty)
    with instance.serving(test_image):
        yield instance, empty


def test_containers_run_and_a_checkpoint_fails_before_touching_the_task(containerd_without_pycriu, test_image,
                                                                         tmp_path):
    containerd, empty = containerd_without_pycriu
    container_id = containerd.new_id("nocriu")
    containerd.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        before = wait_count_above(containerd, container_id, 3)
        images = tmp_path / "images"
        with ContainerdClient(containerd.address, containerd.namespace) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.checkpoint(container_id, oci_pb2.CheckpointOptions(image_path=str(images)))
        message = refused.value.details()
        print(f"checkpoint without pycriu: {refused.value.code()}: {message}")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "needs pycriu" in message and "python3-pycriu" in message and str(empty) in message
        # Untouched: still running and counting, and nothing was written where the image was asked for.
        assert task_status(containerd, container_id) == "RUNNING"
        wait_count_above(containerd, container_id, before + 5)
        assert not images.exists()
        # A second attempt fails the same way (the failed import is not cached as a success).
        with ContainerdClient(containerd.address, containerd.namespace) as client:
            with pytest.raises(grpc.RpcError) as again:
                client.checkpoint(container_id, oci_pb2.CheckpointOptions(image_path=str(images)))
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        remove(containerd, container_id)

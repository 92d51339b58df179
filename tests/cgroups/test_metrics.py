import os
import subprocess
from pathlib import Path

import pytest

from shim.api.containerd.cgroups.v1 import metrics_pb2 as v1_pb
from shim.api.containerd.cgroups.v2 import metrics_pb2 as v2_pb
from shim.cgroups import V1_TYPE_URL, V2_TYPE_URL, CgroupNotFound, V2Cgroup, collect, metrics_for_pid
from tests.cgroups.fake import PID, v1_tree, v2_tree


def test_type_urls_are_bare_message_names():
    assert V1_TYPE_URL == "io.containerd.cgroups.v1.Metrics"
    assert V2_TYPE_URL == "io.containerd.cgroups.v2.Metrics"


def test_v1_any(tmp_path):
    root, proc = v1_tree(tmp_path)
    packed = metrics_for_pid(PID, root=root, proc=proc)
    assert packed.type_url == "io.containerd.cgroups.v1.Metrics"
    # No "type.googleapis.com/" prefix, so Python's Any.Is/Unpack (which want a "/") do
    # not apply; containerd's typeurl accepts the bare name.
    assert v1_pb.Metrics.FromString(packed.value).memory.usage.usage == 12288


def test_v2_any(tmp_path):
    root, proc = v2_tree(tmp_path)
    packed = metrics_for_pid(PID, root=root, proc=proc)
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    assert v2_pb.Metrics.FromString(packed.value).pids.current == 5


def test_unknown_pid_is_not_found(tmp_path):
    root, proc = v2_tree(tmp_path)
    with pytest.raises(CgroupNotFound):
        metrics_for_pid(PID + 1, root=root, proc=proc)


def test_cgroup_removed_after_lookup_is_not_found(tmp_path):
    with pytest.raises(CgroupNotFound):
        collect(V2Cgroup(tmp_path / "gone"))


def test_reaped_process_is_not_found():
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(CgroupNotFound):
        metrics_for_pid(child.pid)


@pytest.mark.skipif(not Path("/sys/fs/cgroup").is_dir(), reason="no cgroupfs on this host")
def test_own_cgroup_on_this_host():
    packed = metrics_for_pid(os.getpid())
    if packed.type_url == V1_TYPE_URL:
        metrics = v1_pb.Metrics.FromString(packed.value)
        assert metrics.memory.usage.usage > 0 or metrics.pids.current >= 1
    else:
        assert packed.type_url == V2_TYPE_URL
        metrics = v2_pb.Metrics.FromString(packed.value)
        assert metrics.memory.usage > 0 or metrics.pids.current >= 1

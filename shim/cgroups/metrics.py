"""The Task.Stats boundary: a pid in, the cgroup Metrics of its container packed in an Any.

The Any's type_url is the bare message name ("io.containerd.cgroups.v1.Metrics" or
"...v2.Metrics"), without the type.googleapis.com/ prefix, because that is the name
containerd's typeurl registry knows these messages by and what `ctr task metrics`
matches on.

Reading is synchronous: a few dozen small cgroupfs reads that the kernel answers from
memory. A caller that wants it off the event loop can use asyncio.to_thread.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import any_pb2
from google.protobuf.message import Message

from shim.api.containerd.cgroups.v1 import metrics_pb2 as v1_pb
from shim.api.containerd.cgroups.v2 import metrics_pb2 as v2_pb
from shim.cgroups.locate import DEFAULT_PROC, DEFAULT_ROOT, Cgroup, CgroupNotFound, V1Cgroup, find_cgroup
from shim.cgroups.v1 import v1_metrics
from shim.cgroups.v2 import v2_metrics

V1_TYPE_URL = v1_pb.Metrics.DESCRIPTOR.full_name
V2_TYPE_URL = v2_pb.Metrics.DESCRIPTOR.full_name


def collect(cgroup: Cgroup, *, proc: Path = DEFAULT_PROC) -> v1_pb.Metrics | v2_pb.Metrics:
    """Metrics of an already located cgroup; CgroupNotFound if it vanished meanwhile (a
    removed cgroup's files read as absent, which would otherwise pass for zeros)."""
    if isinstance(cgroup, V1Cgroup):
        metrics: v1_pb.Metrics | v2_pb.Metrics = v1_metrics(cgroup, proc=proc)
        gone = not any(path.is_dir() for path in cgroup.controllers.values())
    else:
        metrics = v2_metrics(cgroup)
        gone = not cgroup.path.is_dir()
    if gone:
        raise CgroupNotFound(f"cgroup {cgroup} was removed")
    return metrics


def pack(metrics: Message) -> any_pb2.Any:
    return any_pb2.Any(type_url=metrics.DESCRIPTOR.full_name, value=metrics.SerializeToString())


def metrics_for_pid(pid: int, *, root: Path = DEFAULT_ROOT, proc: Path = DEFAULT_PROC) -> any_pb2.Any:
    """The cgroup metrics of the process `pid` (a container's init), ready for a
    StatsResponse. Raises CgroupNotFound when the process or its cgroup is gone."""
    return pack(collect(find_cgroup(pid, root=root, proc=proc), proc=proc))

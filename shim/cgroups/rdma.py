"""The rdma controller's files as Metrics.rdma: rdma.current and rdma.max read alike on cgroup v1 and v2, and
the v1 and v2 Metrics messages carry them in the same shape."""

from __future__ import annotations

from pathlib import Path

from shim.api.containerd.cgroups.v1 import metrics_pb2 as v1_pb
from shim.api.containerd.cgroups.v2 import metrics_pb2 as v2_pb
from shim.cgroups.files import read_parsed
from shim.cgroups.parse import parse_rdma


def fill_rdma(path: Path, metrics: v1_pb.Metrics | v2_pb.Metrics) -> None:
    """metrics.rdma from the cgroup directory at path; left unset when neither file is there."""
    current = read_parsed(path / "rdma.current", parse_rdma)
    limit = read_parsed(path / "rdma.max", parse_rdma)
    if current is None and limit is None:
        return
    metrics.rdma.SetInParent()
    for target, lines in ((metrics.rdma.current, current), (metrics.rdma.limit, limit)):
        for line in lines or []:
            target.add(device=line.device, hca_handles=line.hca_handles, hca_objects=line.hca_objects)

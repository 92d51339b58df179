"""Building io.containerd.cgroups.v2.Metrics from a process's unified-hierarchy directory.

Fills what the Go runc shim reports on cgroup v2: pids, cpu (cpu.stat), memory
(memory.stat plus current/max/swap), memory_events, io (io.stat), hugetlb and rdma; and,
where the kernel has the files, the newer fields of the same proto (memory.peak, swap
peak, CFS burst counters, pressure stall information). Limits of "max" are 2^64-1. A
file the kernel lacks, or a controller not enabled for the cgroup, leaves its part unset
or zero. Network is not a cgroup file and stays empty, as in the Go shim.
"""

from __future__ import annotations

from pathlib import Path

from shim.api.containerd.cgroups.v2 import metrics_pb2 as pb
from shim.cgroups.files import list_names, read_parsed
from shim.cgroups.locate import V2Cgroup
from shim.cgroups.parse import (
    UINT64_MAX,
    Pressure,
    hugepage_sizes,
    parse_flat_keyed,
    parse_io_stat,
    parse_limit,
    parse_pressure,
    parse_uint,
)
from shim.cgroups.rdma import fill_rdma

CPU_STAT_FIELDS = (
    "usage_usec",
    "user_usec",
    "system_usec",
    "nr_periods",
    "nr_throttled",
    "throttled_usec",
    "nr_bursts",
    "burst_usec",
)

# memory.stat keys carried by MemoryStat fields of the same name.
MEMORY_STAT_FIELDS = (
    "anon",
    "file",
    "kernel_stack",
    "slab",
    "sock",
    "shmem",
    "file_mapped",
    "file_dirty",
    "file_writeback",
    "anon_thp",
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
    "slab_reclaimable",
    "slab_unreclaimable",
    "pgfault",
    "pgmajfault",
    "workingset_refault",
    "workingset_activate",
    "workingset_nodereclaim",
    "pgrefill",
    "pgscan",
    "pgsteal",
    "pgactivate",
    "pgdeactivate",
    "pglazyfree",
    "pglazyfreed",
    "thp_fault_alloc",
    "thp_collapse_alloc",
)

# Single-value memory files -> MemoryStat field, and whether the file is a limit.
_MEMORY_FILES = {
    "memory.current": ("usage", False),
    "memory.max": ("usage_limit", True),
    "memory.swap.current": ("swap_usage", False),
    "memory.swap.max": ("swap_limit", True),
    "memory.peak": ("max_usage", False),
    "memory.swap.peak": ("swap_max_usage", False),
}

MEMORY_EVENT_FIELDS = ("low", "high", "max", "oom", "oom_kill")
IO_FIELDS = ("rbytes", "wbytes", "rios", "wios")


def _limit(text: str) -> int:
    return parse_limit(text, UINT64_MAX)


def v2_metrics(cgroup: V2Cgroup) -> pb.Metrics:
    path = cgroup.path
    metrics = pb.Metrics()
    _pids(path, metrics)
    _cpu(path, metrics)
    _memory(path, metrics)
    _memory_events(path, metrics)
    _io(path, metrics)
    _hugetlb(path, metrics)
    fill_rdma(path, metrics)
    return metrics


def _psi(target: pb.PSIStats, pressure: dict[str, Pressure] | None) -> None:
    for kind, value in (pressure or {}).items():
        if kind in ("some", "full"):
            data = getattr(target, kind)
            data.avg10, data.avg60, data.avg300, data.total = value.avg10, value.avg60, value.avg300, value.total


def _pids(path: Path, metrics: pb.Metrics) -> None:
    current = read_parsed(path / "pids.current", parse_uint)
    if current is None:
        return
    metrics.pids.current = current
    metrics.pids.limit = read_parsed(path / "pids.max", _limit) or 0


def _cpu(path: Path, metrics: pb.Metrics) -> None:
    stat = read_parsed(path / "cpu.stat", parse_flat_keyed)
    if stat is None:
        return
    for field in CPU_STAT_FIELDS:
        setattr(metrics.cpu, field, stat.get(field, 0))
    _psi(metrics.cpu.psi, read_parsed(path / "cpu.pressure", parse_pressure))


def _memory(path: Path, metrics: pb.Metrics) -> None:
    stat = read_parsed(path / "memory.stat", parse_flat_keyed)
    values = {
        field: read_parsed(path / name, _limit if is_limit else parse_uint)
        for name, (field, is_limit) in _MEMORY_FILES.items()
    }
    if stat is None and all(v is None for v in values.values()):
        return  # memory controller not enabled for this cgroup
    memory = metrics.memory
    memory.SetInParent()
    for field in MEMORY_STAT_FIELDS:
        setattr(memory, field, (stat or {}).get(field, 0))
    for field, value in values.items():
        setattr(memory, field, value or 0)
    _psi(memory.psi, read_parsed(path / "memory.pressure", parse_pressure))


def _memory_events(path: Path, metrics: pb.Metrics) -> None:
    events = read_parsed(path / "memory.events", parse_flat_keyed)
    if not events:
        return
    for field in MEMORY_EVENT_FIELDS:
        setattr(metrics.memory_events, field, events.get(field, 0))


def _io(path: Path, metrics: pb.Metrics) -> None:
    devices = read_parsed(path / "io.stat", parse_io_stat)
    pressure = read_parsed(path / "io.pressure", parse_pressure)
    if devices is None and pressure is None:
        return
    metrics.io.SetInParent()
    for device in devices or []:
        metrics.io.usage.add(
            major=device.major, minor=device.minor, **{f: device.counters.get(f, 0) for f in IO_FIELDS}
        )
    _psi(metrics.io.psi, pressure)


def _hugetlb(path: Path, metrics: pb.Metrics) -> None:
    for size in hugepage_sizes(list_names(path), "current"):
        metrics.hugetlb.add(
            pagesize=size,
            current=read_parsed(path / f"hugetlb.{size}.current", parse_uint) or 0,
            max=read_parsed(path / f"hugetlb.{size}.max", _limit) or 0,
        )

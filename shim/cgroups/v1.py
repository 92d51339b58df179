"""Building io.containerd.cgroups.v1.Metrics from a process's v1 controller directories.

Fills what the Go runc shim reports on cgroup v1: pids, cpu (cpuacct usage and cpu.stat
throttling), memory (memory.stat, the four usage/limit/max/failcnt groups), the OOM
control state, blkio, hugetlb and rdma. A controller without a directory, or a file the
kernel lacks, leaves its part unset or zero. Network and per-state task counts are not
cgroup files and stay empty, as in the Go shim.
"""

from __future__ import annotations

import os
from pathlib import Path

from shim.api.containerd.cgroups.v1 import metrics_pb2 as pb
from shim.cgroups.files import list_names, read_parsed, read_text
from shim.cgroups.locate import DEFAULT_PROC, V1Cgroup
from shim.cgroups.parse import (
    hugepage_sizes,
    parse_blkio,
    parse_flat_keyed,
    parse_limit,
    parse_partitions,
    parse_uint,
    parse_uint_list,
)
from shim.cgroups.rdma import fill_rdma

NANOSECONDS = 1_000_000_000

# memory.stat key -> MemoryStat field; each also has a "total_" (hierarchical) twin.
_MEMORY_LOCAL = {
    "cache": "cache",
    "rss": "rss",
    "rss_huge": "rss_huge",
    "mapped_file": "mapped_file",
    "dirty": "dirty",
    "writeback": "writeback",
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "inactive_anon": "inactive_anon",
    "active_anon": "active_anon",
    "inactive_file": "inactive_file",
    "active_file": "active_file",
    "unevictable": "unevictable",
}
MEMORY_STAT_FIELDS = {
    **_MEMORY_LOCAL,
    **{f"total_{key}": f"total_{field}" for key, field in _MEMORY_LOCAL.items()},
    "hierarchical_memory_limit": "hierarchical_memory_limit",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}

# memory.<module>.* file prefix -> MemoryStat field holding its MemoryEntry.
_MEMORY_MODULES = {
    "memory": "usage",
    "memory.memsw": "swap",
    "memory.kmem": "kernel",
    "memory.kmem.tcp": "kernel_tcp",
}
# file suffix -> MemoryEntry field
_MEMORY_ENTRY_FILES = {
    "usage_in_bytes": "usage",
    "max_usage_in_bytes": "max",
    "failcnt": "failcnt",
    "limit_in_bytes": "limit",
}

# blkio file (after "blkio.") -> BlkIOStat field. The *_recursive files exist only with
# the CFQ/BFQ-era accounting; without entries there, the throttle files are what is left.
_BLKIO_RECURSIVE = {
    "io_service_bytes_recursive": "io_service_bytes_recursive",
    "io_serviced_recursive": "io_serviced_recursive",
    "io_queued_recursive": "io_queued_recursive",
    "io_service_time_recursive": "io_service_time_recursive",
    "io_wait_time_recursive": "io_wait_time_recursive",
    "io_merged_recursive": "io_merged_recursive",
    "time_recursive": "io_time_recursive",
    "sectors_recursive": "sectors_recursive",
}
_BLKIO_THROTTLE = {
    "throttle.io_service_bytes": "io_service_bytes_recursive",
    "throttle.io_serviced": "io_serviced_recursive",
}


def v1_metrics(cgroup: V1Cgroup, *, proc: Path = DEFAULT_PROC, clock_ticks: int | None = None) -> pb.Metrics:
    metrics = pb.Metrics()
    if (path := cgroup.path("pids")) is not None:
        _pids(path, metrics)
    _cpu(cgroup.path("cpuacct"), cgroup.path("cpu"), metrics, clock_ticks or os.sysconf("SC_CLK_TCK"))
    if (path := cgroup.path("memory")) is not None:
        _memory(path, metrics)
    if (path := cgroup.path("blkio")) is not None:
        _blkio(path, proc, metrics)
    if (path := cgroup.path("hugetlb")) is not None:
        _hugetlb(path, metrics)
    if (path := cgroup.path("rdma")) is not None:
        fill_rdma(path, metrics)
    return metrics


def _pids(path: Path, metrics: pb.Metrics) -> None:
    current = read_parsed(path / "pids.current", parse_uint)
    if current is None:
        return
    metrics.pids.current = current
    # v1 reports an unlimited pids.max as 0, unlike v2.
    metrics.pids.limit = read_parsed(path / "pids.max", lambda text: parse_limit(text, 0)) or 0


def _cpu(cpuacct: Path | None, cpu: Path | None, metrics: pb.Metrics, clock_ticks: int) -> None:
    total = times = per_cpu = throttling = None
    if cpuacct is not None:
        total = read_parsed(cpuacct / "cpuacct.usage", parse_uint)
        times = read_parsed(cpuacct / "cpuacct.stat", parse_flat_keyed)
        per_cpu = read_parsed(cpuacct / "cpuacct.usage_percpu", parse_uint_list)
    if cpu is not None:
        throttling = read_parsed(cpu / "cpu.stat", parse_flat_keyed)
    if total is None and times is None and per_cpu is None and throttling is None:
        return
    # `ctr task metrics` dereferences cpu.usage whenever cpu is set, so set both parts.
    usage, throttle = metrics.cpu.usage, metrics.cpu.throttling
    usage.SetInParent()
    throttle.SetInParent()
    usage.total = total or 0
    if times:
        # cpuacct.stat counts USER_HZ ticks; the proto carries nanoseconds.
        usage.user = times.get("user", 0) * NANOSECONDS // clock_ticks
        usage.kernel = times.get("system", 0) * NANOSECONDS // clock_ticks
    usage.per_cpu.extend(per_cpu or [])
    if throttling:
        throttle.periods = throttling.get("nr_periods", 0)
        throttle.throttled_periods = throttling.get("nr_throttled", 0)
        throttle.throttled_time = throttling.get("throttled_time", 0)


def _memory(path: Path, metrics: pb.Metrics) -> None:
    stat = read_parsed(path / "memory.stat", parse_flat_keyed)
    entries = {
        module: {
            field: read_parsed(path / f"{module}.{name}", parse_uint) for name, field in _MEMORY_ENTRY_FILES.items()
        }
        for module in _MEMORY_MODULES
    }
    if stat is None and all(v is None for entry in entries.values() for v in entry.values()):
        return
    memory = metrics.memory
    for key, field in MEMORY_STAT_FIELDS.items():
        setattr(memory, field, (stat or {}).get(key, 0))
    for module, values in entries.items():
        # All four entries are always present: `ctr task metrics` dereferences
        # memory.usage whenever memory is set, and a zero entry is how an absent module (memsw without swap
        # accounting) is reported.
        entry = getattr(memory, _MEMORY_MODULES[module])
        entry.SetInParent()
        for field, value in values.items():
            setattr(entry, field, value or 0)
    oom = read_parsed(path / "memory.oom_control", parse_flat_keyed)
    if oom is not None:
        metrics.memory_oom_control.SetInParent()
        metrics.memory_oom_control.oom_kill_disable = oom.get("oom_kill_disable", 0)
        metrics.memory_oom_control.under_oom = oom.get("under_oom", 0)
        metrics.memory_oom_control.oom_kill = oom.get("oom_kill", 0)


def _blkio(path: Path, proc: Path, metrics: pb.Metrics) -> None:
    devices = parse_partitions(read_text(proc / "partitions") or "")
    blkio = metrics.blkio

    def read(files: dict[str, str]) -> int:
        count = 0
        for name, field in files.items():
            for line in read_parsed(path / f"blkio.{name}", parse_blkio) or []:
                device = devices.get((line.major, line.minor))
                getattr(blkio, field).add(
                    op=line.op,
                    device=f"/dev/{device}" if device else "",
                    major=line.major,
                    minor=line.minor,
                    value=line.value,
                )
                count += 1
        return count

    if read(_BLKIO_RECURSIVE) == 0:
        read(_BLKIO_THROTTLE)
    blkio.SetInParent()


def _hugetlb(path: Path, metrics: pb.Metrics) -> None:
    for size in hugepage_sizes(list_names(path), "usage_in_bytes"):
        prefix = f"hugetlb.{size}."
        metrics.hugetlb.add(
            pagesize=size,
            usage=read_parsed(path / f"{prefix}usage_in_bytes", parse_uint) or 0,
            max=read_parsed(path / f"{prefix}max_usage_in_bytes", parse_uint) or 0,
            failcnt=read_parsed(path / f"{prefix}failcnt", parse_uint) or 0,
        )

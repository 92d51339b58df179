"""Cgroup metrics and OOM events of a container, found from its init pid.

    metrics_for_pid(pid) -> google.protobuf.Any   # for Task.Stats
    watch_oom(find_cgroup(pid))                   # async iterator of OOM events
    join("/some/cgroup", pid)                     # Options.shim_cgroup

Modules: parse (pure parsers of the file formats), files (reading, absent files as None),
locate (cgroup mode and the process's directories), v1 / v2 (building the Metrics
messages; rdma, the part both build alike), metrics (the Any for Task.Stats), oom and inotify (OOM watching), procs
(joining a cgroup).
"""

from shim.cgroups.locate import CgroupNotFound, Mode, V1Cgroup, V2Cgroup, detect_mode, find_cgroup
from shim.cgroups.metrics import V1_TYPE_URL, V2_TYPE_URL, collect, metrics_for_pid, pack
from shim.cgroups.oom import OomKillCounter, watch_oom
from shim.cgroups.procs import join

__all__ = [
    "V1_TYPE_URL",
    "V2_TYPE_URL",
    "CgroupNotFound",
    "Mode",
    "OomKillCounter",
    "V1Cgroup",
    "V2Cgroup",
    "collect",
    "detect_mode",
    "find_cgroup",
    "join",
    "metrics_for_pid",
    "pack",
    "watch_oom",
]

"""Small task helpers the scenario tests share: a task's status as `ctr task ls` shows it,
waiting for one, removing a task and its container, running a scenario under each shim."""

from __future__ import annotations

import time

from .containerd import RUNTIMES, Containerd


def task_status(containerd: Containerd, container_id: str) -> str:
    for line in containerd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return fields[2]
    return "ABSENT"


def task_pid(containerd: Containerd, container_id: str) -> int:
    """The task's pid as `ctr task ls` shows it; LookupError when there is no such task."""
    for line in containerd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return int(fields[1])
    raise LookupError(f"no task {container_id}")


def wait_status(containerd: Containerd, container_id: str, wanted: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while (status := task_status(containerd, container_id)) != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def each_runtime(scenario):
    """The scenario's outcome under pyshim and under the Go shim."""
    return {runtime: scenario(runtime) for runtime in RUNTIMES}


def remove(containerd: Containerd, container_id: str) -> None:
    containerd.ctr("task", "rm", "-f", container_id, check=False)
    containerd.ctr("containers", "rm", container_id, check=False)

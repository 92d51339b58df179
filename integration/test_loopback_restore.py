"""A server its own container reaches at 127.0.0.1 survives checkpoint and restore: pyshim against the Go runc shim.

redis-server (Debian's, from the redis test image) keeps its data only in memory and listens on 127.0.0.1; clients
inside the container write keys, then `ctr containers checkpoint --task` takes the container into the content store,
the original task and container are removed and `ctr containers restore --live` brings the checkpoint back under a
new id. A client inside the restored container then reads the keys back.

runc restores a container's private network namespace with its loopback DOWN and nobody raises it (containerd#4683,
CRIU#590): under the Go shim the restored server is alive with its data but no process of the container can reach
127.0.0.1. pyshim raises `lo` at CRIU's setup-namespaces notification, before any socket is restored. The test asserts
both outcomes, the loopback flags behind them, and (under the Go shim) that raising `lo` by hand brings the data back,
so the difference is the loopback and nothing else.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.containerd import PYSHIM, RUNC_V2, RUNTIMES, Containerd
from harness.environment import Environment
from harness.image import TestImage
from harness.redis_image import build_redis_image, redis_files
from harness.tasks import task_pid, task_status, wait_status

PORT = "6379"
# Data only in memory: no RDB snapshots, no append-only file.
REDIS_SERVER = ("redis-server", "--bind", "127.0.0.1", "--port", PORT, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "warning")
IFF_UP = 0x1
KEYS = {"greeting": "hello from before the checkpoint", "answer": "42"}
# (exit code, output) of one redis-cli command
Reply = tuple[int, str]
# What the clients wrote before the checkpoint, as `redis-cli GET` returns it.
WRITTEN: dict[str, Reply] = {**{key: (0, value) for key, value in KEYS.items()}, "counter": (0, "3")}
# What redis-cli says when 127.0.0.1 has no route: the loopback is down.
UNREACHABLE = (1, f"Could not connect to Redis at 127.0.0.1:{PORT}: Network is unreachable")

_exec_ids = itertools.count()


@pytest.fixture(scope="session")
def redis_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_redis_image(tmp_path_factory.mktemp("redis-image-cache"), environment.redis,
                             busybox=environment.busybox)


@dataclass
class Outcome:
    status_after_checkpoint: str
    restored_status: str
    lo_flags_before: int
    lo_flags_after: int
    reads_after: dict[str, Reply]
    # Under the Go shim only: the same reads once the test raised lo from the host.
    reads_after_lo_raised: dict[str, Reply] | None = None


def in_container(containerd: Containerd, container_id: str, *command: str,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    return containerd.ctr("task", "exec", "--exec-id", f"probe{next(_exec_ids)}", container_id, *command,
                          check=check, timeout=20)


def redis_cli(containerd: Containerd, container_id: str, *command: str,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    return in_container(containerd, container_id, "redis-cli", "-h", "127.0.0.1", "-p", PORT, *command, check=check)


def read_back(containerd: Containerd, container_id: str) -> dict[str, Reply]:
    replies = {}
    for key in WRITTEN:
        result = redis_cli(containerd, container_id, "GET", key, check=False)
        replies[key] = (result.returncode, (result.stdout + result.stderr).strip())
    return replies


def lo_flags(containerd: Containerd, container_id: str) -> int:
    return int(in_container(containerd, container_id, "cat", "/sys/class/net/lo/flags").stdout.strip(), 16)


def wait_for_pong(containerd: Containerd, container_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (result := redis_cli(containerd, container_id, "PING", check=False)).stdout.strip() != "PONG":
        assert time.monotonic() < deadline, f"redis-server did not answer: {result.stdout}{result.stderr}"
        time.sleep(0.1)


def remove(containerd: Containerd, container_id: str) -> None:
    containerd.ctr("task", "rm", "-f", container_id, check=False)
    containerd.ctr("containers", "rm", container_id, check=False)


def checkpoint_and_restore(containerd: Containerd, image: TestImage, runtime: str) -> Outcome:
    original, restored = containerd.new_id("redis"), containerd.new_id("restored")
    checkpoint = f"localhost/pyshim-test/checkpoint:{original}"
    try:
        containerd.run(original, image, *REDIS_SERVER, runtime=runtime)
        wait_for_pong(containerd, original)
        for key, value in KEYS.items():
            assert redis_cli(containerd, original, "SET", key, value).stdout.strip() == "OK"
        for _ in range(3):
            redis_cli(containerd, original, "INCR", "counter")
        before = lo_flags(containerd, original)

        containerd.ctr("containers", "checkpoint", "--task", original, checkpoint, timeout=60)
        status_after_checkpoint = task_status(containerd, original)
        # The original goes away entirely: the restored server cannot be it.
        containerd.ctr("task", "kill", "-s", "KILL", original)
        wait_status(containerd, original, "STOPPED")
        containerd.ctr("task", "rm", original)
        containerd.ctr("containers", "rm", original)
        containerd.ctr("containers", "restore", "--live", restored, checkpoint, timeout=60)

        outcome = Outcome(
            status_after_checkpoint=status_after_checkpoint,
            restored_status=task_status(containerd, restored),
            lo_flags_before=before,
            lo_flags_after=lo_flags(containerd, restored),
            reads_after=read_back(containerd, restored),
        )
        if runtime == RUNC_V2:
            # The server and its data did come back: only the loopback is missing. Raise it from the host.
            subprocess.run(["nsenter", "-t", str(task_pid(containerd, restored)), "-n", "ip", "link", "set", "lo",
                            "up"], check=True, timeout=10)
            outcome.reads_after_lo_raised = read_back(containerd, restored)
        return outcome
    finally:
        remove(containerd, restored)
        remove(containerd, original)
        containerd.ctr("images", "rm", checkpoint, check=False)


def test_redis_image_is_deterministic_and_self_contained(environment: Environment, tmp_path: Path,
                                                         redis_image: TestImage):
    rebuilt = build_redis_image(tmp_path, environment.redis, busybox=environment.busybox)
    assert rebuilt.path.read_bytes() == redis_image.path.read_bytes()
    with tarfile.open(rebuilt.path) as layout:
        manifest = layout.extractfile(f"blobs/sha256/{rebuilt.manifest_digest.removeprefix('sha256:')}")
        layer_digest = json.load(manifest)["layers"][0]["digest"]
        layer = tarfile.open(fileobj=layout.extractfile(f"blobs/sha256/{layer_digest.removeprefix('sha256:')}"))
        names = set(layer.getnames())
    # the binaries, their interpreter and every library the loader resolved for them, at the paths they load from
    assert set(redis_files(environment.redis)) <= names
    assert {"usr/bin/redis-server", "usr/bin/redis-cli", "bin/busybox", "etc/passwd", "etc/group"} <= names
    assert any(name.startswith("lib64/ld-linux") or name.startswith("lib/ld-linux") for name in names)


def test_server_on_loopback_answers_after_restore(containerd: Containerd, redis_image: TestImage):
    containerd.import_image(redis_image)
    outcomes = {runtime: checkpoint_and_restore(containerd, redis_image, runtime) for runtime in RUNTIMES}

    pyshim = outcomes[PYSHIM]
    assert (pyshim.status_after_checkpoint, pyshim.restored_status) == ("RUNNING", "RUNNING")
    assert pyshim.lo_flags_before & IFF_UP
    assert pyshim.lo_flags_after & IFF_UP, f"pyshim restored the container's lo down (flags {pyshim.lo_flags_after:#x})"
    assert pyshim.reads_after == WRITTEN, "the server pyshim restored did not answer at 127.0.0.1 with its data"

    # The expected differential outcome, runc's and containerd's known behaviour (containerd#4683, CRIU#590): the
    # Go shim restores the container's network namespace with lo down, so the restored server, alive and holding its
    # data, is unreachable from its own container until someone raises lo.
    go = outcomes[RUNC_V2]
    assert (go.status_after_checkpoint, go.restored_status) == ("RUNNING", "RUNNING")
    assert go.lo_flags_before & IFF_UP
    assert not go.lo_flags_after & IFF_UP, (
        f"the Go shim restored lo up (flags {go.lo_flags_after:#x}): containerd#4683 looks fixed in this "
        "containerd/runc, so the differential half of this test no longer holds")
    assert go.reads_after == {key: UNREACHABLE for key in WRITTEN}, (
        "expected the Go shim's restored container to fail to reach 127.0.0.1 (lo down, containerd#4683)")
    assert go.reads_after_lo_raised == WRITTEN

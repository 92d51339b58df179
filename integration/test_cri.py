"""pyshim as a Kubernetes runtime handler: containerd's CRI plugin driven as kubelet drives it, on 1.6, 1.7 and 2.x.

The test containerd enables CRI (harness config.CriSettings; every other test keeps it disabled) with two runtime
handlers side by side: `pyshim` (io.containerd.pyshim.v2) and `runc` (the Go shim, io.containerd.runc.v2). Pods use
the host network (no CNI), their sandbox image is a local busybox image whose command lives until signalled (nothing
is pulled), and the CRI client is harness/cri.py over protos/cri/runtime/v1/api.proto. Every scenario runs under
both handlers and the observable outcomes are compared.

- Lifecycle: RunPodSandbox, CreateContainer/StartContainer, ContainerStatus (RUNNING, its pid a child of the pod's
  shim, whose command line is the handler's shim binary: the pod really runs under pyshim), ExecSync (stdout, stderr,
  exit code), StopContainer (the exit code of the container's TERM trap), RemoveContainer, StopPodSandbox (the shim
  exits), RemovePodSandbox.
- Kubernetes' forensic checkpoint (CRI CheckpointContainer) of a counter kept only in a shell's memory: 1.6 and 1.7
  answer Unimplemented for any handler; 2.x writes the archive (a tar holding CRIU's images) under both handlers and
  leaves the container running; the one difference is where CRIU's dump.log and stats-dump land in the archive
  (test_checkpoint_container says why).
- Restore through CRI (2.x): CreateContainer whose image is a checkpoint archive, StartContainer; under both handlers
  the counter goes on from its checkpointed value. containerd 2.1 pulls the checkpoint's base image during the
  restore, so that image is served from 127.0.0.1 by the test itself (harness/registry.py).
"""

from __future__ import annotations

import tarfile
import uuid
from pathlib import Path

import grpc
import pytest
from conftest import track_containerd
from harness import processes
from harness.containerd import CRI_NAMESPACE, Containerd
from harness.cri import STATE_NAMES, CriClient, container_config, pod_config
from harness.environment import Environment
from harness.image import TestImage, build_pause_image
from harness.registry import Registry
from harness.waiting import wait_until

from shim.api.cri.runtime.v1 import api_pb2 as cri_api

HANDLERS = ("pyshim", "runc")
RUNTIME_TYPES = {"pyshim": "io.containerd.pyshim.v2", "runc": "io.containerd.runc.v2"}
SHIM_BINARIES = {"pyshim": "containerd-shim-pyshim-v2", "runc": "containerd-shim-runc-v2"}
# Exits 7 on SIGTERM (StopContainer's first signal); `wait` returns at once when the trap fires.
WORKLOAD = "trap 'exit 7' TERM; echo ready > /tmp/ready; sleep 86400 & wait"
# Rewritten in place at a fixed width in the image's /tmp/count (harness/image.py): whatever the dump catches the
# shell holding open exists, at the same size, in the rootfs the restore starts from.
COUNTER = "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done"
WAIT = 15.0
POD_STATES = {cri_api.SANDBOX_READY: "SANDBOX_READY", cri_api.SANDBOX_NOTREADY: "SANDBOX_NOTREADY"}


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pause_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_pause_image(tmp_path_factory.mktemp("pause-image"), busybox=environment.busybox)


@pytest.fixture
def cri_containerd(request: pytest.FixtureRequest, containerd_version: str, environment: Environment,
                   test_image: TestImage, pause_image: TestImage, containerd_log_dir: Path):
    """A private containerd with CRI enabled, both images imported into CRI's namespace and known to CRI."""
    instance = Containerd(containerd_version, environment, log_dir=containerd_log_dir,
                          cri_sandbox_image=pause_image.ref)
    track_containerd(request, instance)
    try:
        instance.start()
        for image in (test_image, pause_image):
            instance.import_image(image, namespace=CRI_NAMESPACE)
        with CriClient(instance.address) as cri:
            for image in (test_image, pause_image):
                cri.wait_image(image.ref)
        yield instance
    finally:
        for note in instance.stop():
            print(f"containerd {containerd_version} (CRI) teardown: {note}")


@pytest.fixture
def cri(cri_containerd: Containerd):
    with CriClient(cri_containerd.address) as client:
        yield client


# --- helpers -----------------------------------------------------------------------------------------------------

def rpc_error(call, *args) -> tuple[str, str] | None:
    """None if the call succeeds, else (status code name, details)."""
    try:
        call(*args)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()
    return None


def run_pod(cri: CriClient, containerd: Containerd, name: str, handler: str):
    """A pod on the host network whose cgroups sit under the test namespace's (removed by the harness)."""
    config = pod_config(f"{name}-{handler}", uuid.uuid4().hex, cgroup_parent=f"/{containerd.namespace}")
    return cri.run_pod_sandbox(config, handler), config


def remove_pod(cri: CriClient, sandbox_id: str) -> None:
    """StopPodSandbox + RemovePodSandbox (which also remove the pod's containers), errors ignored: cleanup."""
    for call in (cri.stop_pod_sandbox, cri.remove_pod_sandbox):
        rpc_error(call, sandbox_id)


def runs_under(containerd: Containerd, sandbox_id: str, handler: str) -> int:
    """The pod's shim process (found by pid through /proc: adopted by our subreaper, serving the sandbox's bundle)
    after checking that its command line is the handler's shim binary."""
    shim = wait_until(lambda: containerd.shim_pid(sandbox_id, CRI_NAMESPACE), what=f"the shim of pod {sandbox_id}")
    argv = processes.cmdline(shim)
    assert any(Path(arg).name == SHIM_BINARIES[handler] for arg in argv[:3]), argv
    return shim


def counter_path(containerd: Containerd, container_id: str) -> Path:
    return containerd.bundle(container_id, CRI_NAMESPACE) / "rootfs" / "tmp" / "count"


def read_counter(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def wait_counter(path: Path, predicate, timeout: float = WAIT) -> int:
    value = wait_until(lambda: (v := read_counter(path)) is not None and predicate(v) and v, timeout,
                       f"{path} to satisfy the predicate (now {read_counter(path)!r})")
    return value


def start_counter(cri: CriClient, containerd: Containerd, image: str, sandbox_id: str, config) -> str:
    container_id = cri.create_container(sandbox_id, container_config("counter", image, "sh", "-c", COUNTER), config)
    cri.start_container(container_id)
    wait_counter(counter_path(containerd, container_id), lambda v: v >= 3)
    return container_id


def archive_members(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {member.name.removeprefix("./") for member in tar.getmembers()}


# --- 1. lifecycle ------------------------------------------------------------------------------------------------

def test_pod_lifecycle_under_pyshim_and_the_go_shim(cri_containerd: Containerd, cri: CriClient,
                                                     test_image: TestImage):
    containerd = cri_containerd
    assert cri.version().runtime_name == "containerd"

    def scenario(handler: str) -> dict:
        sandbox_id, config = run_pod(cri, containerd, "life", handler)
        try:
            outcome = {}
            status, info = cri.pod_sandbox_status(sandbox_id)
            shim = runs_under(containerd, sandbox_id, handler)
            outcome["sandbox"] = (POD_STATES[status.state], status.runtime_handler, info.get("runtimeType"),
                                  processes.parent_pid(info["pid"]) == shim)

            container_id = cri.create_container(
                sandbox_id, container_config("work", test_image.ref, "sh", "-c", WORKLOAD), config)
            created = cri.state(container_id)
            cri.start_container(container_id)
            status, info = cri.container_status(container_id)
            pid = info["pid"]
            wait_until(lambda: (containerd.bundle(container_id, CRI_NAMESPACE) / "rootfs/tmp/ready").exists(),
                       what="the workload to start")
            outcome["container"] = (
                created, cri.state(container_id), info.get("runtimeType"),
                pid > 0 and processes.is_running(pid),
                processes.parent_pid(pid) == shim,  # the pod's shim is the container's parent (subreaper) ...
                containerd.shim_pid(container_id, CRI_NAMESPACE) is None,  # ... and no other shim serves it ...
                containerd.shim_socket(container_id, CRI_NAMESPACE) == containerd.shim_socket(sandbox_id,
                                                                                               CRI_NAMESPACE),
                processes.cmdline(pid)[:2],
            )
            reply = cri.exec_sync(container_id, "sh", "-c", "cat /tmp/ready; echo out-$((6*7)); echo err >&2; exit 3")
            outcome["exec"] = (reply.stdout, reply.stderr, reply.exit_code)

            cri.stop_container(container_id, timeout=10)
            status, _ = cri.container_status(container_id)
            outcome["stopped"] = (cri.state(container_id), status.exit_code, status.reason,
                                  status.finished_at >= status.started_at > 0, processes.is_running(pid))
            cri.remove_container(container_id)
            outcome["removed"] = (rpc_error(cri.container_status, container_id) or ("still there",))[0]

            cri.stop_pod_sandbox(sandbox_id)
            status, _ = cri.pod_sandbox_status(sandbox_id)
            shim_gone = wait_until(lambda: not processes.is_running(shim), what="the pod's shim to exit")
            cri.remove_pod_sandbox(sandbox_id)
            status_error = (rpc_error(cri.pod_sandbox_status, sandbox_id) or ("still there",))[0]
            outcome["pod stopped and removed"] = (POD_STATES[status.state], shim_gone, status_error)
            return outcome
        finally:
            remove_pod(cri, sandbox_id)

    outcomes = {handler: scenario(handler) for handler in HANDLERS}
    pyshim = outcomes["pyshim"]
    assert pyshim == {
        "sandbox": ("SANDBOX_READY", "pyshim", "io.containerd.pyshim.v2", True),
        "container": ("CREATED", "RUNNING", "io.containerd.pyshim.v2", True, True, True, True, ["sh", "-c"]),
        "exec": (b"ready\nout-42\n", b"err\n", 3),
        "stopped": ("EXITED", 7, "Error", True, False),
        "removed": "NOT_FOUND",
        "pod stopped and removed": ("SANDBOX_NOTREADY", True, "NOT_FOUND"),  # the shim exited at StopPodSandbox
    }
    runc = outcomes["runc"]
    # The same under the Go shim, but for the names of the handler and runtime type.
    assert runc["sandbox"] == ("SANDBOX_READY", "runc", "io.containerd.runc.v2", True)
    assert runc["container"][2] == "io.containerd.runc.v2"
    assert {k: v for k, v in pyshim.items() if k not in ("sandbox", "container")} == \
        {k: v for k, v in runc.items() if k not in ("sandbox", "container")}
    assert pyshim["container"][:2] + pyshim["container"][3:] == runc["container"][:2] + runc["container"][3:]


# --- 2. CRI CheckpointContainer -----------------------------------------------------------------------------------

ARCHIVE_FILES = ("checkpoint/inventory.img", "checkpoint/pages-1.img", "config.dump", "spec.dump", "status.dump",
                 "rootfs-diff.tar", "stats-dump", "dump.log", "checkpoint/stats-dump", "checkpoint/dump.log")


def checkpoint_counter(cri: CriClient, containerd: Containerd, image: str, handler: str,
                       location: Path) -> tuple[dict, tuple[int, int]]:
    """A counter pod under handler, CheckpointContainer to location, the pod removed. Returns the outcome and the
    counter's values just before and just after the checkpoint."""
    sandbox_id, config = run_pod(cri, containerd, "ckpt", handler)
    try:
        runs_under(containerd, sandbox_id, handler)
        container_id = start_counter(cri, containerd, image, sandbox_id, config)
        path = counter_path(containerd, container_id)
        before = read_counter(path)
        error = rpc_error(cri.checkpoint_container, container_id, str(location))
        after = read_counter(path)
        outcome = {
            "error": error,
            "state after": cri.state(container_id),
            "counter goes on": wait_counter(path, lambda v: v >= after + 3) > after,
            "archive": location.exists(),
        }
        if location.exists():
            members = archive_members(location)
            outcome["archive holds"] = {name for name in ARCHIVE_FILES if name in members}
        return outcome, (before, after)
    finally:
        remove_pod(cri, sandbox_id)


def test_checkpoint_container(cri_containerd: Containerd, cri: CriClient, test_image: TestImage):
    """CRI CheckpointContainer (Kubernetes' forensic checkpoint: the container is left running).

    1.6/1.7: Unimplemented for any runtime (pkg/cri/server/container_checkpoint.go). 2.x: the archive under both
    handlers, one difference: containerd gives CRIU's work path (its CRI container directory) only to
    io.containerd.runc.v2 (internal/cri/server/container_checkpoint_linux.go, withCheckpointOpts: CheckpointOptions
    with WorkPath for plugins.RuntimeRuncV2 only; other runtimes get no options). So the Go shim's CRIU leaves
    dump.log and stats-dump in that directory, from where containerd copies them to the archive's top level, while
    pyshim, asked for no work path, keeps them with the images, under checkpoint/.
    """
    containerd = cri_containerd
    outcomes = {handler: checkpoint_counter(cri, containerd, test_image.ref, handler,
                                            containerd.tmp / f"checkpoint-{handler}.tar")[0]
                for handler in HANDLERS}
    if containerd.version in ("1.6", "1.7"):
        unimplemented = {"error": ("UNIMPLEMENTED", "method CheckpointContainer not implemented"),
                         "state after": "RUNNING", "counter goes on": True, "archive": False}
        assert outcomes == {"pyshim": unimplemented, "runc": unimplemented}
        return
    common = {"checkpoint/inventory.img", "checkpoint/pages-1.img", "config.dump", "spec.dump", "status.dump",
              "rootfs-diff.tar"}
    written = {"error": None, "state after": "RUNNING", "counter goes on": True, "archive": True}
    assert outcomes["runc"] == {**written, "archive holds": common | {"stats-dump", "dump.log"}}
    assert outcomes["pyshim"] == {**written, "archive holds": common | {"checkpoint/stats-dump", "checkpoint/dump.log"}}


# --- 3. restore through CRI ---------------------------------------------------------------------------------------

def test_restore_from_checkpoint_archive(cri_containerd: Containerd, cri: CriClient, test_image: TestImage):
    """containerd 2.1's CRI restore: CreateContainer whose image is a CheckpointContainer archive (CRImportCheckpoint
    unpacks it; StartContainer creates the task with the archive's checkpoint/ as CreateTaskRequest.checkpoint, which
    the shim restores from). The restored counter goes on from its checkpointed value, not from 1.

    CRImportCheckpoint pulls the checkpoint's base image by the image reference CRI recorded (ContainerStatus
    image_ref) even when it is in the local store (skipped for local images only from containerd PR #12021, after
    2.1), so the counter's image comes from a registry the test serves on 127.0.0.1 (harness/registry.py), pulled
    through CRI PullImage as kubelet would: the recorded reference is then that registry's digest reference.
    """
    containerd = cri_containerd
    if containerd.version in ("1.6", "1.7"):
        pytest.skip(f"containerd {containerd.version} cannot restore through CRI: CheckpointContainer is "
                    "Unimplemented there (pkg/cri/server/container_checkpoint.go) and CreateContainer does not import "
                    "checkpoint archives (CRI restore came with containerd 2.1, PR #10365)")
    with Registry() as registry:
        registry.configure(containerd.registry_config_dir)
        image = registry.add(test_image, "pyshim-test/busybox")
        cri.pull_image(image)

        def scenario(handler: str) -> dict:
            archive = containerd.tmp / f"restore-{handler}.tar"
            checkpointed, (low, high) = checkpoint_counter(cri, containerd, image, handler, archive)
            assert checkpointed["error"] is None and checkpointed["archive"], checkpointed
            sandbox_id, config = run_pod(cri, containerd, "restore", handler)
            try:
                shim = runs_under(containerd, sandbox_id, handler)
                container_id = cri.create_container(sandbox_id, container_config("counter", str(archive)), config)
                created = cri.state(container_id)
                cri.start_container(container_id)
                status, info = cri.container_status(container_id)
                path = counter_path(containerd, container_id)
                seen = []  # every value read until the counter is 3 past the first one the restored process wrote

                def advanced() -> bool:
                    if (value := read_counter(path)) is not None:
                        seen.append(value)
                    return len(seen) > 1 and seen[-1] >= seen[0] + 3
                wait_until(advanced, what="the restored counter to advance")
                return {
                    "created, started": (created, STATE_NAMES[status.state]),
                    "restored annotation": status.annotations.get("restored"),
                    "runtime": info.get("runtimeType"),
                    "under the pod's shim": processes.parent_pid(info["pid"]) == shim,
                    # The file comes back with the rootfs diff at the checkpointed value; the process goes on from
                    # there: never a value below it (a fresh start would write 1, 2, 3, ...).
                    "resumed": low <= seen[0] <= high + 3 and min(seen) >= low,
                }
            finally:
                remove_pod(cri, sandbox_id)

        outcomes = {handler: scenario(handler) for handler in HANDLERS}
        print(outcomes)
    restored = {"created, started": ("CREATED", "RUNNING"), "restored annotation": "true", "under the pod's shim": True,
                "resumed": True}
    assert outcomes["pyshim"] == {**restored, "runtime": "io.containerd.pyshim.v2"}
    assert outcomes["runc"] == {**restored, "runtime": "io.containerd.runc.v2"}
    assert registry.requests, "the base image was pulled from the test's registry"

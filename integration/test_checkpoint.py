"""Checkpoint and restore through containerd, pyshim against the Go runc shim, on containerd 1.6, 1.7 and 2.x.

The workload is a busybox shell that counts in a shell variable and shows each value in /tmp/count. Only the
restored memory knows the variable, so a restored counter that goes on from the checkpointed value (and does not
start again at 1) proves the restore. The counter is read on the host through the task's bundle rootfs.

Scenarios (each under pyshim and under io.containerd.runc.v2, outcomes compared):
- `ctr containers checkpoint --task --rw` into the content store, then `ctr containers restore --live` under new ids,
  once without and once with `--rw`: both counters resume; only the --rw one has the file written before the
  checkpoint.
- A paused task checkpointed with `ctr task checkpoint` stays PAUSED (its counter frozen) and resumes afterwards;
  `ctr containers checkpoint --task` refuses a paused task under both shims (ctr pauses unconditionally).
- `ctr task checkpoint --exit --image-path D --work-path W`: the task ends, D holds a complete image, W the dump
  log; a new container restores from D through its runtime options (pyshim: a `--runtime-config-path` file with
  CriuImagePath, then `ctr task start`; the Go shim: runc Options through the API, as ctr has no flag for it). On
  1.6/1.7 ctr sends these flags only to io.containerd.runc.*: pyshim gets them from `io.pyshim.checkpoint.*`
  annotations instead, and without annotations the flags are shown not to arrive.
- nerdctl's flow through containerd's gRPC API (harness.grpc_client): Tasks.Checkpoint leaving the task running,
  the criu tar read from the content store and extracted, re-imported as content and given to Tasks.Create of a new
  container as its checkpoint; Tasks.Start restores it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path

import grpc
import pycriu.images
import pytest
from harness import cgroup2_view
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.grpc_client import (
    MEDIA_CHECKPOINT_CONFIG,
    MEDIA_CRIU_TAR,
    ContainerdClient,
)
from harness.image import TestImage
from harness.tasks import each_runtime, remove, task_status, wait_status

from shim.api.containerd.runc.options import oci_pb2

# The counter is rewritten in place at a fixed width in the image's /tmp/count (harness/image.py): a dump that
# catches the shell with the file open restores into a fresh rootfs too. (Writing a new file and renaming it failed
# such a restore in CI: "Can't open file tmp/count.new on restore".)
COUNTER = ("echo written-before-checkpoint > /tmp/marker; "
           "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done")
# Where ctr puts the fifos of a task it creates without --fifo-dir (`ctr containers restore` has no such flag).
DEFAULT_FIFO_DIR = Path("/run/containerd/fifo")
ANNOTATION = "io.pyshim.checkpoint."


# --- the counter -------------------------------------------------------------------------------------------------

def read_counter(path: Path) -> int | None:
    """The counter's value, or None while the file is missing or half-written."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def wait_counter(path: Path, predicate, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read_counter(path)
        if value is not None and predicate(value):
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{path}: counter at {read_counter(path)!r} after {timeout}s")


def counter(containerd: Containerd, container_id: str) -> Path:
    return containerd.bundle(container_id) / "rootfs" / "tmp" / "count"


def resumed(path: Path, checkpointed: tuple[int, int], initial: int | None = None) -> bool:
    """True when the restored counter continues from the checkpoint: the first value its process writes lies
    between the values read just before and just after the checkpoint (with slack for the polling), and it
    advances from there. `initial` is what the file held before the restored process wrote (a --rw restore brings
    the file back with the rootfs)."""
    low, high = checkpointed
    first = wait_counter(path, lambda v: v not in (initial, 0))  # 0: the image's file, not yet rewritten
    wait_counter(path, lambda v: v >= first + 3)
    return low <= first <= high + 3


# --- tasks -------------------------------------------------------------------------------------------------------

def start_counter(containerd: Containerd, image: TestImage, runtime: str, prefix: str = "orig",
                  extra: tuple[str, ...] = ()) -> str:
    container_id = containerd.new_id(prefix)
    containerd.run(container_id, image, "sh", "-c", COUNTER, runtime=runtime, extra=extra)
    wait_counter(counter(containerd, container_id), lambda v: v >= 3)
    return container_id


def create_container(containerd: Containerd, image: TestImage, runtime: str, *flags: str) -> str:
    """`ctr containers create` of the counter (no task yet). 1.6's ctr has no --runc-root here: the Go shim's
    runc root comes with the task's options instead."""
    container_id = containerd.new_id("rest")
    runtime_flags = ["--runtime", runtime, *flags]
    if runtime == PYSHIM and "--runtime-config-path" not in flags:
        runtime_flags += ["--runtime-config-path", str(containerd.pyshim_config())]
    # `--` : 1.6's ctr would take the command's -c for its own --config
    containerd.ctr("containers", "create", *runtime_flags, image.ref, container_id, "--", "sh", "-c", COUNTER)
    return container_id


def remove_default_fifos(container_id: str) -> None:
    """The fifo dirs `ctr containers restore` made for a task under /run/containerd/fifo (ctr never removes them):
    each holds `<id>-stdout` and friends, and the ids are unique to this test."""
    for stdout in DEFAULT_FIFO_DIR.glob(f"*/{container_id}-stdout"):
        shutil.rmtree(stdout.parent, ignore_errors=True)


def in_own_cgroup(containerd: Containerd, container_id: str) -> bool:
    """Whether the task's init lives in the cgroup its container's spec names (cgroupsPath: /<namespace>/<id> of
    the container whose spec it is; `ctr containers restore` keeps the checkpointed one's): in the unified hierarchy
    in the cgroup v2 view, in the v1 freezer hierarchy (runc's pause) otherwise."""
    line = next(line for line in containerd.ctr("task", "ls").stdout.splitlines() if line.split()[:1] == [container_id])
    entries = [entry.split(":", 2) for entry in Path(f"/proc/{line.split()[1]}/cgroup").read_text().splitlines()]
    if containerd.cgroup2:
        path = next(path for hierarchy, _, path in entries if hierarchy == "0")
    else:
        path = next(path for _, controllers, path in entries if "freezer" in controllers.split(","))
    spec = json.loads((containerd.bundle(container_id) / "config.json").read_text())
    return path == spec["linux"]["cgroupsPath"]


def end_restored(containerd: Containerd, container_id: str) -> None:
    """SIGKILL a restored task's init by pid (not --all, which goes by the container's cgroup: under the Go shim in
    the cgroup v2 view the restored processes are in the checkpointed container's), then remove it."""
    containerd.ctr("task", "kill", "-s", "KILL", container_id, check=False)
    wait_status(containerd, container_id, "STOPPED")
    remove(containerd, container_id)


def same_but_the_go_shims_restored_cgroup(containerd: Containerd, go, ours, restored_keys: tuple[str, ...]):
    """The Go shim's outcome with its restored tasks' own-cgroup flags (last item of each restored_keys entry)
    taken as pyshim's, after asserting that in the cgroup v2 view they are False: runc (1.1) tells CRIU the new
    container's cgroup on v1 only, so under the Go shim the restored processes go back to the cgroup they were
    checkpointed in; pyshim names the new one to CRIU itself (shim/cgroups/runc_path.py)."""
    if not containerd.cgroup2:
        return go
    go = dict(go)
    for key in restored_keys:
        assert go[key][-1] is False, (key, go[key])
        go[key] = (*go[key][:-1], ours[key][-1])
    print(f"NOTE go-runc shim, cgroup v2: restored tasks outside their own cgroup ({', '.join(restored_keys)})")
    return go


def image_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


# --- 1. ctr containers checkpoint / restore ------------------------------------------------------------------------

@pytest.mark.cgroup_v2
def test_containers_checkpoint_and_live_restore_under_new_ids(containerd: Containerd, test_image: TestImage):
    def scenario(runtime):
        original = start_counter(containerd, test_image, runtime)
        ref = f"localhost/pyshim-test/checkpoint/{original}:1"
        restored = {}
        try:
            path = counter(containerd, original)
            before = read_counter(path)
            containerd.ctr("containers", "checkpoint", "--task", "--rw", original, ref)
            after = read_counter(path)
            running = task_status(containerd, original)
            advancing = wait_counter(path, lambda v: v >= after + 2) > after  # leave-running: it goes on
            remove(containerd, original)  # the restores must not lean on it

            outcome = {"original after checkpoint": (running, advancing)}
            for rw in (False, True):
                restored[rw] = containerd.new_id("rest")
                containerd.ctr("containers", "restore", "--live", *(["--rw"] if rw else []), restored[rw], ref)
                path = counter(containerd, restored[rw])
                marker = path.parent / "marker"
                outcome[f"restore --live{' --rw' if rw else ''}"] = (
                    resumed(path, (before, after), initial=read_counter(path)),
                    task_status(containerd, restored[rw]), marker.exists(), in_own_cgroup(containerd, restored[rw]))
            return outcome
        finally:
            remove(containerd, original)
            for container_id in restored.values():
                end_restored(containerd, container_id)
            for container_id in restored.values():
                remove_default_fifos(container_id)
            containerd.ctr("images", "rm", ref, check=False)

    outcomes = each_runtime(scenario)
    assert outcomes[PYSHIM] == {
        "original after checkpoint": ("RUNNING", True),
        # the counter resumes, in the cgroup the spec names; the rootfs is the image's
        "restore --live": (True, "RUNNING", False, True),
        "restore --live --rw": (True, "RUNNING", True, True),  # ... and with --rw the file written before comes back
    }
    # (The restored containers' spec is the checkpointed one's, cgroupsPath included: the cgroup CRIU recorded is the
    # one the spec names, so the Go shim's restore lands there on cgroup v2 too.)
    assert outcomes[PYSHIM] == outcomes[RUNC_V2]


# --- 2. a paused task --------------------------------------------------------------------------------------------

@pytest.mark.cgroup_v2
def test_paused_task_checkpointed_stays_paused_and_resumes(containerd: Containerd, test_image: TestImage):
    def scenario(runtime):
        container_id = start_counter(containerd, test_image, runtime)
        path = counter(containerd, container_id)
        try:
            containerd.ctr("task", "pause", container_id)
            paused = wait_status(containerd, container_id, "PAUSED")
            frozen_at = read_counter(path)
            # ctr task checkpoint sees PAUSED and neither pauses nor resumes (containerd's TestCheckpointOnPauseStatus)
            image = containerd.ctr("task", "checkpoint", container_id).stdout.strip()
            after_checkpoint = task_status(containerd, container_id)
            # ctr containers checkpoint pauses whatever the state: both shims refuse, the task stays paused
            refused = containerd.ctr("containers", "checkpoint", "--task", container_id,
                                     f"localhost/pyshim-test/checkpoint/{container_id}:paused", check=False)
            after_refusal = task_status(containerd, container_id)
            time.sleep(0.3)
            still_frozen = read_counter(path) == frozen_at
            containerd.ctr("task", "resume", container_id)
            running = wait_status(containerd, container_id, "RUNNING")
            advanced = wait_counter(path, lambda v: v >= frozen_at + 3) > frozen_at
            listed = image in containerd.ctr("images", "ls", "-q").stdout.split()
            return (paused, after_checkpoint, listed, refused.returncode != 0, "paused" in refused.stderr,
                    after_refusal, still_frozen, running, advanced)
        finally:
            remove(containerd, container_id)

    outcomes = each_runtime(scenario)
    assert outcomes[PYSHIM] == ("PAUSED", "PAUSED", True, True, True, "PAUSED", True, "RUNNING", True)
    assert outcomes[PYSHIM] == outcomes[RUNC_V2]


# --- 3. ctr task checkpoint --exit --image-path --work-path ----------------------------------------------------

def _flags_reach(containerd: Containerd, runtime: str) -> bool:
    """Whether ctr sends CheckpointOptions to this runtime: 1.6/1.7 only to io.containerd.runc.*, 2.x to any."""
    return runtime == RUNC_V2 or containerd.version.split(".")[0] != "1"


@pytest.mark.cgroup_v2
def test_task_checkpoint_exit_into_image_path_and_restore_from_it(containerd: Containerd, test_image: TestImage):
    def scenario(runtime):
        images, work = containerd.tmp / f"images-{runtime}", containerd.tmp / f"work-{runtime}"
        restore_work = containerd.tmp / f"restore-work-{runtime}"
        options = []
        if not _flags_reach(containerd, runtime):
            # the same options per container, where ctr cannot send them: annotations (runc flag names)
            options = ["--annotation", f"{ANNOTATION}leave-running=false",
                       "--annotation", f"{ANNOTATION}image-path={images}",
                       "--annotation", f"{ANNOTATION}work-path={work}"]
        original = start_counter(containerd, test_image, runtime, extra=tuple(options))
        restored = None
        try:
            before = read_counter(counter(containerd, original))
            containerd.ctr("task", "checkpoint", "--exit", "--image-path", str(images), "--work-path", str(work),
                           original)
            stopped = wait_status(containerd, original, "STOPPED")
            last = read_counter(counter(containerd, original))
            files = image_files(images)
            outcome = {"after checkpoint": (stopped, "inventory.img" in files, "pages-1.img" in files,
                                            (work / "dump.log").is_file())}

            restored, failure = restore_from_image_path(containerd, test_image, runtime, images, restore_work)
            assert failure is None, failure
            outcome["restored"] = (resumed(counter(containerd, restored), (before, last)),
                                   task_status(containerd, restored), (restore_work / "restore.log").is_file(),
                                   in_own_cgroup(containerd, restored))
            if runtime == PYSHIM:
                record = json.loads((images / "pyshim-checkpoint.json").read_text())
                modes = {stat.S_IMODE(p.stat().st_mode) for p in images.iterdir()}
                outcome["pyshim image"] = (record["options"]["leave_running"], record["options"]["image_path"],
                                           stat.S_IMODE(images.stat().st_mode), modes)
            return outcome
        finally:
            remove(containerd, original)
            if restored is not None:
                end_restored(containerd, restored)

    outcomes = each_runtime(scenario)
    pyshim_image = outcomes[PYSHIM].pop("pyshim image")
    assert outcomes[PYSHIM] == {"after checkpoint": ("STOPPED", True, True, True),
                                "restored": (True, "RUNNING", True, True)}
    assert outcomes[PYSHIM] == same_but_the_go_shims_restored_cgroup(containerd, outcomes[RUNC_V2], outcomes[PYSHIM],
                                                                     ("restored",))
    # pyshim's own record of the options, and its image private (runc leaves the images world-readable)
    assert pyshim_image == (False, str(containerd.tmp / f"images-{PYSHIM}"), 0o700, {0o600})


def restore_from_image_path(containerd: Containerd, image: TestImage, runtime: str, images: Path,
                            work: Path) -> tuple[str, str | None]:
    """A new counter container whose task restores from the image directory; (its id, the error if the restore
    failed). pyshim reads runc's options by their TOML names from its runtime options file; for the Go shim, ctr has
    no flag for CriuImagePath: the API, as the Go client's WithRestoreImagePath does."""
    if runtime == PYSHIM:
        config = containerd.tmp / f"pyshim-restore-{images.name}.toml"
        config.write_text(f'BinaryName = "runc"\nRoot = "{containerd.runc_root}"\n'
                          f'CriuImagePath = "{images}"\nCriuWorkPath = "{work}"\n')
        restored = create_container(containerd, image, runtime, "--runtime-config-path", str(config))
        started = containerd.ctr("task", "start", "-d", "--fifo-dir", str(containerd.fifo_dir), restored, check=False)
        return restored, started.stderr if started.returncode else None
    restored = create_container(containerd, image, runtime)
    with ContainerdClient(containerd.address, containerd.namespace) as api:
        try:
            api.create_task(restored, options=oci_pb2.Options(
                root=str(containerd.runc_root), criu_image_path=str(images), criu_work_path=str(work)))
            api.start_task(restored)
        except grpc.RpcError as exc:
            return restored, exc.details()
    return restored, None


@pytest.mark.parametrize("containerd_version", ["1.6", "1.7"], ids=lambda v: f"containerd-{v}")
def test_task_checkpoint_flags_do_not_reach_pyshim_on_1x(containerd: Containerd, test_image: TestImage):
    """Why the annotations above: ctr 1.6/1.7 drop --exit/--image-path for a runtime not named io.containerd.runc.*,
    so pyshim checkpoints into containerd's content store and the task keeps running."""
    images = containerd.tmp / "images"
    container_id = start_counter(containerd, test_image, PYSHIM)
    try:
        containerd.ctr("task", "checkpoint", "--exit", "--image-path", str(images), container_id)
        assert task_status(containerd, container_id) == "RUNNING"
        assert not images.exists()
        # (ctr prints no image name when given --image-path, but containerd made one)
        assert any(name.startswith(f"containerd.io/checkpoint/{container_id}:")
                   for name in containerd.ctr("images", "ls", "-q").stdout.split())
    finally:
        remove(containerd, container_id)


# --- 4. the gRPC API, as nerdctl drives it ---------------------------------------------------------------------

def _tar_directory(directory: Path) -> bytes:
    """The directory as an uncompressed tar of its entries by relative name (nerdctl re-imports with
    containerd's archive.Diff, which writes the same for a flat directory)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(directory)):
            tar.add(directory / name, arcname=name)
    return buffer.getvalue()


def test_nerdctl_style_checkpoint_extract_and_start_from_it(containerd: Containerd, test_image: TestImage):
    def scenario(runtime):
        original = start_counter(containerd, test_image, runtime)
        restored = None
        try:
            # (under a lease, as nerdctl's client: the checkpoint's blobs have no GC label of their own)
            with ContainerdClient(containerd.address, containerd.namespace) as api, api.lease():
                path = counter(containerd, original)
                before = read_counter(path)
                # `nerdctl checkpoint create --leave-running`: Tasks.Checkpoint with exit unset, into the content store
                blobs = api.checkpoint(original, oci_pb2.CheckpointOptions(exit=False))
                after = read_counter(path)
                running = task_status(containerd, original)
                criu = next(blob for blob in blobs if blob.media_type == MEDIA_CRIU_TAR)
                checkpoint_dir = containerd.tmp / "checkpoints" / f"{runtime}-cp1"
                checkpoint_dir.mkdir(parents=True)
                with tarfile.open(fileobj=io.BytesIO(api.read(criu.digest))) as tar:
                    tar.extractall(checkpoint_dir, filter="data")
                extracted = image_files(checkpoint_dir)
                remove(containerd, original)

                # `nerdctl start --checkpoint cp1`, into a new container: the directory back into content as a
                # criu tar, named as the task's checkpoint; containerd extracts it for the shim
                restored = create_container(containerd, test_image, runtime)
                blob = api.write(_tar_directory(checkpoint_dir), MEDIA_CRIU_TAR, f"checkpoint-{restored}")
                options = oci_pb2.Options(root=str(containerd.runc_root)) if runtime == RUNC_V2 else None
                api.create_task(restored, checkpoint=blob, options=options)
                api.start_task(restored)
                outcome = (running, sorted(b.media_type for b in blobs), "inventory.img" in extracted,
                           resumed(counter(containerd, restored), (before, after)), task_status(containerd, restored))
                api.delete_content(blob.digest)
                return outcome, extracted
        finally:
            for container_id in filter(None, (original, restored)):
                remove(containerd, container_id)

    outcomes = each_runtime(scenario)
    assert outcomes[PYSHIM][0] == ("RUNNING", sorted([MEDIA_CHECKPOINT_CONFIG, MEDIA_CRIU_TAR]), True, True,
                                   "RUNNING")
    assert outcomes[PYSHIM][0] == outcomes[RUNC_V2][0]
    # pyshim's record of the options travels with the images through the content store
    assert "pyshim-checkpoint.json" in outcomes[PYSHIM][1]


# --- 5. manage-cgroups-mode on cgroup v2 ---------------------------------------------------------------------------

def recorded_cgroup_dirs(images: Path) -> set[str]:
    """Every cgroup directory (as a path) the dump recorded in cgroup.img, in any hierarchy."""
    if not (images / "cgroup.img").exists():
        return set()
    with open(images / "cgroup.img", "rb") as f:
        image = pycriu.images.load(f)

    def walk(directories, prefix):
        for directory in directories:
            path = f"{prefix}/{directory['dir_name']}".replace("//", "/")
            yield path
            yield from walk(directory.get("children") or [], path)

    return {path for entry in image["entries"] for controller in entry.get("controllers") or []
            for path in walk(controller.get("dirs") or [], "")}


@pytest.mark.parametrize(("containerd_version", "cgroup_view"), [("2", "cgroup-v2")], indirect=["cgroup_view"],
                         ids=["containerd-2-cgroup-v2"])
@pytest.mark.parametrize("mode", ["soft", "full", "strict", "ignore"])
def test_manage_cgroups_mode_on_cgroup_v2(containerd: Containerd, test_image: TestImage, mode: str):
    """`runc checkpoint --manage-cgroups-mode` through CheckpointOptions.cgroups_mode, each value, then a restore into
    a new container, in the cgroup v2 view. Both shims' dumps record the container's v2 cgroup (pyshim's not with
    ignore; the Go shim's whatever the mode).
    A restore under pyshim honours the mode the checkpoint was taken with (strict is refused by CRIU: runc has made
    the new container's cgroup already) and puts the task in the new container's cgroup; the Go shim restores in
    CRIU's default mode whatever the checkpoint said, into the checkpointed container's cgroup (runc 1.1 names no
    cgroup root to CRIU on v2). Limits cannot be shown here (the memory controller is v1's on these hosts:
    harness/cgroup2_view.py), which test_checkpoint_options.test_manage_cgroups_mode shows on the host's cgroups."""
    def scenario(runtime):
        images = containerd.tmp / f"cg-{mode}-{runtime}"
        work, restore_work = containerd.tmp / f"cg-work-{runtime}", containerd.tmp / f"cg-rwork-{runtime}"
        original = start_counter(containerd, test_image, runtime)
        restored = None
        try:
            before = read_counter(counter(containerd, original))
            with ContainerdClient(containerd.address, containerd.namespace) as api:
                api.checkpoint(original, oci_pb2.CheckpointOptions(
                    exit=True, image_path=str(images), work_path=str(work), cgroups_mode=mode))
            wait_status(containerd, original, "STOPPED")
            last = read_counter(counter(containerd, original))
            recorded = f"/{containerd.namespace}/{original}" in recorded_cgroup_dirs(images)
            restored, failure = restore_from_image_path(containerd, test_image, runtime, images, restore_work)
            if failure is not None:
                return recorded, "refused" if "Abort restore of existing cgroups" in failure else failure
            return recorded, (resumed(counter(containerd, restored), (before, last)),
                              task_status(containerd, restored), in_own_cgroup(containerd, restored))
        finally:
            remove(containerd, original)
            if restored is not None:
                end_restored(containerd, restored)

    outcomes = each_runtime(scenario)
    recorded = mode != "ignore"
    assert outcomes[PYSHIM] == (recorded, "refused" if mode == "strict" else (True, "RUNNING", True))
    # The Go shim's dump records the cgroup with ignore too (runc 1.1 lists soft, full and strict only).
    assert outcomes[RUNC_V2] == (True, (True, "RUNNING", False))
    print(f"NOTE limits not restored or compared: {cgroup2_view.NO_V1_CONTROLLERS}")

"""Bad input to a running shim (containerd 2.x), pyshim with the Go runc shim's outcome beside it: each case runs
against both shims, both outcomes are printed, pyshim's is asserted (the Go shim's is recorded in
docs/checkpoint.md, "Bad input: pyshim beside the Go shim").

pyshim: each is a clear error, the shim stays up and the task with it, and nothing is written outside what was asked.

- hostile `io.pyshim.checkpoint.*` annotation values (NaN / negative / infinite timeout, a shell command as an
  option value, an unknown option, relative, `..`, /proc and /sys paths): Checkpoint is an InvalidArgument naming the
  option; the task is RUNNING, the same shim serves it, the path named was not created.
- image and work paths of `ctr task checkpoint` (CheckpointOptions image_path/work_path): relative, with `..`, a
  symbolic link as the last component, a symbolic link on the way into /proc, /proc/self/cwd (which resolves into the
  shim's bundle): refused the same way; the directory a link points to stays empty.
- a restore's criu_image_path / criu_work_path (runc Options, the way containerd hands a restore to a shim): with
  `..`, in /proc, a work path that is a symbolic link: the task's Start fails with the same kind of error.
- the shim's ttrpc socket: a peer of another uid gets nothing (refused by the socket's mode or the shim); garbage, a
  frame declaring 4 GiB, and a truncated frame are each dropped with their connection; 64 idle connections held open
  do not stop containerd's calls from being answered, and once closed the shim's descriptors are back where they
  were.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.grpc_client import ContainerdClient
from harness.image import TestImage
from harness.tasks import task_status, wait_status

from shim.api.containerd.runc.options import oci_pb2

pytestmark = pytest.mark.parametrize("containerd_version", ["2"], ids=lambda v: f"containerd-{v}")
ANNOTATION = "io.pyshim.checkpoint."
WAIT = 10.0
SHIMS = (PYSHIM, RUNC_V2)
NAMES = {PYSHIM: "pyshim", RUNC_V2: "Go shim"}


@pytest.fixture
def lab(containerd: Containerd) -> Iterator[Path]:
    """A directory of the test's own, in the containerd's temp dir; containers named run-* removed at the end."""
    path = containerd.tmp / f"hostile-{secrets.token_hex(3)}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_sleeper(containerd: Containerd, image: TestImage, runtime: str = PYSHIM,
                annotations: dict[str, str] | None = None) -> str:
    container_id = containerd.new_id("hostile")
    extra = []
    for name, value in (annotations or {}).items():
        extra += ["--annotation", f"{ANNOTATION}{name}={value}"]
    containerd.run(container_id, image, "sleep", "3600", runtime=runtime, extra=extra)
    wait_status(containerd, container_id, "RUNNING", timeout=WAIT)
    return container_id


def remove(containerd: Containerd, container_id: str) -> None:
    containerd.ctr("task", "rm", "-f", container_id, check=False, timeout=30)
    containerd.ctr("containers", "rm", container_id, check=False)


def one_line(text: str, limit: int = 160) -> str:
    return " ".join(text.split())[-limit:]


def attempt_checkpoint(containerd: Containerd, container_id: str, *flags: str) -> dict:
    """`ctr task checkpoint` with flags: whether it was refused, ctr's error (the shim's message without its code),
    the task's status after it, whether the same shim still serves it."""
    shim = containerd.shim_pid(container_id)
    result = containerd.ctr("task", "checkpoint", *flags, container_id, check=False, timeout=60)
    return {"refused": result.returncode != 0, "error": one_line(result.stderr),
            "status": task_status(containerd, container_id), "same shim": containerd.shim_pid(container_id) == shim}


def refused(outcome: dict, expected: str) -> bool:
    """pyshim's outcome for a bad input: refused naming it, the task running under the same shim."""
    return (outcome["refused"], expected in outcome["error"], outcome["status"], outcome["same shim"]) == \
        (True, True, "RUNNING", True)


def show(case: object, outcomes: dict) -> None:
    for runtime, outcome in outcomes.items():
        print(f"{NAMES[runtime]:8} {case}: {outcome}")


HOSTILE_ANNOTATIONS = [
    ({"timeout": "nan"}, "timeout nan"),
    ({"timeout": "-1"}, "timeout -1"),
    ({"timeout": "1e999"}, "timeout inf"),
    ({"leave-running": "$(touch /tmp/pwned)"}, "not a boolean"),
    ({"manage-cgroups-mode": "soft; reboot"}, "manage-cgroups-mode"),
    ({"engine": "/bin/sh"}, "engine '/bin/sh'"),
    ({"no-such-option": "1"}, "unknown checkpoint option 'no-such-option'"),
    ({"page-server": "no-port"}, "page-server"),
    ({"image-path": "relative/images"}, "must be an absolute path"),
    ({"image-path": "/tmp/../etc/pyshim-hostile"}, "must not contain '..'"),
    ({"image-path": "/proc/self/pyshim-hostile"}, "kernel filesystem"),
    ({"work-path": "/sys/fs/pyshim-hostile"}, "kernel filesystem"),
]


def test_hostile_annotation_values_are_refused_by_name(containerd: Containerd, test_image: TestImage):
    wrong = []
    for hostile, expected in HOSTILE_ANNOTATIONS:
        outcomes = {}
        for runtime in SHIMS:
            container_id = run_sleeper(containerd, test_image, runtime, hostile)
            try:
                # No --image-path: containerd's own temp dir is the lowest layer, so image-path annotations apply.
                outcomes[runtime] = attempt_checkpoint(containerd, container_id)
            finally:
                remove(containerd, container_id)
        show(hostile, outcomes)
        if not refused(outcomes[PYSHIM], expected):
            wrong.append((hostile, outcomes[PYSHIM]))
    assert wrong == []
    assert not Path("/tmp/pwned").exists()
    assert not Path("/etc/pyshim-hostile").exists()


def listing(*roots: Path) -> set[str]:
    """Every path under roots (symbolic links not followed; a bundle's rootfs left out: the container's own)."""
    found = set()
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not (directory == str(root) and d == "rootfs")]
            found.update(os.path.join(directory, name) for name in subdirs + files)
    return found


# Paths a checkpoint given /proc/self/cwd or /dev paths could create outside the lab and the bundle.
ELSEWHERE = (Path("/dev/pyshim-work"), Path("/pyshim-images"))


def test_hostile_checkpoint_paths_are_refused_and_nothing_is_written(containerd: Containerd, test_image: TestImage,
                                                                   lab: Path):
    elsewhere = lab / "elsewhere"
    elsewhere.mkdir()
    (lab / "link-to-elsewhere").symlink_to(elsewhere)
    (lab / "link-to-proc").symlink_to("/proc")
    (lab / "sub").mkdir()
    cases = [
        (("--image-path", "relative/images"), "must be an absolute path"),
        (("--image-path", f"{lab}/sub/../images"), "must not contain '..'"),
        (("--image-path", str(lab / "link-to-elsewhere")), "symbolic link"),
        (("--image-path", f"{lab}/link-to-proc/pyshim-images"), "kernel filesystem"),
        (("--image-path", "/proc/self/cwd/pyshim-images"), "kernel filesystem"),
        (("--image-path", str(lab / "images"), "--work-path", str(lab / "link-to-elsewhere")), "symbolic link"),
        (("--image-path", str(lab / "images"), "--work-path", "/dev/pyshim-work"), "kernel filesystem"),
    ]
    outcomes: dict[str, list[dict]] = {}
    for runtime in SHIMS:
        container_id = run_sleeper(containerd, test_image, runtime)
        outcomes[runtime] = []
        try:
            bundle = containerd.bundle(container_id)
            before = listing(lab, bundle)
            for flags, _ in cases:
                outcome = attempt_checkpoint(containerd, container_id, *flags)
                written = sorted(listing(lab, bundle) - before) + [str(p) for p in ELSEWHERE if p.exists()]
                outcome["written"] = [p.replace(str(lab), "<lab>").replace(str(bundle), "<bundle>") for p in written]
                outcomes[runtime].append(outcome)
                # What the Go shim wrote goes, so that every case starts from the same ground.
                for path in sorted(written, key=len, reverse=True):
                    if os.path.islink(path) or not os.path.isdir(path):
                        os.unlink(path)
                    else:
                        shutil.rmtree(path, ignore_errors=True)
            if runtime == PYSHIM:
                # The same task still checkpoints where it is asked to.
                containerd.ctr("task", "checkpoint", "--image-path", str(lab / "images"), container_id, timeout=60)
                assert (lab / "images" / "inventory.img").exists()
                assert task_status(containerd, container_id) == "RUNNING"
                shutil.rmtree(lab / "images")
        finally:
            remove(containerd, container_id)
    for n, (flags, _) in enumerate(cases):
        show(flags, {runtime: outcomes[runtime][n] for runtime in SHIMS})
    wrong = [(flags, outcomes[PYSHIM][n]) for n, (flags, expected) in enumerate(cases)
             if not refused(outcomes[PYSHIM][n], expected) or outcomes[PYSHIM][n]["written"]]
    assert wrong == []


def restore_attempt(containerd: Containerd, image: TestImage, runtime: str, lab: Path, image_path: str,
                    work_path: str = "") -> dict:
    """A new container whose task restores from image_path (work_path): pyshim through its runtime options file,
    the Go shim through the API's runc Options (ctr has no flag for CriuImagePath). Whether Start failed, its error,
    and what was written in the lab."""
    container_id = containerd.new_id("hostile-restore")
    before = listing(lab)
    try:
        if runtime == PYSHIM:
            config = lab.parent / f"{container_id}.toml"
            work = f'\nCriuWorkPath = "{work_path}"' if work_path else ""
            config.write_text(f'BinaryName = "runc"\nRoot = "{containerd.runc_root}"\n'
                              f'CriuImagePath = "{image_path}"{work}\n')
            flags = containerd.runtime_flags(PYSHIM)
            flags[flags.index("--runtime-config-path") + 1] = str(config)
            i = flags.index("--fifo-dir")
            del flags[i:i + 2]
            containerd.ctr("containers", "create", *flags, image.ref, container_id, "sleep", "3600")
            result = containerd.ctr("task", "start", "-d", container_id, check=False, timeout=60)
            failed, error = result.returncode != 0, result.stderr
        else:
            containerd.ctr("containers", "create", "--runtime", RUNC_V2, image.ref, container_id, "sleep", "3600")
            with ContainerdClient(containerd.address, containerd.namespace) as api:
                try:
                    api.create_task(container_id, options=oci_pb2.Options(
                        root=str(containerd.runc_root), criu_image_path=image_path, criu_work_path=work_path))
                    api.start_task(container_id)
                    failed, error = False, ""
                except grpc.RpcError as exc:
                    failed, error = True, exc.details() or ""
        return {"failed": failed, "error": one_line(error),
                "written": sorted(p.replace(str(lab), "<lab>") for p in listing(lab) - before)}
    finally:
        remove(containerd, container_id)


def test_hostile_restore_paths_are_refused(containerd: Containerd, test_image: TestImage, lab: Path):
    source = run_sleeper(containerd, test_image)
    images = lab / "images"
    try:
        containerd.ctr("task", "checkpoint", "--image-path", str(images), source, timeout=60)
    finally:
        remove(containerd, source)
    (lab / "work-elsewhere").mkdir()
    (lab / "work-link").symlink_to(lab / "work-elsewhere")
    cases = [
        ((f"{lab}/x/../images", ""), "must not contain '..'"),
        (("/proc/self/cwd", ""), "kernel filesystem"),
        ((str(images), f"{lab}/work-link"), "symbolic link"),
    ]
    outcomes = {runtime: [restore_attempt(containerd, test_image, runtime, lab, *paths) for paths, _ in cases]
                for runtime in SHIMS}
    for n, (paths, _) in enumerate(cases):
        show(paths, {runtime: outcomes[runtime][n] for runtime in SHIMS})
    wrong = [(paths, outcomes[PYSHIM][n]) for n, (paths, expected) in enumerate(cases)
             if (outcomes[PYSHIM][n]["failed"], expected in outcomes[PYSHIM][n]["error"],
                 outcomes[PYSHIM][n]["written"]) != (True, True, [])]
    assert wrong == []


# --- the shim's socket ---------------------------------------------------------------------------------------------

def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def reaction(sock: socket.socket) -> str:
    """What the shim did with a connection after what was sent: closed it without an answer, answered, or kept it
    open without an answer for 5 s."""
    try:
        return "answered" if sock.recv(100) else "closed"
    except ConnectionResetError:
        return "closed"
    except TimeoutError:
        return "kept open, no answer"
    finally:
        sock.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stranger(path: Path) -> str:
    """A peer of another uid (nobody) connecting and sending an empty ttrpc request: what happened."""
    answers = {0: "refused by the socket's mode", 1: "closed", 2: "answered", 3: "kept open, no answer"}
    child = os.fork()
    if child == 0:
        code = 9
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                sock = connect(path)
            except PermissionError:
                code = 0
            else:
                sock.sendall(struct.pack(">IIBB", 0, 1, 1, 0))
                code = {"closed": 1, "answered": 2, "kept open, no answer": 3}[reaction(sock)]
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return answers.get(os.waitstatus_to_exitcode(status), f"exit {os.waitstatus_to_exitcode(status)}")


def socket_outcome(containerd: Containerd, image: TestImage, runtime: str) -> dict:
    container_id = run_sleeper(containerd, image, runtime)
    try:
        shim = containerd.shim_pid(container_id)
        path = containerd.shim_socket(container_id)
        assert shim and path is not None
        fds_before = fd_count(shim)
        outcome = {"other uid": stranger(path)}

        # Garbage; a frame declaring 4 GiB; a frame cut short, its connection closed mid-way.
        sock = connect(path)
        sock.sendall(os.urandom(4096))
        outcome["garbage"] = reaction(sock)
        sock = connect(path)
        sock.sendall(struct.pack(">IIBB", 0xFFFFFFFF, 1, 1, 0) + b"x" * 100)
        sock.close()
        sock = connect(path)
        sock.sendall(struct.pack(">IIBB", 100, 1, 1, 0) + b"y" * 10)
        sock.close()

        # 64 idle connections held while containerd talks to the shim.
        idle = [connect(path) for _ in range(64)]
        try:
            started = time.monotonic()
            states = [task_status(containerd, container_id)]
            containerd.ctr("task", "pause", container_id)
            states.append(task_status(containerd, container_id))
            containerd.ctr("task", "resume", container_id)
            states.append(task_status(containerd, container_id))
            outcome["served with 64 idle connections"] = (states, time.monotonic() - started < WAIT)
        finally:
            for sock in idle:
                sock.close()
        outcome["same shim"] = containerd.shim_pid(container_id) == shim
        deadline = time.monotonic() + WAIT
        while fd_count(shim) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        outcome["fds back"] = fd_count(shim) <= fds_before
        return outcome
    finally:
        remove(containerd, container_id)


def test_shim_socket_survives_strangers_garbage_and_idle_connections(containerd: Containerd, test_image: TestImage):
    outcomes = {runtime: socket_outcome(containerd, test_image, runtime) for runtime in SHIMS}
    show("socket", outcomes)
    assert outcomes[PYSHIM]["other uid"] in ("refused by the socket's mode", "closed")
    assert {k: v for k, v in outcomes[PYSHIM].items() if k != "other uid"} == {
        "garbage": "closed", "served with 64 idle connections": (["RUNNING", "PAUSED", "RUNNING"], True),
        "same shim": True, "fds back": True}

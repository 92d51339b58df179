"""Bad input to a running pyshim (containerd 2.x): each is a clear error, the shim stays up and the task with it, and
nothing is written outside what was asked.

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

import pytest
from harness.containerd import PYSHIM, Containerd
from harness.image import TestImage
from harness.tasks import task_status, wait_status

pytestmark = pytest.mark.parametrize("containerd_version", ["2"], ids=lambda v: f"containerd-{v}")
ANNOTATION = "io.pyshim.checkpoint."
WAIT = 10.0


@pytest.fixture
def lab(containerd: Containerd) -> Iterator[Path]:
    """A directory of the test's own, in the containerd's temp dir; containers named run-* removed at the end."""
    path = containerd.tmp / f"hostile-{secrets.token_hex(3)}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_sleeper(containerd: Containerd, image: TestImage, annotations: dict[str, str] | None = None) -> str:
    container_id = containerd.new_id("hostile")
    extra = []
    for name, value in (annotations or {}).items():
        extra += ["--annotation", f"{ANNOTATION}{name}={value}"]
    containerd.run(container_id, image, "sleep", "3600", runtime=PYSHIM, extra=extra)
    wait_status(containerd, container_id, "RUNNING", timeout=WAIT)
    return container_id


def remove(containerd: Containerd, container_id: str) -> None:
    containerd.ctr("task", "rm", "-f", container_id, check=False, timeout=30)
    containerd.ctr("containers", "rm", container_id, check=False)


def refused_checkpoint(containerd: Containerd, container_id: str, *flags: str) -> str:
    """`ctr task checkpoint` that must fail; the task RUNNING, its shim the same; ctr's error (ctr prints the shim's
    message without its code)."""
    shim = containerd.shim_pid(container_id)
    result = containerd.ctr("task", "checkpoint", *flags, container_id, check=False, timeout=60)
    assert result.returncode != 0, f"checkpoint with {flags} succeeded"
    assert task_status(containerd, container_id) == "RUNNING"
    assert containerd.shim_pid(container_id) == shim, "the shim was replaced or died"
    return result.stderr


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
    for hostile, expected in HOSTILE_ANNOTATIONS:
        container_id = run_sleeper(containerd, test_image, hostile)
        try:
            # No --image-path: containerd's own temp dir is the lowest layer, so image-path annotations apply.
            error = refused_checkpoint(containerd, container_id)
            assert expected in error, f"{hostile}: {error}"
        finally:
            remove(containerd, container_id)
    assert not Path("/tmp/pwned").exists()
    assert not Path("/etc/pyshim-hostile").exists()


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
    container_id = run_sleeper(containerd, test_image)
    try:
        bundle = containerd.bundle(container_id)
        before = sorted(p.name for p in bundle.iterdir())
        for flags, expected in cases:
            error = refused_checkpoint(containerd, container_id, *flags)
            assert expected in error, f"{flags}: {error}"
        assert list(elsewhere.iterdir()) == []
        assert sorted(p.name for p in lab.iterdir()) == ["elsewhere", "link-to-elsewhere", "link-to-proc", "sub"]
        assert list((lab / "sub").iterdir()) == []
        assert sorted(p.name for p in bundle.iterdir()) == before
        assert not Path("/dev/pyshim-work").exists()
        # The same task still checkpoints where it is asked to.
        containerd.ctr("task", "checkpoint", "--image-path", str(lab / "images"), container_id, timeout=60)
        assert (lab / "images" / "inventory.img").exists()
        assert task_status(containerd, container_id) == "RUNNING"
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
        (f'CriuImagePath = "{lab}/x/../images"', "must not contain '..'"),
        ('CriuImagePath = "/proc/self/cwd"', "kernel filesystem"),
        (f'CriuImagePath = "{images}"\nCriuWorkPath = "{lab}/work-link"', "symbolic link"),
    ]
    for setting, expected in cases:
        container_id = containerd.new_id("hostile-restore")
        config = lab / f"{container_id}.toml"
        config.write_text(f'BinaryName = "runc"\nRoot = "{containerd.runc_root}"\n{setting}\n')
        flags = containerd.runtime_flags(PYSHIM)
        flags[flags.index("--runtime-config-path") + 1] = str(config)
        i = flags.index("--fifo-dir")
        del flags[i:i + 2]
        try:
            containerd.ctr("containers", "create", *flags, test_image.ref, container_id, "sleep", "3600")
            result = containerd.ctr("task", "start", "-d", container_id, check=False, timeout=60)
            assert result.returncode != 0, setting
            assert expected in result.stderr, f"{setting}: {result.stderr}"
        finally:
            remove(containerd, container_id)
    assert list((lab / "work-elsewhere").iterdir()) == []


# --- the shim's socket ---------------------------------------------------------------------------------------------

def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def closed_without_answer(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_shim_socket_survives_strangers_garbage_and_idle_connections(containerd: Containerd, test_image: TestImage):
    container_id = run_sleeper(containerd, test_image)
    try:
        shim = containerd.shim_pid(container_id)
        path = containerd.shim_socket(container_id)
        assert shim and path is not None
        fds_before = fd_count(shim)

        # A peer of another uid: the socket's mode keeps it out, or the shim closes on it without an answer.
        child = os.fork()
        if child == 0:
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    sock = connect(path)
                except PermissionError:
                    code = 0
                else:
                    sock.sendall(struct.pack(">IIBB", 0, 1, 1, 0))  # an empty ttrpc request
                    code = 0 if closed_without_answer(sock) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a peer of another uid was answered"

        # Garbage; a frame declaring 4 GiB; a frame cut short, its connection closed mid-way.
        sock = connect(path)
        sock.sendall(os.urandom(4096))
        assert closed_without_answer(sock)
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
            assert task_status(containerd, container_id) == "RUNNING"
            containerd.ctr("task", "pause", container_id)
            assert task_status(containerd, container_id) == "PAUSED"
            containerd.ctr("task", "resume", container_id)
            assert task_status(containerd, container_id) == "RUNNING"
            assert time.monotonic() - started < WAIT
        finally:
            for sock in idle:
                sock.close()
        assert containerd.shim_pid(container_id) == shim
        deadline = time.monotonic() + WAIT
        while fd_count(shim) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fd_count(shim) <= fds_before, f"{fd_count(shim)} fds after, {fds_before} before"
    finally:
        remove(containerd, container_id)

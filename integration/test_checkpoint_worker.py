"""Checkpoints done by a worker process, not by the shim server (shim/criu/offload.py, shim/criu/worker.py), on
containerd 2.x under pyshim.

- Through the fork server: its checkpoint spare (`forkserver-criu`) is up once a server has been forked; five
  checkpoints of a task leave the server's RSS within 1.5 MiB of where it was (a server that imported the CRIU path
  grew by about 7 MiB), every image is complete, the task runs on.
- Without a fork server (PYSHIM_FORKSERVER=0): the server starts a worker interpreter itself; the checkpoint works.
- A worker SIGKILLed in the middle of a 300 MiB dump, its CRIU SIGSTOPped first (so CRIU cannot clean up after
  itself): the checkpoint fails naming the dead worker, CRIU is gone with it, no image is left, and the task is
  RUNNING (not left frozen) and still counting.
- 8 containers checkpointed (--exit, into image paths) in parallel, then restored from those images in parallel:
  every counter resumes from where its checkpoint caught it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import processes
from harness.containerd import PYSHIM, Containerd
from harness.image import TestImage
from harness.tasks import remove, task_status, wait_status
from harness.waiting import wait_until
from test_checkpoint import counter, create_container, read_counter, resumed, start_counter, wait_counter

pytestmark = pytest.mark.parametrize("containerd_version", ["2"], ids=lambda v: f"containerd-{v}")
WAIT = 20.0
MiB = 1 << 20


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def with_token(token: str, containerd_pid: int) -> list[int]:
    """pyshim's per-containerd processes whose command line has token (forkserver, forkserver-criu, ...)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit()
            and token in (argv := processes.cmdline(int(e))) and str(containerd_pid) in argv]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def remove_checkpoint_images(containerd: Containerd) -> None:
    """ctr records each checkpoint of a runtime other than io.containerd.runc.v2 as an image named by the second
    (containerd.io/checkpoint/ID:TIME): two in one second collide unless the first is gone."""
    for ref in containerd.ctr("images", "ls", "-q").stdout.split():
        if ref.startswith("containerd.io/checkpoint/"):
            containerd.ctr("images", "rm", ref, check=False)


def test_a_server_that_checkpoints_stays_lean(containerd: Containerd, test_image: TestImage):
    warmup = start_counter(containerd, test_image, PYSHIM, prefix="warm")  # launches the fork server
    remove(containerd, warmup)
    container_id = start_counter(containerd, test_image, PYSHIM)
    try:
        wait_until(lambda: with_token("forkserver-criu", containerd.pid), WAIT, "the fork server's checkpoint spare")
        server = containerd.shim_pid(container_id)
        assert server is not None
        before = rss_kib(server)
        for n in range(5):
            images = containerd.tmp / f"lean-{n}"
            containerd.ctr("task", "checkpoint", "--image-path", str(images), container_id, timeout=60)
            assert (images / "pyshim-checkpoint.json").is_file() and (images / "inventory.img").is_file()
            remove_checkpoint_images(containerd)
        after = rss_kib(server)
        assert containerd.shim_pid(container_id) == server
        assert task_status(containerd, container_id) == "RUNNING"
        assert after - before < 1536, f"server RSS {before} -> {after} KiB over 5 checkpoints"
        log = containerd.log_path.read_text()
        assert "starting one" not in log, "a worker was exec'd though the fork server was up"
    finally:
        remove(containerd, container_id)


@pytest.fixture
def no_forkserver(containerd_version: str, environment, test_image: TestImage, containerd_log_dir: Path):
    instance = Containerd(containerd_version, environment, log_dir=containerd_log_dir)
    instance.env["PYSHIM_FORKSERVER"] = "0"
    with instance.serving(test_image):
        yield instance


def test_without_a_fork_server_the_server_starts_its_worker(no_forkserver: Containerd, test_image: TestImage):
    c = no_forkserver
    container_id = start_counter(c, test_image, PYSHIM)
    try:
        images = c.tmp / "images"
        c.ctr("task", "checkpoint", "--image-path", str(images), container_id, timeout=60)
        assert (images / "inventory.img").is_file()
        assert task_status(c, container_id) == "RUNNING"
        assert not with_token("forkserver", c.pid)
    finally:
        remove(c, container_id)


def test_a_worker_killed_mid_dump_fails_the_checkpoint_and_leaves_the_task_running(containerd: Containerd,
                                                                                  test_image: TestImage):
    # 300 MiB touched (busybox awk holds the string), and a counter beside it to show the task runs afterwards.
    hog = (f'awk \'BEGIN {{ n = {300 * MiB}; s = "x"; while (length(s) < n) s = s s; system("exec sleep 3600") }}\' & '
           "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done")
    container_id = containerd.new_id("killw")
    containerd.run(container_id, test_image, "sh", "-c", hog, runtime=PYSHIM)
    images = containerd.tmp / "killed-images"
    try:
        path = counter(containerd, container_id)
        wait_counter(path, lambda v: v >= 3)
        init = int((containerd.bundle(container_id) / "init.pid").read_text())
        wait_until(lambda: any(int(_rss_of_child(init)) > 290 * 1024 for _ in [0]), 60, "the hog's memory")
        ctr = subprocess.Popen([*containerd.ctr_argv(), "task", "checkpoint", "--image-path", str(images),
                                container_id], env=containerd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        try:
            # The worker (comm pyshim-ckpt, working in the bundle: the one waiting for the next job has its CRIU
            # started too) once its CRIU (a process of its session other than itself) is writing the hog's pages
            # into the partial image: the task is frozen then.
            bundle = str(containerd.bundle(container_id))
            worker = wait_until(lambda: next((int(e) for e in os.listdir("/proc") if e.isdigit()
                                              and comm(int(e)) == "pyshim-ckpt" and _cwd(int(e)) == bundle
                                              and _session_members(int(e))), None),
                                WAIT, "a checkpoint worker running CRIU", poll=0.02)
            # Who to stop is read before the pages are waited for: CRIU writes 300 MiB in a fraction of a second on
            # an idle machine, and a scan of /proc between the two let a dump finish first (seen in a CI run).
            session = _session_members(worker)
            wait_until(lambda: _pages_written(images) > 1 * MiB, 30, "CRIU writing pages", poll=0.02)
            # CRIU stopped where it is: it can neither finish nor notice its worker's death and resume the task
            # itself; only the server killing the worker's session and resuming the task ends this.
            _stop(session)  # the known ones at once, then any that came since
            _stop(set(_session_members(worker)) - set(session))
            os.kill(worker, signal.SIGKILL)
            _, stderr = ctr.communicate(timeout=60)
        finally:
            if ctr.poll() is None:
                ctr.kill()
                ctr.wait()
        assert ctr.returncode != 0
        assert f"checkpoint worker pid {worker}" in stderr and "ended without an answer" in stderr, stderr
        wait_until(lambda: not any(processes.is_running(p) for p in session), 10, "CRIU ended with its worker")
        assert not images.exists()
        assert task_status(containerd, container_id) == "RUNNING"
        now = read_counter(path)
        wait_counter(path, lambda v: v >= (now or 0) + 3)  # counting, so not frozen
    finally:
        remove(containerd, container_id)


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _pages_written(images: Path) -> int:
    """Bytes of pages in the partial image a dump into images is writing (shim/criu/images.py)."""
    total = 0
    for path in images.parent.glob(f".{images.name}.pyshim-partial-*/pages-*.img"):
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def _rss_of_child(init: int) -> int:
    """The largest VmRSS (KiB) among the init's children (the awk)."""
    best = 0
    for child in processes.children_of(init):
        try:
            best = max(best, rss_kib(child))
        except (OSError, AssertionError):
            pass
    return best


def _stop(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != sid:
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[3]) == sid:
                found.append(int(entry))
    return found


def test_eight_containers_checkpointed_and_restored_in_parallel(containerd: Containerd, test_image: TestImage):
    originals = [start_counter(containerd, test_image, PYSHIM, prefix=f"par{n}") for n in range(8)]
    restored: list[str] = []
    try:
        def checkpoint(container_id: str) -> tuple[int, int]:
            path = counter(containerd, container_id)
            before = read_counter(path)
            containerd.ctr("task", "checkpoint", "--exit", "--image-path", str(containerd.tmp / f"img-{container_id}"),
                           container_id, timeout=120)
            wait_status(containerd, container_id, "STOPPED", timeout=WAIT)
            return before, read_counter(path)

        with ThreadPoolExecutor(8) as pool:
            caught = dict(zip(originals, pool.map(checkpoint, originals), strict=True))
        for container_id in originals:
            assert (containerd.tmp / f"img-{container_id}" / "pyshim-checkpoint.json").is_file(), container_id
            remove(containerd, container_id)

        def restore(container_id: str) -> tuple[str, str, bool]:
            config = containerd.tmp / f"restore-{container_id}.toml"
            config.write_text(f'BinaryName = "runc"\nRoot = "{containerd.runc_root}"\n'
                              f'CriuImagePath = "{containerd.tmp / f"img-{container_id}"}"\n')
            new = create_container(containerd, test_image, PYSHIM, "--runtime-config-path", str(config))
            restored.append(new)
            containerd.ctr("task", "start", "-d", "--fifo-dir", str(containerd.fifo_dir), new, timeout=120)
            # Read at once, in this thread: the counter runs on meanwhile (10 a second).
            return new, task_status(containerd, new), resumed(counter(containerd, new), caught[container_id])

        with ThreadPoolExecutor(8) as pool:
            results = dict(zip(originals, pool.map(restore, originals), strict=True))
        outcomes = {original: (status, ok) for original, (_, status, ok) in results.items()}
        assert outcomes == {original: ("RUNNING", True) for original in originals}
    finally:
        for container_id in (*originals, *restored):
            remove(containerd, container_id)

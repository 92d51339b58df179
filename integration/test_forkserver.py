"""pyshim's fork server under real containerd: the first container's `start` forks the shim server itself and
launches a fork server; later ones are forked by it, and must be indistinguishable from the first kind to containerd
and the host (cgroups, command line, process tree). A fork server never serves code other than what it imported,
exits when idle or when its containerd goes, and leaves nothing for the harness's teardown.

Each test's containerd has its own fork server (they are per containerd process), so tests never share one.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from harness import processes
from harness.containerd import PYSHIM, Containerd
from harness.environment import Environment
from harness.image import TestImage
from harness.waiting import wait_until

from shim.forkserver import wire

WAIT = 20.0
CGROUP_ROOT = Path("/sys/fs/cgroup")


def fork_server_argv(pid: int) -> list[str] | None:
    argv = processes.cmdline(pid)
    if "forkserver" not in argv or len(argv) < argv.index("forkserver") + 5:
        return None
    return argv[argv.index("forkserver") + 1:]


def fork_server_socket(pid: int) -> str | None:
    rest = fork_server_argv(pid)
    if rest is None:
        return None
    return wire.socket_path(wire.RUN_DIR, wire.server_key(rest[2], int(rest[0]), int(rest[1])))


def spares(containerd: Containerd) -> list[int]:
    """The fork server's spare (forked in advance to become the next shim server): `forkserver-spare`."""
    return [pid for pid in containerd.adopted() if "forkserver-spare" in processes.cmdline(pid)
            and str(containerd.pid) in processes.cmdline(pid) and processes.is_running(pid)]


def no_children(pid: int) -> bool:
    """The fork server has no child: its short-lived intermediates come and go within milliseconds."""
    return wait_until(lambda: processes.children_of(pid) == [], timeout=5, what=f"{pid} without children")


def fork_servers(containerd: Containerd) -> list[int]:
    """Fork servers of this containerd process: adopted by its subreaper, naming its pid."""
    return [pid for pid in containerd.adopted()
            if (rest := fork_server_argv(pid)) and rest[0] == str(containerd.pid) and processes.is_running(pid)]


def serving_fork_server(containerd: Containerd, other_than: int | None = None) -> int:
    """The fork server of this containerd once it listens on its socket."""
    def ready():
        for pid in fork_servers(containerd):
            path = fork_server_socket(pid)
            if pid != other_than and path and pid in processes.unix_socket_listeners(path):
                return pid
        return None

    return wait_until(ready, WAIT, what=f"containerd {containerd.version}'s fork server")


def origin(containerd: Containerd, container_id: str) -> str:
    """How the shim server of container_id came to be, from its start-up log line in containerd's log."""
    pattern = re.compile(rf"pyshim serving namespace \S+ id {re.escape(container_id)} \(pid \d+, ([^)]*)\)")
    found = wait_until(lambda: pattern.findall(containerd.log_path.read_text(errors="replace")), WAIT,
                       what=f"the start-up log line of {container_id}'s shim")
    assert len(found) == 1, found
    return found[0]


def run_rm(containerd: Containerd, image: TestImage, word: str) -> str:
    container_id = containerd.new_id("fs")
    result = containerd.run(container_id, image, "echo", word, runtime=PYSHIM, detach=False, extra=["--rm"])
    assert result.stdout == f"{word}\n"
    return container_id


def cgroups_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def move_to_test_cgroup(pid: int, namespace: str) -> list[Path]:
    """Put pid in /<namespace>/forkserver (memory and pids on v1, the one hierarchy on v2); the harness removes
    /<namespace> at teardown. Returns the cgroups it was moved to."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        hierarchies = [CGROUP_ROOT]
    else:
        hierarchies = [CGROUP_ROOT / name for name in ("memory", "pids") if (CGROUP_ROOT / name).is_dir()]
    moved = []
    for hierarchy in hierarchies:
        target = hierarchy / namespace / "forkserver"
        target.mkdir(parents=True, exist_ok=True)
        (target / "cgroup.procs").write_text(str(pid))
        moved.append(target)
    return moved


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def remove(containerd: Containerd, *container_ids: str) -> None:
    for container_id in container_ids:
        containerd.ctr("task", "rm", "-f", container_id, check=False)
        containerd.ctr("containers", "rm", container_id, check=False)


@pytest.fixture
def own_containerd(environment: Environment, test_image: TestImage, containerd_log_dir: Path):
    """Make containerds with extra environment (seen by `start` and so by the fork server); all stopped after."""
    made: list[Containerd] = []

    def make(version: str = "2", path_first: Path | None = None, **env: str) -> Containerd:
        instance = Containerd(version, environment, log_dir=containerd_log_dir)
        made.append(instance)
        instance.env.update(env)
        if path_first is not None:
            instance.env["PATH"] = f"{path_first}:{instance.env['PATH']}"
        instance.start()
        instance.import_image(test_image)
        return instance

    yield make
    for instance in made:
        instance.stop()


def test_containers_start_through_the_fork_server(containerd: Containerd, test_image: TestImage):
    first = run_rm(containerd, test_image, "one")
    assert origin(containerd, first) == "forked by start"
    server = serving_fork_server(containerd)
    # Later shims come from the fork server (or its spare) even when those sit in other cgroups than containerd.
    spare = wait_until(lambda: spares(containerd), WAIT, what="the fork server's spare")
    assert len(spare) == 1
    moved = move_to_test_cgroup(server, containerd.namespace) + move_to_test_cgroup(spare[0], containerd.namespace)
    assert cgroups_of(server) != cgroups_of(containerd.pid)

    second = run_rm(containerd, test_image, "two")
    assert origin(containerd, second) == f"forked by fork server {server}"

    detached = containerd.new_id("fs")
    containerd.run(detached, test_image, "sleep", "60", runtime=PYSHIM)
    try:
        assert origin(containerd, detached) == f"forked by fork server {server}"
        shim = containerd.shim_pid(detached)  # found as before: adopted by the subreaper, start's cmdline
        assert shim is not None
        assert cgroups_of(shim) == cgroups_of(containerd.pid), "the shim joins the cgroups of start (containerd's)"
        assert all(str(shim) not in (directory / "cgroup.procs").read_text().split() for directory in moved)
        assert processes.parent_pid(shim) != server
        assert no_children(server)  # double forks: nothing to reap, no zombies
        assert processes.cmdline(shim)[-1] == "start" and Path(f"/proc/{shim}/comm").read_text() == "containerd-shim\n"
        environ = Path(f"/proc/{shim}/environ").read_bytes().split(b"\0")
        assert f"TTRPC_ADDRESS={containerd.ttrpc_address}".encode() in environ
        server_sockets = {t for t in fd_targets(server) if t.startswith("socket:")}
        shim_fds = fd_targets(shim)
        assert not server_sockets & set(shim_fds) and not any(t.endswith(".lock") for t in shim_fds)
        assert os.readlink(f"/proc/{server}/cwd") == "/"  # holds no bundle
        result = containerd.ctr("task", "exec", "--exec-id", "e1", detached, "echo", "exec")
        assert result.stdout == "exec\n"
    finally:
        remove(containerd, detached)


def test_concurrent_starts(containerd: Containerd, test_image: TestImage):
    run_rm(containerd, test_image, "warm")
    server = serving_fork_server(containerd)
    ids = [containerd.new_id("par") for _ in range(6)]
    results: dict[str, int] = {}

    def one(container_id: str) -> None:
        results[container_id] = containerd.run(container_id, test_image, "sleep", "60", runtime=PYSHIM,
                                               check=False).returncode

    threads = [threading.Thread(target=one, args=(container_id,)) for container_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert results == {container_id: 0 for container_id in ids}
        assert {origin(containerd, container_id) for container_id in ids} == {f"forked by fork server {server}"}
        assert len({containerd.shim_pid(container_id) for container_id in ids}) == len(ids)
        assert no_children(server)
    finally:
        remove(containerd, *ids)


def private_install(environment: Environment, into: Path) -> Path:
    """A copy of the shim package with a launcher like the installed one (same interpreter and flags, the copy
    first on sys.path, then the installed paths for its dependencies). Returns its bin dir."""
    installed = environment.shim.resolve().read_text().splitlines()
    line = next(i for i, text in enumerate(installed) if text.startswith("sys.path[1:1] = "))
    paths = ast.literal_eval(installed[line].split("=", 1)[1].strip())
    source = next(p for p in paths if (Path(p) / "shim" / "__init__.py").exists())
    shutil.copytree(Path(source) / "shim", into / "src" / "shim", ignore=shutil.ignore_patterns("__pycache__"))
    installed[line] = f"sys.path[1:1] = {[str(into / 'src'), *paths]!r}"
    launcher = into / "bin" / "containerd-shim-pyshim-v2"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("\n".join(installed) + "\n")
    launcher.chmod(0o755)
    return launcher.parent


def test_changed_code_never_reaches_the_old_fork_server(own_containerd, environment: Environment,
                                                         test_image: TestImage):
    with tempfile.TemporaryDirectory(prefix="pyshim-fs-") as tmp:
        bin_dir = private_install(environment, Path(tmp))
        containerd = own_containerd("2", path_first=bin_dir, PYSHIM_FORKSERVER_CHECK="0.2")
        assert origin(containerd, run_rm(containerd, test_image, "a")) == "forked by start"
        old = serving_fork_server(containerd)
        assert origin(containerd, run_rm(containerd, test_image, "b")) == f"forked by fork server {old}"

        with open(Path(tmp) / "src" / "shim" / "cli.py", "a") as f:  # an upgrade: the code on disk changes
            f.write("# upgraded\n")
        assert origin(containerd, run_rm(containerd, test_image, "c")) == "forked by start"
        wait_until(lambda: not processes.is_running(old), WAIT, what="the old fork server to exit")
        new = serving_fork_server(containerd, other_than=old)
        assert fork_server_socket(new) != fork_server_socket(old)
        assert origin(containerd, run_rm(containerd, test_image, "d")) == f"forked by fork server {new}"
        notes = containerd.stop()
        assert not [note for note in notes if "leftover" in note], notes


def test_idle_fork_server_exits_holding_nothing_of_its_containers(own_containerd, test_image: TestImage):
    containerd = own_containerd("2", PYSHIM_FORKSERVER_IDLE="1")
    first = containerd.new_id("idle")
    containerd.run(first, test_image, "sleep", "60", runtime=PYSHIM)
    server = serving_fork_server(containerd)
    path = fork_server_socket(server)
    second = containerd.new_id("idle")
    containerd.run(second, test_image, "sleep", "60", runtime=PYSHIM)
    assert origin(containerd, second) == f"forked by fork server {server}"
    wait_until(lambda: not processes.is_running(server), timeout=10, what="the idle fork server to exit")
    assert path and not os.path.exists(path) and not os.path.exists(path.removesuffix(".sock") + ".lock")
    for container_id in (first, second):
        assert containerd.ctr("task", "exec", "--exec-id", "after", container_id, "echo", "ok").stdout == "ok\n"
    remove(containerd, first, second)
    assert not [note for note in containerd.stop() if "leftover" in note]


def test_teardown_ends_the_fork_server_and_the_switch_turns_it_off(own_containerd, test_image: TestImage):
    containerd = own_containerd("2")
    running = containerd.new_id("td")
    containerd.run(running, test_image, "sleep", "60", runtime=PYSHIM)
    server = serving_fork_server(containerd)
    path = fork_server_socket(server)
    notes = containerd.stop()  # removes the task, stops containerd: the fork server goes with it
    assert not [note for note in notes if "leftover" in note], notes
    assert not processes.is_running(server)
    assert path and not os.path.exists(path)

    off = own_containerd("1.7", PYSHIM_FORKSERVER="0")
    ids = [run_rm(off, test_image, word) for word in ("x", "y")]
    assert [origin(off, container_id) for container_id in ids] == ["forked by start"] * 2
    time.sleep(0.5)
    assert fork_servers(off) == []

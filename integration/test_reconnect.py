"""containerd restarts and shim deaths, under pyshim and (for comparison) the Go runc shim, on 1.6, 1.7 and 2.x.

1. With ten running tasks, the containerd process alone is stopped (SIGTERM by pid; the shims keep running) and
   started again on the same root, state, sockets and config. The new containerd must reconnect to every shim
   from its bundle: the tasks are still RUNNING with the same pids, served by the same shim processes, and
   everything works through the new containerd: kill (the exit shows in `ctr events` with its status and
   `ctr task ls` shows STOPPED), Wait (`ctr task attach` returns the exit status), ps, exec, delete.
2. A shim is killed with SIGKILL. containerd sees its connection close and runs the shim binary's `delete`
   action, which cleans up after the dead shim: the container's processes, the rootfs mount, the runc state. From
   its DeleteResponse containerd publishes /tasks/exit and /tasks/delete (137, the init pid) and forgets the task.
3. A task exits while containerd is down for a few seconds: its exit event must still reach the new containerd
   (1.6), or the new containerd cleans the stopped task up as a leaked shim (1.7, 2.x).

Each scenario also runs with the Go shim under the same assertions, so a difference shows as one runtime failing.
Timings are printed with each test's output (`pytest -rP` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from harness import mounts, processes
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.events import EventStream
from harness.image import TestImage
from harness.waiting import wait_until

from shim.api.containerd.task.v2 import shim_pb2 as task_v2
from shim.api.containerd.task.v3 import shim_pb2 as task_v3
from shim.server.events import NAMESPACE_KEY
from shim.ttrpc import Client, Code, TtrpcError

RUNTIMES = pytest.mark.parametrize("runtime", [PYSHIM, RUNC_V2], ids=["pyshim", "go-runc"])
TASKS = 10
# sh as the container's pid 1: SIGTERM runs the trap (exit 42), SIGKILL ends it with 137.
LOOP = 'trap "exit 42" TERM; while true; do sleep 0.2; done'
# Two long-lived children besides the loop: "the container's processes" are more than its init.
FAMILY = 'sleep 3600 & sleep 3600 & while true; do sleep 0.2; done'
KILLED = 128 + 9
EVENT_LINE = re.compile(r"^(?P<time>.+) (?P<namespace>\S+) (?P<topic>/\S+) (?P<event>\{.*\})$")


# --- helpers -------------------------------------------------------------------------------------------------------

def task_list(containerd: Containerd) -> dict[str, tuple[int, str]]:
    """`ctr task ls`: id -> (pid, status)."""
    listed = {}
    for line in containerd.ctr("tasks", "ls", timeout=15).stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3:
            listed[fields[0]] = (int(fields[1]), fields[2])
    return listed


def task_pids(containerd: Containerd, container_id: str) -> list[int]:
    """`ctr task ps`: the pids of the task's processes."""
    lines = containerd.ctr("tasks", "ps", container_id, timeout=15).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in lines if line.split() and line.split()[0].isdigit()]


def wait_event(stream: EventStream, topic: str, timeout: float = 15.0, **fields) -> dict:
    """The payload of the first `ctr events` line of topic whose payload has all of fields."""
    deadline = time.monotonic() + timeout
    while True:
        lines = stream.lines()
        for line in lines:
            match = EVENT_LINE.match(line.strip())
            if match and match["topic"] == topic:
                payload = json.loads(match["event"])
                if all(payload.get(key) == value for key, value in fields.items()):
                    return payload
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {topic} event with {fields} within {timeout}s; events seen:\n" + "\n".join(lines))
        stream.wait_for(re.escape(topic), timeout=min(remaining, 0.5), start=len(lines), raising=False)


def connect_shim(path: Path, namespace: str, container_id: str) -> tuple[int, int]:
    """Task.Connect on the shim's socket, as containerd calls it when it reloads: (shim_pid, task_pid).

    Task v2 first (pyshim, 1.6/1.7 Go shims), v3 when the shim only serves that (2.x Go shim)."""
    async def call():
        client = await Client.connect(str(path))
        try:
            for api in (task_v2, task_v3):  # v3 reuses v2's messages
                service = api.DESCRIPTOR.services_by_name["Task"]
                try:
                    reply = await client.stub(service, metadata={NAMESPACE_KEY: namespace}, timeout=5).Connect(
                        task_v2.ConnectRequest(id=container_id))
                except TtrpcError as exc:
                    if exc.code == Code.UNIMPLEMENTED:
                        continue
                    raise
                return reply.shim_pid, reply.task_pid
            raise AssertionError(f"{path}: neither Task v2 nor v3 implements Connect")
        finally:
            client.close()

    return asyncio.run(call())


def answers(path: Path) -> bool:
    """True if something accepts connections on the unix socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file of a shim this test killed, once nothing listens on it (the Go shim leaves it)."""
    if not path.is_socket():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        probe.close()


def open_pidfds(pids) -> dict[int, int]:
    """pid -> pidfd for those still there; a pidfd keeps meaning that process even after its pid is reused."""
    fds = {}
    for pid in pids:
        fd = processes.open_pidfd(pid)
        if fd is not None:
            fds[pid] = fd
    return fds


def close_pidfds(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)


def still_running(fds: dict[int, int]) -> list[int]:
    return [pid for pid, fd in fds.items() if not processes.wait_exited(fd, 0)]


def force_remove(containerd: Containerd, container_ids) -> None:
    """Cleanup for a test that failed halfway: what is already gone just fails quietly."""
    for container_id in container_ids:
        containerd.ctr("tasks", "rm", "-f", container_id, check=False, timeout=20)
        containerd.ctr("containers", "rm", container_id, check=False, timeout=20)


def assert_nothing_left(containerd: Containerd, container_ids) -> None:
    assert task_list(containerd) == {}
    assert containerd.ctr("containers", "ls", "-q").stdout.split() == []
    assert {c["id"] for c in containerd.runc().list()} & set(container_ids) == set()
    for container_id in container_ids:
        assert mounts.mounts_under(containerd.bundle(container_id)) == []


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()  # our own child, by pid
    process.wait(10)


def delete_event(stream: EventStream, containerd: Containerd, runtime: str, container_id: str) -> dict | None:
    """The task's /tasks/delete event; from the Go shim, None when it never came but the task is gone.

    pyshim's publisher drains its queue, retries included, before the shim exits, so its event is
    required. The Go shim's is occasionally never published (seen in CI on containerd 2.x, here
    after a containerd restart and in test_environment without one). Its forwarder gives each
    event one Forward and queues a failed one for a retry a second later, while the Shutdown that
    follows Delete closes the event queue and then the publisher as soon as the queue is drained,
    so that retry never runs (containerd 2.x: forward() in cmd/containerd-shim-runc-v2/task/
    service.go, queue() in pkg/shim/publisher.go). What fails that one Forward here is not known.
    For the reference the observable outcome checked is then the task's removal.
    """
    try:
        return wait_event(stream, "/tasks/delete", timeout=15 if runtime == RUNC_V2 else 30,
                          container_id=container_id)
    except TimeoutError:
        if runtime != RUNC_V2:
            raise
    assert container_id not in task_list(containerd)
    print(f"NOTE go-runc shim: no /tasks/delete event for {container_id} after the containerd restart "
          "- the task is deleted")
    return None


def report(containerd: Containerd, runtime: str, record_property, **timings: float) -> None:
    rendered = " ".join(f"{name}={seconds:.2f}s" for name, seconds in timings.items())
    print(f"TIMING containerd {containerd.version} {runtime}: {rendered}")
    for name, seconds in timings.items():
        record_property(name, round(seconds, 3))


# --- 1. containerd restarts --------------------------------------------------------------------------------------

@RUNTIMES
def test_tasks_survive_containerd_restart(containerd: Containerd, test_image: TestImage, runtime: str,
                                          record_property):
    ids = [containerd.new_id(f"restart{i}") for i in range(TASKS)]
    signalled = {ids[0]: ("TERM", 42), ids[1]: ("KILL", KILLED), ids[2]: ("KILL-ALL", KILLED)}
    exec_target, fifo_dir = ids[3], str(containerd.fifo_dir)

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(force_remove, containerd, ids)
        started = time.monotonic()
        for container_id in ids:
            containerd.run(container_id, test_image, "sh", "-c", LOOP, runtime=runtime)
        before = task_list(containerd)
        assert {cid: status for cid, (_, status) in before.items()} == dict.fromkeys(ids, "RUNNING")
        shims = {container_id: containerd.shim_pid(container_id) for container_id in ids}
        assert all(shims.values()) and len(set(shims.values())) == TASKS, shims
        shim_fds = open_pidfds(shims.values())
        cleanup.callback(close_pidfds, shim_fds)
        init_fds = open_pidfds(pid for pid, _ in before.values())
        cleanup.callback(close_pidfds, init_fds)
        old_pid = containerd.pid
        ran = time.monotonic()

        containerd.restart()
        restarted = time.monotonic()
        assert containerd.pid != old_pid
        after = task_list(containerd)
        listed = time.monotonic()

        # The same tasks, the same pids, the same shim processes: reconnected, nothing restarted or respawned.
        assert after == before
        assert set(still_running(init_fds)) == set(init_fds)
        assert {container_id: containerd.shim_pid(container_id) for container_id in ids} == shims
        assert before[exec_target][0] in task_pids(containerd, exec_target)  # Pids through the new containerd

        with containerd.events() as stream:
            # Wait through the new containerd: attach waits for the task and exits with its status.
            attach = subprocess.Popen([*containerd.ctr_argv(), "tasks", "attach", ids[0]], env=containerd.env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            cleanup.callback(stop_process, attach)
            time.sleep(0.5)  # let it subscribe to the exit (it would also get the status after the exit)
            containerd.ctr("tasks", "kill", ids[0])  # SIGTERM: the trap exits 42
            containerd.ctr("tasks", "kill", "-s", "KILL", ids[1])
            containerd.ctr("tasks", "kill", "-a", "-s", "KILL", ids[2])
            for container_id, (_, status) in signalled.items():
                exit_event = wait_event(stream, "/tasks/exit", container_id=container_id, id=container_id)
                assert (exit_event["pid"], exit_event.get("exit_status", 0)) == (before[container_id][0], status)
            # attach also deletes the task it waited for (ctr defers task.Delete).
            out, err = attach.communicate(timeout=15)
            assert attach.returncode == 42, (out, err)
            wait_until(lambda: ids[0] not in task_list(containerd), 10, "attach deletes the task")

            stopped = task_list(containerd)
            for container_id in ids[1:]:
                expected = "STOPPED" if container_id in signalled else "RUNNING"
                assert stopped[container_id] == (before[container_id][0], expected)

            result = containerd.ctr("tasks", "exec", "--fifo-dir", fifo_dir, "--exec-id", "after-restart",
                                    exec_target, "sh", "-c", "echo hello from exec; exit 3", check=False)
            assert (result.returncode, result.stdout.strip()) == (3, "hello from exec"), result
            exec_exit = wait_event(stream, "/tasks/exit", container_id=exec_target, id="after-restart")
            assert exec_exit.get("exit_status") == 3

            for container_id, (_, status) in signalled.items():
                if container_id != ids[0]:
                    containerd.ctr("tasks", "rm", container_id)
                deleted = delete_event(stream, containerd, runtime, container_id)
                if deleted is not None:
                    assert (deleted["pid"], deleted.get("exit_status", 0)) == (before[container_id][0], status)
                containerd.ctr("containers", "rm", container_id)
            remaining = task_list(containerd)
            assert set(remaining) == set(ids) - set(signalled)
            assert all(status == "RUNNING" for _, status in remaining.values())
            runc_ids = {c["id"] for c in containerd.runc().list()}
            assert runc_ids & set(ids) == set(ids) - set(signalled)

            # The rest: killed and deleted through the new containerd; every shim then exits.
            rest = [container_id for container_id in ids if container_id not in signalled]
            for container_id in rest:
                containerd.ctr("tasks", "kill", "-s", "KILL", container_id)
            for container_id in rest:
                exit_event = wait_event(stream, "/tasks/exit", container_id=container_id, id=container_id)
                assert (exit_event["pid"], exit_event.get("exit_status")) == (before[container_id][0], KILLED)
            for container_id in rest:
                containerd.ctr("tasks", "rm", container_id)
                containerd.ctr("containers", "rm", container_id)
        wait_until(lambda: not still_running(shim_fds), 15, "every shim exits after its task is deleted")
        assert_nothing_left(containerd, ids)
        done = time.monotonic()

    report(containerd, runtime, record_property, run_10=ran - started, restart=restarted - ran,
           restart_to_all_listed=listed - ran, after_restart_checks=done - listed, total=done - started)


# --- 2. a shim killed with SIGKILL -------------------------------------------------------------------------------

@RUNTIMES
def test_killed_shim_is_cleaned_up_by_delete(containerd: Containerd, test_image: TestImage, runtime: str,
                                             record_property):
    victim, bystander = containerd.new_id("victim"), containerd.new_id("bystander")
    rootfs = containerd.bundle(victim) / "rootfs"

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(force_remove, containerd, [victim, bystander])
        for container_id in (victim, bystander):
            containerd.run(container_id, test_image, "sh", "-c", FAMILY, runtime=runtime)
        before = task_list(containerd)
        init = before[victim][0]
        family = wait_until(lambda: pids if len(pids := task_pids(containerd, victim)) >= 3 else None, 10,
                            "the victim's init and its two sleeps")
        assert init in family
        family_fds = open_pidfds(family)
        cleanup.callback(close_pidfds, family_fds)
        shim, bystander_shim = containerd.shim_pid(victim), containerd.shim_pid(bystander)
        assert shim and bystander_shim and shim != bystander_shim
        shim_fds = open_pidfds([shim, bystander_shim])
        cleanup.callback(close_pidfds, shim_fds)
        socket_path = containerd.shim_socket(victim)
        assert socket_path is not None and answers(socket_path)
        # The shim found through /proc is the one the bundle's socket leads to, as its Connect reply says.
        assert connect_shim(socket_path, containerd.namespace, victim) == (shim, init)
        for path in {socket_path, *containerd.go_shim_sockets(shim)}:
            cleanup.callback(remove_stale_socket, path)
        assert mounts.mounts_under(rootfs) != []
        assert victim in {c["id"] for c in containerd.runc().list()}

        with containerd.events() as stream:
            killed = time.monotonic()
            containerd.kill_adopted(shim)
            assert processes.wait_exited(shim_fds[shim], 5)
            # containerd ran the shim binary's `delete`: its DeleteResponse is what these events carry.
            exit_event = wait_event(stream, "/tasks/exit", container_id=victim, id=victim)
            deleted = wait_event(stream, "/tasks/delete", container_id=victim)
            reported = time.monotonic()
        assert (exit_event["pid"], exit_event.get("exit_status")) == (init, KILLED)
        assert (deleted["pid"], deleted.get("exit_status")) == (init, KILLED)

        wait_until(lambda: victim not in task_list(containerd), 10, "containerd forgets the task")
        forgotten = time.monotonic()
        wait_until(lambda: not still_running(family_fds), 10, "the victim's processes are gone")
        assert mounts.mounts_under(rootfs) == []
        assert victim not in {c["id"] for c in containerd.runc().list()}
        # Nobody answers on the dead shim's socket. The Go shim's `delete` leaves the file (containerd#11292;
        # the cleanup above removes it); pyshim's `delete` removes it (deliberately better).
        assert not answers(socket_path)
        if runtime == PYSHIM:
            assert not socket_path.exists()

        # Nothing else was touched.
        assert task_list(containerd)[bystander] == before[bystander]
        assert still_running(shim_fds) == [bystander_shim]

        # The container record stays until it is removed; the task is gone for good.
        assert containerd.ctr("tasks", "rm", victim, check=False).returncode != 0
        containerd.ctr("containers", "rm", victim)
        containerd.ctr("tasks", "kill", "-s", "KILL", bystander)
        wait_until(lambda: task_list(containerd)[bystander][1] == "STOPPED", 10, "the bystander stops")
        containerd.ctr("tasks", "rm", bystander)
        containerd.ctr("containers", "rm", bystander)
        wait_until(lambda: not still_running(shim_fds), 10, "the bystander's shim exits")
        assert_nothing_left(containerd, [victim, bystander])

    report(containerd, runtime, record_property, kill_to_events=reported - killed,
           kill_to_task_gone=forgotten - killed)


# --- 3. a task exits while containerd is down --------------------------------------------------------------------

DOWN_FOR = 7.0  # the shims' retries of the exit event fall at 1, 3, 6, 10, 15 s: the one at 10 s finds it back


@RUNTIMES
def test_exit_while_containerd_is_down(containerd: Containerd, test_image: TestImage, runtime: str):
    """The task's init ends (runc kill) while containerd is stopped; containerd comes back DOWN_FOR s later.

    1.6 reconnects to the shim of the stopped task: it is listed STOPPED and the shim's exit event, retried until
    containerd is back, arrives (the Go publisher retries for ~15 s). 1.7 and 2.x treat a shim whose task has no
    process left as leaked when they reload: they delete the task through it and forget it.
    """
    exited, bystander = containerd.new_id("exited"), containerd.new_id("bystander")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(force_remove, containerd, [exited, bystander])
        for container_id in (exited, bystander):
            containerd.run(container_id, test_image, "sh", "-c", LOOP, runtime=runtime)
        before = task_list(containerd)
        init = before[exited][0]
        init_fds = open_pidfds([init])
        cleanup.callback(close_pidfds, init_fds)
        shim_fds = open_pidfds([containerd.shim_pid(exited)])
        cleanup.callback(close_pidfds, shim_fds)

        def exit_while_down():
            down = time.monotonic()
            containerd.runc().kill(exited, "TERM")  # the trap exits 42
            assert processes.wait_exited(init_fds[init], 5)
            time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - down)))

        containerd.restart(while_down=exit_while_down)
        with containerd.events() as stream:
            listed = task_list(containerd)
            assert listed[bystander] == before[bystander]
            if containerd.version == "1.6":
                assert listed[exited] == (init, "STOPPED")
                exit_event = wait_event(stream, "/tasks/exit", timeout=20, container_id=exited, id=exited)
                assert (exit_event["pid"], exit_event.get("exit_status")) == (init, 42)
                containerd.ctr("tasks", "rm", exited)
            else:
                assert exited not in listed
                assert containerd.ctr("tasks", "rm", exited, check=False).returncode != 0
        wait_until(lambda: not still_running(shim_fds), 10, "the exited task's shim ends")
        assert exited not in {c["id"] for c in containerd.runc().list()}
        assert mounts.mounts_under(containerd.bundle(exited)) == []
        containerd.ctr("containers", "rm", exited)
        containerd.ctr("tasks", "kill", "-s", "KILL", bystander)
        wait_until(lambda: task_list(containerd)[bystander][1] == "STOPPED", 10, "the bystander stops")
        containerd.ctr("tasks", "rm", bystander)
        containerd.ctr("containers", "rm", bystander)
        assert_nothing_left(containerd, [exited, bystander])

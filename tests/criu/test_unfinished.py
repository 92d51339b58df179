"""shim.criu.unfinished: the marker of a restore in progress, and what `delete` does with it (unprivileged: real
processes of the test's own stand in for runc and CRIU; no mounts, no cgroups)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from shim.criu import unfinished

# A stand-in for `runc restore`: a process with a child (CRIU), both sleeping.
TREE = "import os, time; os.fork(); time.sleep(60)"


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _children(pid: int) -> list[int]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) == pid]
        if found:
            return found
        time.sleep(0.01)
    return []


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def test_the_marker_records_processes_with_their_start_time_and_is_forgotten(tmp_path):
    facts = {"id": "c1", "processes": []}
    unfinished.record(str(tmp_path), facts)
    assert unfinished.load(unfinished.path(str(tmp_path))) == facts
    assert oct(os.stat(unfinished.path(str(tmp_path))).st_mode & 0o777) == "0o600"
    unfinished.add_process(str(tmp_path), facts, os.getpid())
    assert unfinished.load(unfinished.path(str(tmp_path)))["processes"] == [[os.getpid(),
                                                                              unfinished.start_time(os.getpid())]]
    unfinished.forget(str(tmp_path))
    unfinished.forget(str(tmp_path))  # twice: nothing to remove is fine
    assert not os.path.exists(unfinished.path(str(tmp_path)))


def test_end_kills_a_recorded_process_and_its_descendants(tmp_path):
    runc = subprocess.Popen([sys.executable, "-c", TREE])
    try:
        criu = _children(runc.pid)
        assert criu
        facts: dict = {"processes": []}
        unfinished.add_process(str(tmp_path), facts, runc.pid)
        killed = unfinished.end(facts)
        assert sorted(killed) == sorted([runc.pid, *criu])
        assert runc.wait(timeout=5) == -9
        assert all(_gone_or_zombie(pid) for pid in criu)
    finally:
        runc.kill()
        runc.wait()


def test_end_leaves_a_process_whose_start_time_is_not_the_recorded_one():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = unfinished.start_time(other.pid)
        assert started is not None
        assert unfinished.end({"processes": [[other.pid, started - 1], ["junk"], [1]]}) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_leftovers_go_but_a_state_runc_wrote_and_the_marker_last(tmp_path):
    state = tmp_path / "state" / "c1"
    (state / "criu-root").mkdir(parents=True)
    (state / "runc.pid").write_text("1")
    work = tmp_path / "bundle" / "criu-restore-x"
    work.mkdir(parents=True)
    (work / "restore.log").write_text("log")
    marker = tmp_path / "bundle" / "restoring.json"
    marker.write_text("{}")
    facts = {"state_dir": str(state), "work": str(work), "own_work": True, "cgroups_path": ""}
    assert unfinished.remove_leftovers(facts, str(marker)) == []
    assert not state.exists() and not work.exists() and not marker.exists()
    # runc's own state (state.json written) is runc's to remove; a work dir that is not the restore's own stays.
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}")
    work.mkdir()
    unfinished.remove_leftovers({**facts, "own_work": False}, str(marker))
    assert (state / "state.json").exists() and work.exists()

"""The `pyshim` command's failures a person can act on, on a real containerd 2.x: each is one line on stderr naming
the cause and the fix, exit status 1, and nothing half-written is left where a checkpoint was expected. Then the
store (`checkpoint create` without --export, `ls`, `inspect`, `rm`), and `pyshim doctor` on this host and on the same
host with criu, pycriu or iptables hidden.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.image import TestImage
from harness.tasks import remove, wait_status
from test_tool_migrate import COUNTER, pyshim, runtime_config, tool_command, wait_counter_above

WORKTREE = Path(__file__).resolve().parents[1]


@pytest.fixture
def containerd2(request, environment, test_image: TestImage, containerd_log_dir: Path):
    from conftest import track_containerd

    instance = Containerd("2", environment, log_dir=containerd_log_dir)
    track_containerd(request, instance)
    with instance.serving(test_image):
        yield instance


def one_line_failure(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyshim: ")
    return lines[0]


def test_errors_are_one_line_with_cause_and_fix_and_leave_nothing(containerd2: Containerd, test_image: TestImage,
                                                                  tmp_path: Path):
    containerd = containerd2
    store = tmp_path / "store"
    exports = tmp_path / "exports"
    exports.mkdir()
    running, stopped, go = containerd.new_id("running"), containerd.new_id("stopped"), containerd.new_id("go")
    containerd.run(running, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    containerd.run(stopped, test_image, "true", runtime=PYSHIM)
    containerd.run(go, test_image, "sleep", "60", runtime=RUNC_V2)
    try:
        wait_counter_above(containerd, running, 1)
        assert wait_status(containerd, stopped, "STOPPED") == "STOPPED"
        line = one_line_failure(pyshim(containerd, store, "checkpoint", "create", "nosuch", "--export",
                                       str(exports / "a.tar")))
        assert "no container 'nosuch'" in line and "containers ls" in line
        line = one_line_failure(pyshim(containerd, store, "checkpoint", "create", stopped, "--export",
                                       str(exports / "b.tar")))
        assert "is stopped" in line and "running or paused" in line
        line = one_line_failure(pyshim(containerd, store, "checkpoint", "create", go, "--export",
                                       str(exports / "c.tar")))
        assert RUNC_V2 in line and "--runtime io.containerd.pyshim.v2" in line
        line = one_line_failure(pyshim(containerd, store, "checkpoint", "create", running, "--export",
                                       str(exports / "d.zip")))
        assert ".tar, .tar.gz or .tar.zst" in line
        # an option the shim refuses: the task goes on, nothing is written
        line = one_line_failure(pyshim(containerd, store, "checkpoint", "create", running, "--export",
                                       str(exports / "e.tar"), "--manage-cgroups-mode", "bogus"))
        assert "manage-cgroups-mode 'bogus'" in line
        # pyshim's own options reach the shim in the same request (the extension only: containerd has no field)
        line = one_line_failure(pyshim(containerd, store, "checkpoint", "create", running, "--export",
                                       str(exports / "f.tar"), "--network-lock", "bogus"))
        assert "network-lock 'bogus'" in line
        assert list(exports.iterdir()) == []
        assert wait_status(containerd, running, "RUNNING") == "RUNNING"

        # a good export, then the restore errors
        export = exports / "good.tar.gz"
        assert pyshim(containerd, store, "checkpoint", "create", running, "--export", str(export),
                      "--leave-running").returncode == 0
        line = one_line_failure(pyshim(containerd, store, "restore", str(export), "--name", running))
        assert "already exists" in line and "--name" in line
        truncated = exports / "truncated.tar.gz"
        truncated.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
        line = one_line_failure(pyshim(containerd, store, "restore", str(truncated), "--name", "r1"))
        assert "corrupt" in line and "export it again" in line
        foreign = exports / "foreign.tar"
        subprocess.run(["tar", "-cf", str(foreign), "-C", str(WORKTREE), "pyproject.toml"], check=True)
        line = one_line_failure(pyshim(containerd, store, "restore", str(foreign), "--name", "r2"))
        assert "not a container checkpoint" in line and "checkpoint/inventory.img" in line
        line = one_line_failure(pyshim(containerd, store, "restore", str(exports / "absent.tar"), "--name", "r3"))
        assert "no checkpoint" in line
        # nothing of the failed restores is left: no containers, no unpacked archives
        assert set(containerd.ctr("containers", "ls", "-q").stdout.split()) == {running, stopped, go}
        assert not store.exists() or list(store.iterdir()) == []
    finally:
        for container_id in (running, stopped, go):
            remove(containerd, container_id)


def test_store_create_ls_inspect_rm(containerd2: Containerd, test_image: TestImage, tmp_path: Path):
    containerd = containerd2
    store = tmp_path / "store"
    original, restored = containerd.new_id("stored"), containerd.new_id("from-store")
    containerd.run(original, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
    try:
        wait_counter_above(containerd, original, 2)
        result = pyshim(containerd, store, "checkpoint", "create", original, "--name", "first", "--leave-running",
                        "--file-locks")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(store / "first")
        assert sorted(os.listdir(store / "first")) == sorted(
            ["checkpoint", "config.dump", "dump.log", "rootfs-diff.tar", "spec.dump", "stats-dump", "status.dump"])
        listed = json.loads(pyshim(containerd, store, "checkpoint", "ls", "--json").stdout)
        assert [(e["name"], e["container"], e["image"]) for e in listed] == [("first", original, test_image.ref)]
        shown = pyshim(containerd, store, "checkpoint", "inspect", "first", "--json")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert report["container"] == original
        assert report["options"]["file_locks"] is True and report["options"]["leave_running"] is True
        init = report["processes"][0]
        assert init["command"] == "sh" and init["memory_dumped"] > 0
        assert report["statistics"]["pages_written"] > 0
        text = pyshim(containerd, store, "checkpoint", "inspect", "first").stdout
        assert "processes" in text and " sh " in text
        # a checkpoint in the store restores by its name
        remove(containerd, original)
        result = pyshim(containerd, store, "restore", "first", "--name", restored, "--runtime-config",
                        runtime_config(containerd))
        assert result.returncode == 0, result.stderr
        assert wait_status(containerd, restored, "RUNNING") == "RUNNING"
        assert pyshim(containerd, store, "checkpoint", "rm", "first").returncode == 0
        assert json.loads(pyshim(containerd, store, "checkpoint", "ls", "--json").stdout) == []
        line = one_line_failure(pyshim(containerd, store, "checkpoint", "rm", "first"))
        assert "no checkpoint first" in line
    finally:
        remove(containerd, original)
        remove(containerd, restored)


def doctor(tmp_path: Path, path: str, pycriu_path: str | None = None) -> subprocess.CompletedProcess:
    """`pyshim doctor --json` as the installed command sees the host: the interpreter without site's .pth files (the
    dev venv's puts pycriu on sys.path, which an installed pyshim does not have), a given PATH."""
    env = {"PATH": path, "LANG": "C.UTF-8", **command_environment()}
    if pycriu_path is not None:
        env["PYSHIM_PYCRIU_PATH"] = pycriu_path
    return subprocess.run([*doctor_command(), "--address", str(tmp_path / "no.sock"), "doctor", "--json"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def doctor_command() -> list[str]:
    """The installed `pyshim` (its launcher sets its own paths), else the checkout's without site processing."""
    command = tool_command()
    return command if len(command) == 1 else [sys.executable, "-S", "-m", "shim.tool"]


def command_environment() -> dict[str, str]:
    """What the checkout's command needs to import itself without site processing (nothing for the installed one)."""
    if len(tool_command()) == 1:
        return {}
    return {"PYTHONPATH": f"{WORKTREE}:{sysconfig.get_paths()['purelib']}"}


def checks_of(result: subprocess.CompletedProcess) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for check in json.loads(result.stdout)["checks"]:
        found.setdefault(check["area"], []).append(check)
    return found


def host_path_without(tmp_path: Path, *hidden: str) -> str:
    """A PATH of symlinks to this host's tools, less the hidden ones."""
    bin_dir = tmp_path / f"bin-without-{'-'.join(hidden) or 'nothing'}"
    bin_dir.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name in hidden or (bin_dir / name).exists():
                continue
            (bin_dir / name).symlink_to(os.path.join(directory, name))
    return str(bin_dir)


def test_doctor_names_what_is_missing_with_its_fix(tmp_path: Path):
    full = doctor(tmp_path, host_path_without(tmp_path))
    assert full.returncode == 0, full.stdout + full.stderr
    checks = checks_of(full)
    assert checks["criu"][0]["status"] == "ok" and checks["criu check"][0]["status"] == "ok"
    assert checks["pycriu"][0]["status"] == "ok"

    no_criu = doctor(tmp_path, host_path_without(tmp_path, "criu"))
    assert no_criu.returncode == 1
    criu = checks_of(no_criu)["criu"][0]
    assert criu["status"] == "FAIL" and "install CRIU >= 4.2" in criu["fix"]

    empty = tmp_path / "no-pycriu"
    empty.mkdir()
    no_pycriu = doctor(tmp_path, host_path_without(tmp_path, "nothing-hidden"), pycriu_path=str(empty))
    assert no_pycriu.returncode == 1
    pycriu = checks_of(no_pycriu)["pycriu"][0]
    assert pycriu["status"] == "FAIL" and "python3-pycriu" in pycriu["fix"] and str(empty) in pycriu["found"]

    no_iptables = doctor(tmp_path, host_path_without(tmp_path, "iptables-restore", "ip6tables-restore"))
    lock = checks_of(no_iptables)["network lock"][0]
    assert lock["status"] == "warn" and "apt install iptables" in lock["fix"]
    # TCP-less checkpoints still work without iptables: a warning, not a failure
    assert no_iptables.returncode == 0

    text = subprocess.run([*doctor_command(), "--address", str(tmp_path / "no.sock"), "doctor"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": host_path_without(tmp_path, "criu", "x"), **command_environment()})
    assert text.returncode == 1
    assert "FAIL  criu" in text.stdout and "fix: install CRIU >= 4.2" in text.stdout
    assert text.stdout.strip().endswith("cannot work here: 1 problem(s) above")


def test_a_full_disk_is_one_line_and_leaves_nothing(containerd2: Containerd, test_image: TestImage, tmp_path: Path):
    """An export onto a filesystem too small for it (a 256 KiB tmpfs): one line saying there is no space, the task
    running on (the dump left it so), and nothing left on that filesystem."""
    containerd = containerd2
    small = containerd.tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True, timeout=10)
    container_id = containerd.new_id("full")
    try:
        containerd.run(container_id, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
        wait_counter_above(containerd, container_id, 1)
        line = one_line_failure(pyshim(containerd, tmp_path / "store", "checkpoint", "create", container_id,
                                       "--leave-running", "--export", str(small / "full.tar")))
        assert "no space left on device" in line and "free some space or write elsewhere" in line, line
        assert list(small.iterdir()) == []
        assert wait_status(containerd, container_id, "RUNNING") == "RUNNING"
    finally:
        remove(containerd, container_id)
        subprocess.run(["umount", str(small)], check=False, timeout=10)

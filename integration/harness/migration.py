"""Two "hosts" for `pyshim migrate`: a source and a destination containerd, the network lab between them
(harness.migration_lab), the destination's sshd (harness.sshd), and the command run against them.

`TwoHosts.migrate(container, *flags)` runs `pyshim migrate` on the source with DEST naming the destination's
containerd through the sshd, the ssh options that trust only that sshd, and a JSON report file; `MigrateRun` holds
the exit status, output, report and timings. `modes_supported()` reads the command's help, so that a test skips,
with the reason, a mode the command under test does not offer.

`TwoHosts.residue()` lists what a migration may leave behind on either host, for a test to compare before and after:
containers, tasks, snapshots, content and leases of each containerd, mounts under each containerd's directory, the
files in the work directories, the sshd's sessions, and processes naming either containerd.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import mounts, processes
from .containerd import Containerd
from .migration_lab import MigrationLab
from .sshd import Sshd

MODES = ("stop-copy", "stream", "post-copy")


def tool_argv(tool: Path | None) -> list[str]:
    """The pyshim command under test (PYSHIM_TOOL), or the checkout's module when the env names none."""
    return [str(tool)] if tool else [sys.executable, "-m", "shim.tool"]


@functools.cache
def _migrate_help(tool: str) -> str:
    result = subprocess.run([*tool_argv(Path(tool) if tool else None), "migrate", "--help"], capture_output=True,
                            text=True, timeout=60)
    return result.stdout if result.returncode == 0 else ""


def _mode_help(tool: Path | None, mode: str) -> str | None:
    """The help's line describing --mode, or None when the command does not have the flag."""
    for line in _migrate_help(str(tool or "")).splitlines():
        if line.strip().startswith(f"--{mode} "):
            return " ".join(line.split())
    return None


def modes_supported(tool: Path | None) -> tuple[str, ...]:
    """The modes `pyshim migrate --help` offers (a flag whose help says "not available" is not offered); () when
    the command has no migrate."""
    return tuple(mode for mode in MODES if (line := _mode_help(tool, mode)) and "not available" not in line)


def mode_skip_reason(tool: Path | None, mode: str) -> str | None:
    if not _migrate_help(str(tool or "")):
        return "this pyshim has no `migrate` command (branch migrate not merged here)"
    if mode in modes_supported(tool):
        return None
    line = _mode_help(tool, mode)
    return f"`pyshim migrate` does not offer --{mode} yet" + (f" (its help: {line!r})" if line else "")


@dataclass
class MigrateRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    report: dict = field(default_factory=dict)

    @property
    def message(self) -> str:
        """stderr on one line, for substring checks of an error message."""
        return " ".join(self.stderr.split())


@dataclass
class TwoHosts:
    source: Containerd
    destination: Containerd
    lab: MigrationLab
    sshd: Sshd
    tool: Path | None
    work: Path  # the test's directory for reports and stores

    @property
    def source_store(self) -> Path:
        return self.work / "source-store"

    @property
    def destination_store(self) -> Path:
        """Where the destination's receiver keeps its work (DEST's store=): a test may mount a small tmpfs there."""
        return self.work / "destination-store"

    def dest_url(self) -> str:
        """DEST: the destination containerd through the sshd, its work in destination_store, the restored task's
        runc state under the destination containerd's own runc root."""
        url = self.sshd.destination(self.destination.address, self.destination.namespace)
        return (f"{url}&store={self.destination_store}"
                f"&runtime-config={self.destination.pyshim_config()}")

    def migrate_argv(self, container_id: str, *flags: str, report: Path | None = None) -> list[str]:
        options = [flag for option in self.sshd.ssh_options() for flag in ("--ssh-option", option)]
        return [*tool_argv(self.tool), "--address", self.source.address, "--namespace", self.source.namespace,
                "--store", str(self.source_store), "migrate", container_id, self.dest_url(), *flags, *options,
                *(["--report-json", str(report)] if report else [])]

    def start_migrate(self, container_id: str, *flags: str, report: Path | None = None) -> subprocess.Popen:
        """`pyshim migrate` started in the background (a test that cuts it mid-way); our child, ended by pid."""
        return subprocess.Popen(self.migrate_argv(container_id, *flags, report=report), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def migrate(self, container_id: str, *flags: str, timeout: float = 300) -> MigrateRun:
        report = self.work / f"report-{container_id}-{time.monotonic_ns()}.json"
        argv = self.migrate_argv(container_id, *flags, report=report)
        started = time.monotonic()
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        run = MigrateRun(argv, result.returncode, result.stdout, result.stderr, time.monotonic() - started)
        if report.exists():
            try:
                run.report = json.loads(report.read_text())
            except ValueError:
                run.report = {"unreadable": report.read_text()[:2000]}
        return run

    def end_leftover_processes(self) -> list[str]:
        """SIGKILL, by pid, what a migration started and left running (a receiver whose connection was cut names the
        destination's socket on its command line); what was killed."""
        killed = []
        for host in (self.source, self.destination):
            for pid, joined in pids_naming(host.address).items():
                pidfd = processes.open_pidfd(pid)
                if pidfd is None:
                    continue
                try:
                    processes.send_signal(pidfd, signal.SIGKILL)
                finally:
                    os.close(pidfd)
                killed.append(f"killed {pid}: {joined[:200]}")
        return killed

    def residue(self) -> dict[str, list[str]]:
        """What either host holds that a migration could have added (compare a snapshot before with one after)."""
        found: dict[str, list[str]] = {}
        for side, host in (("source", self.source), ("destination", self.destination)):
            found[f"{side} containers"] = host.ctr("containers", "ls", "-q").stdout.split()
            found[f"{side} tasks"] = [" ".join(line.split()[::2]) for line in
                                      host.ctr("tasks", "ls").stdout.splitlines()[1:]]
            found[f"{side} snapshots"] = sorted(line.split()[0] for line in
                                                host.ctr("snapshots", "ls").stdout.splitlines()[1:] if line.split())
            found[f"{side} content"] = sorted(line.split()[0] for line in
                                              host.ctr("content", "ls").stdout.splitlines()[1:] if line.split())
            found[f"{side} images"] = host.ctr("images", "ls", "-q").stdout.split()
            found[f"{side} leases"] = sorted(line.split()[0] for line in
                                             host.ctr("leases", "ls").stdout.splitlines()[1:] if line.split())
            found[f"{side} mounts"] = mounts.mounts_under(host.tmp)
            found[f"{side} processes"] = processes_naming(host.address)
        found["ssh sessions"] = [str(pid) for pid in self.sshd.session_pids()]
        # both "hosts" share this /tmp: the root yard a killed restore's CRIU leaves there (the shim removes it)
        found["CRIU yards in /tmp"] = sorted(str(p) for p in Path("/tmp").glob(".criu.mntns.*"))
        found["work files"] = sorted(str(p.relative_to(self.work)) for p in self.work.rglob("*")
                                     if p.is_file() and not p.name.startswith("report-"))
        return found


def pids_naming(text: str) -> dict[int, str]:
    """Processes whose command line mentions text (e.g. a containerd's socket), other than containerd itself and
    its shims: what a migration started and did not end (pid -> command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = processes.cmdline(int(entry))
        joined = " ".join(argv)
        name = argv[0].rsplit("/", 1)[-1] if argv else ""
        if text in joined and name not in ("containerd", "containerd-shim-pyshim-v2", "containerd-shim-runc-v2") \
                and "-address" not in argv and processes.is_running(int(entry)):
            found[int(entry)] = joined
    return found


def processes_naming(text: str) -> list[str]:
    return sorted(f"{pid}: {joined[:200]}" for pid, joined in pids_naming(text).items())


def added(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, list[str]]:
    """What after holds that before did not, per kind (kinds with nothing new left out)."""
    return {kind: new for kind, items in after.items() if (new := sorted(set(items) - set(before.get(kind, []))))}


def _base_name(pid: int | None) -> str:
    argv = processes.cmdline(pid) if pid else []
    return argv[0].rsplit("/", 1)[-1] if argv else ""


def descendants_named(roots: list[int], name: str, *, parent: str | None = None) -> list[int]:
    """Running processes called name (argv[0]'s base name) below any of roots, found through /proc's parent links;
    with parent, only those whose parent is called that (e.g. the CRIU that `runc restore` runs)."""
    wanted = set(roots)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        argv = processes.cmdline(pid)
        if not argv or argv[0].rsplit("/", 1)[-1] != name or not processes.is_running(pid):
            continue
        if parent is not None and _base_name(processes.parent_pid(pid)) != parent:
            continue
        ancestor: int | None = pid
        for _ in range(64):  # bounded walk up the tree
            ancestor = processes.parent_pid(ancestor) if ancestor else None
            if ancestor is None or ancestor <= 1:
                break
            if ancestor in wanted:
                found.append(pid)
                break
    return sorted(found)

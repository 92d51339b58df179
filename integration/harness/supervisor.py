"""Starting a command under the subreaper program and tearing it down with everything it left behind.

`supervise()` returns a `Supervised`: the command's own pid (signalled through a pidfd), its exit code once it ends,
and the orphans the subreaper adopted (daemonised shims, detached containers), which `terminate()` kills by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import processes

SUBREAPER_SCRIPT = Path(__file__).with_name("subreaper.py")
POLL_INTERVAL = 0.05

Stdio = int | IO | None


@dataclass
class Supervised:
    """A command running under its own subreaper process."""

    name: str
    subreaper: subprocess.Popen
    main_pid: int
    status_file: Path
    _main_pidfd: int | None = field(default=None, repr=False)

    def main_exit_code(self) -> int | None:
        """The command's exit code, or None while it runs."""
        try:
            return int(self.status_file.read_text())
        except FileNotFoundError:
            return None

    def wait_main(self, timeout: float) -> int:
        """Wait for the command itself (not its orphans) to end; return its exit code."""
        deadline = time.monotonic() + timeout
        while (code := self.main_exit_code()) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} (pid {self.main_pid}) still running after {timeout}s")
            time.sleep(POLL_INTERVAL)
        return code

    def signal_main(self, signum: int) -> None:
        if self._main_pidfd is not None:
            processes.send_signal(self._main_pidfd, signum)

    def stop_main(self, timeout: float) -> None:
        """SIGTERM the command, then SIGKILL it if it is still there after timeout seconds."""
        if self._main_pidfd is None:
            return
        processes.send_signal(self._main_pidfd, signal.SIGTERM)
        if not processes.wait_exited(self._main_pidfd, timeout):
            processes.send_signal(self._main_pidfd, signal.SIGKILL)
            processes.wait_exited(self._main_pidfd, timeout)

    def orphans(self) -> list[int]:
        """Processes the subreaper adopted and that are still around (the command itself excluded)."""
        # Once Popen has reaped the subreaper its pid may belong to someone else; until then it is ours.
        if self.subreaper.poll() is not None:
            return []
        return [pid for pid in processes.children_of(self.subreaper.pid) if pid != self.main_pid]

    def kill_orphans(self, timeout: float) -> list[int]:
        """SIGKILL adopted orphans, in rounds (a killed shim hands its own children to the subreaper).

        Returns the pids that were killed, so a caller can report what had been left behind.
        """
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [pid for pid in self.orphans() if processes.is_running(pid)]
            if not alive:
                break
            for pid in alive:
                processes.kill_child_of(self.subreaper.pid, pid)
            killed.extend(pid for pid in alive if pid not in killed)
            time.sleep(POLL_INTERVAL)
        return killed

    def terminate(self, timeout: float = 10.0) -> list[int]:
        """End the command, kill its orphans, wait for the subreaper. Returns the orphan pids that were killed."""
        self.stop_main(timeout)
        killed = self.kill_orphans(timeout)
        try:
            self.subreaper.wait(timeout)
        except subprocess.TimeoutExpired:
            # Last resort; whatever is still below it is re-parented to PID 1.
            self.subreaper.kill()
            self.subreaper.wait(timeout)
        self.close()
        return killed

    def wait(self, timeout: float) -> int:
        """Wait for the subreaper, i.e. for the command and every orphan it adopted."""
        return self.subreaper.wait(timeout)

    def close(self) -> None:
        if self._main_pidfd is not None:
            os.close(self._main_pidfd)
            self._main_pidfd = None


def supervise(
    argv: Sequence[str],
    *,
    name: str,
    run_dir: Path,
    env: Mapping[str, str] | None = None,
    stdin: Stdio = subprocess.DEVNULL,
    stdout: Stdio = None,
    stderr: Stdio = None,
    linger: float = 600.0,
    start_timeout: float = 10.0,
) -> Supervised:
    """Start argv under a new subreaper (in a new session, so terminal signals do not reach it)."""
    pid_file = run_dir / f"{name}.pid"
    status_file = run_dir / f"{name}.status"
    for stale in (pid_file, status_file):
        stale.unlink(missing_ok=True)
    subreaper = subprocess.Popen(
        [sys.executable, "-I", str(SUBREAPER_SCRIPT), "--pid-file", str(pid_file),
         "--status-file", str(status_file), "--linger", str(linger), "--", *argv],
        env=dict(env) if env is not None else None,
        stdin=stdin, stdout=stdout, stderr=stderr,
        start_new_session=True,
    )
    deadline = time.monotonic() + start_timeout
    while not pid_file.exists():
        if subreaper.poll() is not None:
            raise RuntimeError(f"{name}: subreaper exited with {subreaper.returncode} before starting {argv[0]}")
        if time.monotonic() >= deadline:
            subreaper.kill()
            subreaper.wait()
            raise TimeoutError(f"{name}: {argv[0]} not started after {start_timeout}s")
        time.sleep(POLL_INTERVAL / 5)
    main_pid = int(pid_file.read_text())
    supervised = Supervised(name, subreaper, main_pid, status_file)
    pidfd = processes.open_pidfd(main_pid)
    # Checked after taking the pidfd: while the command is the subreaper's (possibly zombie) child its pid is its own.
    if pidfd is not None and processes.parent_pid(main_pid) != subreaper.pid:
        os.close(pidfd)
        pidfd = None
    supervised._main_pidfd = pidfd
    return supervised

"""Plain runc against one state root, one method per subcommand the tests use.

Checkpoint and restore failures carry the tail of CRIU's own log (dump.log / restore.log in the work dir), which
is where the actual reason is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from . import commands, logs
from .supervisor import Supervised, supervise

RESTORE_TIMEOUT = 30.0


def _log_tail(path: Path, lines: int = 30) -> str:
    return f"--- {path} (tail) ---\n" + logs.tail(path, lines)


class Runc:
    """`runc --root <root> ...` with the environment (PATH with criu) the tests run it in; `wrap` turns each
    command line into the one to run (e.g. harness.cgroup2_view.wrap: runc in a cgroup v2 view of the host)."""

    def __init__(self, root: Path, env: Mapping[str, str], binary: str = "runc",
                 wrap: Callable[[Sequence[str]], list[str]] = list):
        self.root = root
        self.env = dict(env)
        self.binary = binary
        self.wrap = wrap

    def argv(self, *args: str) -> list[str]:
        return self.wrap([self.binary, "--root", str(self.root), *args])

    def _run(self, *args: str, check: bool = True, timeout: float = commands.DEFAULT_TIMEOUT):
        return commands.run(self.argv(*args), env=self.env, check=check, timeout=timeout)

    def list(self) -> list[dict]:
        # runc prints `null` rather than `[]` when there is no container.
        return json.loads(self._run("list", "--format", "json").stdout) or []

    def state(self, container_id: str) -> dict:
        return json.loads(self._run("state", container_id).stdout)

    def checkpoint(self, container_id: str, image_path: Path, work_path: Path, *, leave_running: bool = False) -> None:
        """Dump the container to image_path. Without leave_running runc kills it and deletes its state after."""
        args = ["checkpoint", "--image-path", str(image_path), "--work-path", str(work_path)]
        if leave_running:
            args.append("--leave-running")
        try:
            self._run(*args, container_id, timeout=60)
        except commands.CommandFailed as exc:
            raise commands.CommandFailed(exc.argv, exc.returncode, exc.stdout,
                                         exc.stderr + "\n" + _log_tail(work_path / "dump.log")) from None

    def restore_detached(self, container_id: str, *, bundle: Path, image_path: Path, work_path: Path,
                         pid_file: Path, run_dir: Path, stdin: int | IO, stdout: int | IO,
                         stderr: int | IO) -> Supervised:
        """`runc restore --detach` under a subreaper, which adopts the restored container when runc exits.

        The restored process gets runc's own stdio in place of the pipes it had at checkpoint time: runc reads
        descriptors.json and passes CRIU an inherit_fd {key "pipe:[<ino>]", fd i} for each pipe among fds 0-2, and
        in detached mode those are runc's fds 0-2. So the caller's stdin/stdout/stderr become the container's.
        Returns once runc has exited successfully; the caller must kill/delete the container and wait() the result.
        """
        argv = self.argv("restore", "--detach", "--image-path", str(image_path), "--work-path", str(work_path),
                         "--bundle", str(bundle), "--pid-file", str(pid_file), container_id)
        restored = supervise(argv, name=f"restore-{container_id}", run_dir=run_dir, env=self.env,
                             stdin=stdin, stdout=stdout, stderr=stderr)
        try:
            code = restored.wait_main(RESTORE_TIMEOUT)
        except TimeoutError:
            restored.terminate()
            raise
        if code != 0:
            restored.terminate()
            raise commands.CommandFailed(argv, code, "", _log_tail(work_path / "restore.log"))
        return restored

    def kill(self, container_id: str, signal: str = "KILL", *, check: bool = True) -> None:
        self._run("kill", container_id, signal, check=check)

    def delete(self, container_id: str, *, force: bool = False, check: bool = True) -> None:
        self._run("delete", *(["--force"] if force else []), container_id, check=check)

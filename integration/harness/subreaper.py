"""A standalone program: run one command as the child of a child subreaper that reaps everything orphaned below it.

Anything that daemonises (the shims containerd starts, a container restored by `runc restore --detach`) is
re-parented to the nearest subreaper. Being that subreaper keeps such orphans identifiable as ours (children of
this process), so teardown can find and kill them by pid, and reaps them at once (PID 1 on the test machines
reaps orphans only after a delay). Run as

    python subreaper.py --pid-file F --status-file S [--linger SECONDS] -- COMMAND ARGS...

it writes COMMAND's pid to F, forwards SIGTERM/SIGINT/SIGHUP to it, writes its exit code to S when it ends, keeps
reaping adopted orphans until none is left (at most --linger seconds after COMMAND ended) and exits with COMMAND's
exit code. It imports only the standard library because it runs as a plain script, outside the harness package.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
POLL_INTERVAL = 0.05


def _write_atomically(path: str, text: str) -> None:
    # Readers poll for the file; rename makes them see either nothing or the whole content.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--status-file", required=True)
    parser.add_argument("--linger", type=float, default=600.0,
                        help="seconds to keep reaping adopted orphans after COMMAND ended")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    _become_subreaper()
    main_pid: int | None = None

    def forward(signum: int, _frame: object) -> None:
        # Only while the command is unreaped: its pid cannot be reused before we wait for it.
        if main_pid is not None:
            os.kill(main_pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)

    main_pid = os.posix_spawnp(command[0], command, os.environ)
    _write_atomically(args.pid_file, str(main_pid))

    exit_code: int | None = None
    deadline = float("inf")
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if exit_code is None else os.WNOHANG)
        except ChildProcessError:
            break  # nobody left to reap
        if pid == 0:
            if time.monotonic() >= deadline:
                print(f"subreaper: giving up on orphans of {command[0]} after {args.linger}s", file=sys.stderr)
                break
            time.sleep(POLL_INTERVAL)
            continue
        if pid == main_pid:
            main_pid = None
            exit_code = os.waitstatus_to_exitcode(status)
            _write_atomically(args.status_file, str(exit_code))
            deadline = time.monotonic() + args.linger
    assert exit_code is not None
    return exit_code if exit_code >= 0 else 128 - exit_code


if __name__ == "__main__":
    sys.exit(main())

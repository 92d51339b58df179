"""A shim server after checkpoints, pyshim against containerd's Go runc shim: its RSS after N checkpoints, and the
latency of its first checkpoint. A benchmark script, not a test.

One private containerd (integration/harness, 2.x by default) with the local busybox test image. Each round, per shim
(alternating which goes first): `ctr run -d --null-io` a tiny container (`sleep`), the shim server's RSS once idle,
`ctr task checkpoint --image-path D --work-path W` (leave running) timed for the first checkpoint of that server's
life, then N-1 more, then the server's RSS again (/proc/PID/smaps_rollup; pyshim's server only: its checkpoint
workers are separate short-lived processes, and the fork server with its spares is one per containerd, reported
apart). `--checkpoint-in-server` sets PYSHIM_CHECKPOINT_WORKER=0 in containerd's environment: pyshim's servers then
checkpoint in their own process, as before shim/criu/offload.py. Run as root:

    /opt/pyshim/venv/bin/python benchmarks/checkpoint_rss.py --containerd 2 --rounds 5 --checkpoints 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lifecycle  # benchmarks/: shims, interleaving, timing, host description, section writing
from harness import processes  # noqa: E402
from harness.containerd import GO_SHIM_SOCKET_DIR, Containerd, remove_go_shim_socket_dir  # noqa: E402
from harness.environment import CONTAINERD_VERSIONS, load_environment, unavailable_reason  # noqa: E402
from harness.image import build_test_image  # noqa: E402
from lifecycle import GO, PY, SHIMS, in_turn, median, memory_kib, ratio

CTR_TIMEOUT = 120.0
SETTLE = 0.5  # seconds after `ctr run -d` before the idle RSS: the server has answered its last call by then


class RoundFailed(Exception):
    pass


class Bench:
    def __init__(self, c: Containerd, image, images_root: Path, checkpoints: int):
        self.c = c
        self.image = image
        self.images_root = images_root
        self.checkpoints = checkpoints
        self.samples = {shim: {"idle": [], "after": [], "first": [], "later": []} for shim in SHIMS}
        self.failures: list[str] = []

    def ctr(self, *args: str) -> tuple[float, subprocess.CompletedProcess]:
        return lifecycle.timed([*self.c.ctr_argv(), *args], env=self.c.env, stdin=subprocess.DEVNULL, text=True,
                               timeout=CTR_TIMEOUT)

    def server_pid(self, shim, container_id: str) -> int:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            argv = processes.cmdline(int(entry))
            flags = lifecycle.flag_values(argv)
            if (flags.get("-id") == container_id and flags.get("-address") == self.c.address
                    and argv[-1:] != ["delete"] and shim.binary_name in [Path(a).name for a in argv[:3]]):
                return int(entry)
        raise RoundFailed(f"no shim server found for {container_id}")

    def one_round(self, shim, counted: bool) -> None:
        container_id = self.c.new_id("rss")
        workdir = Path(tempfile.mkdtemp(prefix="py-" if shim is PY else "go-", dir=self.images_root))
        try:
            _, result = self.ctr("run", "-d", "--null-io", *self.c.runtime_flags(shim.runtime), self.image.ref,
                                 container_id, "sleep", "3600")
            if result.returncode != 0:
                raise RoundFailed(f"ctr run: {result.stderr.strip()}")
            time.sleep(SETTLE)
            pid = self.server_pid(shim, container_id)
            idle = memory_kib(pid)["Rss"]
            times = []
            for n in range(self.checkpoints):
                images, work = workdir / f"i{n}", workdir / f"w{n}"
                seconds, result = self.ctr("task", "checkpoint", "--image-path", str(images), "--work-path", str(work),
                                           container_id)
                if result.returncode != 0:
                    raise RoundFailed(f"checkpoint {n + 1}: {result.stderr.strip()}")
                times.append(seconds)
                shutil.rmtree(images, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
                self.remove_checkpoint_images()
            time.sleep(SETTLE)
            after = memory_kib(pid)["Rss"]
            if counted:
                s = self.samples[shim]
                s["idle"].append(idle)
                s["after"].append(after)
                s["first"].append(times[0])
                s["later"] += times[1:]
        except RoundFailed as exc:
            self.failures.append(f"{shim.label}: {exc}")
        finally:
            self.ctr("tasks", "rm", "-f", container_id)
            self.ctr("containers", "rm", container_id)
            shutil.rmtree(workdir, ignore_errors=True)

    def remove_checkpoint_images(self) -> None:
        """ctr makes a containerd.io/checkpoint/... image for runtimes other than io.containerd.runc.v2."""
        _, result = self.ctr("images", "ls", "-q")
        for ref in result.stdout.split():
            if ref.startswith("containerd.io/checkpoint/"):
                self.ctr("images", "rm", ref)

    def fork_server_memory(self) -> list[str]:
        """pyshim's per-containerd processes: the fork server, its shim spare and its checkpoint spare."""
        rows = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                argv = processes.cmdline(int(entry))
                for token in ("forkserver", "forkserver-spare", "forkserver-criu"):
                    if token in argv and str(self.c.pid) in argv:
                        m = memory_kib(int(entry))
                        rows.append(f"{token} (pid {entry}): RSS {m['Rss'] / 1024:.1f} MiB, PSS {m['Pss'] / 1024:.1f} "
                                    f"MiB, USS {m['Uss'] / 1024:.1f} MiB")
        return sorted(rows)


def render(marker: str, heading: str, command: str, host: list[str], bench: Bench, rounds: int, in_server: bool,
           forkserver_rows: list[str]) -> str:
    py, go = bench.samples[PY], bench.samples[GO]
    mode = ("in the server (PYSHIM_CHECKPOINT_WORKER=0)" if in_server
            else "in a checkpoint worker (the default)")
    lines = [f"<!-- BEGIN {marker} -->", f"## {heading}", "", "Command (as root, in the repository):", "",
             f"    {command}", "", *host, f"- pyshim checkpoints {mode}", "",
             f"{rounds} rounds per shim after one uncounted warm-up round, alternating which shim goes first; "
             f"each round a fresh tiny container (`sleep`), {bench.checkpoints} leave-running checkpoints through "
             "`ctr task checkpoint --image-path D --work-path W`. Medians; the ratio is pyshim / Go.", "",
             "| | pyshim | Go | ratio |", "|---|---|---|---|",
             f"| server RSS, idle (MiB) | {median(py['idle']) / 1024:.1f} | {median(go['idle']) / 1024:.1f} | "
             f"{ratio(median(py['idle']), median(go['idle']))} |",
             f"| server RSS after {bench.checkpoints} checkpoints (MiB) | {median(py['after']) / 1024:.1f} | "
             f"{median(go['after']) / 1024:.1f} | **{ratio(median(py['after']), median(go['after']))}** |",
             f"| first checkpoint of a server (ms) | {median(py['first']) * 1000:.1f} | "
             f"{median(go['first']) * 1000:.1f} | **{ratio(median(py['first']), median(go['first']))}** |",
             f"| later checkpoints (ms) | {median(py['later']) * 1000:.1f} | {median(go['later']) * 1000:.1f} | "
             f"{ratio(median(py['later']), median(go['later']))} |", ""]
    if forkserver_rows:
        lines += ["pyshim's processes per containerd (not in the table), at the end: " + "; ".join(forkserver_rows), ""]
    if bench.failures:
        lines += ["Failures: " + "; ".join(bench.failures), ""]
    lines.append(f"<!-- END {marker} -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containerd", choices=CONTAINERD_VERSIONS, default="2")
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds per shim (5)")
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints per round (20)")
    parser.add_argument("--checkpoint-in-server", action="store_true",
                        help="PYSHIM_CHECKPOINT_WORKER=0: pyshim checkpoints in the server process (the old way)")
    parser.add_argument("--images-dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--out", type=Path, default=lifecycle.REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if not args.containerd.startswith("2"):
        print("containerd 2.x only: 1.6/1.7's ctr drops --image-path for runtimes not named io.containerd.runc.*",
              file=sys.stderr)
        return 2
    if reason := unavailable_reason():
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    command = shlex.join([sys.executable, *sys.argv])
    run_dir_existed = GO_SHIM_SOCKET_DIR.parent.exists()
    lifecycle.become_subreaper()
    env = load_environment()
    image = build_test_image(lifecycle.CACHE_DIR, busybox=env.busybox)
    images_root = Path(tempfile.mkdtemp(prefix="pyshim-bench-rss-", dir=args.images_dir))
    c = Containerd(args.containerd, env, log_dir=lifecycle.LOG_DIR)
    if args.checkpoint_in_server:
        c.env["PYSHIM_CHECKPOINT_WORKER"] = "0"
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    bench = None
    try:
        c.start()
        c.import_image(image)
        version = c.server_version()
        bench = Bench(c, image, images_root, args.checkpoints)
        for i in range(args.rounds + 1):
            for shim in in_turn(i):
                print(f"round {i} {shim.label}", file=sys.stderr)
                bench.one_round(shim, counted=i > 0)
        forkserver_rows = bench.fork_server_memory()
    finally:
        notes = c.stop()
        lifecycle.end_fork_servers()
        shutil.rmtree(images_root, ignore_errors=True)
        if not run_dir_existed:
            remove_go_shim_socket_dir()
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    today = datetime.date.today().isoformat()
    mode = "in-server" if args.checkpoint_in_server else "worker"
    marker = f"checkpoint-rss containerd={version} date={today} mode={mode}"
    heading = f"A server after checkpoints, containerd {version}, {today} (pyshim checkpoints: {mode})"
    host = lifecycle.describe_host(env) + [f"- load average before / after: {load_before} / {load_after}"]
    if notes:
        host.append("- teardown: " + "; ".join(notes))
    section = render(marker, heading, command, host, bench, args.rounds, args.checkpoint_in_server, forkserver_rows)
    print(section)
    lifecycle.write_section(args.out, marker, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does an exec's output reach `ctr task exec`? pyshim against the Go runc shim, under CPU load: a script, not a test.

One private containerd (integration/harness) of the version asked for, one long-running busybox container per shim;
then N rounds, alternating the shims (ABAB / BABA), each round a `ctr task exec` of a short process that prints one
known line and exits at once. An exec whose stdout is not exactly that line (empty, cut, or another exit code) is
counted, per shim. With --load K, K busy-loop processes (started here, ended by pid at the end) keep the CPUs busy
meanwhile, as a CI machine under load does.

    /opt/pyshim/venv/bin/python benchmarks/exec_output.py --containerd 2 --execs 300 --load 4
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(REPO / "integration"), str(REPO)]

from harness.containerd import PYSHIM, RUNC_V2, Containerd  # noqa: E402
from harness.environment import load_environment  # noqa: E402
from harness.image import build_test_image  # noqa: E402

CACHE_DIR = Path("/var/tmp/pyshim-bench-cache")
LOG_DIR = Path("/var/tmp/pyshim-bench-logs")
LABELS = {PYSHIM: "pyshim", RUNC_V2: "Go runc shim"}


def start_load(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(count)]


def stop_load(busy: list[subprocess.Popen[bytes]]) -> None:
    for process in busy:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def one_exec(c: Containerd, container_id: str, exec_id: str, command: list[str], expected: str) -> str | None:
    """None when the exec printed exactly `expected` and exited 0; else what went wrong."""
    result = c.ctr("task", "exec", "--exec-id", exec_id, container_id, *command, check=False, timeout=60)
    if result.returncode != 0:
        return f"exit {result.returncode}: {result.stderr.strip()[:200]}"
    if result.stdout != expected:
        return "empty" if not result.stdout else f"wrong: {result.stdout[:80]!r}"
    return None


def shim_says(log_path: Path, exec_ids: list[str]) -> list[str]:
    """pyshim's debug line for each of these execs, written when it released the exec's IO at Delete: whether the
    output copy reached end of file and how many bytes it wrote into the client's fifo."""
    wanted = {f"exec {exec_id}:": exec_id for exec_id in exec_ids}
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        for marker, exec_id in wanted.items():
            if marker in line and "output" in line:
                found.append(f"{exec_id}: {line[line.index(marker):][:160]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containerd", default="2", help="containerd line (default 2)")
    parser.add_argument("--execs", type=int, default=300, help="execs per shim (default 300)")
    parser.add_argument("--load", type=int, default=4, help="busy-loop processes meanwhile (default 4)")
    parser.add_argument("--shims", default="pyshim,go", help="which shims, comma-separated (default pyshim,go)")
    args = parser.parse_args(argv)
    runtimes = [{"pyshim": PYSHIM, "go": RUNC_V2}[name] for name in args.shims.split(",")]
    env = load_environment()
    image = build_test_image(CACHE_DIR, busybox=env.busybox)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    failures: dict[str, Counter[str]] = {r: Counter() for r in runtimes}
    examples: dict[str, list[str]] = {r: [] for r in runtimes}
    busy: list[subprocess.Popen[bytes]] = []
    lost: list[tuple[str, str]] = []  # (runtime, exec id) of each exec without its output
    started = time.monotonic()
    with Containerd(args.containerd, env, log_dir=LOG_DIR) as c, c.serving(image):
        containers = {}
        for runtime in runtimes:
            containers[runtime] = c.new_id("execio")
            c.run(containers[runtime], image, "sleep", "100000", runtime=runtime)
        busy = start_load(args.load)
        try:
            for n in range(args.execs):
                order = runtimes if n % 2 == 0 else runtimes[::-1]
                for runtime in order:
                    expected = f"exec-output-{n}\n"
                    exec_id = f"{LABELS[runtime].split()[0].lower()}-{n}"
                    problem = one_exec(c, containers[runtime], exec_id, ["echo", expected.strip()], expected)
                    if problem is not None:
                        failures[runtime][problem.split(":")[0]] += 1
                        lost.append((runtime, exec_id))
                        if len(examples[runtime]) < 5:
                            examples[runtime].append(f"exec {exec_id}: {problem}")
        finally:
            stop_load(busy)
            load = os.getloadavg()
            shim_lines = shim_says(c.log_path, [exec_id for runtime, exec_id in lost if runtime == PYSHIM])
            for container_id in containers.values():
                c.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
    print(f"containerd {args.containerd}, {args.execs} execs per shim, {args.load} busy loops, "
          f"{time.monotonic() - started:.0f} s, load average at the end {load[0]:.1f} {load[1]:.1f}")
    for runtime in runtimes:
        total = sum(failures[runtime].values())
        detail = ", ".join(f"{kind} {count}" for kind, count in sorted(failures[runtime].items())) or "-"
        print(f"{LABELS[runtime]}: {total}/{args.execs} execs without their output ({detail})")
        for example in examples[runtime]:
            print(f"    {example}")
    if shim_lines:
        print("what pyshim logged when it released those execs' IO (bytes written into the client's fifo):")
        for line in shim_lines:
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

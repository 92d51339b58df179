"""`pyshim checkpoint create --export` and `pyshim restore` of containers that have touched N MiB: time and archive
size for each compression (none, gzip, zstd). A benchmark script, not a test.

One private containerd (integration/harness, 2.x) with the local busybox test image. The workload is busybox awk
holding an N-byte string of "x" (every page written; see benchmarks/checkpoint.py) and waiting on a sleep: its
memory compresses extremely well, so the compressed sizes here are a best case (memory of random bytes would give
archives about as large as the memory, and slower to compress). For each size and compression: the export with
--leave-running (wall time of the command: CRIU dump through containerd and pyshim, rootfs diff, archive writing),
the archive's size, and the restore of that archive under a new name on the same containerd (wall time of
`pyshim restore`: unpacking, snapshot, CRIU restore; the task is RUNNING when it returns). Run as root:

    /opt/pyshim/venv/bin/python benchmarks/tool_archive.py [--mib 64 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "integration"), str(ROOT)]

from harness.containerd import PYSHIM, Containerd  # noqa: E402
from harness.environment import load_environment  # noqa: E402
from harness.image import build_test_image  # noqa: E402
from harness.tasks import task_pid  # noqa: E402

from shim.tool.archive import human_size  # noqa: E402

MIB = 1 << 20
SUFFIXES = (".tar", ".tar.gz", ".tar.zst")


def pyshim(containerd: Containerd, store: Path, *args: str) -> float:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "shim.tool", "--address", containerd.address, "--namespace",
                             containerd.namespace, "--store", str(store), *args], capture_output=True, text=True,
                            timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"pyshim {' '.join(args)} failed: {result.stderr}")
    return time.monotonic() - started


def wait_rss(pid: int, mib: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:") and int(line.split()[1]) * 1024 >= 0.97 * mib * MIB:
                return
        time.sleep(0.2)
    raise TimeoutError(f"pid {pid} did not touch {mib} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    environment = load_environment()
    work = Path(tempfile.mkdtemp(prefix="pyshim-tool-bench-", dir="/var/tmp"))
    try:
        return _measure(args, environment, work)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def _measure(args, environment, work: Path) -> int:
    image = build_test_image(work / "image-cache", busybox=environment.busybox)
    rows = []
    with Containerd("2", environment, log_dir=work / "logs") as containerd:
        containerd.import_image(image)
        config = str(containerd.pyshim_config())
        for mib in args.mib:
            original = containerd.new_id(f"mem{mib}")
            program = (f'BEGIN {{ n = {mib} * {MIB}; s = "x"; while (length(s) < n) s = s s; '
                       f'if (length(s) > n) s = substr(s, 1, n); system("exec sleep 3600") }}')
            containerd.run(original, image, "awk", program, runtime=PYSHIM)
            try:
                wait_rss(task_pid(containerd, original), mib)
                for suffix in SUFFIXES:
                    exports, restores, sizes = [], [], []
                    for run in range(args.runs):
                        archive = work / f"{original}-{run}{suffix}"
                        exports.append(pyshim(containerd, work / "store", "checkpoint", "create", original,
                                              "--leave-running", "--export", str(archive)))
                        sizes.append(archive.stat().st_size)
                        restored = containerd.new_id("restored")
                        restores.append(pyshim(containerd, work / "store", "restore", str(archive), "--name",
                                               restored, "--runtime-config", config))
                        containerd.ctr("task", "rm", "-f", restored, check=False, timeout=60)
                        containerd.ctr("containers", "rm", restored, check=False, timeout=60)
                        archive.unlink()
                    rows.append((mib, suffix, statistics.median(exports), human_size(statistics.median(sizes)),
                                 statistics.median(restores)))
                    print(f"{mib} MiB {suffix}: export {rows[-1][2]:.2f} s, {rows[-1][3]}, "
                          f"restore {rows[-1][4]:.2f} s", flush=True)
            finally:
                containerd.ctr("task", "rm", "-f", original, check=False, timeout=60)
                containerd.ctr("containers", "rm", original, check=False, timeout=60)
    print(f"\n{args.runs} run(s) each, medians\n")
    print("| touched memory | archive | export (s) | archive size | restore (s) |")
    print("|---|---|---|---|---|")
    for mib, suffix, export, size, restore in rows:
        print(f"| {mib} MiB | `{suffix}` | {export:.2f} | {size} | {restore:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

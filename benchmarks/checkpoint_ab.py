"""pyshim's checkpoint in a worker against pyshim's checkpoint in the server, at the same time: a benchmark script,
not a test.

Two private containerds (2.x) run side by side, one with pyshim's default (checkpoints in a worker process,
shim/criu/offload.py) and one with PYSHIM_CHECKPOINT_WORKER=0 (checkpoints in the server process); each runs a tiny
container (`sleep`) under pyshim. The two are checkpointed in turn (`ctr task checkpoint --image-path D`, leave running,
alternating which goes first), so both see the same load. The first checkpoint of each is left out (the in-server
one pays its imports there; benchmarks/checkpoint_rss.py measures that); the rest give medians and p10s of ctr's wall
time. Run as root:

    /opt/pyshim/venv/bin/python benchmarks/checkpoint_ab.py --runs 24
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lifecycle
from harness.containerd import Containerd  # noqa: E402
from harness.environment import load_environment, unavailable_reason  # noqa: E402
from harness.image import build_test_image  # noqa: E402

MODES = {"worker": {}, "in-server": {"PYSHIM_CHECKPOINT_WORKER": "0"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=24, help="checkpoints per mode, the first of each left out")
    args = parser.parse_args()
    if reason := unavailable_reason():
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    lifecycle.become_subreaper()
    env = load_environment()
    image = build_test_image(lifecycle.CACHE_DIR, busybox=env.busybox)
    images = Path(tempfile.mkdtemp(prefix="pyshim-bench-ab-", dir="/var/tmp"))
    daemons: dict[str, Containerd] = {}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        ids = {}
        for mode, extra in MODES.items():
            c = Containerd("2", env, log_dir=lifecycle.LOG_DIR)
            c.env.update(extra)
            daemons[mode] = c
            c.start()
            c.import_image(image)
            ids[mode] = c.new_id("ab")
            c.ctr("run", "-d", "--null-io", *c.runtime_flags(lifecycle.PY.runtime), image.ref, ids[mode], "sleep",
                  "3600")
        for n in range(args.runs):
            for mode in (("worker", "in-server") if n % 2 == 0 else ("in-server", "worker")):
                c, target = daemons[mode], images / f"{mode}-{n}"
                started = time.perf_counter()
                c.ctr("task", "checkpoint", "--image-path", str(target), ids[mode], timeout=120)
                if n:
                    times[mode].append((time.perf_counter() - started) * 1000)
                shutil.rmtree(target, ignore_errors=True)
                for ref in c.ctr("images", "ls", "-q").stdout.split():  # ctr's record, named by the second
                    if ref.startswith("containerd.io/checkpoint/"):
                        c.ctr("images", "rm", ref, check=False)
    finally:
        for c in daemons.values():
            c.stop()
        shutil.rmtree(images, ignore_errors=True)
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average before / after: {load_before} / {load_after}")
    print("| pyshim checkpoints | n | median ms | p10 ms |\n|---|---|---|---|")
    for mode, values in times.items():
        print(f"| {mode} | {len(values)} | {statistics.median(values):.1f} | "
              f"{sorted(values)[len(values) // 10]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

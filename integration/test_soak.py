"""A soak of checkpoints and restores of redis holding 20,000 keys under pyshim (containerd 2.x), its data verified
every cycle, and what the shim and the host hold checked flat.

- Leave-running cycles: one redis container; each cycle increments a counter key, checkpoints the task (leave
  running) into a fresh image path, and checks the dataset digest (`DEBUG DIGEST`, all 20,000 keys and the counter)
  and the counter's value. The shim server is the same process throughout: its RSS and open descriptors are sampled
  each cycle.
- Exit + restore cycles: each cycle increments the counter, checkpoints with --exit, removes the task and container,
  and restores the image into a new container (runtime options file with CriuImagePath); the restored redis must
  answer with the digest taken before the checkpoint. Each restore has its own shim server: its RSS is sampled.
- Throughout: the mounts under the test containerd's directories, CRIU's lock rules and tables on the host, and
  pyshim's per-containerd processes (fork server and its spares: RSS and descriptors) are sampled; at the end they
  must be where they were after the first cycle (RSS: within 1 MiB, median of the last 10 samples against the first
  10), and no CRIU or worker process is left.

CI (`pytest integration/test_soak.py`) runs 100 leave-running and 30 exit+restore cycles (about 2 to 3 minutes on
2 cores). The same soak, longer and with its figures printed as Markdown, runs as a script:

    PYSHIM_ENV_FILE=... python integration/test_soak.py --leave-running 300 --exit-restore 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # run as a script: the harness and the shim package from this checkout
    sys.path[0:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import pytest
from harness import mounts, processes
from harness.containerd import PYSHIM, Containerd
from harness.image import TestImage
from harness.redis_image import build_redis_image
from harness.tasks import remove, task_status, wait_status

from shim.criu import netlock

LEAVE_RUNNING = 100
EXIT_RESTORE = 30
KEYS = 20000
PORT = "6379"
REDIS_SERVER = ("redis-server", "--bind", "127.0.0.1", "--port", PORT, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "warning", "--enable-debug-command", "yes")
RSS_SLACK_KIB = 1024


@dataclass
class Samples:
    server_rss: list[int] = field(default_factory=list)  # KiB, the leave-running shim server
    server_fds: list[int] = field(default_factory=list)
    restored_rss: list[int] = field(default_factory=list)  # KiB, each restored container's shim server
    per_containerd_rss: list[int] = field(default_factory=list)  # KiB, fork server + its spares, summed
    per_containerd_fds: list[int] = field(default_factory=list)
    mounts: list[int] = field(default_factory=list)
    rules: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    execs: int = 0  # `ctr task exec` runs of redis-cli
    empty_answers: int = 0  # of those, the ones that exited 0 without output (asked again)


# Tries of a read-only command whose `ctr task exec` exited 0 with nothing on stdout. ctr itself loses an exec's
# output now and then on a loaded machine, whatever the shim: after the Delete it closes its stdout fifo at once, and
# what its copy had not read yet is dropped (benchmarks/exec_output.py counts this for both shims).
EMPTY_ANSWER_TRIES = 3


class Redis:
    def __init__(self, containerd: Containerd) -> None:
        self.c = containerd
        self.execs = 0
        self.empty_answers = 0  # execs that exited 0 with no output and were asked again

    def _exec(self, container_id: str, *command: str) -> str:
        self.execs += 1
        result = self.c.ctr("task", "exec", "--exec-id", f"soak{self.execs}", container_id, "redis-cli", "-h",
                            "127.0.0.1", "-p", PORT, *command, timeout=30)
        return result.stdout.strip()

    def cli(self, container_id: str, *command: str) -> str:
        """A read-only (or idempotent) command's answer; asked again, a bounded number of times, when ctr printed
        nothing although the command succeeded (redis-cli always prints an answer)."""
        for _ in range(EMPTY_ANSWER_TRIES - 1):
            answer = self._exec(container_id, *command)
            if answer:
                return answer
            self.empty_answers += 1
        return self._exec(container_id, *command)

    def incr(self, container_id: str, key: str) -> str:
        """INCR once (never repeated: a second try would count twice); its answer, read back with GET when ctr lost
        the INCR's own output."""
        answer = self._exec(container_id, "INCR", key)
        if answer:
            return answer
        self.empty_answers += 1
        return self.cli(container_id, "GET", key)

    def wait_ready(self, container_id: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.cli(container_id, "PING") == "PONG":
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert time.monotonic() < deadline, f"redis in {container_id} did not answer PING"
            time.sleep(0.1)

    def state(self, container_id: str) -> tuple[str, str, str]:
        """(DBSIZE, the counter, DEBUG DIGEST): the whole dataset in three answers."""
        return (self.cli(container_id, "DBSIZE"), self.cli(container_id, "GET", "soak:counter"),
                self.cli(container_id, "DEBUG", "DIGEST"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mount_count(c: Containerd) -> int:
    """Mounts under this containerd's private directories (root, state, bundles): other containerds on the host
    mount and unmount their own meanwhile."""
    return len(mounts.mounts_under(c.tmp))


def rule_count() -> int:
    """CRIU's network-lock rules and tables on the host (iptables, ip6tables, nftables): a lock a checkpoint forgot.
    Other rules are other tests' (the host is shared)."""
    count = 0
    for tool in ("iptables-save", "ip6tables-save"):
        count += len(netlock.iptables_lines(subprocess.run([tool], capture_output=True, text=True, timeout=30).stdout))
    ruleset = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30).stdout
    return count + sum(1 for family, name in netlock.nft_tables(ruleset) if netlock.is_criu_table(family, name))


def per_containerd(containerd_pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()
            and any(t in (argv := processes.cmdline(int(e))) for t in ("forkserver", "forkserver-criu",
                                                                       "forkserver-spare"))
            and str(containerd_pid) in argv]


def leftover_workers(c: Containerd, settle: float = 10.0) -> list[str]:
    """Checkpoint workers and CRIUs of this containerd's tasks (working in a bundle under its state dir) still there
    after settle seconds: a worker answers first and then removes what a dump with exit left (`runc delete`)."""
    deadline = time.monotonic() + settle
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    name = Path(f"/proc/{entry}/comm").read_text().strip()
                    cwd = os.readlink(f"/proc/{entry}/cwd")
                except OSError:
                    continue
                if name in ("pyshim-ckpt", "criu") and cwd.startswith(str(c.state)):
                    found.append(f"{entry} {name}")
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def sample_host(c: Containerd, s: Samples) -> None:
    pids = per_containerd(c.pid)
    s.per_containerd_rss.append(sum(rss_kib(p) for p in pids))
    s.per_containerd_fds.append(sum(fd_count(p) for p in pids))
    s.mounts.append(mount_count(c))
    s.rules.append(rule_count())


def soak(c: Containerd, image: TestImage, leave_running: int, exit_restore: int) -> Samples:
    s = Samples()
    redis = Redis(c)
    container_id = c.new_id("soak")
    images_root = c.tmp / "soak-images"
    images_root.mkdir(exist_ok=True)
    started = time.monotonic()
    try:
        c.run(container_id, image, *REDIS_SERVER, runtime=PYSHIM)
        redis.wait_ready(container_id)
        assert redis.cli(container_id, "DEBUG", "POPULATE", str(KEYS), "soak") == "OK"
        server = c.shim_pid(container_id)
        assert server is not None
        for cycle in range(1, leave_running + 1):
            assert redis.incr(container_id, "soak:counter") == str(cycle)
            before = redis.state(container_id)
            images = images_root / f"lr-{cycle}"
            c.ctr("task", "checkpoint", "--image-path", str(images), container_id, timeout=120)
            assert (images / "pyshim-checkpoint.json").is_file(), f"cycle {cycle}: no complete image"
            subprocess.run(["rm", "-rf", str(images)], check=True)
            _remove_checkpoint_images(c)
            after = redis.state(container_id)
            assert after == before == (str(KEYS + 1), str(cycle), before[2]), f"cycle {cycle}: {before} -> {after}"
            assert c.shim_pid(container_id) == server, f"cycle {cycle}: the shim server changed"
            s.server_rss.append(rss_kib(server))
            s.server_fds.append(fd_count(server))
            sample_host(c, s)
        s.seconds["leave-running"] = time.monotonic() - started

        started = time.monotonic()
        counter = leave_running
        for cycle in range(1, exit_restore + 1):
            counter += 1
            assert redis.incr(container_id, "soak:counter") == str(counter)
            before = redis.state(container_id)
            images = images_root / f"er-{cycle}"
            c.ctr("task", "checkpoint", "--exit", "--image-path", str(images), container_id, timeout=120)
            assert wait_status(c, container_id, "STOPPED", timeout=20) == "STOPPED"
            _remove_checkpoint_images(c)
            remove(c, container_id)
            config = c.tmp / f"soak-restore-{cycle}.toml"
            config.write_text(f'BinaryName = "runc"\nRoot = "{c.runc_root}"\nCriuImagePath = "{images}"\n')
            container_id = c.new_id("soakr")
            flags = c.runtime_flags(PYSHIM)
            flags[flags.index("--runtime-config-path") + 1] = str(config)
            i = flags.index("--fifo-dir")
            del flags[i:i + 2]
            c.ctr("containers", "create", *flags, image.ref, container_id, *REDIS_SERVER)
            c.ctr("task", "start", "-d", "--fifo-dir", str(c.fifo_dir), container_id, timeout=120)
            assert task_status(c, container_id) == "RUNNING", f"exit+restore cycle {cycle}: not running"
            after = redis.state(container_id)
            assert after == before, f"exit+restore cycle {cycle}: {before} -> {after}"
            subprocess.run(["rm", "-rf", str(images)], check=True)
            config.unlink()
            s.restored_rss.append(rss_kib(c.shim_pid(container_id) or 0))
            sample_host(c, s)
        s.seconds["exit+restore"] = time.monotonic() - started
    finally:
        s.execs, s.empty_answers = redis.execs, redis.empty_answers
        remove(c, container_id)
        subprocess.run(["rm", "-rf", str(images_root)], check=False)
    return s


def _remove_checkpoint_images(c: Containerd) -> None:
    """ctr names its record of a checkpoint by the second: two in one second would collide."""
    for ref in c.ctr("images", "ls", "-q").stdout.split():
        if ref.startswith("containerd.io/checkpoint/"):
            c.ctr("images", "rm", ref, check=False)


def flat(values: list[int], slack: int = 0) -> bool:
    if len(values) < 20:
        return max(values) - min(values) <= slack
    return statistics.median(values[-10:]) - statistics.median(values[:10]) <= slack


def problems(s: Samples, c: Containerd) -> list[str]:
    found = []
    for name, values, slack in (("server RSS", s.server_rss, RSS_SLACK_KIB),
                                ("restored servers' RSS", s.restored_rss, RSS_SLACK_KIB),
                                ("fork server and spares' RSS", s.per_containerd_rss, RSS_SLACK_KIB)):
        if values and not flat(values, slack):
            found.append(f"{name} grew: {values[:10]} ... {values[-10:]}")
    for name, values in (("server descriptors", s.server_fds), ("fork server and spares' descriptors",
                                                                 s.per_containerd_fds),
                         ("mounts", s.mounts), ("iptables rules", s.rules)):
        if values and values[-1] > values[0]:
            found.append(f"{name}: {values[0]} after the first cycle, {values[-1]} at the end")
    left = leftover_workers(c)
    if left:
        found.append(f"left running: {left}")
    return found


def report(s: Samples) -> str:
    def row(name: str, values: list[int], unit: str = "", scale: float = 1.0) -> str:
        if not values:
            return f"| {name} | - | - | - | - |"
        return (f"| {name} | {values[0] / scale:.1f}{unit} | {statistics.median(values[:10]) / scale:.1f}{unit} | "
                f"{statistics.median(values[-10:]) / scale:.1f}{unit} | {values[-1] / scale:.1f}{unit} |")

    return "\n".join([
        f"{len(s.server_rss)} leave-running cycles in {s.seconds.get('leave-running', 0):.0f} s, "
        f"{len(s.restored_rss)} exit+restore cycles in {s.seconds.get('exit+restore', 0):.0f} s; "
        f"{s.execs} execs of redis-cli, {s.empty_answers} of them exited 0 without output and were asked again",
        "", "| | first | median of first 10 | median of last 10 | last |", "|---|---|---|---|---|",
        row("shim server RSS (MiB), leave-running", s.server_rss, "", 1024),
        row("shim server fds, leave-running", s.server_fds),
        row("restored shim server RSS (MiB)", s.restored_rss, "", 1024),
        row("fork server + spares RSS (MiB)", s.per_containerd_rss, "", 1024),
        row("fork server + spares fds", s.per_containerd_fds),
        row("mounts under the containerd's directories", s.mounts),
        row("CRIU lock rules and tables on the host", s.rules), ""])


@pytest.fixture(scope="module")
def redis_image(environment, tmp_path_factory) -> TestImage:
    return build_redis_image(tmp_path_factory.mktemp("redis-image-cache"), environment.redis,
                             busybox=environment.busybox)


@pytest.mark.parametrize("containerd_version", ["2"], ids=lambda v: f"containerd-{v}")
def test_soak_of_redis_checkpoints_and_restores(containerd: Containerd, redis_image: TestImage):
    containerd.import_image(redis_image)
    samples = soak(containerd, redis_image, LEAVE_RUNNING, EXIT_RESTORE)
    print(report(samples))
    assert problems(samples, containerd) == []


def main() -> int:
    from harness.environment import load_environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leave-running", type=int, default=LEAVE_RUNNING)
    parser.add_argument("--exit-restore", type=int, default=EXIT_RESTORE)
    args = parser.parse_args()
    env = load_environment()
    cache = Path("/var/tmp/pyshim-soak-cache")
    cache.mkdir(exist_ok=True)
    image = build_redis_image(cache, env.redis, busybox=env.busybox)
    c = Containerd("2", env, log_dir=cache)
    try:
        c.start()
        c.import_image(image)
        samples = soak(c, image, args.leave_running, args.exit_restore)
        found = problems(samples, c)
    finally:
        for note in c.stop():
            print(f"teardown: {note}")
    print(report(samples))
    print(json.dumps({"problems": found}, indent=1))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

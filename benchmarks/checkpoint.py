"""Checkpoint and restore latency, pyshim against containerd's Go runc shim on one private containerd: a benchmark
script, not a test.

One private containerd (integration/harness, default 2.x) with the local busybox test image. For each workload — tiny
(busybox `sleep`) and a process that has touched N MiB (busybox awk builds an N-byte string, then waits on `sleep`;
VmRSS is checked) — every round runs both shims, alternating which goes first (ABAB / BABA):

1. `ctr run -d --null-io` the workload; wait until its memory is touched;
2. `ctr task checkpoint --image-path D --work-path W ID` (leave running) twice — the first checkpoint in the shim's
   life, then again — and `ctr task checkpoint --exit ...`: wall time each. On containerd 2.x ctr sends the options
   to any runtime and with image_path nothing goes to the content store: this is ctr + containerd + shim + CRIU.
   `--work-path` keeps CRIU's dump.log and stats-dump for both shims (the Go shim deletes its default work dir);
3. restore from the --exit images under a new id through containerd's Tasks API (gRPC, as nerdctl and the containerd
   client do): a container made by `ctr containers create`, then Tasks.Create with runc Options{criu_image_path,
   criu_work_path} — containerd turns criu_image_path into the shim's CreateTaskRequest.checkpoint for every runtime
   — and Tasks.Start; timed from Create to Start's answer (the task is RUNNING then; checked with Tasks.Get).
   Both shims get the same request. pyshim only: the same images restored by `ctr task start -d` of a container
   whose `--runtime-config-path` TOML sets CriuImagePath (pyshim's own way in; the Go shim has none through ctr);
4. CRIU's own figures for every dump and restore: stats-dump / stats-restore (pycriu), the CRIU run's length (the
   last timestamp of dump.log / restore.log), its namespace dump, and the time CRIU spent in notifications and
   action scripts, per action.

Images go to a private directory under --images-dir (default /var/tmp) and are deleted after each run. Results go to
stdout and into a Markdown file (default docs/benchmarks.md): one section per containerd version and date, replaced
on a rerun the same day; other sections are left alone. Run as root:

    /opt/pyshim/venv/bin/python benchmarks/checkpoint.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lifecycle  # benchmarks/: the shims, interleaving, timing, host description, section writing
from harness.containerd import GO_SHIM_SOCKET_DIR, Containerd, remove_go_shim_socket_dir  # noqa: E402
from harness.environment import CONTAINERD_VERSIONS, Environment, load_environment, unavailable_reason  # noqa: E402
from harness.image import TestImage, build_test_image  # noqa: E402
from lifecycle import GO, PY, SHIMS, Shim, in_turn, median, p90, timed

MIB = 1 << 20
TARGETS = {"checkpoint tiny": 0.8, "checkpoint large": 1.0, "restore": 0.9}
READY_TIMEOUT = 120.0
CTR_TIMEOUT = 300.0
RSS_TOLERANCE = 0.97  # the touched workload must show at least this share of N MiB in VmRSS
TASK_STATUS = {0: "UNKNOWN", 1: "CREATED", 2: "RUNNING", 3: "STOPPED", 4: "PAUSED", 5: "PAUSING"}
CHECKPOINTS = ("leave running, 1st", "leave running, 2nd", "--exit")
STAT_KEYS = ("freezing_time", "frozen_time", "memdump_time", "memwrite_time", "pages_scanned", "pages_written")
RESTORE_STAT_KEYS = ("forking_time", "restore_time", "pages_restored")
LOG_LINE = re.compile(r"^\((\d+\.\d+)\) (.*)$")


@dataclass(frozen=True)
class Workload:
    name: str
    mib: int  # 0: tiny
    runs: int

    def command(self) -> list[str]:
        if not self.mib:
            return ["sleep", "3600"]
        # busybox has no memory hog: awk doubles a string of "x" up to N bytes (every page written), trims it to N,
        # and then waits in system() on a sleep (exec'd by sh): the string stays in awk's heap.
        return ["awk", f'BEGIN {{ n = {self.mib} * {MIB}; s = "x"; while (length(s) < n) s = s s; '
                       f'if (length(s) > n) s = substr(s, 1, n); system("exec sleep 3600") }}']


# --- containerd's gRPC API, the few calls used here -----------------------------------------------------------------

class ContainerdApi:
    """Tasks.Create/Start/Get and Snapshots.Mounts over grpcio. The messages are declared here (same field numbers as
    containerd's api/services/tasks/v1 and snapshots/v1 protos); Mount and Any come from pyshim's generated code."""

    def __init__(self, address: str, namespace: str):
        import grpc
        from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

        from shim.api.containerd.types import mount_pb2

        fields = descriptor_pb2.FieldDescriptorProto
        proto = descriptor_pb2.FileDescriptorProto(
            name="pyshim_benchmarks/containerd_api.proto", package="pyshim.benchmarks", syntax="proto3",
            dependency=[mount_pb2.DESCRIPTOR.name, any_pb2.DESCRIPTOR.name])
        scalar = {"string": fields.TYPE_STRING, "uint32": fields.TYPE_UINT32, "bool": fields.TYPE_BOOL}
        messages = {
            "CreateTaskRequest": [(1, "container_id", "string"), (3, "rootfs", "*.containerd.types.Mount"),
                                  (4, "stdin", "string"), (5, "stdout", "string"), (6, "stderr", "string"),
                                  (7, "terminal", "bool"), (9, "options", ".google.protobuf.Any")],
            "CreateTaskResponse": [(1, "container_id", "string"), (2, "pid", "uint32")],
            "StartRequest": [(1, "container_id", "string"), (2, "exec_id", "string")],
            "StartResponse": [(1, "pid", "uint32")],
            "GetRequest": [(1, "container_id", "string"), (2, "exec_id", "string")],
            "Process": [(1, "container_id", "string"), (2, "id", "string"), (3, "pid", "uint32"),
                        (4, "status", "uint32")],
            "GetResponse": [(1, "process", ".pyshim.benchmarks.Process")],
            "MountsRequest": [(1, "snapshotter", "string"), (2, "key", "string")],
            "MountsResponse": [(1, "mounts", "*.containerd.types.Mount")],
        }
        for name, members in messages.items():
            message = proto.message_type.add(name=name)
            for number, member, kind in members:
                repeated = kind.startswith("*")
                kind = kind.lstrip("*")
                f = message.field.add(name=member, number=number,
                                      label=fields.LABEL_REPEATED if repeated else fields.LABEL_OPTIONAL)
                if kind.startswith("."):
                    f.type, f.type_name = fields.TYPE_MESSAGE, kind
                else:
                    f.type = scalar[kind]
        pool = descriptor_pool.Default()
        try:
            pool.FindFileByName(proto.name)
        except KeyError:
            pool.AddSerializedFile(proto.SerializeToString())
        self.m = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"pyshim.benchmarks.{name}"))
                  for name in messages}
        self.any = any_pb2.Any
        self.channel = grpc.insecure_channel("unix://" + address)
        self.metadata = (("containerd-namespace", namespace),)

    def _call(self, method: str, request, response: str, timeout: float = CTR_TIMEOUT):
        stub = self.channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=self.m[response].FromString)
        return stub(request, metadata=self.metadata, timeout=timeout)

    def mounts(self, snapshotter: str, key: str):
        return self._call("/containerd.services.snapshots.v1.Snapshots/Mounts",
                          self.m["MountsRequest"](snapshotter=snapshotter, key=key), "MountsResponse").mounts

    def create(self, container_id: str, rootfs, options) -> int:
        request = self.m["CreateTaskRequest"](container_id=container_id, rootfs=rootfs, options=options)
        return self._call("/containerd.services.tasks.v1.Tasks/Create", request, "CreateTaskResponse").pid

    def start(self, container_id: str) -> int:
        return self._call("/containerd.services.tasks.v1.Tasks/Start",
                          self.m["StartRequest"](container_id=container_id), "StartResponse").pid

    def get(self, container_id: str) -> tuple[str, int]:
        process = self._call("/containerd.services.tasks.v1.Tasks/Get",
                             self.m["GetRequest"](container_id=container_id), "GetResponse", timeout=30).process
        return TASK_STATUS.get(process.status, str(process.status)), process.pid

    def close(self) -> None:
        self.channel.close()


def runc_options(**fields):
    """containerd.runc.v1.Options as an Any (containerd's bare type URL)."""
    from google.protobuf import any_pb2

    from shim.api.containerd.runc.options import oci_pb2

    return any_pb2.Any(type_url="containerd.runc.v1.Options", value=oci_pb2.Options(**fields).SerializeToString())


# --- what CRIU left behind ------------------------------------------------------------------------------------------

def read_stats(directories: Sequence[Path], kind: str) -> dict[str, int]:
    """stats-<kind> from the first directory that has it, decoded with pycriu."""
    import pycriu.images

    for directory in directories:
        path = directory / f"stats-{kind}"
        if path.is_file():
            with open(path, "rb") as f:
                entries = pycriu.images.load(f).get("entries") or []
            return {k: int(v) for k, v in (entries[0].get(kind) or {}).items()} if entries else {}
    return {}


@dataclass
class CriuLog:
    total: float = float("nan")  # seconds: the last timestamp of the (last) CRIU run in the log
    netns: float = float("nan")  # "Dump NET namespace info" -> "Namespaces dump complete"
    actions: dict[str, float] = field(default_factory=dict)  # "Running X scripts" -> next untabbed line, per X


def parse_criu_log(path: Path) -> CriuLog:
    """Timings from a CRIU log. Timestamps restart at 0 for each CRIU run appending to the log (runc asks CRIU its
    version first): only the last run counts."""
    out = CriuLog()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    stamped = [(float(m[1]), m[2]) for m in map(LOG_LINE.match, lines) if m]
    for i in range(len(stamped) - 1, 0, -1):
        if stamped[i][0] < stamped[i - 1][0]:
            stamped = stamped[i:]
            break
    if not stamped:
        return out
    out.total = stamped[-1][0]
    net_start = next((t for t, text in stamped if text.startswith("Dump NET namespace info")), None)
    net_end = next((t for t, text in stamped if text.startswith("Namespaces dump complete")), None)
    if net_start is not None and net_end is not None:
        out.netns = net_end - net_start
    for i, (t, text) in enumerate(stamped):
        match = re.match(r"Running (\S+) scripts", text)
        if match:
            following = next((t2 for t2, text2 in stamped[i + 1:] if not text2.startswith("\t")), t)
            out.actions[match[1]] = out.actions.get(match[1], 0.0) + following - t
    return out


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# --- one benchmark run ----------------------------------------------------------------------------------------------

@dataclass
class Dump:
    seconds: float
    stats: dict[str, int]
    log: CriuLog
    record_stats: dict[str, int] | None = None  # pyshim's pyshim-checkpoint.json "stats"


@dataclass
class Restore:
    create: float
    start: float
    stats: dict[str, int]
    log: CriuLog
    rss_kib: int

    @property
    def seconds(self) -> float:
        return self.create + self.start


@dataclass
class Samples:
    source_rss_kib: list[int] = field(default_factory=list)
    dumps: dict[str, list[Dump]] = field(default_factory=lambda: {kind: [] for kind in CHECKPOINTS})
    restores: list[Restore] = field(default_factory=list)
    toml_restores: list[float] = field(default_factory=list)  # pyshim only: `ctr task start -d`, TOML CriuImagePath


class CheckpointBenchmark:
    def __init__(self, c: Containerd, image: TestImage, images_root: Path):
        self.c = c
        self.image = image
        self.images_root = images_root
        self.api = ContainerdApi(c.address, c.namespace)
        self.failures: list[str] = []
        self.ids: dict[str, Shim] = {}
        self.record_mismatch: list[str] = []
        self.checkpoint_images = {shim: 0 for shim in SHIMS}  # images ctr created for --image-path checkpoints

    def new_id(self, shim: Shim, prefix: str) -> str:
        container_id = self.c.new_id(prefix)
        self.ids[container_id] = shim
        return container_id

    def ctr(self, *args: str, timeout: float = CTR_TIMEOUT) -> tuple[float, subprocess.CompletedProcess]:
        return timed([*self.c.ctr_argv(), *args], env=self.c.env, stdin=subprocess.DEVNULL, text=True,
                     timeout=timeout)

    def remove(self, *container_ids: str) -> None:
        for container_id in container_ids:
            self.ctr("tasks", "rm", "-f", container_id, timeout=60)
            self.ctr("containers", "rm", container_id, timeout=60)

    def create_flags(self, shim: Shim, runtime_config: Path | None = None) -> list[str]:
        """`ctr containers create` takes the runtime flags of `ctr run` except --fifo-dir."""
        flags = self.c.runtime_flags(shim.runtime)
        i = flags.index("--fifo-dir")
        del flags[i:i + 2]
        if runtime_config is not None:
            flags[flags.index("--runtime-config-path") + 1] = str(runtime_config)
        return flags

    # ---------------------------------------------------------------------------------------------------------------
    def run_workload(self, workload: Workload, warmup: int) -> dict[Shim, Samples]:
        samples = {shim: Samples() for shim in SHIMS}
        for i in range(warmup + workload.runs):
            for shim in in_turn(i):
                counted = i >= warmup
                print(f"  {workload.name}: {'run ' + str(i - warmup + 1) if counted else 'warm-up'} {shim.label}",
                      file=sys.stderr)
                self.one_round(shim, workload, samples[shim] if counted else Samples())
        return samples

    def one_round(self, shim: Shim, workload: Workload, out: Samples) -> None:
        os.sync()  # earlier images' writeback must not land in this round's timings
        workdir = Path(tempfile.mkdtemp(prefix="py-" if shim is PY else "go-", dir=self.images_root))
        source = self.new_id(shim, "cps")
        restored: list[str] = []
        try:
            seconds, result = self.ctr("run", "-d", "--null-io", *self.c.runtime_flags(shim.runtime),
                                       self.image.ref, source, *workload.command())
            if result.returncode != 0:
                raise RoundFailed(f"ctr run: exit {result.returncode}: {result.stderr.strip()}")
            out.source_rss_kib.append(self.wait_touched(source, workload))
            for n, kind in enumerate(CHECKPOINTS):
                images, work = workdir / f"images-{n}", workdir / f"work-{n}"
                dump = self.checkpoint(shim, source, images, work, exit=kind == "--exit")
                out.dumps[kind].append(dump)
                if kind != "--exit":
                    shutil.rmtree(images)
                shutil.rmtree(work, ignore_errors=True)
            self.remove(source)
            target = self.new_id(shim, "cpr")
            restored.append(target)
            out.restores.append(self.restore(shim, workload, target, images, workdir / "restore-work"))
            if shim is PY:
                self.remove(target)
                target = self.new_id(shim, "cpt")
                restored.append(target)
                out.toml_restores.append(self.restore_with_ctr(target, images, workdir))
        except RoundFailed as exc:
            self.failures.append(f"{workload.name}, {shim.label}: {exc}")
        finally:
            self.remove(source, *restored)
            shutil.rmtree(workdir, ignore_errors=True)

    def wait_touched(self, container_id: str, workload: Workload) -> int:
        """The init's VmRSS (KiB) once the workload is ready: for N MiB, awk has built its string and waits on its
        sleep child; the RSS must then cover N MiB."""
        deadline = time.monotonic() + READY_TIMEOUT
        pid_file = self.c.bundle(container_id) / "init.pid"
        while True:
            try:
                pid = int(pid_file.read_text())
                if not workload.mib or children(pid):
                    rss = vm_rss_kib(pid)
                    if rss * 1024 < RSS_TOLERANCE * workload.mib * MIB:
                        raise RoundFailed(f"VmRSS {rss} KiB after the build: the {workload.mib} MiB were not touched")
                    return rss
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RoundFailed(f"workload not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def checkpoint(self, shim: Shim, container_id: str, images: Path, work: Path, exit: bool) -> Dump:
        argv = ["tasks", "checkpoint", *(["--exit"] if exit else []), "--image-path", str(images),
                "--work-path", str(work), container_id]
        seconds, result = self.ctr(*argv)
        if result.returncode != 0:
            raise RoundFailed(f"ctr {' '.join(argv[:3])}: exit {result.returncode}: {result.stderr.strip()[-1500:]}")
        self.remove_checkpoint_images(shim, container_id)
        status, _ = self.api.get(container_id)
        if status != ("STOPPED" if exit else "RUNNING"):
            raise RoundFailed(f"task {status} after {'--exit' if exit else 'leave-running'} checkpoint")
        record = None
        if shim is PY:
            try:
                record = json.loads((images / "pyshim-checkpoint.json").read_text()).get("stats")
            except (OSError, ValueError) as exc:
                raise RoundFailed(f"no pyshim-checkpoint.json: {exc}") from None
        stats = read_stats([work, images], "dump")
        if record is not None and record != stats:
            self.record_mismatch.append(f"{container_id}: record {record} vs stats-dump {stats}")
        return Dump(seconds, stats, parse_criu_log(work / "dump.log"), record)

    def remove_checkpoint_images(self, shim: Shim, container_id: str) -> None:
        """ctr's client skips its content-store step only for runtime io.containerd.runc.v2 with an image path: for
        pyshim it writes an (empty) checkpoint index and an image named containerd.io/checkpoint/ID:<time to the
        second>, so a second checkpoint within the same second fails with "already exists". Removed, untimed."""
        names = self.ctr("images", "ls", "-q", timeout=60)[1].stdout.split()
        ours = [name for name in names if name.startswith(f"containerd.io/checkpoint/{container_id}:")]
        self.checkpoint_images[shim] += len(ours)
        if ours:
            self.ctr("images", "rm", *ours, timeout=60)

    def restore(self, shim: Shim, workload: Workload, target: str, images: Path, work: Path) -> Restore:
        """Tasks.Create (runc Options with criu_image_path) + Tasks.Start of a container made by ctr."""
        _, result = self.ctr("containers", "create", *self.create_flags(shim), self.image.ref, target,
                             *workload.command())
        if result.returncode != 0:
            raise RoundFailed(f"ctr containers create: {result.stderr.strip()}")
        info = json.loads(self.ctr("containers", "info", target)[1].stdout)
        rootfs = self.api.mounts(info["Snapshotter"], info["SnapshotKey"])
        options = runc_options(binary_name="runc", root=str(self.c.runc_root), criu_image_path=str(images),
                               criu_work_path=str(work))
        try:
            t0 = time.perf_counter()
            self.api.create(target, rootfs, options)
            t1 = time.perf_counter()
            pid = self.api.start(target)
            t2 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - grpc.RpcError and friends: recorded, the round is dropped
            details = getattr(exc, "details", None)  # grpc.RpcError's message; any other error says itself
            raise RoundFailed(f"restore through the Tasks API: {details() if callable(details) else exc}") from None
        status, _ = self.api.get(target)
        if status != "RUNNING":
            raise RoundFailed(f"restored task is {status}")
        rss = vm_rss_kib(pid)
        if rss * 1024 < RSS_TOLERANCE * workload.mib * MIB:
            raise RoundFailed(f"restored VmRSS {rss} KiB < {workload.mib} MiB")
        return Restore(t1 - t0, t2 - t1, read_stats([work, images], "restore"), parse_criu_log(work / "restore.log"),
                       rss)

    def restore_with_ctr(self, target: str, images: Path, workdir: Path) -> float:
        """pyshim's own way in: a runtime options TOML with CriuImagePath, then `ctr task start -d --null-io`."""
        config = workdir / f"{target}.toml"
        config.write_text(f'BinaryName = "runc"\nRoot = "{self.c.runc_root}"\nCriuImagePath = "{images}"\n')
        _, result = self.ctr("containers", "create", *self.create_flags(PY, config), self.image.ref, target,
                             "sleep", "3600")
        if result.returncode != 0:
            raise RoundFailed(f"ctr containers create (TOML): {result.stderr.strip()}")
        seconds, result = self.ctr("tasks", "start", "-d", "--null-io", "--fifo-dir", str(self.c.fifo_dir), target)
        if result.returncode != 0:
            raise RoundFailed(f"ctr tasks start (TOML CriuImagePath): {result.stderr.strip()[-1500:]}")
        if self.api.get(target)[0] != "RUNNING":
            raise RoundFailed("task restored by ctr task start is not RUNNING")
        return seconds

    # ---------------------------------------------------------------------------------------------------------------
    def action_script_floor(self, runs: int) -> dict[str, float]:
        """What one CRIU action-script call costs pyshim's restore: the script pyshim names (shim.criu.loopback),
        served by a LoopbackHook in this process's event loop as the shim serves it during a restore, run for an
        action it ignores and for setup-namespaces against a fresh network namespace (`unshare --net sleep`, ours,
        ended by pid after each sample) whose `lo` the hook raises; and the shell alone."""
        from shim.criu.loopback import LoopbackHook

        directory = Path(tempfile.mkdtemp(prefix="action-", dir=self.images_root))
        samples: dict[str, list[float]] = {}

        async def sample(name: str, argv: list[str], env: dict[str, str]) -> None:
            started = time.perf_counter()
            child = await asyncio.create_subprocess_exec(*argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(child.communicate(), 30)
            if child.returncode == 0:
                samples.setdefault(name, []).append(time.perf_counter() - started)
            else:
                self.failures.append(f"{name}: exit {child.returncode}: {err.decode().strip()[-300:]}")

        async def measure() -> None:
            hook = LoopbackHook(str(directory))
            try:
                for i in range(runs + 1):
                    with subprocess.Popen(["unshare", "--net", "sleep", "60"]) as netns_holder:
                        try:
                            await asyncio.sleep(0.05)  # unshare has made the namespace and exec'd sleep (same pid)
                            for name, argv, env in (
                                    ("`sh -c :` (the shell alone)", ["sh", "-c", ":"], {}),
                                    ("action script, an action it ignores (pre-resume)", [hook.script],
                                     {"CRTOOLS_SCRIPT_ACTION": "pre-resume"}),
                                    ("action script, setup-namespaces (the shim raises `lo` in a fresh netns)",
                                     [hook.script], {"CRTOOLS_SCRIPT_ACTION": "setup-namespaces",
                                                     "CRTOOLS_INIT_PID": str(netns_holder.pid)})):
                                if i:
                                    await sample(name, argv, env)
                        finally:
                            netns_holder.kill()
            finally:
                hook.close()

        try:
            asyncio.run(measure())
            return {name: median(values) for name, values in samples.items()}
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class RoundFailed(Exception):
    pass


# --- the report -----------------------------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    if seconds != seconds:
        return "n/a"
    value = seconds * 1000
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def us_ms(values: Sequence[int]) -> str:
    return ms(median(values) / 1e6) if values else "n/a"


def verdict(value: float, target: float) -> str:
    if value != value:
        return "n/a"
    return f"**{'met' if value <= target else 'NOT met'}** ({value:.2f}x vs <= {target}x)"


def target_for(workload: Workload, what: str) -> float:
    if what == "restore":
        return TARGETS["restore"]
    return TARGETS["checkpoint tiny" if not workload.mib else "checkpoint large"]


def latency_row(label: str, py: Sequence[float], go: Sequence[float], target: float) -> str:
    r = median(py) / median(go) if py and go else float("nan")
    return (f"| {label} | {ms(median(py))} | {ms(median(go))} | {ms(p90(py))} | {ms(p90(go))} | "
            f"{'n/a' if r != r else f'{r:.2f}x'} | {verdict(r, target)} | {len(py)}/{len(go)} |")


def render(marker: str, heading: str, command: str, host: list[str], extra_host: list[str],
           workloads: list[Workload], results: dict[str, dict[Shim, Samples]], bench: CheckpointBenchmark,
           floors: dict[str, float], warmup: int) -> str:
    lines = [f"<!-- BEGIN {marker} -->", f"## Checkpoint and restore: {heading}", "",
             "Written by `benchmarks/checkpoint.py`. Command (as root, in the repository):", "", f"    {command}", ""]
    lines += host + extra_host + [""]
    lines += [
        "Method. One private containerd; each round runs both shims, alternating which goes first, after "
        f"{warmup} uncounted warm-up round(s) per workload. Workloads: *tiny* is busybox `sleep`; *N MiB* is busybox "
        "awk holding an N-byte string of `x` (every page written) while it waits on a `sleep` child; its VmRSS is "
        "checked before the first checkpoint and after the restore. Per round: `ctr run -d --null-io`; "
        "`ctr task checkpoint --image-path D --work-path W` twice, leaving the task running (*1st* is the first "
        "checkpoint in that shim's life, *2nd* the next one), then with `--exit`; the task's state is checked after "
        "each. ctr pauses the task, sends Checkpoint and resumes it; with image_path containerd 2.x writes nothing to "
        "its content store. `--work-path` keeps CRIU's dump.log and stats-dump for both shims. Restore: a container "
        "made by `ctr containers create` with the same flags, then containerd's Tasks API over gRPC — Create with "
        "`containerd.runc.v1.Options{criu_image_path, criu_work_path}` (containerd turns criu_image_path into the "
        "shim's CreateTaskRequest.checkpoint for any runtime) and Start — timed from Create until Start answers; "
        "the task is RUNNING then. Both shims get the same requests. Images are written under a private directory "
        "in the images dir (page cache; `sync` before each round) and deleted after the round. Milliseconds.",
        ""]
    lines += ["### Latency", "",
              "| workload, operation | pyshim median | Go median | pyshim p90 | Go p90 | ratio (medians) | "
              "target | runs |",
              "|---|---|---|---|---|---|---|---|"]
    for workload in workloads:
        py, go = results[workload.name][PY], results[workload.name][GO]
        for kind in CHECKPOINTS:
            lines.append(latency_row(f"{workload.name}: checkpoint ({kind})",
                                     [d.seconds for d in py.dumps[kind]], [d.seconds for d in go.dumps[kind]],
                                     target_for(workload, "checkpoint")))
        lines.append(latency_row(f"{workload.name}: restore (Tasks.Create + Start)",
                                 [r.seconds for r in py.restores], [r.seconds for r in go.restores],
                                 TARGETS["restore"]))
    lines += ["", f"Targets (issue 4): checkpoint <= {TARGETS['checkpoint tiny']}x the Go shim for the tiny "
                  f"container, <= {TARGETS['checkpoint large']}x for the large ones; restore <= "
                  f"{TARGETS['restore']}x.", ""]

    lines += gap_table(workloads, results)
    lines += ["### Where the checkpoint time goes (medians)", "",
              "*CRIU run*: the last timestamp of dump.log (CRIU's own clock from its start to \"Dumping finished\"); "
              "*outside CRIU* = wall - CRIU run: ctr, containerd (State, Pause, Checkpoint, Resume), the shim, and "
              "for the Go shim `runc checkpoint` around its CRIU; *netns*: CRIU's network namespace dump (\"Dump NET "
              "namespace info\" to \"Namespaces dump complete\"); *notify+scripts*: time CRIU waited on "
              "notifications to its RPC client and action scripts. freezing, frozen, memdump and memwrite are "
              "stats-dump's; frozen spans memdump and memwrite.", "",
              "| workload, checkpoint | shim | wall | CRIU run | outside CRIU | freezing | frozen | memdump | memwrite "
              "| netns | notify+scripts | pages written |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload in workloads:
        for kind in CHECKPOINTS:
            for shim in SHIMS:
                dumps = results[workload.name][shim].dumps[kind]
                if not dumps:
                    continue
                stat = {key: [d.stats[key] for d in dumps if key in d.stats] for key in STAT_KEYS}
                lines.append(
                    f"| {workload.name}, {kind} | {shim.label} | {ms(median([d.seconds for d in dumps]))} | "
                    f"{ms(median([d.log.total for d in dumps]))} | "
                    f"{ms(median([d.seconds - d.log.total for d in dumps]))} | "
                    + " | ".join(us_ms(stat[k]) for k in ("freezing_time", "frozen_time", "memdump_time",
                                                          "memwrite_time"))
                    + f" | {ms(median([d.log.netns for d in dumps]))} | "
                    f"{ms(median([sum(d.log.actions.values()) for d in dumps]))} | "
                    f"{int(median(stat['pages_written'])) if stat['pages_written'] else 'n/a'} |")
    lines.append("")
    lines += notification_table(results, workloads, "dump")

    lines += ["### Where the restore time goes (medians)", "",
              "*create*: Tasks.Create (containerd starts the shim; the shim records the checkpoint); *start*: "
              "Tasks.Start (`runc restore` and CRIU); *CRIU run*: the last timestamp of restore.log; "
              "restore_time, forking_time and pages_restored are stats-restore's.", "",
              "| workload | shim | wall | create | start | CRIU run | start - CRIU run | restore_time | forking "
              "| notify+scripts | pages restored | VmRSS after, MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload in workloads:
        for shim in SHIMS:
            rs = results[workload.name][shim].restores
            if not rs:
                continue
            stat = {key: [r.stats[key] for r in rs if key in r.stats] for key in RESTORE_STAT_KEYS}
            lines.append(
                f"| {workload.name} | {shim.label} | {ms(median([r.seconds for r in rs]))} | "
                f"{ms(median([r.create for r in rs]))} | {ms(median([r.start for r in rs]))} | "
                f"{ms(median([r.log.total for r in rs]))} | {ms(median([r.start - r.log.total for r in rs]))} | "
                f"{us_ms(stat['restore_time'])} | {us_ms(stat['forking_time'])} | "
                f"{ms(median([sum(r.log.actions.values()) for r in rs]))} | "
                f"{int(median(stat['pages_restored'])) if stat['pages_restored'] else 'n/a'} | "
                f"{median([r.rss_kib for r in rs]) / 1024:.1f} |")
    lines.append("")
    lines += notification_table(results, workloads, "restore")

    lines += ["### Workload memory and pyshim's own restore path", "",
              "| workload | VmRSS before checkpoint, pyshim / Go (MiB, medians) | pyshim: `ctr task start -d` with "
              "CriuImagePath in its `--runtime-config-path` TOML, median (p90) | runs |", "|---|---|---|---|"]
    for workload in workloads:
        py, go = results[workload.name][PY], results[workload.name][GO]
        lines.append(f"| {workload.name} | {median(py.source_rss_kib) / 1024:.1f} / "
                     f"{median(go.source_rss_kib) / 1024:.1f} | {ms(median(py.toml_restores))} "
                     f"({ms(p90(py.toml_restores))}) | {len(py.toml_restores)} |")
    lines += ["", "The TOML path is ctr's own `task start` (ctr start-up, snapshot mounts, Create, Start) and has "
                  "no Go shim counterpart through ctr; it is shown for pyshim alone.", ""]
    if floors:
        lines += ["pyshim's CRIU action script (named in the CRIU configuration pyshim writes for a restore that makes "
                  "a network namespace; CRIU runs it at every action; at setup-namespaces it has the shim raise `lo`), "
                  "run on its own with this script serving it as the shim would, wall time, "
                  "medians of 10:", "", "| command | ms |", "|---|---|"]
        lines += [f"| {name} | {ms(value)} |" for name, value in floors.items()]
        lines.append("")
    dumps = {shim: sum(len(results[w.name][shim].dumps[kind]) for w in workloads for kind in CHECKPOINTS)
             for shim in SHIMS}
    lines += [f"ctr's client-side extra: for runtime `io.containerd.runc.v2` with an image path it stops after "
              "Checkpoint; for any other runtime it also writes a (here empty) checkpoint index to the content store "
              "and creates an image `containerd.io/checkpoint/ID:TIME` (inside the timed wall). Images ctr created "
              f"(warm-up included): pyshim {bench.checkpoint_images[PY]}, Go {bench.checkpoint_images[GO]}; "
              f"timed dumps: pyshim {dumps[PY]}, Go {dumps[GO]}. They are removed after each checkpoint "
              "(untimed): a second one within the same second would fail with \"already exists\".", ""]
    if bench.record_mismatch:
        lines += ["pyshim-checkpoint.json stats differing from stats-dump:", ""]
        lines += [f"- {note}" for note in bench.record_mismatch[:10]] + [""]
    else:
        lines += ["The stats in every pyshim-checkpoint.json equal its dump's stats-dump.", ""]
    if bench.failures:
        lines += ["Failures (rounds dropped from the figures):", ""]
        lines += [f"- {failure}" for failure in dict.fromkeys(bench.failures)] + [""]
    lines += [f"<!-- END {marker} -->"]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"


def gap_table(workloads: list[Workload], results: dict[str, dict[Shim, Samples]]) -> list[str]:
    """pyshim minus Go, split into the parts the breakdowns below measure (differences of medians, so the parts only
    roughly add up)."""
    def gap(values: Callable[[Samples], list[float]], workload: Workload) -> str:
        py, go = values(results[workload.name][PY]), values(results[workload.name][GO])
        return f"{(median(py) - median(go)) * 1000:+.0f}" if py and go else "n/a"

    lines = ["### pyshim minus Go, and where the difference sits (ms, differences of medians)", "",
             "| workload | checkpoint 1st / 2nd / --exit | of which outside CRIU | of which CRIU run | restore | "
             "of which Create | of which Start |", "|---|---|---|---|---|---|---|"]
    for workload in workloads:
        def per_kind(metric: Callable[[Dump], float], workload: Workload = workload) -> str:
            return " / ".join(gap(lambda s, k=kind: [metric(d) for d in s.dumps[k]], workload) for kind in CHECKPOINTS)
        lines.append(f"| {workload.name} | {per_kind(lambda d: d.seconds)} | "
                     f"{per_kind(lambda d: d.seconds - d.log.total)} | {per_kind(lambda d: d.log.total)} | "
                     f"{gap(lambda s: [r.seconds for r in s.restores], workload)} | "
                     f"{gap(lambda s: [r.create for r in s.restores], workload)} | "
                     f"{gap(lambda s: [r.start for r in s.restores], workload)} |")
    return lines + [""]


def notification_table(results: dict[str, dict[Shim, Samples]], workloads: list[Workload], what: str) -> list[str]:
    """Per CRIU action, the median time CRIU waited on it (notification to the RPC client, then action scripts)."""
    shown = workloads[0]
    rows: dict[str, dict[Shim, list[float]]] = {}
    for shim in SHIMS:
        samples = results[shown.name][shim]
        logs = [d.log for d in samples.dumps["--exit"]] if what == "dump" else [r.log for r in samples.restores]
        for log in logs:
            for action, seconds in log.actions.items():
                rows.setdefault(action, {s: [] for s in SHIMS})[shim].append(seconds)
    if not rows:
        return []
    lines = [f"CRIU notifications and action scripts per action, {what} (`{shown.name}`"
             + (", --exit" if what == "dump" else "") + "), medians in ms:", "",
             "| action | pyshim | Go |", "|---|---|---|"]
    lines += [f"| {action} | {ms(median(by[PY]))} | {ms(median(by[GO]))} |" for action, by in rows.items()]
    return lines + [""]


def check_space(directory: Path, shown_mib: int) -> None:
    needed = (3 * shown_mib + 1024) * MIB  # the --exit images and a second set while one is deleted, plus slack
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise SystemExit(f"{directory} has {free / MIB / 1024:.1f} GiB free; the {shown_mib} MiB workload needs "
                         f"{needed / MIB / 1024:.1f} GiB: choose another --images-dir")


def filesystem_of(path: Path) -> str:
    result = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True)
    rows = result.stdout.split("\n")[1:2]
    return " ".join(rows[0].split()) if rows and rows[0] else "?"


def shim_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((lifecycle.REPO / "shim").rglob("*.py")):
        digest.update(path.relative_to(lifecycle.REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def leftover_sockets(c: Containerd, ids: dict[str, Shim]) -> list[str]:
    """Shim sockets of our ids still in /run/containerd/s once everything is torn down: removed and reported."""
    left = {shim: 0 for shim in SHIMS}
    for container_id, shim in ids.items():
        for path in lifecycle.go_shim_socket_paths(c.address, c.namespace, container_id):
            if path.is_socket():
                path.unlink()
                left[shim] += 1
    return [f"{shim.label} left {count} socket(s) in {GO_SHIM_SOCKET_DIR} (removed by the script)"
            for shim, count in left.items() if count]


def run(version: str, env: Environment, image: TestImage, args: argparse.Namespace, command: str) -> tuple[str, str]:
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    workloads = [Workload("tiny", 0, args.runs_tiny)] + [Workload(f"{mib} MiB", mib, args.runs) for mib in args.sizes]
    images_root = Path(tempfile.mkdtemp(prefix="pyshim-bench-ckpt-", dir=args.images_dir))
    c = Containerd(version, env, log_dir=lifecycle.LOG_DIR)
    bench = None
    started = time.monotonic()
    digest_before = shim_digest()
    try:
        c.start()
        c.import_image(image)
        server_version = c.server_version()
        others = lifecycle.other_containerds(c)
        bench = CheckpointBenchmark(c, image, images_root)
        results = {}
        for workload in workloads:
            print(f"containerd {server_version}: {workload.name} x{workload.runs}", file=sys.stderr)
            results[workload.name] = bench.run_workload(workload, args.warmup)
        try:
            floors = bench.action_script_floor(10)
        except Exception as exc:  # noqa: BLE001 - an extra; it must not cost the measurements above
            floors = {}
            bench.failures.append(f"action script floor not measured: {type(exc).__name__}: {exc}")
        others = max(others, lifecycle.other_containerds(c))
    finally:
        if bench is not None:
            bench.api.close()
        notes = c.stop()
        shutil.rmtree(images_root, ignore_errors=True)
        if bench is not None:
            notes += leftover_sockets(c, bench.ids)
    elapsed = time.monotonic() - started
    digest_after = shim_digest()
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    today = datetime.date.today().isoformat()
    marker = f"checkpoint containerd={server_version} date={today}"
    heading = f"containerd {server_version} (`--containerd {version}`), {today}"
    criu = subprocess.run([str(env.criu), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    extra = [f"- CRIU: {criu.strip()} (`{env.criu}`); images dir: `{args.images_dir}` on "
             f"{filesystem_of(args.images_dir)}",
             f"- pyshim binary: `{shutil.which(PY.binary_name, path=c.env['PATH'])}`; Go shim: "
             f"`{shutil.which(GO.binary_name, path=c.env['PATH'])}`; pyshim's checkpoint engine: its default "
             "(`criu`, its own CRIU RPC client); the Go shim runs `runc checkpoint` / `runc restore`",
             f"- load average before / after: {load_before} / {load_after}; other containerd daemons running "
             f"meanwhile: {others}; the whole run took {elapsed / 60:.1f} min",
             f"- shim/**/*.py digest at start {digest_before}, at end {digest_after}"
             + ("" if digest_before == digest_after else " — **the shim's code changed during the run** (each shim "
                "process runs the code it found when it started): rounds are not all of one version")]
    section = render(marker, heading, command, lifecycle.describe_host(env), extra, workloads, results, bench, floors,
                     args.warmup)
    if notes:
        end = f"<!-- END {marker} -->"
        section = section.replace(end, "Teardown: " + "; ".join(notes) + f"\n\n{end}")
    return marker, section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containerd", choices=CONTAINERD_VERSIONS, default="2",
                        help="the containerd line to run against (default 2; 1.6/1.7 are refused, see below)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per shim for each N MiB workload (5)")
    parser.add_argument("--runs-tiny", type=int, default=10, help="timed rounds per shim for the tiny workload (10)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256, 1024],
                        help="touched-memory workloads in MiB, comma-separated (64,256,1024)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds per workload before the timed ones (1)")
    parser.add_argument("--images-dir", type=Path, default=Path("/var/tmp"),
                        help="where the checkpoint images go (a private temp dir is made inside; default /var/tmp)")
    parser.add_argument("--out", type=Path, default=lifecycle.REPO / "docs" / "benchmarks.md",
                        help="Markdown file whose section for this containerd version and date is replaced")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.runs_tiny < 1 or args.warmup < 0 or any(mib < 1 for mib in args.sizes):
        parser.error("--runs and --runs-tiny must be at least 1, --warmup at least 0, sizes positive")
    if not args.containerd.startswith("2"):
        # 1.6/1.7: ctr sends CheckpointOptions (image_path) only to runtimes named io.containerd.runc.*, and the
        # daemon honours image_path only for them: pyshim's dump would go through the content store, the Go shim's
        # not. No like-for-like comparison there.
        print(f"cannot run on containerd {args.containerd}: its ctr and daemon drop --image-path for runtimes not "
              "named io.containerd.runc.*, so the two shims would not take the same path", file=sys.stderr)
        return 2
    if reason := unavailable_reason():
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    args.sizes = sorted(set(args.sizes))
    check_space(args.images_dir, max(args.sizes, default=0))
    command = shlex.join([sys.executable, *sys.argv])
    run_dir_existed = GO_SHIM_SOCKET_DIR.parent.exists()
    lifecycle.become_subreaper()
    env = load_environment()
    image = build_test_image(lifecycle.CACHE_DIR, busybox=env.busybox)
    try:
        marker, section = run(args.containerd, env, image, args, command)
        print(section)
        lifecycle.write_section(args.out, marker, section)
        print(f"written to {args.out}", file=sys.stderr)
    finally:
        if not run_dir_existed:
            remove_go_shim_socket_dir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

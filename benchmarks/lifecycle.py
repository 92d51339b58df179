"""pyshim against containerd's Go runc shim, side by side on one private containerd: a benchmark script, not a test.

For each containerd line asked for, one private containerd (integration/harness) with the local busybox test image;
every measurement alternates between the two shims (ABAB / BABA) so that drift hits both alike:

1. lifecycle: `ctr run --rm <runtime flags> IMAGE ID true` wall time;
2. the shim binary's `start` and `delete` actions alone, run as containerd runs them (its argv and environment,
   the bundle as cwd, a new process group, the `log` fifo open for reading), on a bundle holding only config.json
   and the runtime's own settings files; then `ctr run -d` (container + task create + start) wall time;
3. idle memory: RSS/PSS/USS of every shim process with IDLE detached `sleep` containers per shim;
4. pyshim only: `python -X importtime` of the start path and of the server path, and the interpreter's floor.

With `--compare-shim PATH --compare-label LABEL`, a second pyshim build (its `containerd-shim-pyshim-v2` launcher, e.g.
the code before a change) runs as a third runtime of the same containerd, interleaved with the other two in every
measurement of sections 1-3, and a fifth section gives the same-run ratios of this build to it and of both to Go.

The results go to stdout and into a Markdown file (default docs/benchmarks.md), one section per containerd version
and date (a rerun on the same day replaces it). Run as root:

    /opt/pyshim/venv/bin/python benchmarks/lifecycle.py --containerd 2 --runs 20
    /opt/pyshim/venv/bin/python benchmarks/lifecycle.py --containerd 2 --runs 20 \
        --compare-shim /path/to/before/containerd-shim-pyshim-v2 --compare-label before
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(REPO / "integration"), str(REPO)]

from harness import containerd as harness_containerd  # noqa: E402
from harness import processes  # noqa: E402
from harness.containerd import GO_SHIM_SOCKET_DIR, RUNC_V2, Containerd, remove_go_shim_socket_dir  # noqa: E402
from harness.environment import CONTAINERD_VERSIONS, Environment, load_environment, unavailable_reason  # noqa: E402
from harness.image import TestImage, build_test_image  # noqa: E402

PYSHIM = getattr(harness_containerd, "PYSHIM", "io.containerd.pyshim.v2")
PR_SET_CHILD_SUBREAPER = 36
CACHE_DIR = Path("/var/tmp/pyshim-bench-cache")
LOG_DIR = Path("/var/tmp/pyshim-bench-logs")
SHIM_EXIT_TIMEOUT = 5.0
SETTLE_SECONDS = 3.0
TARGET_RATIO = 1.2
# Bundle files that describe a running container rather than how to run one; not copied into the start/delete bundles.
RUNTIME_STATE_FILES = {"address", "bootstrap.json", "init.pid", "log.json", "shim-binary-path"}


@dataclass(frozen=True)
class Shim:
    label: str
    runtime: str
    binary_name: str
    path: Path | None = None  # a build given on the command line, linked as binary_name on containerd's PATH


PY = Shim("pyshim", PYSHIM, "containerd-shim-pyshim-v2")
GO = Shim("Go runc shim", RUNC_V2, "containerd-shim-runc-v2")
SHIMS = (PY, GO)
# --compare-shim: another pyshim build as a runtime of its own (containerd runs containerd-shim-<name>-v2 for
# io.containerd.<name>.v2); it takes the same runtime options as pyshim.
COMPARE_RUNTIME = "io.containerd.pyshimcompare.v2"
COMPARE_BINARY = "containerd-shim-pyshimcompare-v2"
PYSHIM_BINARIES = (PY.binary_name, COMPARE_BINARY)


def compare_shim(path: Path, label: str) -> Shim:
    return Shim(f"pyshim ({label})", COMPARE_RUNTIME, COMPARE_BINARY, path)


def in_turn(i: int, shims: Sequence[Shim] = SHIMS) -> list[Shim]:
    """The order of the shims in round i: rotated each round, so none always runs first, on a warmer cache, or
    right after the same other one. With two shims: ABAB / BABA."""
    k = i % len(shims)
    return [*shims[k:], *shims[:k]]


# --- small helpers -------------------------------------------------------------------------------------------------

def timed(argv: Sequence[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    """Run argv to completion (stdout/stderr read to EOF, as containerd does); wall seconds and the result."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("timeout", 60)
    t0 = time.perf_counter()
    result = subprocess.run(list(argv), **kwargs)
    return time.perf_counter() - t0, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def ratio(py: float, go: float) -> str:
    return f"{py / go:.2f}x" if go else "n/a"


def memory_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and Uss (private clean + dirty) of one process, in KiB, from /proc/<pid>/smaps_rollup."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return {"Rss": values["Rss"], "Pss": values["Pss"],
            "Uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)}


def flag_values(argv: Sequence[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-")}


def go_shim_socket_paths(containerd_address: str, namespace: str, group: str) -> list[Path]:
    """The socket (and 2.x -debug socket) a shim of this group binds, as the Go shim library names them."""
    key = os.path.normpath(os.path.join(containerd_address, namespace, group))
    return [GO_SHIM_SOCKET_DIR / hashlib.sha256(k.encode()).hexdigest() for k in (key, key + "/debug")]


def is_fork_server(pid: int) -> bool:
    """pyshim's fork server (shim/forkserver): `<shim binary> forkserver <containerd pid> ...`, launched by a
    `start` that found none, its spare (`forkserver-spare`) or its checkpoint spare (`forkserver-criu`). None is a
    shim server of any container."""
    argv = processes.cmdline(pid)
    for token in ("forkserver", "forkserver-spare", "forkserver-criu"):
        if token in argv and any(Path(a).name in PYSHIM_BINARIES for a in argv[:argv.index(token)]):
            return True
    return False


def listening_children(path: str) -> list[int]:
    """Our children, fork servers aside, holding a listening unix socket bound at path."""
    so_acceptcon = 0x10000
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & so_acceptcon:
            inodes.add(f"socket:[{fields[6]}]")
    found = []
    for pid in processes.children_of(os.getpid()):
        if is_fork_server(pid):
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def end_strays() -> list[str]:
    """Shim processes still our children at the end (none should be): ended by pid, and reported."""
    notes = []
    for pid in processes.children_of(os.getpid()):
        argv = processes.cmdline(pid)
        if any(Path(a).name in (*PYSHIM_BINARIES, GO.binary_name) for a in argv[:3]) and not is_fork_server(pid):
            notes.append(f"ended a leftover shim process {pid} ({' '.join(argv[-2:])})")
            processes.kill_child_of(os.getpid(), pid, signal.SIGTERM)
            if not reap(pid, 3.0):
                processes.kill_child_of(os.getpid(), pid, signal.SIGKILL)
                reap(pid, 3.0)
    return notes


def end_fork_servers() -> list[int]:
    """SIGTERM (by pidfd) and reap the fork servers that are our children: those launched by the `start` runs of
    section 2, whose "containerd" is this script. They would exit with the script or when idle."""
    ended = []
    for pid in processes.children_of(os.getpid()):
        if is_fork_server(pid):
            processes.kill_child_of(os.getpid(), pid, signal.SIGTERM)
            if not reap(pid, SHIM_EXIT_TIMEOUT):
                processes.kill_child_of(os.getpid(), pid, signal.SIGKILL)
                reap(pid, 3.0)
            ended.append(pid)
    return ended


def become_subreaper() -> None:
    """Servers that `start` daemonises get re-parented to us: ours to find, wait for and reap by pid."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap(pid: int, timeout: float) -> bool:
    """Wait for our child pid to exit and reap it; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def end_child(pid: int) -> str:
    """Make sure our child pid is gone: it should already be exiting; SIGTERM, then SIGKILL, by pidfd."""
    if reap(pid, SHIM_EXIT_TIMEOUT):
        return ""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        processes.kill_child_of(os.getpid(), pid, signum)
        if reap(pid, 3.0):
            return f"pid {pid} needed {signal.Signals(signum).name}"
    return f"pid {pid} would not exit"


def parse_start_output(output: bytes) -> tuple[str, int]:
    """`start`'s stdout: a plain address (task API v2) or 2.x's JSON {"version": 2|3, "address": ...}."""
    text = output.decode(errors="replace").strip()
    if text.startswith("{"):
        try:
            bootstrap = json.loads(text)
            return str(bootstrap.get("address", "")), int(bootstrap.get("version", 2))
        except (ValueError, TypeError):
            return "", 0
    return text, 2


async def _answer_then_shutdown(address: str, api_version: int, container_id: str,
                                on_ready: Callable[[], None]) -> None:
    """Wait for the shim server's first answer (State of an unknown task), call on_ready, then ask it to Shutdown."""
    from shim.api.containerd.task.v2 import shim_pb2 as task  # v3's Task takes v2's messages
    from shim.api.containerd.task.v3 import shim_pb2 as task_v3
    from shim.ttrpc import Client, ConnectionLost, TtrpcError

    service = (task_v3 if api_version == 3 else task).DESCRIPTOR.services_by_name["Task"]
    client = await Client.connect(address, timeout=5.0)
    try:
        stub = client.stub(service, timeout=10.0)
        try:
            await stub.State(task.StateRequest(id=container_id))
        except ConnectionLost:
            raise
        except TtrpcError:
            pass  # NotFound: there is no task, but the server is up and answering
        on_ready()
        try:
            await stub.Shutdown(task.ShutdownRequest(id=container_id))
        except ConnectionLost:
            pass  # it may close the connection before the reply gets out
    finally:
        client.close()


def shebang(path: Path) -> list[str]:
    """Interpreter and its single argument from a script's #! line (Linux passes the rest as one argument)."""
    with open(path, "rb") as f:
        first = f.readline().decode(errors="replace").strip()
    if not first.startswith("#!"):
        return []
    interpreter, _, arg = first[2:].strip().partition(" ")
    return [interpreter, *([arg.strip()] if arg.strip() else [])]


# --- one benchmark run against one containerd ----------------------------------------------------------------------

@dataclass
class StartDelete:
    start: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)  # start exited -> server answered its first call
    delete: list[float] = field(default_factory=list)
    server_rss: list[int] = field(default_factory=list)  # KiB, server with no container, after its first answer
    notes: list[str] = field(default_factory=list)
    origins: Counter = field(default_factory=Counter)  # pyshim: how each counted server came to be (its log line)


@dataclass
class Cycle:
    """One start -> first answer -> Shutdown -> delete, in seconds; server_rss in KiB."""

    start: float = 0.0
    ready: float = 0.0
    delete: float = 0.0
    server_rss: int = 0
    start_stderr: str = ""
    origin: str = ""  # pyshim: "forked by start" or "forked by fork server N", from the server's log
    problems: list[str] = field(default_factory=list)


class Benchmark:
    def __init__(self, containerd: Containerd, image: TestImage, runs: int, idle: int, compare: Shim | None = None):
        self.c = containerd
        self.image = image
        self.runs = runs
        self.idle = idle
        self.compare = compare
        self.shims: tuple[Shim, ...] = SHIMS if compare is None else (*SHIMS, compare)
        if compare is not None and compare.path is not None:
            (containerd.shim_dir / compare.binary_name).symlink_to(compare.path)
        self.binaries = {shim: Path(shutil.which(shim.binary_name, path=containerd.env["PATH"]) or shim.binary_name)
                         for shim in self.shims}
        self.bundle_templates: dict[Shim, Path] = {}
        self.start_env: dict[str, str] = {}
        self.start_flags: list[str] = []
        self.argv_source = ""
        self.failures: list[str] = []
        self.ids: dict[str, Shim] = {}  # every container id used, for the socket check at the end

    def runtime_flags(self, shim: Shim) -> list[str]:
        """ctr's runtime flags for shim: a compared pyshim build gets pyshim's (its runtime name aside)."""
        if shim.runtime != COMPARE_RUNTIME:
            return self.c.runtime_flags(shim.runtime)
        flags = self.c.runtime_flags(PYSHIM)
        flags[flags.index("--runtime") + 1] = shim.runtime
        return flags

    def new_id(self, shim: Shim, prefix: str) -> str:
        container_id = self.c.new_id(prefix)
        self.ids[container_id] = shim
        return container_id

    def remove_leftover_sockets(self) -> list[str]:
        """Shim sockets of our container ids still in /run/containerd/s after teardown (nothing listens on them any
        more): removed, and counted per shim and per phase (the id prefix) for the report."""
        left: dict[Shim, Counter[str]] = {}
        for container_id, shim in self.ids.items():
            for path in go_shim_socket_paths(self.c.address, self.c.namespace, container_id):
                if path.is_socket():
                    path.unlink()
                    left.setdefault(shim, Counter())[container_id.rsplit("-", 1)[0]] += 1
        return [f"{shim.label} left {phases.total()} socket(s) in {GO_SHIM_SOCKET_DIR} after its containers or "
                "servers were gone (removed by the script); by id prefix: "
                + ", ".join(f"{phase} {count}" for phase, count in phases.items())
                for shim, phases in left.items()]

    # 1 ------------------------------------------------------------------------------------------------------------
    def lifecycle(self) -> dict[Shim, list[float]]:
        """`ctr run --rm ... true`, runs+1 rounds; round 0 warms caches and is not counted."""
        samples: dict[Shim, list[float]] = {shim: [] for shim in self.shims}
        for i in range(self.runs + 1):
            for shim in in_turn(i, self.shims):
                container_id = self.new_id(shim, "lc")
                argv = [*self.c.ctr_argv(), "run", "--rm", *self.runtime_flags(shim), self.image.ref,
                        container_id, "true"]
                seconds, result = timed(argv, env=self.c.env, stdin=subprocess.DEVNULL, text=True)
                if result.returncode != 0:
                    self.failures.append(f"lifecycle {shim.label}: exit {result.returncode}: {result.stderr.strip()}")
                elif i:
                    samples[shim].append(seconds)
        return samples

    def pyshim_origins(self, prefix: str) -> Counter:
        """How the pyshim servers of our containers with ids starting with prefix came to be, from their start-up
        log line in containerd's log ("forked by start", "forked by fork server N")."""
        text = self.c.log_path.read_text(errors="replace") if self.c.log_path.exists() else ""
        return Counter(re.sub(r"\d+", "N", origin) for container_id, origin in
                       re.findall(r"pyshim serving namespace \S+ id (\S+) \(pid \d+, ([^)]*)\)", text)
                       if container_id.startswith(prefix) and container_id in self.ids)

    def cleanups_after_disconnect(self, prefix: str) -> dict[Shim, int]:
        """How many of our containers (ids starting with prefix) containerd logged "cleaning up after shim
        disconnected" for: each such cleanup runs the shim binary's `delete` action."""
        counts = {shim: 0 for shim in self.shims}
        text = self.c.log_path.read_text(errors="replace") if self.c.log_path.exists() else ""
        for container_id in re.findall(r'cleaning up after shim disconnected" id=(\S+)', text):
            if container_id.startswith(prefix) and container_id in self.ids:
                counts[self.ids[container_id]] += 1
        return counts

    # 2 ------------------------------------------------------------------------------------------------------------
    def capture_how_containerd_runs_shims(self) -> None:
        """One detached container per shim: keep its bundle's settings files as templates, and take the argv and
        environment containerd gave pyshim's `start` from pyshim's server (a fork of start: same cmdline/environ)."""
        ids = {}
        for shim in self.shims:
            container_id = self.new_id(shim, "probe")
            self.c.ctr("run", "-d", *self.runtime_flags(shim), self.image.ref, container_id, "sleep", "3600")
            ids[shim] = container_id
            template = self.c.tmp / "bench-templates" / shim.binary_name
            template.mkdir(parents=True)
            for path in self.c.bundle(container_id).iterdir():
                if path.is_file() and not path.is_symlink() and path.name not in RUNTIME_STATE_FILES:
                    shutil.copy2(path, template / path.name)
            self.bundle_templates[shim] = template
        found = self.shim_processes({PY: [ids[PY]]})[PY]
        argv = processes.cmdline(found[ids[PY]]) if found else []
        names = [Path(a).name for a in argv]
        if argv and argv[-1] == "start" and PY.binary_name in names:
            flags = argv[names.index(PY.binary_name) + 1:-1]
            self.start_flags = flags
            environ = Path(f"/proc/{found[ids[PY]]}/environ").read_bytes().split(b"\0")
            self.start_env = dict(e.decode().partition("=")[::2] for e in environ if b"=" in e)
            self.argv_source = ("as captured from a pyshim server that containerd started "
                                "(`/proc/PID/cmdline`, `environ`)")
        else:
            self.start_flags, self.start_env = self._documented_start_command(ids[PY])
            self.argv_source = ("as shim-v2-protocol.md §1 documents them "
                                "(pyshim's server no longer shows its start argv)")
        self.remove_containers(list(ids.values()))

    def _documented_start_command(self, container_id: str) -> tuple[list[str], dict[str, str]]:
        publish = os.path.realpath(self.c.bin_dir / "containerd")
        flags = ["-namespace", self.c.namespace, "-address", self.c.address, "-publish-binary", publish,
                 "-id", container_id, "-debug"]  # the harness runs containerd at debug level
        env = {**self.c.env, "GOMAXPROCS": "2", "TTRPC_ADDRESS": self.c.ttrpc_address}
        if self.c.version != "1.6":
            env.update(GRPC_ADDRESS=self.c.address, NAMESPACE=self.c.namespace)
        if self.c.version.startswith("2"):
            env["MAX_SHIM_VERSION"] = "2"
        return flags, env

    def _argv(self, shim: Shim, container_id: str, action: str, bundle: Path) -> list[str]:
        template_id = flag_values(self.start_flags)["-id"]
        flags = [container_id if a == template_id else a for a in self.start_flags]
        if action == "delete":
            debug = "-debug" in flags and self.c.version != "1.6"  # 1.6 never passes -debug to delete
            flags = [a for a in flags if a != "-debug"] + ["-bundle", str(bundle)] + (["-debug"] if debug else [])
        return [str(self.binaries[shim]), *flags, action]

    def _new_bundle(self, shim: Shim, container_id: str) -> Path:
        # Named <...>/<namespace>/<id> like containerd's: the Go shim's delete finds the bundle as dirname(cwd)/id.
        bundle = self.c.tmp / "bench-bundles" / self.c.namespace / container_id
        shutil.copytree(self.bundle_templates[shim], bundle)
        os.mkfifo(bundle / "log", 0o700)
        return bundle

    def start_and_delete(self) -> dict[Shim, StartDelete]:
        results = {shim: StartDelete() for shim in self.shims}
        for i in range(self.runs + 1):
            for shim in in_turn(i, self.shims):
                self._start_delete_once(shim, results[shim], counted=i > 0)
        return results

    def _start_delete_once(self, shim: Shim, out: StartDelete, counted: bool) -> None:
        cycle = self._start_then_delete(shim, "sd")
        out.notes += cycle.problems
        if counted and not cycle.problems:
            out.start.append(cycle.start)
            out.ready.append(cycle.ready)
            out.delete.append(cycle.delete)
            out.server_rss.append(cycle.server_rss)
            if cycle.origin:
                out.origins[re.sub(r"\d+", "N", cycle.origin)] += 1

    def _start_then_delete(self, shim: Shim, prefix: str, interpreter: Sequence[str] = ()) -> Cycle:
        """One shim lifetime without a container, as containerd drives it: `start` (timed), the server's first answer
        (timed from start's exit), Shutdown over ttrpc, `delete` (timed). interpreter (e.g. python -X importtime)
        runs the shim script under it; start's stderr is kept."""
        container_id = self.new_id(shim, prefix)
        bundle = self._new_bundle(shim, container_id)
        cycle = Cycle()
        # containerd opens the log fifo for reading before it runs start, and copies it to its own log.
        log_reader = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
        children_before = set(processes.children_of(os.getpid()))
        try:
            cycle.start, result = timed([*interpreter, *self._argv(shim, container_id, "start", bundle)], cwd=bundle,
                                        env=self.start_env, input=b"", process_group=0)
            started = time.perf_counter()  # *ready* counts from start's exit
            cycle.start_stderr = result.stderr.decode(errors="replace")
            address, api_version = parse_start_output(result.stdout)
            path = address.removeprefix("unix://") if address.startswith("unix:///") else ""
            servers: list[int] = []

            def on_ready() -> None:
                cycle.ready = time.perf_counter() - started
                # The server is the child of ours that listens on the address (found once it has answered, so the
                # search is not timed): forked by start, re-executed by the Go shim, or pyshim's fork server's
                # spare, which was our child before this start ran.
                servers.extend(listening_children(path))
                if len(servers) == 1:
                    cycle.server_rss = memory_kib(servers[0])["Rss"]

            if result.returncode == 0 and path:
                try:
                    asyncio.run(_answer_then_shutdown(address, api_version, container_id, on_ready))
                except Exception as exc:  # noqa: BLE001 - recorded, and the server is ended below either way
                    cycle.problems.append(f"{type(exc).__name__}: {exc}")
            if result.returncode != 0 or not path or len(servers) != 1:
                new = [pid for pid in processes.children_of(os.getpid())
                       if pid not in children_before and not is_fork_server(pid)]
                cycle.problems.append(f"start failed: exit {result.returncode}, output {result.stdout!r} "
                                      f"{result.stderr[-2000:]!r}, servers {servers}, new children {new}")
                for pid in dict.fromkeys(servers + new):
                    end_child(pid)
                return cycle
            if note := end_child(servers[0]):
                cycle.problems.append(note)
            cycle.delete, deleted = timed(self._argv(shim, container_id, "delete", bundle), cwd=bundle,
                                          env=self.start_env, stdin=subprocess.DEVNULL, process_group=0)
            if deleted.returncode != 0:
                cycle.problems.append(f"delete failed: exit {deleted.returncode}: {deleted.stderr[-2000:]!r}")
            return cycle
        finally:
            logged = b""
            try:
                while chunk := os.read(log_reader, 65536):
                    logged += chunk
            except BlockingIOError:
                pass
            os.close(log_reader)
            shutil.rmtree(bundle, ignore_errors=True)
            if found := re.search(rb"pyshim serving namespace \S+ id \S+ \(pid \d+, ([^)]*)\)", logged):
                cycle.origin = found[1].decode()

    # 3 ------------------------------------------------------------------------------------------------------------
    def create_and_idle_memory(self) -> tuple[dict[Shim, list[float]], dict[Shim, list[dict[str, int]]], list[str]]:
        """`ctr run -d ... sleep 3600`, idle per shim (timed), then the memory of every shim process."""
        create: dict[Shim, list[float]] = {shim: [] for shim in self.shims}
        ids: dict[Shim, list[str]] = {shim: [] for shim in self.shims}
        notes: list[str] = []
        try:
            for i in range(self.idle):
                for shim in in_turn(i, self.shims):
                    container_id = self.new_id(shim, "idle")
                    argv = [*self.c.ctr_argv(), "run", "-d", *self.runtime_flags(shim), self.image.ref,
                            container_id, "sleep", "3600"]
                    seconds, result = timed(argv, env=self.c.env, stdin=subprocess.DEVNULL, text=True)
                    if result.returncode != 0:
                        self.failures.append(f"ctr run -d {shim.label}: exit {result.returncode}: "
                                             f"{result.stderr.strip()}")
                        continue
                    ids[shim].append(container_id)
                    create[shim].append(seconds)
            time.sleep(SETTLE_SECONDS)
            memory: dict[Shim, list[dict[str, int]]] = {shim: [] for shim in self.shims}
            for shim, by_id in self.shim_processes(ids).items():
                missing = set(ids[shim]) - set(by_id)
                if missing:
                    notes.append(f"{shim.label}: no shim process found for {len(missing)} container(s)")
                for container_id, pid in by_id.items():
                    memory[shim].append(memory_kib(pid))
                    init = self._init_pid(container_id)
                    others = [p for p in processes.children_of(pid) if p != init]
                    if others:
                        notes.append(f"{shim.label} pid {pid} has processes besides the container: "
                                     f"{[processes.cmdline(p) for p in others]}")
            return create, memory, notes
        finally:
            self.remove_containers([container_id for shim in self.shims for container_id in ids[shim]])

    def _init_pid(self, container_id: str) -> int | None:
        try:
            return int((self.c.bundle(container_id) / "init.pid").read_text())
        except (OSError, ValueError):
            return None

    def shim_processes(self, ids: dict[Shim, list[str]]) -> dict[Shim, dict[str, int]]:
        """Shim server processes of this containerd, by container id: their cmdline names the shim binary, this
        containerd's own socket (a path in its private temp dir) as -address and one of our ids as -id."""
        wanted = {container_id: shim for shim, container_ids in ids.items() for container_id in container_ids}
        found: dict[Shim, dict[str, int]] = {shim: {} for shim in ids}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            argv = processes.cmdline(int(entry))
            flags = flag_values(argv)
            shim = wanted.get(flags.get("-id", ""))
            if (shim is None or flags.get("-address") != self.c.address or argv[-1:] == ["delete"]
                    or shim.binary_name not in [Path(a).name for a in argv[:3]]):
                continue
            found[shim][flags["-id"]] = int(entry)
        return found

    def remove_containers(self, container_ids: Sequence[str]) -> None:
        for container_id in container_ids:
            self.c.ctr("tasks", "rm", "-f", container_id, check=False, timeout=30)
            self.c.ctr("containers", "rm", container_id, check=False, timeout=30)

    # 4 ------------------------------------------------------------------------------------------------------------
    def python_breakdown(self) -> dict:
        """What bounds pyshim's start-up: interpreter floor, `-X importtime` of start and of the server path."""
        launcher = shebang(self.binaries[PY].resolve())
        out: dict = {"launcher": launcher, "floors": {}, "start_imports": None, "server_imports": None}
        if not launcher:
            out["error"] = f"{self.binaries[PY]} is not a #! script; no importtime breakdown"
            return out
        floors = {
            f"`{shlex.join([Path(launcher[0]).name, *launcher[1:]])} -c pass` (interpreter floor)":
                [*launcher, "-c", "pass"],
            f"`{shlex.join([Path(launcher[0]).name, *launcher[1:]])} -c 'import asyncio'`":
                [*launcher, "-c", "import asyncio"],
            f"`{PY.binary_name} -v`": [str(self.binaries[PY]), "-v"],
            f"`{GO.binary_name} -v`": [str(self.binaries[GO]), "-v"],
        }
        samples: dict[str, list[float]] = {name: [] for name in floors}
        for i in range(self.runs + 1):
            for name, argv in (floors.items() if i % 2 == 0 else reversed(floors.items())):
                seconds, _ = timed(argv, stdin=subprocess.DEVNULL)
                if i:
                    samples[name].append(seconds)
        out["floors"] = {name: median(values) for name, values in samples.items()}
        out["idle_kib"] = {"bare interpreter": self._interpreter_idle_memory(launcher, ""),
                           "interpreter after `import asyncio`": self._interpreter_idle_memory(launcher, ", asyncio")}
        out["start_imports"] = self._importtime_start(launcher)
        out["server_imports"] = self._importtime_server(launcher)
        return out

    def _interpreter_idle_memory(self, launcher: list[str], imports: str) -> dict[str, int]:
        code = f"import sys, time{imports}; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)"
        with subprocess.Popen([*launcher, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as child:
            try:
                child.stdout.readline()
                time.sleep(0.2)
                return memory_kib(child.pid)
            finally:
                child.kill()

    def _importtime_start(self, launcher: list[str]) -> list[tuple[int, int, str]] | str:
        cycle = self._start_then_delete(PY, "imp", [*launcher, "-X", "importtime"])
        return "; ".join(cycle.problems) if cycle.problems else parse_importtime(cycle.start_stderr)

    def _importtime_server(self, launcher: list[str]) -> list[tuple[int, int, str]] | str:
        """The server path in the foreground: no action, the listening socket as fd 3 (the Go shim's re-exec
        convention), stderr kept; everything it imports until it has answered a call and shut down."""
        container_id = self.new_id(PY, "imp")
        bundle = self._new_bundle(PY, container_id)
        log_reader = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
        path = str(self.c.tmp / f"{container_id}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(16)
        argv = self._argv(PY, container_id, "start", bundle)[:-1]
        listener_fd = listener.fileno()

        def listener_as_fd3() -> None:  # in the child; dup2 clears close-on-exec on fd 3
            if listener_fd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(listener_fd, 3)
        try:
            with subprocess.Popen([*launcher, "-X", "importtime", *argv], cwd=bundle, env=self.start_env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  close_fds=False, preexec_fn=listener_as_fd3) as server:
                listener.close()
                try:
                    asyncio.run(_answer_then_shutdown("unix://" + path, 2, container_id, lambda: None))
                except Exception as exc:  # noqa: BLE001
                    server.kill()
                    return f"the server did not answer: {type(exc).__name__}: {exc}"
                try:
                    _, stderr = server.communicate(timeout=SHIM_EXIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    server.kill()
                    _, stderr = server.communicate()
            return parse_importtime(stderr.decode(errors="replace"))
        finally:
            listener.close()
            os.close(log_reader)
            Path(path).unlink(missing_ok=True)
            shutil.rmtree(bundle, ignore_errors=True)


def parse_importtime(stderr: str) -> list[tuple[int, int, str]]:
    """`import time: self | cumulative | name` lines -> (self us, cumulative us, indented name)."""
    rows = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (.*)$", line)
        if match:
            rows.append((int(match[1]), int(match[2]), match[3]))
    return rows


# --- the report ----------------------------------------------------------------------------------------------------

def describe_host(env: Environment) -> list[str]:
    def first_line(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    shim_digest = hashlib.sha256()
    for path in sorted((REPO / "shim").rglob("*.py")):
        shim_digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "shim", "packaging"],
                           capture_output=True, text=True).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    from google.protobuf.internal import api_implementation

    return [
        f"- host: {platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"Debian {Path('/etc/debian_version').read_text().strip()}",
        f"- pyshim: commit {commit}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
        + f"; shim/*.py digest {shim_digest.hexdigest()[:12]}",
        f"- Python {platform.python_version()} ({sys.executable}), protobuf backend {api_implementation.Type()}",
        f"- runc: {first_line([str(env.runc), '--version'])}",
    ]


def other_containerds(own: Containerd) -> int:
    """containerd daemons on this machine that are not ours (a concurrent test run skews the figures)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = processes.cmdline(int(entry))
            if argv and Path(argv[0]).name == "containerd" and own.config_path.as_posix() not in argv:
                count += 1
    return count


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def timing_row(name: str, py: Sequence[float], go: Sequence[float], with_p90: bool = False) -> str:
    cells = [name, ms(median(py)), ms(median(go))]
    if with_p90:
        cells += [ms(p90(py)), ms(p90(go))]
    cells += [ratio(median(py), median(go)), f"{(median(py) - median(go)) * 1000:+.1f}", f"{len(py)}/{len(go)}"]
    return "| " + " | ".join(cells) + " |"


def verdict(value: float, target: float = TARGET_RATIO) -> str:
    return f"{'met' if value <= target else 'NOT met'} ({value:.2f}x vs <= {target}x)"


def render(marker: str, heading: str, command: str, host: list[str], bench: Benchmark,
           lifecycle: dict, cleanups: dict, origins: Counter, start_delete: dict, create: dict, memory: dict,
           memory_notes: list[str],
           breakdown: dict, load: tuple[str, str], others: int) -> str:
    lines = [f"<!-- BEGIN {marker} -->", f"## {heading}", "", "Command (as root, in the repository):", "",
             f"    {command}", ""]
    lines += host
    lines += [f"- pyshim binary: `{bench.binaries[PY].resolve()}`; Go shim: `{bench.binaries[GO].resolve()}`"
              + (f"; {bench.compare.label}: `{bench.compare.path}` (as runtime `{bench.compare.runtime}`)"
                 if bench.compare else ""),
              f"- load average before / after: {load[0]} / {load[1]}; other containerd daemons running meanwhile: "
              f"{others}", ""]
    life_py, life_go = lifecycle[PY], lifecycle[GO]
    lines += ["### 1. Lifecycle: `ctr run --rm <runtime flags> IMAGE ID true`",
              "",
              f"{bench.runs} runs per shim after one uncounted warm-up round, alternating which shim goes first. "
              "Milliseconds; the delta is pyshim minus Go.",
              "",
              "| | pyshim median | Go median | pyshim p90 | Go p90 | ratio (medians) | delta ms | runs |",
              "|---|---|---|---|---|---|---|---|",
              timing_row("`ctr run --rm ... true`", life_py, life_go, with_p90=True),
              "",
              f"Target lifecycle <= {TARGET_RATIO}x the Go shim: **{verdict(median(life_py) / median(life_go))}**.",
              "",
              f"containerd logged \"cleaning up after shim disconnected\" (it then runs the shim binary's `delete`) "
              f"for {cleanups[PY]} of pyshim's and {cleanups[GO]} of Go's {bench.runs + 1} lifecycle containers "
              "(warm-up included)." + origins_sentence(origins),
              ""]
    sd_py, sd_go = start_delete[PY], start_delete[GO]
    lines += ["### 2. The shim's own actions, and task creation through containerd",
              "",
              f"`start` and `delete` run {bench.runs} times per shim (after a warm-up round) the way containerd "
              f"runs them: argv and environment {bench.argv_source}; the bundle dir as cwd; a new process group; "
              "empty stdin on start; `log` fifo open for reading. The bundle holds config.json and the settings "
              "files the runtime wrote at create (`options.json` + `runtime` for Go, pyshim's own), copied from a "
              "real container's bundle; there is no container, so `delete`'s `runc delete --force` finds none. "
              "`start` is timed until it has exited and closed its stdout/stderr (containerd reads them to EOF); "
              "*ready* is the extra time until the daemonised server answers its first ttrpc call (State), which "
              "containerd's Create waits for; then the server is ended with Shutdown over ttrpc (pyshim's "
              "`shim.ttrpc.Client`), and `delete` runs on the same bundle. *server RSS* is the server right after "
              "that first answer, without a container.",
              "",
              "| | pyshim median | Go median | ratio | delta ms | runs |",
              "|---|---|---|---|---|---|",
              timing_row("`start` (until exit, address printed)", sd_py.start, sd_go.start),
              timing_row("start exited -> server answers", sd_py.ready, sd_go.ready),
              timing_row("`start` + ready", [a + b for a, b in zip(sd_py.start, sd_py.ready, strict=True)],
                         [a + b for a, b in zip(sd_go.start, sd_go.ready, strict=True)]),
              timing_row("`delete`", sd_py.delete, sd_go.delete),
              timing_row("`ctr run -d ... sleep` (container + task create + start)", create[PY], create[GO]),
              "",
              f"Server RSS without a container: pyshim {mib(median(sd_py.server_rss))} MiB, "
              f"Go {mib(median(sd_go.server_rss))} MiB (medians). Longest `delete`: pyshim "
              f"{ms(max(sd_py.delete, default=float('nan')))} ms, Go {ms(max(sd_go.delete, default=float('nan')))} ms "
              "(containerd allows 5 s).",
              ""]
    if sd_py.origins:
        lines += [f"pyshim servers of the counted `start` runs: {describe_origins(sd_py.origins)}.", ""]
    for shim in bench.shims:
        for note in dict.fromkeys(start_delete[shim].notes):
            lines.append(f"- {shim.label} start/delete problem: {note}")
    lines.append("")
    mem_py, mem_go = memory[PY], memory[GO]
    lines += [f"### 3. Idle memory: {bench.idle} detached `sleep` containers per shim",
              "",
              "Every shim server process of this containerd (found in /proc by cmdline: the shim binary, this "
              "containerd's private socket as `-address`, our container ids as `-id`), read from "
              f"`/proc/PID/smaps_rollup` {SETTLE_SECONDS:.0f} s after the last container started. MiB. PSS shares "
              "common pages among the processes that map them; USS is private memory.",
              "",
              "| | pyshim | Go | ratio |",
              "|---|---|---|---|"]
    for key in ("Rss", "Pss", "Uss"):
        py_values = [m[key] for m in mem_py]
        go_values = [m[key] for m in mem_go]
        lines.append(f"| {key} median per shim | {mib(median(py_values))} | {mib(median(go_values))} | "
                     f"{ratio(median(py_values), median(go_values))} |")
        lines.append(f"| {key} total ({len(py_values)} / {len(go_values)} shims) | {mib(sum(py_values))} | "
                     f"{mib(sum(go_values))} | {ratio(sum(py_values), sum(go_values))} |")
    rss_ratio = median([m["Rss"] for m in mem_py]) / median([m["Rss"] for m in mem_go])
    lines += ["", f"Target idle RSS <= {TARGET_RATIO}x the Go shim: **{verdict(rss_ratio)}**.", ""]
    lines += [f"- {note}" for note in memory_notes]
    lines += render_breakdown(breakdown)
    if bench.compare is not None:
        lines += render_comparison(bench, bench.compare, lifecycle, start_delete, create, memory)
    if bench.failures:
        lines += ["", "Failures (excluded from the figures):", ""]
        lines += [f"- {failure}" for failure in dict.fromkeys(bench.failures)]
    lines += ["", f"<!-- END {marker} -->"]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"


def render_comparison(bench: Benchmark, other: Shim, lifecycle: dict, start_delete: dict, create: dict,
                      memory: dict) -> list[str]:
    """Section 5: this pyshim against the other build and both against Go, from the same interleaved rounds."""
    def row(name: str, samples: dict[Shim, Sequence[float]], unit: Callable[[float], str]) -> str:
        py, was, go = (median(samples[shim]) for shim in (PY, other, GO))
        return (f"| {name} | {unit(py)} | {unit(was)} | {unit(go)} | {ratio(py, was)} | {ratio(py, go)} | "
                f"{ratio(was, go)} | {len(samples[PY])}/{len(samples[other])}/{len(samples[GO])} |")

    shims = (PY, other, GO)
    sd = {shim: start_delete[shim] for shim in shims}
    lines = ["", f"### 5. This pyshim against {other.label}, same run", "",
             f"`{other.label}` is `{other.path}`, run by the same containerd as runtime `{other.runtime}` and "
             "interleaved with the two others round by round (the order rotates each round) in sections 1-3; the "
             "figures are medians of those same rounds. Milliseconds and MiB; a ratio above 1 means the first is "
             "slower or larger.", "",
             f"| | pyshim | {other.label} | Go | pyshim / {other.label} | pyshim / Go | {other.label} / Go | runs |",
             "|---|---|---|---|---|---|---|---|",
             row("`ctr run --rm ... true`", lifecycle, ms),
             row("`start`", {s: sd[s].start for s in shims}, ms),
             row("start exited -> server answers", {s: sd[s].ready for s in shims}, ms),
             row("`start` + ready", {s: [a + b for a, b in zip(sd[s].start, sd[s].ready, strict=True)]
                                     for s in shims}, ms),
             row("`delete`", {s: sd[s].delete for s in shims}, ms),
             row("`ctr run -d ... sleep`", create, ms),
             row("server RSS without a container", {s: sd[s].server_rss for s in shims}, mib)]
    for key in ("Rss", "Pss", "Uss"):
        lines.append(row(f"idle {key} per shim", {s: [m[key] for m in memory[s]] for s in shims}, mib))
    return lines + [""]


def describe_origins(origins: Counter) -> str:
    return ", ".join(f"{count} {origin}" for origin, count in origins.most_common())


def origins_sentence(origins: Counter) -> str:
    if not origins:
        return ""
    return f" pyshim's servers (warm-up included): {describe_origins(origins)}."


def render_breakdown(breakdown: dict) -> list[str]:
    lines = ["", "### 4. pyshim start-up: what bounds it", ""]
    if breakdown.get("error"):
        return lines + [breakdown["error"]]
    launcher = shlex.join(breakdown["launcher"])
    lines += [f"Launcher interpreter: `#!{launcher}`. Wall time, medians:", "", "| command | ms |", "|---|---|"]
    lines += [f"| {name} | {ms(value)} |" for name, value in breakdown["floors"].items()]
    lines += ["", "Memory floors, idle processes with the launcher's interpreter and flags (MiB):", "",
              "| process | RSS | PSS | USS |", "|---|---|---|---|"]
    lines += [f"| {name} | {mib(m['Rss'])} | {mib(m['Pss'])} | {mib(m['Uss'])} |"
              for name, m in breakdown["idle_kib"].items()]
    lines.append("")
    for title, key in (("start path: `-X importtime` of the `start` action (what runs before it forks the server)",
                        "start_imports"),
                       ("server path: `-X importtime` of the server run in the foreground (socket as fd 3) until it "
                        "has answered State and Shutdown", "server_imports")):
        rows = breakdown[key]
        lines += [f"{title}:", ""]
        if isinstance(rows, str) or not rows:
            lines += [f"    not measured: {rows or 'no importtime output'}", ""]
            continue
        top_level = sum(cumulative for _, cumulative, name in rows if not name.startswith(" "))
        lines += [f"{len(rows)} modules imported, {top_level / 1000:.1f} ms in imports (sum of top-level cumulative "
                  "times, under importtime's own overhead). Top 10 by cumulative time (indentation = nesting):", "",
                  "| cumulative ms | self ms | module |", "|---|---|---|"]
        for self_us, cumulative, name in sorted(rows, key=lambda row: row[1], reverse=True)[:10]:
            depth = (len(name) - len(name.lstrip())) // 2
            lines.append(f"| {cumulative / 1000:.1f} | {self_us / 1000:.1f} | {'. ' * depth}`{name.strip()}` |")
        lines.append("")
    return lines


DOC_PREAMBLE = """# Benchmarks: pyshim against containerd's Go runc shim

Written by `benchmarks/lifecycle.py` (see `benchmarks/README.md`); each section below is one run against one
containerd version on one date, and a rerun on the same date replaces its section. Both shims run on the same private
containerd, with the same image and workload, interleaved. Targets: lifecycle <= 1.2x the Go shim, idle RSS <= 1.2x.
"""


def write_section(out: Path, marker: str, section: str) -> None:
    text = out.read_text() if out.exists() else DOC_PREAMBLE
    pattern = re.compile(rf"<!-- BEGIN {re.escape(marker)} -->.*?<!-- END {re.escape(marker)} -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def run_one(version: str, env: Environment, image: TestImage, args: argparse.Namespace,
            command: str) -> tuple[str, str]:
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    c = Containerd(version, env, log_dir=LOG_DIR)
    if args.no_forkserver:
        c.env["PYSHIM_FORKSERVER"] = "0"  # containerd passes it on to every `start`
    compare = compare_shim(args.compare_shim, args.compare_label) if args.compare_shim else None
    bench = Benchmark(c, image, args.runs, args.idle, compare)
    try:
        c.start()
        c.import_image(image)
        server_version = c.server_version()
        others = other_containerds(c)
        print(f"containerd {server_version}: lifecycle x{args.runs}", file=sys.stderr)
        lifecycle = bench.lifecycle()
        print(f"containerd {server_version}: start/delete x{args.runs}", file=sys.stderr)
        bench.capture_how_containerd_runs_shims()
        start_delete = bench.start_and_delete()
        print(f"containerd {server_version}: ctr run -d + idle memory x{args.idle}", file=sys.stderr)
        create, memory, memory_notes = bench.create_and_idle_memory()
        print(f"containerd {server_version}: importtime", file=sys.stderr)
        breakdown = bench.python_breakdown()
        others = max(others, other_containerds(c))
    finally:
        notes = c.stop()
        notes += end_strays()
        end_fork_servers()
        notes += bench.remove_leftover_sockets()
    cleanups = bench.cleanups_after_disconnect("lc-")  # from containerd's log, kept after it stopped
    origins = bench.pyshim_origins("lc-")
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    today = datetime.date.today().isoformat()
    variant = " forkserver=off" if args.no_forkserver else " forkserver=on"
    if compare is not None:
        variant += f" compare={args.compare_label}"
    marker = f"lifecycle containerd={server_version}{variant} date={today}"
    heading = (f"containerd {server_version} (`--containerd {version}`), {today}"
               + (", pyshim without its fork server (`--no-forkserver`)" if args.no_forkserver else "")
               + (f", beside {compare.label} (`--compare-shim`)" if compare is not None else ""))
    section = render(marker, heading, command, describe_host(env), bench, lifecycle, cleanups, origins, start_delete,
                     create,
                     memory, memory_notes, breakdown, (load_before, load_after), others)
    if notes:
        section = section.replace(f"<!-- END {marker} -->",
                                  "Teardown: " + "; ".join(notes) + f"\n\n<!-- END {marker} -->")
    return marker, section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containerd", choices=[*CONTAINERD_VERSIONS, "all"], default="2",
                        help="which containerd line to run against (default 2; all = each in turn)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per shim for each timing (default 20)")
    parser.add_argument("--idle", type=int, default=20, help="idle containers per shim for memory (default 20)")
    parser.add_argument("--no-forkserver", action="store_true",
                        help="run pyshim without its fork server (PYSHIM_FORKSERVER=0 in containerd's environment): "
                             "every `start` forks the server itself, as before shim/forkserver existed")
    parser.add_argument("--compare-shim", type=Path, metavar="PATH",
                        help="another pyshim build's containerd-shim-pyshim-v2 (e.g. the code before a change), run as "
                             f"a third runtime ({COMPARE_RUNTIME}) interleaved with the two others; section 5 gives "
                             "the same-run ratios")
    parser.add_argument("--compare-label", default="before",
                        help="what to call the --compare-shim build in the report (default: before)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="Markdown file whose section for this containerd version and date is replaced "
                             "(default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.idle < 1:
        parser.error("--runs and --idle must be at least 1")
    if args.compare_shim is not None:
        if not os.access(args.compare_shim, os.X_OK) or args.compare_shim.is_dir():
            parser.error(f"--compare-shim {args.compare_shim}: not an executable file")
        args.compare_shim = args.compare_shim.resolve()
    if not re.fullmatch(r"[\w.+-]{1,40}", args.compare_label):
        parser.error("--compare-label: letters, digits and . + - _ only (it goes into the report's section marker)")
    if reason := unavailable_reason():
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    command = shlex.join([sys.executable, *sys.argv])
    run_dir_existed = GO_SHIM_SOCKET_DIR.parent.exists()
    become_subreaper()
    env = load_environment()
    image = build_test_image(CACHE_DIR, busybox=env.busybox)
    versions = CONTAINERD_VERSIONS if args.containerd == "all" else (args.containerd,)
    try:
        for version in versions:
            marker, section = run_one(version, env, image, args, command)
            print(section)
            write_section(args.out, marker, section)
            print(f"written to {args.out}", file=sys.stderr)
    finally:
        if not run_dir_existed:
            remove_go_shim_socket_dir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A private containerd of one version, in its own temporary directory, and everything it started.

`Containerd` owns: its root, state, sockets and config under a fresh temp dir; the containerd process (run under
the subreaper, so the shims it daemonises are reaped); `ctr` invocations bound to its socket and a test namespace;
and the teardown: tasks and containers removed through ctr, runc containers left in its private runc root deleted,
containerd stopped by pid, orphaned shims killed by pid, mounts under the temp dir unmounted, the namespace cgroups
removed, the temp dir deleted. Only the debug log survives, for failure reports.

`Containerd(..., cgroup2=True)` starts containerd in a mount namespace whose /sys/fs/cgroup is the cgroup2 hierarchy
(harness.cgroup2_view): it and everything it starts run as on a cgroup v2 host, and `runc()` runs runc in such a
namespace too.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import cgroup2_view, cgroups, commands, ids, logs, mounts, processes
from .config import ContainerdPaths, CriSettings, render_config
from .environment import Environment
from .events import EventStream
from .image import TestImage
from .runc import Runc
from .supervisor import Supervised, supervise

RUNC_V2 = "io.containerd.runc.v2"
PYSHIM = "io.containerd.pyshim.v2"
RUNTIMES = (PYSHIM, RUNC_V2)
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Where the Go shim library puts shim sockets whatever containerd's state dir is (1.6-2.x).
GO_SHIM_SOCKET_DIR = Path("/run/containerd/s")
# The containerd namespace the CRI plugin keeps its pods, containers and images in.
CRI_NAMESPACE = "k8s.io"
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# Every instance not yet stopped (created ones too: they own a temp dir).
_live: set[Containerd] = set()


class Containerd:
    """One containerd instance for tests. Use as a context manager, or call start() and stop()."""

    def __init__(self, version: str, environment: Environment, *, log_dir: Path,
                 namespace: str | None = None, base_dir: Path = Path("/tmp"), cri_sandbox_image: str | None = None,
                 cri_runtime_handlers: bool = True, cgroup2: bool = False):
        """cri_sandbox_image enables the CRI plugin (off otherwise) with that image (one to import into
        CRI_NAMESPACE before a pod is run: nothing can be pulled) as every pod's sandbox image; see config.py.
        cri_runtime_handlers=False leaves CRI's runtimes to the test (CriSettings.runtime_handlers).
        cgroup2 runs containerd (and so its shims, runc, CRIU) in a cgroup v2 view of the host: cgroup2_view.py."""
        self.version = version
        self.cgroup2 = cgroup2
        self._v1_cgroups: list[Path] = []  # what cgroup2_view.isolate_v1() made for it
        self.cri_sandbox_image = cri_sandbox_image
        self.cri_runtime_handlers = cri_runtime_handlers
        self.bin_dir = environment.containerd_bin_dir(version)
        # Short paths: unix socket paths are limited to 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix=f"psh{version.replace('.', '')}-", dir=base_dir))
        self.root = self.tmp / "root"
        self.state = self.tmp / "state"
        self.address = str(self.tmp / "containerd.sock")
        # containerd serves ttrpc at <grpc address>.ttrpc and tells shims so in TTRPC_ADDRESS; keep them the same.
        self.ttrpc_address = self.address + ".ttrpc"
        self.runc_root = self.tmp / "runc"
        self.fifo_dir = self.tmp / "fifo"
        self.config_path = self.tmp / "config.toml"
        # CRI's registry hosts configuration (hosts.toml per registry host), when CRI is enabled.
        self.registry_config_dir = self.tmp / "registries"
        self.namespace = namespace or ids.namespace()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"containerd-{version}-{self.tmp.name}.log"
        # The shim under test (PYSHIM_SHIM: the installed one) alone in a directory of its own, first on PATH: its
        # real directory (/usr/bin) could hold a system containerd's binaries that would shadow this version's.
        self.shim_dir = self.tmp / "shim"
        self.shim_dir.mkdir()
        (self.shim_dir / "containerd-shim-pyshim-v2").symlink_to(environment.shim)
        self.env = {
            # Our shim and this version's own shim and ctr come first; the system's runc stays reachable.
            "PATH": ":".join([str(self.shim_dir), str(self.bin_dir), *SYSTEM_PATH]),
            "TMPDIR": str(self.tmp / "tmp"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
        }
        self._process: Supervised | None = None
        # Subreapers of containerd processes ended by restart(): they still reap the shims that process started.
        self._retired: list[Supervised] = []
        self._namespaces_seen: set[str] = {self.namespace}
        if cri_sandbox_image is not None:
            self._namespaces_seen.add(CRI_NAMESPACE)
        _live.add(self)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def serving(self, image: TestImage | None = None) -> Iterator[Containerd]:
        """Started, image imported, for the block; stopped however it ends, and what stop() found left behind
        printed (a test's captured output shows it)."""
        try:
            self.start()
            if image is not None:
                self.import_image(image)
            yield self
        finally:
            for note in self.stop():
                print(f"containerd {self.version} teardown: {note}")

    def start(self, timeout: float = START_TIMEOUT, configure: Callable[[Path], object] | None = None) -> None:
        """configure, if given, is called with the written config.toml's path before containerd starts."""
        for directory in (self.root, self.state, self.runc_root, self.fifo_dir, self.tmp / "tmp"):
            directory.mkdir(parents=True, exist_ok=True)
        paths = ContainerdPaths(self.root, self.state, self.tmp / "tmp", self.address, self.ttrpc_address)
        cri = None
        if self.cri_sandbox_image is not None:
            cni = self.tmp / "cni"
            for directory in (cni / "bin", cni / "conf"):
                directory.mkdir(parents=True, exist_ok=True)
            self.registry_config_dir.mkdir(exist_ok=True)
            cri = CriSettings(self.cri_sandbox_image, self.runc_root, self.pyshim_config(), cni / "bin", cni / "conf",
                              self.registry_config_dir, self.cri_runtime_handlers)
        self.config_path.write_text(render_config(self.version, paths, cri))
        if configure is not None:
            configure(self.config_path)
        if self.cgroup2 and str(self.tmp) not in mounts.mounts_under(self.tmp):
            cgroup2_view.share(self.tmp)
            self._v1_cgroups = cgroup2_view.isolate_v1(f"pyshim-cg2-{self.tmp.name}")
        self._launch(timeout)

    def _launch(self, timeout: float) -> None:
        # One subreaper per containerd process; each keeps its own pid/status files (a restart must not reuse them).
        name = "containerd" if not self._retired else f"containerd-{len(self._retired)}"
        argv = [str(self.bin_dir / "containerd"), "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self._process = supervise(
                cgroup2_view.wrap(argv, join=self._v1_cgroups) if self.cgroup2 else argv,
                name=name, run_dir=self.tmp, env=self.env, stdout=log, stderr=log,
            )
        self._wait_ready(timeout)

    @property
    def pid(self) -> int:
        """The running containerd process's pid."""
        assert self._process is not None
        return self._process.main_pid

    def restart(self, timeout: float = START_TIMEOUT, while_down: Callable[[], object] | None = None,
                kill: bool = False) -> None:
        """Stop the containerd process only (SIGTERM by pid, or SIGKILL with kill; shims and their tasks keep
        running), start it again.

        Same root, state, sockets and config: the new process reloads the shims' bundles and reconnects to them.
        while_down, if given, runs between the two (containerd stopped, shims running).
        The old process's subreaper keeps reaping the shims it adopted until they end; stop() tears those down too.
        """
        assert self._process is not None, "restart() before start()"
        old = self._process
        if kill:
            old.signal_main(signal.SIGKILL)
        else:
            old.stop_main(STOP_TIMEOUT)
        if old.main_exit_code() is None:
            try:
                old.wait_main(STOP_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(f"containerd {self.version} (pid {old.main_pid}) did not stop:\n"
                                   f"{self.log_tail()}") from None
        old.close()
        self._retired.append(old)
        try:
            if while_down is not None:
                while_down()
        finally:
            self._launch(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            if (code := self._process.main_exit_code()) is not None:
                raise RuntimeError(f"containerd {self.version} exited with {code} during start-up:\n{self.log_tail()}")
            result = self.ctr("version", check=False, timeout=5)
            if result.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"containerd {self.version} not answering on {self.address} after {timeout}s: "
                                   f"{result.stderr.strip()}\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> list[str]:
        """Tear everything down; idempotent. Returns notes on what had to be forced (empty when all was tidy)."""
        if self not in _live:
            return []
        notes: list[str] = []
        try:
            if self._process is not None and self._process.main_exit_code() is None:
                notes += self._remove_all_containers()
            notes += self._delete_runc_leftovers()
            if self._process is not None:
                self._process.stop_main(STOP_TIMEOUT)
            for supervised in [*self._retired, *([self._process] if self._process is not None else [])]:
                try:
                    # Shims whose tasks were deleted are already on their way out; give them a moment.
                    supervised.wait(2.0)
                except subprocess.TimeoutExpired:
                    notes += [f"killed leftover process {pid}" for pid in self._kill_orphans(supervised)]
                    try:
                        supervised.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        notes += [f"killed leftover process {pid}" for pid in supervised.terminate(STOP_TIMEOUT)]
                supervised.close()
            left = cgroup2_view.unshare_dir(self.tmp) if self.cgroup2 else mounts.unmount_all_under(self.tmp)
            notes += [f"unmounted {point}" for point in left]
            for namespace in filter(ids.is_test_namespace, self._namespaces_seen):
                # Only names this harness made up: an empty /default cgroup may belong to the host's containerd.
                notes += [f"cgroup still busy: {path}" for path in cgroups.remove_cgroup_tree(namespace)]
            notes += [f"cgroup still busy: {path}" for path in cgroup2_view.remove_v1(self._v1_cgroups)]
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            _live.discard(self)
        return notes

    def _remove_all_containers(self) -> list[str]:
        """Force-delete every task and container in every namespace, through containerd (so shims exit normally)."""
        notes = []
        listed = self.ctr("namespaces", "ls", "-q", check=False, timeout=10)
        self._namespaces_seen.update(listed.stdout.split())
        for namespace in sorted(self._namespaces_seen):
            for task in self.ctr("tasks", "ls", "-q", namespace=namespace, check=False, timeout=10).stdout.split():
                # -f kills the task's processes and waits for them before deleting.
                try:
                    result = self.ctr("tasks", "rm", "-f", task, namespace=namespace, check=False, timeout=15)
                except commands.CommandFailed as exc:
                    # (A kill --all that finds nothing in the task's cgroup waits forever.) The shim and its
                    # processes are killed by pid once containerd has stopped.
                    notes.append(f"could not remove task {namespace}/{task}: {str(exc).splitlines()[0]}")
                    continue
                notes.append(f"removed task {namespace}/{task}" + (f": {result.stderr.strip()}"
                                                                   if result.returncode else ""))
            for container in self.ctr("containers", "ls", "-q", namespace=namespace, check=False,
                                      timeout=10).stdout.split():
                self.ctr("containers", "rm", container, namespace=namespace, check=False, timeout=15)
                notes.append(f"removed container {namespace}/{container}")
        return notes

    def _delete_runc_leftovers(self) -> list[str]:
        """`runc delete -f` whatever is left in the private runc root (e.g. containers a test restored itself)."""
        notes = []
        if not self.runc_root.is_dir():
            return notes
        for state_root in sorted(self.runc_root.iterdir()):
            self._namespaces_seen.add(state_root.name)
            runc = self._runc_on(state_root)
            for container in runc.list():
                runc.delete(container["id"], force=True, check=False)
                notes.append(f"runc delete -f {state_root.name}/{container['id']}")
        return notes

    def _kill_orphans(self, supervised: Supervised) -> list[int]:
        """Kill shims (and their children) left after containerd ended; remove the sockets a killed Go shim leaves."""
        sockets = [socket for pid in supervised.orphans() for socket in self._go_shim_sockets(pid)]
        killed = supervised.kill_orphans(STOP_TIMEOUT)
        for socket in sockets:
            if socket.is_socket():
                socket.unlink(missing_ok=True)
        return killed

    def _go_shim_sockets(self, pid: int) -> list[Path]:
        """Sockets of a Go shim of ours: /run/containerd/s/hex(sha256(<address>/<namespace>/<id>[/debug])).

        The /debug one exists when the shim runs with -debug (containerd at debug level) and only from 2.x on.
        """
        argv = processes.cmdline(pid)
        flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-")}
        if flags.get("-address") != self.address or "-namespace" not in flags or "-id" not in flags:
            return []
        key = os.path.normpath(os.path.join(self.address, flags["-namespace"], flags["-id"]))
        return [GO_SHIM_SOCKET_DIR / hashlib.sha256(k.encode()).hexdigest() for k in (key, key + "/debug")]

    # --- using it ----------------------------------------------------------------------------------------------

    def ctr_argv(self, namespace: str | None = None) -> list[str]:
        return [str(self.bin_dir / "ctr"), "--address", self.address, "--namespace", namespace or self.namespace]

    def ctr(self, *args: str, namespace: str | None = None, check: bool = True,
            timeout: float = commands.DEFAULT_TIMEOUT, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run this version's ctr against this containerd, in the test namespace unless told otherwise."""
        if namespace is not None:
            self._namespaces_seen.add(namespace)
        if self.cgroup2 and args[:1] == ("run",):
            # `ctr run` asks cpu shares 1024 unless told 0, which runc writes to cpu.weight on cgroup v2: a file of
            # the cpu controller, which this view lacks (cgroup2_view.py). `ctr containers create` asks none.
            args = ("run", "--cpu-shares", "0", *args[1:])
        return commands.run([*self.ctr_argv(namespace), *args], env=self.env, check=check, timeout=timeout,
                            input=input)

    def server_version(self) -> str:
        """The daemon's version as `ctr version` reports it under `Server:` (without the leading v)."""
        output = self.ctr("version", timeout=10).stdout
        server = output.split("Server:", 1)[1]
        for line in server.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "Version":
                return value.strip().lstrip("v")
        raise ValueError(f"no server version in `ctr version` output:\n{output}")

    def import_image(self, image: TestImage, namespace: str | None = None) -> None:
        self.ctr("images", "import", str(image.path), namespace=namespace, timeout=60)

    def events(self) -> EventStream:
        """A `ctr events` stream (all namespaces); use as a context manager."""
        return EventStream(
            [str(self.bin_dir / "ctr"), "--address", self.address], self.env,
            lambda ns: self.ctr("namespaces", "create", ns, timeout=10),
            lambda ns: self.ctr("namespaces", "rm", ns, check=False, timeout=10),
        )

    def new_id(self, prefix: str = "c") -> str:
        return ids.container_id(prefix)

    def runtime_flags(self, runtime: str = RUNC_V2) -> list[str]:
        """ctr run/create flags that keep a container's state inside this instance's temp dir."""
        flags = ["--runtime", runtime, "--fifo-dir", str(self.fifo_dir)]
        if runtime == RUNC_V2:
            # The Go shim's runc state goes to <runc-root>/<namespace> instead of /run/containerd/runc/<namespace>.
            flags += ["--runc-root", str(self.runc_root)]
        elif runtime == PYSHIM:
            # ctr sends other runtimes no runc options, only a config file path (runtimeoptions.v1.Options).
            flags += ["--runtime-config-path", str(self.pyshim_config())]
        return flags

    def pyshim_config(self, binary: str = "runc") -> Path:
        """A pyshim runtime options file keeping the OCI runtime's state under this instance's runc root."""
        path = self.tmp / f"pyshim-{binary}.toml"
        if not path.exists():
            path.write_text(f'BinaryName = "{binary}"\nRoot = "{self.runc_root}"\n')
        return path

    def run(self, container_id: str, image: TestImage | str, *command: str, runtime: str = RUNC_V2,
            detach: bool = True, extra: Sequence[str] = (), check: bool = True,
            timeout: float = commands.DEFAULT_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`ctr run` the image as container_id (detached by default)."""
        ref = image.ref if isinstance(image, TestImage) else image
        args = ["run", *(["-d"] if detach else []), *self.runtime_flags(runtime), *extra, ref, container_id, *command]
        return self.ctr(*args, check=check, timeout=timeout)

    def bundle(self, container_id: str, namespace: str | None = None) -> Path:
        """The task's bundle dir (config.json, rootfs/ mounted by the shim, ...)."""
        return self.state / "io.containerd.runtime.v2.task" / (namespace or self.namespace) / container_id

    def runc_state_root(self, namespace: str | None = None) -> Path:
        """What to pass to `runc --root` for the Go shim's containers in a namespace: <runc_root>/<namespace>."""
        return self.runc_root / (namespace or self.namespace)

    def runc(self, namespace: str | None = None) -> Runc:
        """Plain runc on the state root the Go shim uses for a namespace's containers (in the containerd's cgroup
        view)."""
        return self._runc_on(self.runc_state_root(namespace))

    def _runc_on(self, state_root: Path) -> Runc:
        # In the cgroup v2 view, runc must see the cgroups as the containers' runc saw them.
        return Runc(state_root, self.env, wrap=cgroup2_view.wrap if self.cgroup2 else list)

    def adopted(self) -> list[int]:
        """Processes the subreapers of this instance adopted (shims, detached containers), past restarts included."""
        return [pid for supervised in [*self._retired, *([self._process] if self._process else [])]
                for pid in supervised.orphans()]

    def shim_socket(self, container_id: str, namespace: str | None = None) -> Path | None:
        """The shim's socket path as the bundle records it: `address` (1.6/1.7, pyshim) or `bootstrap.json` (2.x)."""
        bundle = self.bundle(container_id, namespace)
        try:
            address = json.loads((bundle / "bootstrap.json").read_text())["address"]
        except (OSError, ValueError, KeyError):
            try:
                address = (bundle / "address").read_text().strip()
            except OSError:
                return None
        # unix://<path> is a filesystem socket; anything else would be an abstract one, which has no file.
        return Path(address.removeprefix("unix://")) if address.startswith("unix:///") else None

    def shim_pid(self, container_id: str, namespace: str | None = None) -> int | None:
        """The running shim server that serves container_id, found by pid through /proc, or None.

        It is a process one of our subreapers adopted (shims daemonise), whose command line names this containerd's
        address, the namespace and the id (pyshim's server is a fork of `start`, so it keeps that argv; the Go
        shim re-executes itself without the action), and which holds the listening socket the bundle names
        (shim_socket()) when it names one.
        """
        namespace = namespace or self.namespace
        socket_path = self.shim_socket(container_id, namespace)
        listeners = set(processes.unix_socket_listeners(socket_path)) if socket_path else None
        found = []
        for pid in self.adopted():
            argv = processes.cmdline(pid)
            flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-")}
            if (flags.get("-address") == self.address and flags.get("-namespace") == namespace
                    and flags.get("-id") == container_id and argv[-1] != "delete" and processes.is_running(pid)
                    and (listeners is None or pid in listeners)):
                found.append(pid)
        if len(found) > 1:
            raise RuntimeError(f"several shims for {namespace}/{container_id}: {found}")
        return found[0] if found else None

    def kill_adopted(self, pid: int, signum: int = signal.SIGKILL) -> None:
        """Signal a process one of our subreapers adopted (a shim), by pid, only while it is still theirs."""
        for supervised in [*self._retired, *([self._process] if self._process else [])]:
            if supervised.subreaper.poll() is None and processes.parent_pid(pid) == supervised.subreaper.pid:
                processes.kill_child_of(supervised.subreaper.pid, pid, signum)
                return
        raise ProcessLookupError(f"{pid} is not a process this containerd instance started")

    def go_shim_sockets(self, pid: int) -> list[Path]:
        """The socket paths a Go shim of ours (by pid) serves or served (to remove after killing it)."""
        return self._go_shim_sockets(pid)

    def log_tail(self, lines: int = 60) -> str:
        return logs.tail(self.log_path, lines)


def remove_go_shim_socket_dir() -> None:
    """rmdir the Go shim's socket dir and /run/containerd if empty (for a session that found neither there)."""
    for directory in (GO_SHIM_SOCKET_DIR, GO_SHIM_SOCKET_DIR.parent):
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # not empty: something else uses it


def stop_all() -> list[str]:
    """Stop every Containerd still running in this process (the safety net for interrupted sessions)."""
    notes = []
    for instance in list(_live):
        notes += [f"containerd {instance.version}: {note}" for note in instance.stop()]
    return notes


# Safety net for an interrupted run: whatever is still running when the interpreter exits is stopped.
atexit.register(stop_all)

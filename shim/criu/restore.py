"""Restoring a container from a checkpoint through the OCI runtime's `restore`, honouring the
options the checkpoint was taken with (recorded beside its images) — which the Go shim
leaves for users to repeat in /etc/criu/runc.conf.

A lazy restore (lazy-pages asked for by the restoring container's annotations or the host
file) runs a lazy-pages daemon beside `runc restore --lazy-pages`: it serves the restored processes'
page faults through userfaultfd, from the images (`criu lazy-pages`) or, with page-server, from a page
server elsewhere (ADDRESS:PORT, or unix:PATH: pyshim's page server of a post-copy migration, connected to
here) through pyshim's own daemon (shim.criu.lazy_daemon: CRIU's can wedge a process for good when it unmaps
memory whose pages are on their way; reading local images it has no such window). The container runs
while its memory still comes; if the daemon fails or has not finished within the options' timeout, the
container is killed (the shim holds the userfaultfds meanwhile, so no process
reads a zero page where its memory should be: shim.criu.userfaultfd)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable

from shim.background import BackgroundTasks
from shim.bundle.config import CRIU_CONFIG_ANNOTATION, Bundle
from shim.cgroups import made as made_cgroups
from shim.children.proctree import children_of, cmdline, parent_of
from shim.children.reaper import Reaper
from shim.children.spawn import python_argv, spawn
from shim.criu import image_check, images, loopback, mount_yard, netlock, unfinished
from shim.criu.lazy_images import RECORD_KEY as POST_COPY
from shim.criu.lazy_images import lazy_pages_left
from shim.criu.log import keep, quote
from shim.criu.options import (
    CheckpointOptions,
    OptionError,
    check_restore_paths,
    from_annotations,
    from_host_config,
    from_record,
    resolve,
)
from shim.criu.plan import DEFAULT_RUNC_CRIU_CONFIG, restore_config, runtime_restore_args
from shim.criu.tcp import refuse_lost_connections
from shim.criu.userfaultfd import UserfaultfdHold
from shim.errors import InvalidArgument, ShimError, Unavailable
from shim.fdwait import readable
from shim.oci.runner import RuntimeFailed
from shim.oci.runtime import OciRuntime, is_gone
from shim.rootfs import unmount

log = logging.getLogger(__name__)
LAZY_PAGES_LOG = "lazy-pages.log"  # in the bundle (either daemon's): it outlives the restore's work dir
KEPT_LOG_BYTES = 16 << 20  # of a failed restore's log kept in the bundle
LAZY_PAGES_READY = 10.0  # seconds for the lazy-pages daemon to listen before the restore gives up
HOLD_SCAN = 0.1  # seconds between looks for the daemon's new userfaultfds (a restored process forked)
PS_SOCKET_FD = 4  # the page server's connection, handed to the daemon (--ps-socket)
EndContainer = Callable[[str], Awaitable[None]]


class RestoreFailed(ShimError):
    pass


def restore_options(bundle: Bundle, image_path: str) -> CheckpointOptions:
    """The options a restore honours: the host's, then the checkpoint's own, then the new
    container's annotations (a restore-time choice such as tcp-close wins)."""
    record = images.read_record(image_path) or {}
    # How long CRIU may take is this host's say (or the restoring container's), not what the checkpoint was given.
    taken_with = {name: value for name, value in (record.get("options") or {}).items() if name != "timeout"}
    try:
        options = resolve(from_host_config(), from_record(taken_with), from_annotations(bundle.annotations))
    except OptionError as exc:
        raise InvalidArgument(f"restore from {image_path}: {exc}") from None
    return options


def creates_network_namespace(bundle: Bundle) -> bool:
    """Whether the restore makes the container a new network namespace (one without a path), whose `lo` nobody
    else raises. A namespace given by path (CNI, a pod) keeps its own `lo`; the host's is the host's: then CRIU is
    given no action script, and runs no process at each of its seven restore stages."""
    return bundle.has_own_namespace("network")


async def restore(reaper: Reaper, background: BackgroundTasks, *, container_id: str, bundle: Bundle, image_path: str,
                  work_path: str, runtime: OciRuntime, stdio: tuple[int | None, int | None, int | None],
                  pid_file: str, console_socket: str = "", no_pivot: bool = False,
                  end_container: EndContainer | None = None) -> Bundle:
    """Restore the container; the bundle as it now is (its config.json names the CRIU configuration used).
    end_container(reason) is called when a lazy restore's memory stops coming after the restore returned (its
    daemon failed, or did not finish in time): it must kill the container's processes."""
    try:
        check_restore_paths(image_path, work_path)
    except OptionError as exc:
        raise InvalidArgument(f"restore of {container_id}: {exc}") from None
    if not os.path.isdir(image_path):
        raise InvalidArgument(f"checkpoint {image_path} does not exist")
    try:
        await asyncio.to_thread(image_check.check, image_path)
    except image_check.ImageDamaged as exc:
        raise InvalidArgument(f"restore of {container_id}: checkpoint {image_path} is damaged: {exc}. Nothing was "
                              "restored; restore from an intact copy or checkpoint again") from None
    except Unavailable as exc:  # no pycriu here: runc's restore does not need it
        log.warning("restore of %s: the images in %s were not checked before the restore: %s", container_id,
                    image_path, exc)
    options = restore_options(bundle, image_path)
    config = bundle.config
    record = images.read_record(image_path)
    lazy = lazy_request(bundle.annotations) or post_copy_request(record)
    _refuse_partial_images(container_id, image_path, record, lazy)
    if options.manage_cgroups_mode in ("full", "strict"):
        from shim.criu.checkpoint import forget_frozen_freezer

        # pyshim's own images keep no freezer state; runc's and the Go shim's record FROZEN
        # (containerd pauses before checkpointing), and such a restore would never end.
        if forget_frozen_freezer(image_path):
            log.info("restore of %s: dropped the FROZEN freezer state recorded in %s", container_id, image_path)
    await refuse_lost_connections(container_id=container_id, image_path=image_path, config=config, options=options)
    own_work = not work_path
    work = work_path or tempfile.mkdtemp(prefix="criu-restore-", dir=bundle.path)
    images.private_dir(work)
    annotations = bundle.annotations
    user_config = read_user_criu_config(annotations.get(CRIU_CONFIG_ANNOTATION, DEFAULT_RUNC_CRIU_CONFIG))
    criu_config = os.path.join(work, "pyshim-criu.conf")
    raises_loopback = creates_network_namespace(bundle)
    images.write_private(criu_config, restore_config(
        options, user_config=user_config,
        action_script=os.path.join(work, loopback.SCRIPT) if raises_loopback else "",
        cgroup_root=_v2_cgroup_root(container_id, bundle)).encode())
    restored = bundle.with_criu_config(criu_config)  # runc hands org.criu.config to CRIU as its config file
    flags = runtime_restore_args(options)
    firewall = netlock.NamespaceFirewall(reaper)
    watched_lock = await netlock.before_restore(firewall, image_path, config)
    cgroups_path = bundle.cgroups_path
    cgroups_before = {path for path in made_cgroups.directories(cgroups_path) if path.is_dir()}
    # What `delete` needs to end and undo this restore should the server die before it is over (shim.criu.unfinished).
    marker = {"id": container_id, "state_dir": runtime.state_dir(container_id), "work": work, "own_work": own_work,
              "cgroups_path": cgroups_path, "cgroups_before": sorted(map(str, cgroups_before)), "processes": [],
              "network_lock": {"lock": watched_lock[0].as_record(), "held": watched_lock[1].as_record()}
              if watched_lock else None}
    _record(unfinished.record, bundle.path, marker)
    daemon = hook = None
    try:
        if raises_loopback:
            hook = loopback.LoopbackHook(work)  # writes the script named in the configuration
        if lazy is not None:
            daemon = await LazyPages.start(reaper, image_path=image_path, work=work,
                                           log_file=bundle.file(LAZY_PAGES_LOG),
                                           page_server=lazy.page_server_address,
                                           page_server_unix=lazy.page_server_unix)
            _record(unfinished.add_process, bundle.path, marker, daemon.pid)
            flags.append("--lazy-pages")
        restoring = runtime.restore(container_id, bundle=bundle.path, pid_file=pid_file, image_path=image_path,
                                    work_path=work, stdio=stdio, console_socket=console_socket, no_pivot=no_pivot,
                                    flags=flags, timeout=options.timeout,
                                    started=lambda pid: _record(unfinished.add_process, bundle.path, marker, pid))
        await (restoring if daemon is None else daemon.guard(restoring, container_id))
    except (RuntimeFailed, asyncio.CancelledError) as exc:
        # Cancelled: the task was killed mid-restore, or containerd's connection closed; runc and CRIU were killed
        # with the call (shim.children.spawn.wait_or_kill), and what they left goes as after a failure.
        if daemon is not None:
            await daemon.stop()
        kept = keep(os.path.join(work, "restore.log"), bundle.file("criu-restore.log"), max_bytes=KEPT_LOG_BYTES)
        await _clean_failed_restore(runtime, container_id, cgroups_path, cgroups_before)
        mount_yard.remove_left_behind(os.path.join(work, "restore.log"))  # a killed CRIU's, in the host's /tmp
        await netlock.after_failed_restore(firewall, watched_lock)  # CRIU locked and did not unlock
        if isinstance(exc, asyncio.CancelledError):
            log.warning("restore of %s from %s stopped before it ended; runc and CRIU were killed and what they "
                        "left removed%s", container_id, image_path, quote(kept))
            raise
        message = f"restore of {container_id} from {image_path} failed: {exc}"
        if daemon is not None and daemon.failed:
            message += f". {daemon.failed}"
        raise RestoreFailed(message + quote(kept)) from exc
    except BaseException:
        if daemon is not None:
            await daemon.stop()
        raise
    finally:
        if hook is not None:
            hook.close()
        # A CRIU killed mid-restore leaves its cgroup yard (every hierarchy's root) mounted in the
        # work dir: removing the dir through it would rmdir every empty cgroup on the host.
        unmount.unmount_all(work)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        unfinished.forget(bundle.path)
    if daemon is not None:
        background.spawn(daemon.serve_for(options.timeout, container_id, end_container),
                         f"{daemon.name} (pid {daemon.pid}) for {container_id}")
    await netlock.after_restore(firewall, images.read_record(image_path), config)
    return restored


def _record(write, *args) -> None:
    """Write the restore's marker for `delete`; a failure to is logged, never the restore's end."""
    try:
        write(*args)
    except OSError as exc:
        log.warning("the restore's marker for `delete` (%s) could not be written: %s; a shim killed mid-restore "
                    "would leave runc and CRIU running", unfinished.MARKER, exc)


def read_user_criu_config(path: str) -> str:
    """The text of the CRIU configuration file the container names (org.criu.config; "" for none) or runc's
    default one; "" when it does not exist, which CRIU ignores too."""
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _v2_cgroup_root(container_id: str, bundle: Bundle) -> str:
    """On cgroup v2, the new container's cgroup for CRIU's cgroup-root (runc says it to CRIU on v1 only, and the
    restored processes would go back to the checkpointed container's cgroup, out of reach of a kill --all); else
    "" (and when it cannot be told, with a warning: the restore goes on as runc alone would do it)."""
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ""
    from shim.cgroups.runc_path import container_cgroup_v2

    try:
        with open("/proc/self/cgroup") as f:
            own = next((line.rstrip("\n").split(":", 2)[2] for line in f if line.startswith("0::")), "/")
        return container_cgroup_v2(bundle.cgroups_path, own)
    except (OSError, ValueError) as exc:
        log.warning("restore of %s: its cgroup v2 path is unknown (%s); CRIU puts the processes back into the "
                    "cgroup they were checkpointed in", container_id, exc)
        return ""


def post_copy_request(record: dict | None) -> CheckpointOptions | None:
    """The lazy restore images split for post-copy ask for: `pyshim migrate --post-copy` names its page server in
    their record (post_copy.page_server), so the restored container's own annotations stay as they were."""
    server = ((record or {}).get(POST_COPY) or {}).get("page_server") if isinstance(record, dict) else None
    if not server:
        return None
    try:
        return resolve(from_host_config(), {"lazy_pages": True, "page_server": str(server)})
    except OptionError as exc:
        raise InvalidArgument(f"post-copy restore: the checkpoint's page server: {exc}") from None


def _refuse_partial_images(container_id: str, image_path: str, record: dict | None,
                           lazy: CheckpointOptions | None) -> None:
    """Images split for post-copy lack the pages their page server keeps: restored without it, the processes would
    find zeros there (CRIU maps a lazy page nobody serves to a zero page)."""
    left = lazy_pages_left(record)
    if left and (lazy is None or not lazy.page_server):
        raise InvalidArgument(f"restore of {container_id}: checkpoint {image_path} leaves {left} pages on the "
                              "page server of a post-copy migration; restore it with lazy-pages and page-server "
                              "naming that server (annotations io.pyshim.checkpoint.lazy-pages=true, "
                              "io.pyshim.checkpoint.page-server=ADDRESS:PORT or unix:PATH)")


def lazy_request(annotations: dict[str, str]) -> CheckpointOptions | None:
    """The options of a lazy restore when the restoring container asks for one (lazy-pages, and
    page-server for pages served from elsewhere than the images), else None. Only the host file
    and the new container's annotations count: a checkpoint's record says how it was taken, not
    where its pages can be found now."""
    try:
        asked = resolve(from_host_config(), from_annotations(annotations))
    except OptionError as exc:
        raise InvalidArgument(f"lazy restore: {exc}") from None
    return asked if asked.lazy_pages else None


LAZY_DAEMON = "pyshim's lazy-pages daemon"


def lazy_daemon_command() -> list[str]:
    return python_argv("from shim.criu.lazy_daemon import main; sys.exit(main(sys.argv[2:]))")


def daemon_argv(*, image_path: str, work: str, log_file: str, page_server: tuple[str, int] | None,
                page_server_unix: str) -> tuple[str, list[str]]:
    """(its name, its command line): CRIU's daemon for the images here, pyshim's for a page server."""
    common = ["--images-dir", image_path, "--work-dir", work, "--log-file", log_file]
    if page_server_unix:
        return LAZY_DAEMON, [*lazy_daemon_command(), *common, "--status-fd", "3", "--ps-socket", str(PS_SOCKET_FD)]
    if page_server:
        return LAZY_DAEMON, [*lazy_daemon_command(), *common, "--status-fd", "3", "--address", page_server[0],
                             "--port", str(page_server[1])]
    return "criu lazy-pages", ["criu", "lazy-pages", *common, "-v4", "--status-fd", "3"]


def _log_name(daemon: str) -> str:
    return "lazy-pages daemon's log" if daemon == LAZY_DAEMON else f"{daemon} log"


class LazyPages:
    """One lazy-pages daemon, started and waited for through the reaper."""

    def __init__(self, pid: int, pidfd: int, exits, log_file: str, name: str = "criu lazy-pages") -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.exits = exits
        self.log_file = log_file
        self.name = name
        self.log_name = _log_name(name)
        self.exited = asyncio.ensure_future(exits.wait(pid))
        self.failed = ""  # why the restore failed because of the daemon, if it did

    @classmethod
    async def start(cls, reaper: Reaper, *, image_path: str, work: str, log_file: str,
                    page_server: tuple[str, int] | None = None, page_server_unix: str = "") -> LazyPages:
        """Start the daemon and return once it listens on work/lazy-pages.socket, where the
        restore's CRIU (same work dir) connects. A page server on a unix socket is connected to here and
        handed to the daemon (--ps-socket)."""
        name, argv = daemon_argv(image_path=image_path, work=work, log_file=log_file, page_server=page_server,
                                 page_server_unix=page_server_unix)
        fds = {}
        connected = None
        if page_server_unix:
            connected = await _connect_unix(page_server_unix)
            fds[PS_SOCKET_FD] = connected.fileno()
        ready, status = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        exits = reaper.subscribe()
        try:
            try:
                pid = spawn(argv, pass_fds={3: status, **fds})
            finally:
                os.close(status)
                if connected is not None:
                    connected.close()
            daemon = cls(pid, os.pidfd_open(pid), exits, log_file, name)
        except OSError as exc:
            exits.close()
            os.close(ready)
            raise RestoreFailed(f"cannot start {name}: {exc}") from None
        try:
            said = await asyncio.wait_for(_read_once(ready), LAZY_PAGES_READY)
        except TimeoutError:
            said = None
        finally:
            os.close(ready)
        if said != b"\0":
            await daemon.stop()
            why = "exited" if said == b"" else f"was not ready within {LAZY_PAGES_READY:g}s"
            raise RestoreFailed(f"{name} {why}" + quote(log_file, source=daemon.log_name))
        source = (f" from the page server unix:{page_server_unix}" if page_server_unix else
                  f" from the page server {page_server[0]}:{page_server[1]}" if page_server else "")
        log.info("%s (pid %d) serves %s%s", name, pid, image_path, source)
        return daemon

    async def guard(self, restoring, container_id: str,
                    stop_restore: Callable[[str], object] | None = None) -> None:
        """Await the restore; if the daemon fails first, nobody will serve the page faults the
        restored processes are already blocked in, and CRIU would wait for them until the
        restore's timeout: stop the restore now (stop_restore(container_id); by default
        kill_restoring_criu, so that runc fails)."""
        restore = asyncio.ensure_future(restoring)
        try:
            done, _ = await asyncio.wait({restore, self.exited}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            restore.cancel()
            raise
        if restore not in done and self.exited.result().status != 0:
            self.failed = (f"{self.name} exited with {self.exited.result().status} during the restore"
                           + quote(self.log_file, source=self.log_name))
            log.warning("%s: %s; killing the restore's CRIU", container_id, self.failed)
            (stop_restore or kill_restoring_criu)(container_id)
        await restore

    async def serve_for(self, timeout: float, container_id: str = "",
                        end_container: EndContainer | None = None) -> None:
        """Let the daemon serve the restored container (the caller runs this in the background), holding its
        userfaultfds (shim.criu.userfaultfd). If it fails, or has not moved every page within timeout (then it is
        killed), the container is ended through end_container: memory that can no longer come must not be read
        as zeros."""
        hold = UserfaultfdHold(self.pid, self.pidfd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not self.exited.done() and (remaining := deadline - loop.time()) > 0:
                hold.take()
                await asyncio.wait({self.exited}, timeout=min(HOLD_SCAN, remaining))
            if self.exited.done() and self.exited.result().status == 0:
                log.info("%s (pid %d) moved every page of %s and exited (log %s)", self.name, self.pid,
                         container_id, self.log_file)
                return
            if self.exited.done():
                why = f"{self.name} exited with {self.exited.result().status}"
            else:
                why = f"{self.name} had not moved every page after {timeout:g}s (killed)"
                await self.stop()
            reason = (f"post-copy of {container_id} failed: {why}; the container was killed, since the memory "
                      "not moved yet can no longer come and must not be read as zeros"
                      + quote(self.log_file, source=self.log_name))
            log.error("%s", reason)
            if end_container is not None:
                try:
                    await end_container(reason)
                except Exception:  # noqa: BLE001 - logged: the userfaultfds are let go below all the same
                    log.exception("ending %s after its lost memory", container_id)
        finally:
            hold.release()  # after the kill: a process waiting in a fault is woken by it, not fed a zero page
            self._close()

    async def stop(self) -> None:
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        await asyncio.shield(self.exited)
        self._close()

    def _close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.exits.close()


def kill_restoring_criu(container_id: str) -> None:
    """SIGKILL the CRIU of our `runc restore ... <container_id>` (runc then fails and says so)."""
    for runc in children_of(os.getpid()):
        argv = cmdline(runc)
        if "restore" not in argv or not argv or argv[-1] != container_id:
            continue
        for criu in children_of(runc):
            try:
                pidfd = os.pidfd_open(criu)
            except OSError:
                continue
            try:
                if parent_of(criu) == runc:  # still runc's child: the pidfd is CRIU's, not a reused pid's
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)


async def _connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), LAZY_PAGES_READY)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise RestoreFailed(f"cannot reach the page server at unix:{path}: {exc or 'timed out'}") from None
    sock.setblocking(True)  # CRIU reads it blocking
    return sock


async def _read_once(fd: int) -> bytes:
    """One read of a non-blocking pipe, waiting until it is readable (b"" at EOF)."""
    await readable(fd)
    return os.read(fd, 1)


async def _clean_failed_restore(runtime: OciRuntime, container_id: str, cgroups_path: str,
                                cgroups_before: set) -> None:
    """Undo what a failed or killed `runc restore` left (its processes were killed with it): runc's private bind
    of the rootfs, unmounted before runc removes its state (removing a still-mounted criu-root deletes the
    container's files through it), runc's state, and the cgroups it made, which runc killed before writing its
    state does not know."""
    unmount.unmount_all(os.path.join(runtime.state_dir(container_id), "criu-root"))
    try:
        await runtime.delete(container_id, force=True)
    except RuntimeFailed as exc:
        if not is_gone(exc):
            log.warning("cleaning up the failed restore of %s: %s", container_id, exc)
    for problem in unfinished.remove_unfinished_state(runtime.state_dir(container_id)):
        log.warning("cleaning up the failed restore of %s: %s", container_id, problem)
    left = made_cgroups.remove_made(cgroups_path, cgroups_before)
    if left:
        log.warning("the failed restore of %s left cgroups still in use: %s", container_id,
                    ", ".join(map(str, left)))



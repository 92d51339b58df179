"""Checkpointing a container: preflight, a private image written aside, the dump — through
CRIU's RPC (the default engine) or through the OCI runtime's own `checkpoint` — and a task
that is still running, and says why, whenever anything fails."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from shim.background import BackgroundTasks
from shim.bundle.config import Bundle
from shim.children.reaper import Reaper
from shim.criu import bindings, external_unix, images, netlock
from shim.criu.errors import CriuError, CriuFailed, CriuMissing, CriuTimeout
from shim.criu.log import keep, quote
from shim.criu.options import CheckpointOptions, as_record
from shim.criu.plan import ContainerFacts, dump_request, facts_from_bundle, runtime_checkpoint_args
from shim.criu.rpc import CriuRpc, CriuVersion
from shim.criu.stats import read_stats, summary, within
from shim.criu.tcp import network_record
from shim.errors import FailedPrecondition, Interrupted, InvalidArgument, ShimError, Unavailable
from shim.oci.runner import RuntimeFailed
from shim.oci.runtime import OciRuntime

log = logging.getLogger(__name__)
FORMAT = 1
MIN_CRIU = (3, 15)  # status-ready notifications, external pid namespaces


@dataclass(frozen=True)
class CheckpointResult:
    image_path: str
    engine: str
    stats: dict[str, int]
    stopped: bool  # the dump ended the container, as asked
    # CRIU's network lock the dump left in a namespace that outlives the task, for Delete to remove
    # (None: none left, or the container keeps it for a restore there: keep-network-lock).
    network_lock: netlock.Lock | None = None
    # A lazy dump returns once its page server is ready (what runc's --status-fd tells); this
    # completes with the final CheckpointResult when the pages have been served.
    completion: asyncio.Future | None = None


class CheckpointFailed(ShimError):
    """A dump that did not happen, CRIU having undone what it did to the task. Quotes CRIU's log. What became of
    the task is said by its owner (shim.process.init), who sees its exit."""


class DumpInterrupted(CheckpointFailed, Interrupted):
    """A dump whose CRIU died (killed, timed out) before it finished: it did not undo what it was doing to the task.
    A process CRIU was stepping through its injected code at that instant cannot go on (only CRIU held its
    registers): it dies when it next runs."""


@dataclass(frozen=True)
class DumpJob:
    """One checkpoint between its preflight and its committed image: the container, what was asked, and where the
    dump writes (the image, aside until it is whole, and CRIU's work directory)."""

    container_id: str
    bundle: Bundle
    pid: int
    options: CheckpointOptions
    runtime: OciRuntime
    paused: bool | Callable[[], bool]  # whether containerd has the task paused; asked when a dump fails
    facts: ContainerFacts
    partial: images.PartialImage
    work: str
    own_work: bool  # the work directory is ours (no work-path was asked): removed at the end
    started: float = field(default_factory=time.monotonic)

    @property
    def dump_log(self) -> str:
        return os.path.join(self.work, "dump.log")

    def is_paused(self) -> bool:
        return self.paused() if callable(self.paused) else self.paused


class Dumper(Protocol):
    """What a checkpoint reads of the container and asks of CRIU: CriuDumper, or a fake in unit tests. The
    Checkpointer does the rest (the image aside and its commit, the logs kept, the freezer and the network lock
    after a failure, the runc engine)."""

    async def preflight(self, options: CheckpointOptions) -> None:
        """Refuse, before touching the task, what this CRIU or kernel cannot do."""
        ...

    async def facts(self, container_id: str, bundle: Bundle, pid: int, options: CheckpointOptions) -> ContainerFacts:
        """What the dump is told about the container."""
        ...

    async def dump(self, job: DumpJob, ready: asyncio.Event) -> None:
        """The dump into job.partial through CRIU; ready is set once a lazy dump's page server listens. Raises
        CriuError when CRIU did not dump."""
        ...


class CriuDumper:
    """The Dumper that runs CRIU (`criu swrk`) and reads the container from its bundle and /proc."""

    def __init__(self, rpc: CriuRpc, *, version: CriuVersion | None = None) -> None:
        self.rpc = rpc
        self.version = version  # asked of CRIU at the first preflight unless known (a worker is told it)

    async def preflight(self, options: CheckpointOptions) -> None:
        try:
            if self.version is None:
                self.version = await self.rpc.version()
        except CriuMissing as exc:
            raise Unavailable(f"checkpoint needs CRIU >= 4.2, and it cannot be run: {exc}") from None
        if tuple(self.version[:2]) < MIN_CRIU:
            raise Unavailable(f"CRIU {'.'.join(map(str, self.version[:3]))} is too old: pyshim needs >= "
                              f"{'.'.join(map(str, MIN_CRIU))} (4.2 or newer on recent kernels)")
        if options.page_server_unix:
            raise InvalidArgument(f"page-server {options.page_server}: a dump sends its pages to, or serves them "
                                  "at, ADDRESS:PORT; unix:PATH names a page server a lazy restore reads from")
        wanted = {"mem_track": options.pre_dump or bool(options.parent_path), "lazy_pages": options.lazy_pages}
        if not any(wanted.values()):
            return
        features = await self.rpc.feature_check(**{name: True for name, on in wanted.items() if on},
                                                pidfd_store=False, **{n: False for n, on in wanted.items() if not on})
        if wanted["mem_track"] and not features.get("mem_track"):
            what = "pre-dump" if options.pre_dump else "parent-path (an incremental checkpoint)"
            raise FailedPrecondition(f"{what} needs kernel soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY), "
                                     "which this kernel lacks: take a full checkpoint instead")
        if wanted["lazy_pages"] and not features.get("lazy_pages"):
            raise FailedPrecondition("lazy-pages needs userfaultfd (CONFIG_USERFAULTFD), which this kernel or "
                                     "CRIU lacks: checkpoint without lazy-pages")

    async def facts(self, container_id: str, bundle: Bundle, pid: int, options: CheckpointOptions) -> ContainerFacts:
        facts = facts_from_bundle(bundle, pid)
        if options.pre_dump:  # a pre-dump takes memory only, never sockets
            return facts
        return replace(facts, external_unix_sockets=await _external_unix_sockets(container_id, pid, options))

    async def dump(self, job: DumpJob, ready: asyncio.Event) -> None:
        rpc = bindings.rpc_messages()
        descriptors = external_descriptors(job.runtime.state_dir(job.container_id), job.facts.pid)
        images.write_private(os.path.join(job.partial.path, "descriptors.json"), json.dumps(descriptors).encode())
        work_fd = os.open(job.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            request = dump_request(rpc, job.options, job.facts, images_dir_fd=job.partial.fd, work_dir_fd=work_fd)

            async def notified(script: str, pid: int, fds: list[int]) -> None:
                log.debug("criu dump of %s: %s", job.container_id, script)
                if script == "status-ready":  # a lazy dump's page server is listening
                    ready.set()

            await self.rpc.call(request, notify=notified, timeout=job.options.timeout)
        finally:
            os.close(work_fd)


class Checkpointer:
    def __init__(self, reaper: Reaper, background: BackgroundTasks, *, criu: str = "criu", dumper: Dumper | None = None,
                 firewall: netlock.Firewall | None = None) -> None:
        self.dumper = dumper or CriuDumper(CriuRpc(reaper, criu=criu))
        self.firewall = firewall or netlock.NamespaceFirewall(reaper)
        self.background = background

    async def checkpoint(self, *, container_id: str, bundle: Bundle, pid: int, options: CheckpointOptions,
                         runtime: OciRuntime, paused: bool | Callable[[], bool],
                         token: str | None = None) -> CheckpointResult:
        """token names the dump's own work directory and its partial image (images.own_work_dir / partial_path),
        so that the server that sent a worker this job finds what the worker left if it dies (its CRIU's log,
        hence the network lock it took); without one they get random names."""
        await self.dumper.preflight(options)
        facts = await self.dumper.facts(container_id, bundle, pid, options)
        own_work = not options.work_path
        work = options.work_path or (images.own_work_dir(bundle.path, token) if token
                                     else tempfile.mkdtemp(prefix="criu-work-", dir=bundle.path))
        try:
            _usable(images.private_dir, work, "work path")
            partial = _usable(lambda path: images.prepare(path, token), options.image_path, "image path")
        except BaseException:
            if own_work:
                shutil.rmtree(work, ignore_errors=True)
            raise
        job = DumpJob(container_id, bundle, pid, options, runtime, paused, facts, partial, work, own_work)
        ready = asyncio.Event()
        finishing = asyncio.ensure_future(self._complete(job, ready))
        lazy = options.lazy_pages and options.engine != "runc"
        return await until_ready(finishing, ready if lazy else None, image_path=options.image_path)

    async def _complete(self, job: DumpJob, ready: asyncio.Event) -> CheckpointResult:
        options, partial = job.options, job.partial
        try:
            if options.engine == "runc":
                flags = runtime_checkpoint_args(options, image_path=partial.path, work_path=job.work)
                await job.runtime.checkpoint(job.container_id, flags, timeout=options.timeout)
            else:
                await self.dumper.dump(job, ready)
            # With a work directory CRIU writes its log and statistics there: keep both with the image.
            for name in ("dump.log", "stats-dump"):
                keep(os.path.join(job.work, name), os.path.join(partial.path, name))
            forget_frozen_freezer(partial.path)
            stats = within(read_stats(partial.path), int((time.monotonic() - job.started) * 1e6))
            network = network_record(partial.path, external_netns=job.facts.external_namespaces.get("network"),
                                     options=options)
            lock = _lock_kept(options, job.bundle, job.pid, partial.path)
            network["lock"] = lock.as_record() if lock else None
            partial.commit({
                "format": FORMAT, "engine": options.engine, "container_id": job.container_id, "pid": job.pid,
                "created": time.time(), "runtime": job.runtime.binary, "options": as_record(options), "stats": stats,
                "network": network,
            })
        except BaseException as exc:
            partial.discard()
            kept = keep(job.dump_log, job.bundle.file("criu-dump.log"))
            # A dead CRIU leaves the cgroup thawed whatever it found: a paused task (containerd
            # pauses every task it checkpoints) must stay paused for the Resume that follows.
            # Asked now, not at the start: a lazy dump fails after containerd's Resume.
            (freeze if job.is_paused() else thaw)(job.facts.freezer_cgroup)
            await self._release_failed_lock(job)
            if isinstance(exc, RuntimeFailed):
                raise CheckpointFailed(f"{exc}{quote(kept)}") from exc
            if isinstance(exc, CriuError):
                if kept:  # the work dir and its log are about to go: the error names the copy
                    exc.log_moved(job.dump_log, kept)
                if cut_short(exc):
                    raise DumpInterrupted(f"CRIU was killed before it finished: {exc}") from exc
                raise CheckpointFailed(str(exc)) from exc
            raise
        finally:
            if job.own_work:
                shutil.rmtree(job.work, ignore_errors=True)
        stopped = not options.leave_running and not options.pre_dump
        if stopped and options.engine != "runc":
            # What `runc checkpoint` does after a dump that stops the task; the caller need not wait
            # for it (Delete's `runc delete` would do it too).
            self.background.spawn(_destroy(job.runtime, job.container_id),
                                  f"runtime state of checkpointed {job.container_id}")
        log.info("checkpointed %s into %s (%s engine): %s", job.container_id, options.image_path, options.engine,
                 summary(stats) or "no statistics")
        return CheckpointResult(options.image_path, options.engine, stats, stopped,
                                network_lock=None if options.keep_network_lock else lock)

    async def _release_failed_lock(self, job: DumpJob) -> None:
        """A CRIU killed (or dead) mid-dump leaves its network lock, and the task running behind it cut off:
        remove it. A CRIU that failed on its own has unlocked already (its log says so)."""
        try:
            lock = netlock.after_dump(job.options, config=job.bundle.config, pid=job.pid,
                                      log_text=netlock.read_text(job.dump_log))
        except Exception as exc:  # noqa: BLE001 - the dump's own error is what the caller must see
            log.warning("could not tell whether the failed dump left CRIU's network lock: %s", exc)
            return
        if lock is not None:
            await netlock.release_logged(self.firewall, lock, "the dump failed")


async def until_ready(finishing: asyncio.Future, ready: asyncio.Event | None, *, image_path: str) -> CheckpointResult:
    """The dump's result; for a lazy dump (ready given), as soon as CRIU says its page server is
    ready: the result then says so and carries the dump's completion."""
    if ready is None:
        return await finishing
    waiting = asyncio.ensure_future(ready.wait())
    try:
        await asyncio.wait({finishing, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if finishing.done():
        return finishing.result()
    return CheckpointResult(image_path, "criu", {}, stopped=False, completion=finishing)


def _lock_kept(options: CheckpointOptions, bundle: Bundle, pid: int, image_dir: str) -> netlock.Lock | None:
    """The network lock a dump that ended the task leaves for its restore, in a namespace that outlives the task
    (given by path): a private namespace goes with the task, and a dump that leaves it running unlocks."""
    config = bundle.config
    if options.leave_running or options.pre_dump or not netlock.is_external(config):
        return None
    try:
        return netlock.after_dump(options, config=config, pid=pid, image_dir=image_dir,
                                  log_text=netlock.read_text(os.path.join(image_dir, "dump.log")))
    except Exception as exc:  # noqa: BLE001 - the dump is done: never lose it over its lock
        log.warning("could not tell which network lock the dump left: %s", exc)
        return None


async def _external_unix_sockets(container_id: str, pid: int, options: CheckpointOptions) -> tuple[int, ...]:
    """Unix sockets with peers outside the container: refused without ext-unix-sk, and with it
    refused when CRIU could not take them, before the task is touched; otherwise the inodes
    CRIU must be told are external."""
    held = external_unix.socket_holders(pid)  # inline: a container without sockets needs no thread hand-over
    found = await asyncio.to_thread(external_unix.find, pid, held) if held[0] else []
    return external_unix.check(found, container_id=container_id, init_pid=pid, ext_unix_sk=options.ext_unix_sk,
                              engine=options.engine)


def external_descriptors(state_dir: str, pid: int) -> list[str]:
    """What the init's stdio (fds 0-2) pointed at when it started — runc records it in its
    state — or, for a runtime that does not (crun), what they point at now."""
    try:
        with open(os.path.join(state_dir, "state.json"), "rb") as f:
            recorded = json.load(f).get("external_descriptors")
        if isinstance(recorded, list) and len(recorded) == 3:
            return [str(d) for d in recorded]
    except (OSError, ValueError):
        pass
    descriptors = []
    for fd in range(3):
        try:
            descriptors.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            descriptors.append("/dev/null")
    return descriptors


def _usable(prepare, path: str, what: str):
    """prepare(path), its failures said as the request's fault: the path as given, and why."""
    try:
        return prepare(path)
    except images.ImageError as exc:
        raise InvalidArgument(f"checkpoint {what}: {exc}") from None
    except OSError as exc:
        raise FailedPrecondition(f"checkpoint {what} {path} cannot be written: {exc.strerror or exc}; "
                                 "nothing was checkpointed, the task was left as it was") from None


def thaw(freezer_cgroup: str) -> None:
    """Thaw a cgroup a dead or failed CRIU left frozen (the task was running before)."""
    _set_freezer(freezer_cgroup, frozen=False)


def freeze(freezer_cgroup: str) -> None:
    """Freeze again a cgroup a dead or failed CRIU left thawed (the task was paused before)."""
    _set_freezer(freezer_cgroup, frozen=True)


def _set_freezer(freezer_cgroup: str, *, frozen: bool) -> None:
    if not freezer_cgroup:
        return
    for name, value in (("freezer.state", "FROZEN" if frozen else "THAWED"), ("cgroup.freeze", str(int(frozen)))):
        path = os.path.join(freezer_cgroup, name)
        if os.path.exists(path):
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as exc:
                log.warning("could not %s %s: %s", "freeze" if frozen else "thaw", freezer_cgroup, exc)


def forget_frozen_freezer(image_dir: str) -> bool:
    """Drop a FROZEN freezer.state from the image's cgroup.img; True if there was one.

    CRIU records the freezer state it found (containerd pauses every task before Checkpoint, so
    FROZEN) and a restore in full or strict cgroup mode writes it back. Under runc that restore
    never ends: CRIU's cgroupd helper runs in the container's cgroup, is frozen with it, and
    CRIU waits for it forever. A restored task is meant to run (soft mode never restores the
    state either), so the image keeps no freezer state to restore.

    Read with the protobuf message itself rather than pycriu's dict conversion (2 to 5 ms of pure
    Python on a checkpoint's path): the file is its two magics, then each cgroup_entry after its
    32-bit little-endian size."""
    path = os.path.join(image_dir, "cgroup.img")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    if b"FROZEN" not in data:
        return False  # nothing to drop: a running task's image, decided without parsing
    message = bindings.image_messages().cgroup_entry
    out, offset, dropped = [data[:8]], 8, False
    while offset < len(data):
        size = int.from_bytes(data[offset:offset + 4], "little", signed=True)
        entry = message.FromString(data[offset + 4:offset + 4 + size])
        offset += 4 + size
        for controller in entry.controllers:
            dropped |= _drop_frozen(controller.dirs)
        payload = entry.SerializeToString()
        out += [len(payload).to_bytes(4, "little", signed=True), payload]
    if dropped:
        with open(path, "wb") as f:
            f.write(b"".join(out))
    return dropped


def _drop_frozen(dirs) -> bool:
    """Remove freezer.state properties other than THAWED from cgroup dir entries and their children."""
    dropped = False
    for directory in dirs:
        for n in reversed(range(len(directory.properties))):
            prop = directory.properties[n]
            if prop.name == "freezer.state" and prop.value != "THAWED":
                del directory.properties[n]
                dropped = True
        dropped |= _drop_frozen(directory.children)
    return dropped


async def _destroy(runtime: OciRuntime, container_id: str) -> None:
    """The runtime's state of a container whose checkpoint stopped it, removed."""
    try:
        await runtime.delete(container_id, force=True)
    except RuntimeFailed as exc:
        log.warning("removing %s's runtime state after the checkpoint that stopped it: %s", container_id, exc)


def cut_short(error: CriuError) -> bool:
    """Whether CRIU was killed (by a signal, or by us at its deadline) before its final answer, rather than failing
    and undoing its work on the task itself (a CRIU that gives up exits with a status of its own)."""
    if isinstance(error, CriuTimeout):
        return True
    return (isinstance(error, CriuFailed) and not isinstance(error, CriuMissing) and error.response is None
            and error.notification is None and error.exit_status is not None and error.exit_status > 128)

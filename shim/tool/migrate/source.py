"""`pyshim migrate CONTAINER DEST`: the source's side, from the checks to the report.

    preflight   the container runs here under pyshim on an overlay snapshot; ssh reaches the destination's
                receiver, which checks its containerd can take the container (and its network identity)
    pre-copy    (--pre-copy N) N pre-dumps while the task runs, each sent to the destination as it is made
                (shim/tool/migrate/precopy.py); the preflight first refuses when CRIU here cannot track dirty memory
    dump        the shim checkpoints the task with exit (CRIU kills it with its TCP sockets in repair mode, so no
                FIN or RST leaves), established connections kept, the network lock kept past Delete; --stream sends
                the pages to the destination's page server during the dump
    transfer    the rest of the images, the spec and the rootfs changes as one tar stream
    restore     the destination restores the same container (id, spec, labels, runtime options, rootfs changes)
    commit      the destination runs: the source's task, lock and container go

Until the destination answers `running` and takes the commit, the way back is one: Migration.roll_back() tells the
destination to undo, and restores the container here from its own images (the recorded page stream replayed first
for --stream), in its network namespace whose lock the restore lifts. A failure before the dump stops nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc

from shim.api.containerd.types import task_pb2
from shim.criu import features, lazy_images
from shim.tool import archive, checkpoint, options, rootfs
from shim.tool.containerd_api import ContainerdClient
from shim.tool.errors import ToolError, from_os, from_rpc
from shim.tool.migrate import frames, lock, network, postcopy, precopy, tarstream, transport
from shim.tool.migrate.channel import ChannelClosed
from shim.tool.migrate.dest import Destination, parse
from shim.tool.migrate.pagestream import SourceRelay, replay
from shim.tool.store import Store

RECORDING = "pages.stream"  # beside checkpoint/ in the staging directory, never sent


class UsageRefusal(ToolError):
    """A usage error the parser cannot see (an option of another mode): exit status 2."""


def progress(text: str) -> None:
    print(f"pyshim migrate: {text}", file=sys.stderr, flush=True)


def check_mode(args) -> None:
    """Options that belong to another mode are refused, not ignored."""
    rounds = getattr(args, "pre_copy", None)
    if rounds is not None:
        args.mode = "pre-copy"
        problem = precopy.check_rounds(rounds)
        if problem:
            raise UsageRefusal(problem)
    bandwidth = getattr(args, "bandwidth", 0.0) or 0.0
    if bandwidth and args.mode != "post-copy":
        raise UsageRefusal("--bandwidth limits the pages --post-copy sends after the container runs on the "
                           f"destination; with --{args.mode} it would limit nothing. Nothing was done")
    if not bandwidth >= 0:
        raise UsageRefusal(f"--bandwidth {bandwidth:g}: give MiB per second, above 0. Nothing was done")


def migrate(args, client: ContainerdClient) -> int:
    check_mode(args)
    dest = parse(args.dest, default_namespace=client.namespace)
    for option in args.ssh_option:
        transport.check_ssh_option(option)
    report = Migration(args, client, dest).run()
    text = json.dumps(report, indent=2)
    if args.report_json:
        try:
            with open(args.report_json, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            raise from_os(exc, f"writing the report {args.report_json} (the migration itself succeeded)") from None
    print(text)
    return 0


class Migration:
    def __init__(self, args, client: ContainerdClient, dest: Destination) -> None:
        self.args = args
        self.client = client
        self.dest = dest
        self.id = args.container
        self.mode = args.mode
        self.migration = os.urandom(8).hex()
        self.started = time.monotonic()
        self.phases: dict[str, float] = {}
        self.session: transport.Session | None = None
        self.staging: str | None = None
        self.relay: SourceRelay | None = None
        self.pyshim_record: dict = {}
        self.dumped = False
        self.memory: str | None = None  # --post-copy: the tmpfs directory the dump goes to, kept until pages moved
        self.pages: postcopy.SourcePages | None = None
        self._shown = 0.0

    def _phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.phases[name] = round((now - since) * 1000, 1)
        return now

    def _deadline_left(self) -> float:
        left = self.args.timeout - (time.monotonic() - self.started)
        if left <= 0:
            raise ToolError(f"the migration took longer than --timeout {self.args.timeout:g} s")
        return left

    # --- the way forward -----------------------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            if self.relay is not None:
                self.relay.close()
            if self.pages is not None:
                self.pages.close()
            if self.session is not None:
                self.session.close()

    def _run(self) -> dict:
        t = self.started
        progress(f"checking {self.id} here and {self.dest.display()}")
        record, task, spec = self._check_source()
        rounds = self._check_dirty_tracking()
        netns = network.namespace_path(spec)
        prepare = self._prepare_message(record, spec, netns)
        self.session = transport.Session(self.dest, self.args.ssh_option).open(min(60.0, self._deadline_left()))
        if rounds and (refused := precopy.destination_refusal(self.id, self.session.hello)):
            raise UsageRefusal(refused)
        try:
            prepared = self.session.request("prepare", expect="prepared", timeout=self._deadline_left(), **prepare)
        except (ChannelClosed, TimeoutError, frames.ProtocolError) as exc:
            raise ToolError(self.session.failure("preparing the destination", exc)) from None
        except transport.RemoteRefusal as exc:
            raise ToolError(f"the destination refused {self.id}: {exc}; nothing was stopped, {self.id} runs on here"
                            ) from None
        progress(f"the destination (containerd {prepared.get('containerd')}) can take {self.id}")
        t = self._phase("preflight", t)
        store = Store.default(self.args.store)
        try:
            store.ensure()
            self.staging = tempfile.mkdtemp(prefix=f".migrate-{self.id}-", dir=store.root)
        except OSError as exc:
            self._abort()
            raise from_os(exc, f"making a staging directory in {store.root}") from None
        if self.mode == "stream":
            self._start_page_stream()
        if self.mode == "post-copy":
            try:
                self.memory = postcopy.memory_directory(self.id)
            except OSError as exc:
                self._abort()
                raise from_os(exc, f"making a directory for the dump in {postcopy.MEMORY_DIR}") from None
        if rounds:
            self._pre_copy(rounds)
            t = self._phase("pre-copy", t)
        chosen = self._dump_options(spec, netns)
        if rounds:
            chosen["parent-path"] = precopy.final_parent(rounds)
        progress(f"checkpointing {self.id} ({self.mode}{': pages streamed to the destination' if self.relay else ''})")
        try:
            with self.client.lease(), _interrupt_deferred() as interrupted:
                self.client.checkpoint(self.id, options.request_options(chosen, self._dumped_images()),
                                       timeout=self._deadline_left())
        except grpc.RpcError as exc:
            why = self._page_server_fate()
            self._abort()
            raise ToolError(f"{from_rpc(exc, f'the checkpoint of {self.id}')}{why}; {self._fate_here()}, nothing "
                            "was left on the destination") from None
        except BaseException:
            self._abort()
            raise
        self.dumped = True
        t_dumped = t = self._phase("dump", t)
        try:
            if interrupted:
                raise KeyboardInterrupt  # after the dump: the way back restores the container here
            if self.memory is not None:
                split = lazy_images.split(self._dumped_images(), self._images())
                progress(f"post-copy: {archive.human_size(split.lazy_pages * lazy_images.PAGE_SIZE)} of memory stay "
                         f"here until the destination asks for them; "
                         f"{archive.human_size(split.eager_pages * lazy_images.PAGE_SIZE)} go with the images")
            self.pyshim_record = checkpoint._complete(self.staging, self.client, record, task, chosen,
                                                      ignore_rootfs=False)
            if self.relay is not None:
                relayed = self.relay.finish(self._deadline_left())
                answer = self._ask("pages-end", expect="pages-done", timeout=self._deadline_left())
                progress(f"page stream: {archive.human_size(relayed)} sent, {archive.human_size(answer['received'])} "
                         "taken by the destination's page server")
            self._send_archive()
            t = self._phase("transfer", t)
            progress(f"restoring {self.id} on the destination")
            left = self._deadline_left()
            if self.memory is not None:
                self._start_page_server()
            self._ask("restore", expect="running", timeout=left, restore_timeout=left,
                      post_copy=self.memory is not None)
            t_running = time.monotonic()
            t = self._phase("restore", t)
        except BaseException as exc:
            self.roll_back(exc)
            if isinstance(exc, (ChannelClosed, TimeoutError, frames.ProtocolError)):
                exc = ToolError(self.session.failure(f"moving {self.id}", exc))
            if isinstance(exc, ToolError):
                raise ToolError(f"{exc}; {self.id} was restored here from its checkpoint and runs on, nothing was "
                                "left on the destination") from None
            raise
        self._commit()
        progress(f"{self.id} runs on {self.dest.host}; removing it here")
        self._remove_source()
        t = self._phase("commit", t)
        moved = self._wait_pages() if self.pages is not None else None
        if moved is not None:
            t = self._phase("pages", t)
        stats = self.pyshim_record.get("stats") or {}
        frozen_ms = round(float(stats.get("frozen_time", 0)) / 1000, 1)
        assert self.session is not None and self.session.channel is not None
        report = {
            "mode": self.mode,
            "container": self.id,
            "frozen_ms": frozen_ms,
            "blackout_ms": round(frozen_ms + (t_running - t_dumped) * 1000, 1),
            "bytes_moved": self.session.channel.sent + self.session.channel.received,
            "total_ms": round((time.monotonic() - self.started) * 1000, 1),
            "phases": self.phases,
        }
        if moved is not None:
            report["post_copy"] = moved
        return report

    # --- pre-copy ----------------------------------------------------------------------------------------------

    def _check_dirty_tracking(self) -> list[precopy.Round]:
        """--pre-copy's rounds, once CRIU here has said it can track dirty memory: refused before anything else."""
        if self.mode != "pre-copy":
            return []
        problem = features.missing(features.DIRTY_TRACKING)
        if problem:
            raise UsageRefusal(precopy.refusal(self.id, problem))
        return precopy.plan(self.args.pre_copy)

    def _pre_copy(self, rounds: list[precopy.Round]) -> None:
        """Each round pre-dumped (the task runs on) and sent as it is made. A failure here stopped nothing: the
        destination undoes, the staging directory goes."""
        assert self.staging is not None
        for one in rounds:
            progress(f"pre-copy round {one.number} of {len(rounds)}: dumping {self.id}'s memory while it runs")
            try:
                with self.client.lease():
                    self.client.checkpoint(self.id, options.request_options(
                        one.options(max(30, int(self._deadline_left()))), os.path.join(self.staging, one.directory)),
                        timeout=self._deadline_left())
                sent = self._send_tar("round", [one.directory], expect="round-received", round=one.directory)
            except grpc.RpcError as exc:
                self._abort()
                raise ToolError(f"{from_rpc(exc, f'pre-copy round {one.number} of {self.id}')}; "
                                f"{self._fate_here()}, nothing was left on the destination") from None
            except (ChannelClosed, TimeoutError, frames.ProtocolError) as exc:
                assert self.session is not None
                failure = self.session.failure(f"sending pre-copy round {one.number}", exc)
                self._abort()
                raise ToolError(f"{failure}; {self.id} runs on here, nothing was left on the destination") from None
            except BaseException:
                self._abort()
                raise
            progress(f"pre-copy round {one.number}: sent {archive.human_size(sent)}")

    # --- post-copy ---------------------------------------------------------------------------------------------

    def _dumped_images(self) -> str:
        """Where the dump writes: the staging directory's images, or for --post-copy the tmpfs."""
        return os.path.join(self.memory, "images") if self.memory is not None else self._images()

    def _start_page_server(self) -> None:
        assert self.session is not None and self.session.channel is not None
        self.pages = postcopy.SourcePages(self.session.channel, self._dumped_images(), report=self._page_progress,
                                          rate=(getattr(self.args, "bandwidth", 0.0) or 0.0) * (1 << 20))

    def _page_progress(self, event: dict) -> None:
        now = time.monotonic()
        if now - self._shown >= 1.0 or event.get("served") == event.get("total"):
            self._shown = now
            page = lazy_images.PAGE_SIZE
            progress(f"post-copy: {archive.human_size(int(event['served']) * page)} of "
                     f"{archive.human_size(int(event['total']) * page)} moved")

    def _wait_pages(self) -> dict:
        """After the commit: the container runs there; its memory is still moving. Until the last page the images
        stay here; a failure now ends the container there (its shim kills it rather than let it read zeros)."""
        assert self.pages is not None and self.session is not None
        try:
            moved = self.pages.wait(max(60.0, self.args.timeout - (time.monotonic() - self.started)))
            if moved["served"] < moved["pages"]:
                # Not every page was asked for: processes that exited or unmapped memory, or a daemon that gave
                # up (whose shim then kills the container). The destination says which.
                try:
                    state = self.session.answer(expect="post-copy-done", timeout=60)["state"]
                except (ChannelClosed, TimeoutError, frames.ProtocolError, transport.RemoteRefusal) as exc:
                    state = f"unknown ({exc})"
                if state != "running":
                    raise ToolError(f"the destination's lazy-pages daemon ended after {moved['served']} of "
                                    f"{moved['pages']} pages and the container is {state} there")
                progress(f"post-copy: {moved['pages'] - moved['served']} pages were never asked for (their "
                         "processes exited or unmapped them); the container runs on there")
        except ToolError as exc:
            kept = self._keep_whole_checkpoint()
            raise ToolError(f"post-copy of {self.id} failed after it started on {self.dest.host}: {exc}. The "
                            "destination's shim ends the container there (its memory can no longer all come, and "
                            f"it is never left running on zeros). Its checkpoint is kept here, whole: {kept}") from None
        self.pages.remove_images()
        self.memory = None
        if self.staging:
            archive.remove_tree(self.staging)
            self.staging = None
        progress(f"post-copy: every page of {self.id} moved ({archive.human_size(moved['page_bytes'])})")
        return moved

    def _keep_whole_checkpoint(self) -> str:
        """The checkpoint as `pyshim restore` takes it: the full images from memory in place of the split ones."""
        assert self.memory is not None and self.staging is not None
        images, memory, staging = self._images(), self.memory, self.staging
        self.memory = self.staging = None  # kept, whatever happens below
        try:
            archive.remove_tree(images)
            shutil.move(os.path.join(memory, "images"), images)
            archive.remove_tree(memory)
        except OSError as exc:
            return (f"the images in {os.path.join(memory, 'images')}, the rest in {staging} (moving them together "
                    f"failed: {exc})")
        return f"`pyshim restore {staging} --name {self.id}` brings the container back here"

    def _check_source(self):
        record, task = checkpoint.running_task(self.client, self.id)
        spec = json.loads(record.spec.value) if record.spec.value else {}
        if (spec.get("process") or {}).get("terminal"):
            raise ToolError(f"{self.id} runs with a terminal, which a migration cannot take along; nothing was done")
        if self.args.dest_netns and not network.namespace_path(spec):
            raise ToolError(f"--dest-netns: {self.id} has no network namespace given by path (it has one of its own, "
                            "which CRIU brings back as a new one on the destination, or the host's); migrate it "
                            "without --dest-netns")
        try:
            rootfs.writable_layer(self.client.mounts(record.snapshotter, record.snapshot_key))
        except grpc.RpcError as exc:
            raise from_rpc(exc, f"reading the snapshot of {self.id}") from None
        return record, task, spec

    def _prepare_message(self, record, spec: dict, netns: str | None) -> dict:
        message: dict = {
            "container": self.id, "migration": self.migration, "mode": self.mode, "image": record.image,
            "snapshotter": record.snapshotter, "labels": dict(record.labels), "tcp_close": self.args.tcp_close,
            "runtime_options": ({"type_url": record.runtime.options.type_url,
                                 "value": record.runtime.options.value.hex()}
                                if record.runtime.options.type_url else None),
        }
        if netns:
            try:
                addresses = network.addresses_of(netns)
            except Exception as exc:  # noqa: BLE001 - pyroute2's errors
                raise ToolError(f"reading the addresses of {self.id}'s network namespace {netns}: {exc}") from None
            message["netns"] = {"source": netns, "destination": self.args.dest_netns or netns,
                                "addresses": addresses}
        return message

    def _dump_options(self, spec: dict, netns: str | None) -> dict[str, str]:
        chosen = {"leave-running": "false", "timeout": str(max(30, int(self._deadline_left())))}
        if network.has_network_namespace(spec):
            chosen["tcp-established"] = "true"  # connections move (or, with --tcp-close, close on the destination)
        if netns:
            chosen["keep-network-lock"] = "true"  # lifted by the restore here (rollback) or by us (commit)
        if self.relay is not None:
            chosen["page-server"] = self.relay.address
        return chosen

    def _page_server_fate(self) -> str:
        """After a failed --stream dump: what the destination's page server says (often the real cause)."""
        if self.relay is None or self.session is None:
            return ""
        try:
            self.session.request("pages-end", expect="pages-done", timeout=30, wait=20)
        except transport.RemoteRefusal as exc:
            return f" (on the destination: {exc})"
        except (ToolError, ChannelClosed, TimeoutError, frames.ProtocolError):
            pass
        return ""

    def _images(self) -> str:
        assert self.staging is not None
        return os.path.join(self.staging, archive.CHECKPOINT_DIR)

    def _start_page_stream(self) -> None:
        assert self.staging is not None and self.session is not None and self.session.channel is not None
        self._ask("pages", expect="pages-ready", timeout=self._deadline_left())
        self.relay = SourceRelay(self.session.channel, os.path.join(self.staging, RECORDING))

    def _ask(self, message_type: str, *, expect: str, timeout: float, **fields) -> dict:
        assert self.session is not None
        try:
            return self.session.request(message_type, expect=expect, timeout=timeout, **fields)
        except (ChannelClosed, TimeoutError, frames.ProtocolError) as exc:
            raise ToolError(self.session.failure(f"'{message_type}' on the destination", exc)) from None

    def _send_archive(self) -> None:
        assert self.staging is not None
        # --pre-copy's rounds went as they were made; checkpoint/parent links to the last of them
        names = [name for name in archive._entries(self.staging) if name != RECORDING and not precopy.is_round(name)]
        sent = self._send_tar("archive", names, expect="archive-received")
        progress(f"sent the checkpoint: {archive.human_size(sent)}")

    def _send_tar(self, message_type: str, names: list[str], *, expect: str, **fields) -> int:
        """Entries of the staging directory as one tar stream after a message; the bytes the destination took."""
        assert self.session is not None and self.session.channel is not None and self.staging is not None
        channel = self.session.channel
        channel.send_message(message_type, **fields)
        try:
            tarstream.send_tree(channel, self.staging, names, filter=archive._owned_by_root)
        except OSError as exc:
            raise from_os(exc, f"reading the checkpoint in {self.staging} to send it") from None
        return int(self.session.answer(expect=expect, timeout=self._deadline_left())["bytes"])

    def _commit(self) -> None:
        """The point of no return: the destination runs; once it has taken the commit it keeps the container."""
        assert self.session is not None
        try:
            self.session.request("commit", expect="committed", timeout=60)
            return
        except (ChannelClosed, TimeoutError, frames.ProtocolError, ToolError) as exc:
            lost = exc
        # The commit may or may not have arrived: ask the destination afresh what became of the container.
        progress(f"the connection was lost around the commit ({lost}); asking the destination what it has")
        state = self._ask_state()
        if state == "running":
            return
        if state == "absent":
            self.roll_back(lost)
            raise ToolError(f"the destination lost the migration before it was committed ({lost}); {self.id} was "
                            "restored here and runs on")
        raise ToolError(f"the connection to {self.dest.host} was lost while committing ({lost}) and the destination "
                        f"could not be asked ({state}): {self.id} may run there; it is stopped here, its images kept "
                        f"in {self.staging} (`pyshim restore {self.staging} --name {self.id}` after removing the "
                        "stopped container, if it does not run there)")

    def _ask_state(self) -> str:
        session = transport.Session(self.dest, self.args.ssh_option)
        try:
            session.open(30)
            return str(session.request("status", expect="status", timeout=30, container=self.id,
                                       migration=self.migration)["state"])
        except (ToolError, ChannelClosed, TimeoutError, frames.ProtocolError) as exc:
            return f"unknown: {exc}"
        finally:
            session.close()

    def _remove_source(self) -> None:
        """The destination runs: the source's stopped task, its network lock, the container and its snapshot. A
        task that cannot be deleted fails the command (the source's task must be gone); the rest is warned about."""
        task_problem = ""
        try:
            self._wait_stopped()
            self.client.delete_task(self.id)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                task_problem = f"deleting its stopped task failed: {exc.details()}"
        try:
            removed = lock.release((self.pyshim_record.get("network") or {}).get("lock"))
            if removed:
                progress(f"released CRIU's network lock: {'; '.join(removed)}")
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            progress(f"warning: CRIU's network lock on {self.id}'s namespace could not be released: {exc}")
        if not task_problem:
            try:
                record = self.client.container(self.id)
                self.client.delete_container(self.id)
                self.client.remove_snapshot(record.snapshotter, record.snapshot_key)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    progress(f"warning: removing the container {self.id} here failed: {exc.details()}")
        if self.staging and self.pages is None:  # --post-copy keeps its checkpoint until the last page moved
            archive.remove_tree(self.staging)
            self.staging = None
        if task_problem:
            raise ToolError(f"{self.id} runs on the destination, but here {task_problem}; remove it with `ctr -n "
                            f"{self.client.namespace} tasks delete {self.id}`")

    def _wait_stopped(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.client.task(self.id).status != task_pb2.STOPPED and time.monotonic() < deadline:
            time.sleep(0.02)

    # --- the way back ------------------------------------------------------------------------------------------

    def _fate_here(self) -> str:
        """After a dump that failed: the source's task as containerd has it. A dump whose CRIU died mid-way (or a
        task killed meanwhile) can end the task: then the container is not said to run on."""
        try:
            task = self.client.task(self.id)
        except grpc.RpcError as exc:
            return f"what became of {self.id}'s task here is unknown ({from_rpc(exc, 'looking it up')})"
        if task.status in (task_pb2.RUNNING, task_pb2.PAUSED):
            return f"{self.id} runs on here"
        return (f"{self.id}'s task here did not survive the failed dump (exit status {task.exit_status}): the task "
                f"and the container are kept, stopped, for you to look at and remove (`ctr -n {self.client.namespace} "
                f"task rm {self.id}`)")

    def _abort(self) -> None:
        """Before the dump: tell the destination to undo; nothing here was stopped."""
        if self.session is not None and self.session.channel is not None:
            try:
                self.session.request("abort", expect="aborted", timeout=30)
            except (ToolError, ChannelClosed, TimeoutError, frames.ProtocolError):
                pass  # a receiver that cannot answer undoes on its own when the connection ends
        if self.staging:
            archive.remove_tree(self.staging)
            self.staging = None
        self._remove_memory()

    def _remove_memory(self) -> None:
        if self.memory is not None:
            archive.remove_tree(self.memory)
            self.memory = None

    def roll_back(self, why: BaseException) -> None:
        """After the dump, before the commit: the destination undoes, the container is restored here."""
        progress(f"failed after the dump ({why}); restoring {self.id} here")
        self._abort_remote_only()
        try:
            self._restore_here()
        except BaseException as exc:
            released = ""
            try:
                lock.release((self.pyshim_record.get("network") or {}).get("lock"))
            except (OSError, ValueError, subprocess.SubprocessError) as lock_exc:
                released = f"; its network lock could not be lifted either ({lock_exc})"
            kept = self.staging
            self.staging = None  # the images stay: they are all that is left of the container's state
            raise ToolError(f"the migration of {self.id} failed ({why}), and restoring it here from its images "
                            f"failed too ({exc}){released}; the images are kept in {kept}: remove the stopped task "
                            f"and restore them (`pyshim restore {kept} --name NEW`)") from None
        if self.staging:
            archive.remove_tree(self.staging)
            self.staging = None
        self._remove_memory()
        progress(f"{self.id} runs on here again")

    def _abort_remote_only(self) -> None:
        if self.session is not None and self.session.channel is not None and self.session.channel.closed is None:
            try:
                self.session.request("abort", expect="aborted", timeout=60)
            except (ToolError, ChannelClosed, TimeoutError, frames.ProtocolError):
                pass
        if self.relay is not None:
            self.relay.close()

    def _restore_here(self) -> None:
        from shim.tool.restore import _task_options

        assert self.staging is not None
        images = self._dumped_images()  # --post-copy: the full images in memory, not the split ones sent
        if self.pages is not None:
            self.pages.close()
            self.pages = None
        if self.relay is not None:
            replay(os.path.join(self.staging, RECORDING), images, os.path.join(self.staging, "replay.log"))
        record = self.client.container(self.id)
        self._wait_stopped()
        try:
            self.client.delete_task(self.id)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        work = tempfile.mkdtemp(prefix=f"pyshim-migrate-back-{self.id}-")
        try:
            task_options = _task_options(_config_path_of(record), images, work)
            _merge_runc_options(task_options, record)
            self.client.create_task(self.id, options=task_options, timeout=self._time_for_rollback())
            self.client.start_task(self.id, timeout=self._time_for_rollback())
        except BaseException:
            try:
                self.client.delete_task(self.id)
            except grpc.RpcError:
                pass
            raise
        finally:
            archive.remove_tree(work)

    def _time_for_rollback(self) -> float:
        return max(60.0, self.args.timeout - (time.monotonic() - self.started))


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[list[int]]:
    """Ctrl-C while the shim dumps would cancel the call, not CRIU, which still ends the task: the interrupt is
    noted (in the list yielded) and acted on once the dump has answered, by the way back."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    noted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _config_path_of(record) -> str | None:
    """The pyshim runtime options file a container was created with (ctr --runtime-config-path), if any."""
    if record.runtime.options.type_url == "runtimeoptions.v1.Options":
        from shim.api.containerd.runtimeoptions.v1 import api_pb2

        return api_pb2.Options.FromString(record.runtime.options.value).config_path or None
    return None


def _merge_runc_options(task_options, record) -> None:
    """A container created with runc's own Options (not a file) keeps them for the restore here."""
    if record.runtime.options.type_url.endswith("containerd.runc.v1.Options"):
        from shim.api.containerd.runc.options import oci_pb2

        given = oci_pb2.Options.FromString(record.runtime.options.value)
        images, work = task_options.criu_image_path, task_options.criu_work_path
        task_options.CopyFrom(given)
        task_options.criu_image_path, task_options.criu_work_path = images, work

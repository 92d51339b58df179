"""`pyshim migrate-receive` (hidden): the destination's side of a migration, run by ssh on the destination host.

It speaks the framed protocol on its stdin and stdout (everything else it or its children print goes to stderr,
which ssh carries back as progress) and answers the source's requests one by one:

    prepare      can this containerd take the container? (socket, id free, image unpacked, runtime options, network
                 namespace and addresses); a private work directory for the images
    round        (--pre-copy) one round's pre-dump images (D frames) unpacked into round-N/ of the work directory,
                 beside checkpoint/, so that each images directory's `parent` link holds here as it did there
    pages        (--stream) a `criu page-server` fed with the P frames, until the source says the dump ended
    archive      the checkpoint archive (D frames) unpacked into the work directory as it arrives
    restore      the container restored from it under the same id; answers `running` with the pid (--post-copy: the
                 shim's lazy restore reads the pages through a unix socket here, relayed to the source)
    commit       the source has let go: the migration is done, the images go (--post-copy: once every page is in)
    abort        undo everything

Whatever happens before `commit` (an error, the source's abort, the connection lost, even after `running`) undoes
everything this side made: the task (killed), the container, its snapshot, the stand-ins, the work directory, the
page server. One place does that: Receiver.undo().
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tarfile
import tempfile
import time
import types
import uuid

import grpc
from google.protobuf.any_pb2 import Any

from shim.api.containerd.types import task_pb2
from shim.tool import archive, restore, tarsafe
from shim.tool.containerd_api import ContainerdClient
from shim.tool.errors import ToolError, from_os, from_rpc
from shim.tool.migrate import frames, network, postcopy, precopy, tarstream
from shim.tool.migrate.channel import Channel, ChannelClosed
from shim.tool.migrate.pagestream import PageServer
from shim.tool.store import Store

# How long the receiver waits for the source's next word. Between `pages` and `archive` the source dumps the whole
# container, between `running` and `commit` it removes its own task: generous, but bounded.
IDLE_TIMEOUT = 3600.0
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"
POST_COPY_SETTLE = 3.0  # seconds a post-copy container must still run after its daemon ended to count as running


def say(text: str) -> None:
    """A progress line, through ssh's stderr to the source; lost quietly when the connection is gone."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


class Receiver:
    def __init__(self, args, channel: Channel, *, refusal: str | None = None) -> None:
        self.args = args
        self.channel = channel
        self.refusal = refusal  # why every request is refused (a restricted key's forced command said no)
        self.client: ContainerdClient | None = None
        self.work: str | None = None  # the private directory: checkpoint/ (the images) and the archive's files
        self.page_server: PageServer | None = None
        self.lazy_pages: postcopy.DestinationPages | None = None  # --post-copy's relay for the shim's daemon
        self.container_id = ""
        self.prepared: dict = {}
        self.restored = False  # a container (and maybe a task) of ours exists
        self.committed = False

    # --- the conversation ----------------------------------------------------------------------------------------

    def serve(self) -> int:
        # requests: what this receiver serves, so that a source can refuse a mode an older receiver lacks up front
        self.channel.send_message("hello", protocol_name=frames.HELLO, protocol=frames.PROTOCOL_VERSION,
                                  host=os.uname().nodename, requests=REQUESTS)
        try:
            if self.refusal:
                self.channel.next_message(IDLE_TIMEOUT, waiting_for="request")
                self.channel.send_message("error", message=self.refusal)
                say(f"pyshim migrate-receive: refused: {self.refusal}")
                return 1
            while not self.committed:
                message = self.channel.next_message(IDLE_TIMEOUT, waiting_for="request")
                kind = message["type"]
                handler = getattr(self, "on_" + kind.replace("-", "_"), None)
                if handler is None:
                    raise frames.ProtocolError(f"unknown request {kind!r}")
                try:
                    handler(message)
                except ToolError as exc:
                    self.undo()
                    self.channel.send_message("error", message=str(exc))
                    if kind == "abort":
                        return 1
        except (ChannelClosed, TimeoutError, frames.ProtocolError) as exc:
            self.undo()  # first: with the connection gone, even stderr may be
            say(f"pyshim migrate-receive: {exc}; undid what this side made")
            return 1
        except BaseException:
            self.undo()
            raise
        self._finish_post_copy()
        return 0

    def _finish_post_copy(self) -> None:
        """After the commit of a post-copy migration: relay pages until the shim's daemon has every one (or has
        failed, and its shim has ended the container); then the work directory goes."""
        if self.lazy_pages is None:
            return
        if not self.lazy_pages.wait(IDLE_TIMEOUT):
            say("pyshim migrate-receive: the page transfer did not end in time; its relay is closed")
        self.lazy_pages.close()
        self.lazy_pages = None
        if self.work:
            archive.remove_tree(self.work)
            self.work = None
        try:
            self.channel.send_message("post-copy-done", state=self._state_after_pages())
        except ChannelClosed:
            pass  # the source is gone (it had every page served, or it keeps its checkpoint)

    def _state_after_pages(self) -> str:
        """The container's state once the shim's daemon has ended: "stopped" when its shim killed it (the daemon
        failed: shim.criu.restore), "running" when it still runs POST_COPY_SETTLE seconds later (the shim kills
        within a fraction of that when the daemon fails)."""
        assert self.client is not None
        deadline = time.monotonic() + POST_COPY_SETTLE
        while True:
            try:
                running = self.client.task(self.container_id).status == 2  # RUNNING
            except grpc.RpcError:
                running = False
            if not running:
                return "stopped"
            if time.monotonic() >= deadline:
                return "running"
            time.sleep(0.05)

    def on_prepare(self, message: dict) -> None:
        self.container_id = str(message["container"])
        self.client = _client(self.args)
        client = self.client
        try:
            version, _ = client.version()
        except grpc.RpcError as exc:
            raise from_rpc(exc, f"reaching containerd at {self.args.address} on the destination") from None
        try:
            client.container(self.container_id)
            raise ToolError(f"a container {self.container_id!r} already exists in namespace {client.namespace} of "
                            f"the destination's containerd: remove it there first (`ctr -n {client.namespace} "
                            f"containers rm {self.container_id}`)")
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise from_rpc(exc, f"looking up container {self.container_id} on the destination") from None
        _image_unpacked(client, str(message["image"]), str(message.get("snapshotter") or "overlayfs"))
        self._runtime_config_usable(message)
        netns = message.get("netns")
        if netns:
            problem = network.destination_problem(netns["destination"], list(netns.get("addresses") or []),
                                                  tcp_close=bool(message.get("tcp_close")))
            if problem:
                raise ToolError(problem)
        store = Store.default(self.args.store)
        try:
            store.ensure()
            self.work = tempfile.mkdtemp(prefix=f".migrate-{self.container_id}-", dir=store.root)
            os.mkdir(os.path.join(self.work, archive.CHECKPOINT_DIR), 0o700)
        except OSError as exc:
            raise from_os(exc, f"making the destination's work directory in {store.root}") from None
        self.prepared = message
        say(f"containerd {version} at {self.args.address} can take {self.container_id}; work directory {self.work}")
        self.channel.send_message("prepared", work=self.work, containerd=version)

    def _runtime_config_usable(self, message: dict) -> None:
        if self.args.runtime_config:
            if not os.path.isfile(self.args.runtime_config):
                raise ToolError(f"the runtime options file {self.args.runtime_config} (runtime-config in DEST) does "
                                "not exist on the destination")
            return
        options = message.get("runtime_options")
        if options and options.get("type_url") == RUNTIME_OPTIONS_TYPE:
            path = _config_path(options)
            if path and not os.path.isfile(path):
                raise ToolError(f"the container's runtime options name the file {path}, which the destination does "
                                "not have: copy it there, or name the destination's with runtime-config=FILE in DEST")

    def on_pages(self, message: dict) -> None:
        work = self._work()
        self.page_server = PageServer(self.channel, os.path.join(work, archive.CHECKPOINT_DIR),
                                      os.path.join(work, "page-server.log"))
        say("criu page-server ready for the dump's pages")
        self.channel.send_message("pages-ready")

    def on_pages_end(self, message: dict) -> None:
        if self.page_server is None:
            raise ToolError("the source ended a page stream that was never started")
        self.page_server.wait(float(message.get("wait") or 600))
        received = self.page_server.received
        self.page_server = None
        self.channel.send_message("pages-done", received=received)

    def on_round(self, message: dict) -> None:
        """A --pre-copy round: its images under round-N/ and nothing else."""
        work = self._work()
        name = str(message.get("round") or "")
        if not precopy.is_round(name):
            raise frames.ProtocolError(f"a pre-copy round named {name!r}")
        reader = self.channel.archive_reader(timeout=IDLE_TIMEOUT)
        try:
            try:
                with tarstream.reading(reader) as tar:
                    for member in tar:
                        if member.name != name and not member.name.startswith(name + "/"):
                            raise ToolError(f"pre-copy {name} from the source holds {member.name!r}, outside {name}/")
                        tarsafe.extract(tar, member, work, data=True)
            finally:
                reader.drain()
        except tarsafe.REFUSED as exc:
            raise ToolError(f"pre-copy {name} from the source holds an entry refused here ({exc})") from None
        except tarfile.TarError as exc:
            raise ToolError(f"pre-copy {name} from the source is damaged or was cut short ({exc})") from None
        except OSError as exc:
            raise from_os(exc, f"unpacking pre-copy {name} into {work} on the destination") from None
        say(f"took pre-copy {name}")
        self.channel.send_message("round-received", bytes=reader.count)

    def on_archive(self, message: dict) -> None:
        work = self._work()
        reader = self.channel.archive_reader(timeout=IDLE_TIMEOUT)
        say("receiving the checkpoint archive")
        try:
            try:
                with tarstream.reading(reader) as tar:
                    for member in tar:
                        tarsafe.extract(tar, member, work, data=True)
            finally:
                reader.drain()  # the source sends to the end whatever happened here: take it all
        except tarsafe.REFUSED as exc:
            raise ToolError(f"the archive from the source holds an entry refused here ({exc})") from None
        except tarfile.TarError as exc:
            raise ToolError(f"the archive from the source is damaged or was cut short ({exc})") from None
        except OSError as exc:
            raise from_os(exc, f"unpacking the checkpoint into {work} on the destination") from None
        archive.check_layout(work, "the migrated checkpoint")
        _drop_source_lock(work)
        self.channel.send_message("archive-received", bytes=reader.count)

    def on_restore(self, message: dict) -> None:
        assert self.client is not None
        work = self._work()
        prepared = self.prepared
        netns = prepared.get("netns") or {}
        runtime_options = None
        config_path = None
        options = prepared.get("runtime_options")
        if options and not self.args.runtime_config:
            runtime_options = Any(type_url=options["type_url"], value=bytes.fromhex(options["value"]))
            if options["type_url"] == RUNTIME_OPTIONS_TYPE:
                config_path = _config_path(options)
        args = types.SimpleNamespace(
            name=self.container_id, image=prepared["image"], snapshotter=prepared.get("snapshotter") or "overlayfs",
            netns=netns.get("destination"), tcp_close=bool(prepared.get("tcp_close")),
            runtime_config=self.args.runtime_config, runtime_config_path=config_path, runtime_options=runtime_options,
            labels={**(prepared.get("labels") or {}), "io.pyshim.migration": str(prepared.get("migration") or "")},
            log=None, timeout=float(message.get("restore_timeout") or 600), store=self.args.store)
        if message.get("post_copy"):
            try:
                self.lazy_pages = postcopy.DestinationPages(self.channel, self.container_id)
                postcopy.name_page_server(os.path.join(work, archive.CHECKPOINT_DIR), self.lazy_pages.address)
            except OSError as exc:
                raise from_os(exc, "opening the page relay for the lazy restore on the destination") from None
        say(f"restoring {self.container_id}")
        self.restored = True  # from here undo() looks for a container of ours
        try:
            pid = restore.restore_from(args, self.client, work, "the migrated checkpoint")
        except grpc.RpcError as exc:
            raise from_rpc(exc, f"restoring {self.container_id} on the destination") from None
        say(f"{self.container_id} runs on the destination (pid {pid})")
        self.channel.send_message("running", pid=pid, at=time.time())

    def on_status(self, message: dict) -> None:
        """After a connection lost around the commit, a new connection asks what became of the migration: the
        container it restored, running, or nothing."""
        self.client = _client(self.args)
        container_id, migration = str(message["container"]), str(message["migration"])
        state = "absent"
        try:
            record = self.client.container(container_id)
            if record.labels.get("io.pyshim.migration") == migration:
                state = "running" if self.client.task(container_id).status == task_pb2.RUNNING else "stopped"
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise from_rpc(exc, f"looking up {container_id} on the destination") from None
        self.committed = True  # nothing of ours to undo in this conversation
        self.channel.send_message("status", state=state)

    def on_commit(self, message: dict) -> None:
        self.committed = True
        if self.work and self.lazy_pages is None:  # post-copy's daemon reads the images until its last page
            archive.remove_tree(self.work)
            self.work = None
        self.channel.send_message("committed")

    def on_abort(self, message: dict) -> None:
        self.undo()
        self.channel.send_message("aborted")
        self.committed = True  # nothing more to do: end the conversation

    # --- the one way back ------------------------------------------------------------------------------------------

    def undo(self) -> None:
        """Remove everything this side made (not after commit): page server, container and task, snapshot,
        stand-ins, work directory."""
        if self.committed:
            return
        if self.page_server is not None:
            self.page_server.stop()
            self.page_server = None
        if self.lazy_pages is not None:
            self.lazy_pages.close()  # the shim's daemon fails: its restore, or its container, ends
            self.lazy_pages = None
        if self.restored and self.client is not None:
            _remove_container(self.client, self.container_id, self.prepared.get("snapshotter") or "overlayfs",
                              str(self.prepared.get("migration") or ""))
            archive.remove_tree(os.path.join(Store.default(self.args.store).root, restore.STAND_INS,
                                             self.container_id))
            self.restored = False
        if self.work:
            archive.remove_tree(self.work)
            self.work = None

    def _work(self) -> str:
        if not self.work:
            raise frames.ProtocolError("a request before prepare")
        return self.work


def _config_path(options: dict) -> str:
    from shim.api.containerd.runtimeoptions.v1 import api_pb2

    return api_pb2.Options.FromString(bytes.fromhex(options["value"])).config_path


def _client(args) -> ContainerdClient:
    if not os.path.exists(args.address):
        raise ToolError(f"the destination's containerd socket {args.address} does not exist: is containerd running "
                        "there, and is the path in DEST right?")
    return ContainerdClient(args.address, args.namespace, lease_prefix="pyshim-migrate")


def _image_unpacked(client: ContainerdClient, image: str, snapshotter: str) -> None:
    """The container's image is in the destination's store and unpacked for the snapshotter (a snapshot prepared
    on it and removed again), or the refusal saying how to get it there."""
    parent = restore._image_chain_id(client, image)
    key = f"pyshim-migrate-check-{uuid.uuid4().hex[:12]}"
    try:
        with client.lease():
            client.prepare_snapshot(snapshotter, key, parent)
            client.remove_snapshot(snapshotter, key)
    except grpc.RpcError as exc:
        raise from_rpc(exc, f"preparing a snapshot of {image} on the destination",
                       not_found=f"image {image} is in the destination's store but not unpacked for the "
                                 f"{snapshotter} snapshotter: `ctr -n {client.namespace} images import` unpacks it "
                                 "(or pull it again)") from None


def _drop_source_lock(work: str) -> None:
    """The record names the network lock the dump left on the SOURCE host: not this host's to remove."""
    path = os.path.join(work, archive.CHECKPOINT_DIR, archive.PYSHIM_RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return
    if (record.get("network") or {}).get("lock"):
        record["network"]["lock"] = None
        with open(path, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)


def _remove_container(client: ContainerdClient, container_id: str, snapshotter: str, migration: str) -> None:
    """The container this migration restored (its label says so), killed and removed with its snapshot."""
    try:
        record = client.container(container_id)
    except grpc.RpcError:
        return
    if record.labels.get("io.pyshim.migration") != migration:
        return  # not ours: someone else's container of that id
    try:
        client.kill_task(container_id, signal.SIGKILL, all=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if client.task(container_id).status == task_pb2.STOPPED:
                break
            time.sleep(0.05)
    except grpc.RpcError:
        pass
    for step in (lambda: client.delete_task(container_id), lambda: client.delete_container(container_id),
                 lambda: client.remove_snapshot(snapshotter, container_id)):
        try:
            step()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                say(f"pyshim migrate-receive: cleaning up {container_id}: {exc.details()}")


def receive(args) -> int:
    """The hidden subcommand: the protocol on stdin/stdout, stdout otherwise pointed at stderr."""
    read_fd = os.dup(0)
    write_fd = os.dup(1)
    os.dup2(2, 1)  # print() and children write to stderr from now on, never into the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    channel = Channel(read_fd, write_fd, peer="the source").start()
    receiver = Receiver(args, channel, refusal=_forced_refusal(args))
    try:
        return receiver.serve()
    finally:
        channel.close_sending()


def _forced_refusal(args) -> str | None:
    """Run as a restricted ssh key's forced command (--forced): why the source's request cannot be served, if so."""
    if not getattr(args, "forced", False):
        return None
    from shim.tool.__main__ import build_parser
    from shim.tool.migrate import restricted

    return restricted.refusal(args, os.environ.get("SSH_ORIGINAL_COMMAND"), build_parser().parse_args)


REQUESTS = sorted(name[3:].replace("_", "-") for name in vars(Receiver) if name.startswith("on_"))

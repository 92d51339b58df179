"""A client for containerd's gRPC API: what the `pyshim` command (and the integration tests) need.

Generic `channel.unary_unary` / `unary_stream` / `stream_stream` calls with the message classes
protos/generate.py builds from protos/containerd/services/ (no generated stubs). Every call carries the
namespace in the `containerd-namespace` metadata, and inside `lease()` the lease in `containerd-lease`, as
containerd's Go client does. A lease matters: the blobs Tasks.Checkpoint writes carry no GC label, and without a
lease the next garbage collection (any removal schedules one) may delete them before they are read; a snapshot
prepared for a container is collected unless a lease or the container holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import grpc
from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from shim.api.containerd.services.containers.v1 import containers_pb2 as containers
from shim.api.containerd.services.content.v1 import content_pb2 as content
from shim.api.containerd.services.images.v1 import images_pb2 as images
from shim.api.containerd.services.leases.v1 import leases_pb2 as leases
from shim.api.containerd.services.snapshots.v1 import snapshots_pb2 as snapshots
from shim.api.containerd.services.tasks.v1 import tasks_pb2 as tasks
from shim.api.containerd.services.version.v1 import version_pb2 as version
from shim.api.containerd.types import descriptor_pb2

# containerd's media types for a task checkpoint (core/images/mediatypes.go).
MEDIA_CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEDIA_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
# The type URL containerd's typeurl package gives an OCI runtime spec (a container record's `spec`).
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
CHUNK = 1 << 20
_Reply = TypeVar("_Reply", bound=Message)
# The records, for annotations inside ContainerdClient (whose containers() and images() hide the modules' names).
ContainerRecord: TypeAlias = containers.Container
ImageRecord: TypeAlias = images.Image


def pack(message: Message) -> Any:
    """An Any with the type URL containerd's typeurl package writes for a protobuf message (no prefix)."""
    return Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(media_type=self.media_type, digest=self.digest, size=self.size)


class ContainerdClient:
    def __init__(self, address: str, namespace: str, timeout: float = 60.0, lease_prefix: str = "pyshim-test") -> None:
        self.address = address
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.namespace = namespace
        self.namespace_metadata = (("containerd-namespace", namespace),)
        self.metadata: tuple[tuple[str, str], ...] = self.namespace_metadata  # and a lease's, inside lease()
        self.timeout = timeout
        self.lease_prefix = lease_prefix

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, request: Message, reply: type[_Reply], timeout: float | None = None) -> _Reply:
        call = self.channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                                        response_deserializer=reply.FromString)
        return call(request, metadata=self.metadata, timeout=timeout or self.timeout)

    @contextlib.contextmanager
    def lease(self, expire: float = 3600.0) -> Iterator[str]:
        """Make the calls inside run under a new lease (deleted afterwards), as the Go client's WithLease."""
        lease_id = f"{self.lease_prefix}-{uuid.uuid4().hex[:12]}"
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expire))
        self._unary("/containerd.services.leases.v1.Leases/Create",
                    leases.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": expiry}),
                    leases.CreateResponse)
        self.metadata = (*self.namespace_metadata, ("containerd-lease", lease_id))
        try:
            yield lease_id
        finally:
            self.metadata = self.namespace_metadata
            self._unary("/containerd.services.leases.v1.Leases/Delete", leases.DeleteRequest(id=lease_id), Empty)

    def version(self) -> tuple[str, str]:
        """The daemon's (version, revision)."""
        reply = self._unary("/containerd.services.version.v1.Version/Version", Empty(), version.VersionResponse,
                            timeout=10)
        return reply.version, reply.revision

    # --- containers and snapshots ----------------------------------------------------------------------------

    def container(self, container_id: str) -> ContainerRecord:
        return self._unary("/containerd.services.containers.v1.Containers/Get",
                           containers.GetContainerRequest(id=container_id), containers.GetContainerResponse).container

    def containers(self, *filters: str) -> list[ContainerRecord]:
        return list(self._unary("/containerd.services.containers.v1.Containers/List",
                                containers.ListContainersRequest(filters=list(filters)),
                                containers.ListContainersResponse).containers)

    def create_container(self, record: ContainerRecord) -> ContainerRecord:
        return self._unary("/containerd.services.containers.v1.Containers/Create",
                           containers.CreateContainerRequest(container=record),
                           containers.CreateContainerResponse).container

    def delete_container(self, container_id: str) -> None:
        self._unary("/containerd.services.containers.v1.Containers/Delete",
                    containers.DeleteContainerRequest(id=container_id), Empty)

    def spec(self, container_id: str) -> dict:
        """The container's OCI spec (containerd stores it as JSON in an Any)."""
        return json.loads(self.container(container_id).spec.value)

    def update_spec(self, container_id: str, spec: dict) -> None:
        """Replace the container's OCI spec (Containers.Update, mask "spec"): what ctr cannot say, such as
        OCI hooks, added to a container ctr created."""
        record = self.container(container_id)
        record.spec.value = json.dumps(spec).encode()
        self._unary("/containerd.services.containers.v1.Containers/Update",
                    containers.UpdateContainerRequest(container=record, update_mask=FieldMask(paths=["spec"])),
                    containers.UpdateContainerResponse)

    def mounts(self, snapshotter: str, key: str) -> list:
        reply = self._unary("/containerd.services.snapshots.v1.Snapshots/Mounts",
                            snapshots.MountsRequest(snapshotter=snapshotter, key=key), snapshots.MountsResponse)
        return list(reply.mounts)

    def prepare_snapshot(self, snapshotter: str, key: str, parent: str) -> list:
        reply = self._unary("/containerd.services.snapshots.v1.Snapshots/Prepare",
                            snapshots.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent),
                            snapshots.PrepareSnapshotResponse)
        return list(reply.mounts)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self._unary("/containerd.services.snapshots.v1.Snapshots/Remove",
                    snapshots.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), Empty)

    # --- images ----------------------------------------------------------------------------------------------

    def image(self, name: str) -> ImageRecord:
        return self._unary("/containerd.services.images.v1.Images/Get", images.GetImageRequest(name=name),
                           images.GetImageResponse).image

    # --- tasks -----------------------------------------------------------------------------------------------

    def task(self, container_id: str):
        """The task's process record (status, pid, exit status); NOT_FOUND when the container has no task."""
        return self._unary("/containerd.services.tasks.v1.Tasks/Get", tasks.GetRequest(container_id=container_id),
                           tasks.GetResponse).process

    def checkpoint(self, container_id: str, options: Message | Any | None = None,
                   timeout: float | None = None) -> list[Blob]:
        request = tasks.CheckpointTaskRequest(container_id=container_id)
        if options is not None:
            request.options.CopyFrom(options if isinstance(options, Any) else pack(options))
        reply = self._unary("/containerd.services.tasks.v1.Tasks/Checkpoint", request, tasks.CheckpointTaskResponse,
                            timeout=timeout)
        return [Blob(d.media_type, d.digest, d.size) for d in reply.descriptors]

    def create_task(self, container_id: str, *, checkpoint: Blob | None = None, options: Message | None = None,
                    stdout: str = "", stderr: str = "", timeout: float | None = None, runtime_path: str = "") -> int:
        """Create the task of an existing container, its rootfs from the container's snapshot (as the Go
        client does); with `checkpoint`, containerd extracts that criu tar and the shim restores from it;
        with `runtime_path`, that shim binary serves the task whatever the container's runtime name (the Go
        client's WithRuntimePath)."""
        record = self.container(container_id)
        request = tasks.CreateTaskRequest(container_id=container_id, stdout=stdout, stderr=stderr,
                                          rootfs=self.mounts(record.snapshotter, record.snapshot_key),
                                          runtime_path=runtime_path)
        if checkpoint is not None:
            request.checkpoint.CopyFrom(checkpoint.descriptor())
        if options is not None:
            request.options.CopyFrom(pack(options))
        return self._unary("/containerd.services.tasks.v1.Tasks/Create", request, tasks.CreateTaskResponse,
                           timeout=timeout).pid

    def start_task(self, container_id: str, timeout: float | None = None) -> int:
        return self._unary("/containerd.services.tasks.v1.Tasks/Start",
                           tasks.StartRequest(container_id=container_id), tasks.StartResponse, timeout=timeout).pid

    def kill_task(self, container_id: str, signal: int, all: bool = False) -> None:
        self._unary("/containerd.services.tasks.v1.Tasks/Kill",
                    tasks.KillRequest(container_id=container_id, signal=signal, all=all), Empty)

    def delete_task(self, container_id: str) -> None:
        self._unary("/containerd.services.tasks.v1.Tasks/Delete", tasks.DeleteTaskRequest(container_id=container_id),
                    tasks.DeleteResponse)

    # --- content ---------------------------------------------------------------------------------------------

    def read(self, digest: str) -> bytes:
        call = self.channel.unary_stream("/containerd.services.content.v1.Content/Read",
                                         request_serializer=content.ReadContentRequest.SerializeToString,
                                         response_deserializer=content.ReadContentResponse.FromString)
        data = bytearray()
        for chunk in call(content.ReadContentRequest(digest=digest), metadata=self.metadata, timeout=self.timeout):
            if chunk.offset != len(data):
                raise OSError(f"content {digest}: chunk at offset {chunk.offset}, expected {len(data)}")
            data += chunk.data
        return bytes(data)

    def write(self, data: bytes, media_type: str, ref: str, labels: dict[str, str] | None = None) -> Blob:
        """Commit data as a blob with the given labels; by default labelled as a GC root (as nerdctl's and
        Docker's re-import of a checkpoint)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if labels is None:
            labels = {"containerd.io/gc.root": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

        def requests() -> Iterator[content.WriteContentRequest]:
            for offset in range(0, len(data), CHUNK):
                yield content.WriteContentRequest(action=content.WRITE, ref=ref, total=len(data), offset=offset,
                                                  data=data[offset:offset + CHUNK])
            yield content.WriteContentRequest(action=content.COMMIT, ref=ref, total=len(data), offset=len(data),
                                              expected=digest, labels=labels)

        call = self.channel.stream_stream("/containerd.services.content.v1.Content/Write",
                                          request_serializer=content.WriteContentRequest.SerializeToString,
                                          response_deserializer=content.WriteContentResponse.FromString)
        last = None  # the server's final reply
        for reply in call(requests(), metadata=self.metadata, timeout=self.timeout):
            last = reply
        if last is None or last.action != content.COMMIT or last.digest != digest:
            raise OSError(f"content write {ref}: not committed as {digest} (last reply: {last})")
        return Blob(media_type, digest, len(data))

    def write_file(self, path: str, media_type: str, ref: str, labels: dict[str, str] | None = None,
                   progress=None) -> Blob:
        """Commit a file as a blob, streamed in chunks (its digest computed first), with the given labels."""
        digest_of = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest_of.update(chunk)
        digest = "sha256:" + digest_of.hexdigest()
        total = os.path.getsize(path)

        def requests() -> Iterator[content.WriteContentRequest]:
            offset = 0
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield content.WriteContentRequest(action=content.WRITE, ref=ref, total=total, offset=offset,
                                                      data=chunk)
                    offset += len(chunk)
                    if progress is not None:
                        progress.add(len(chunk))
            yield content.WriteContentRequest(action=content.COMMIT, ref=ref, total=total, offset=total,
                                              expected=digest, labels=labels or {})

        call = self.channel.stream_stream("/containerd.services.content.v1.Content/Write",
                                          request_serializer=content.WriteContentRequest.SerializeToString,
                                          response_deserializer=content.WriteContentResponse.FromString)
        last = None  # the server's final reply
        for reply in call(requests(), metadata=self.metadata, timeout=max(self.timeout, total / (20 << 20))):
            last = reply
        if last is None or last.action != content.COMMIT or last.digest != digest:
            raise OSError(f"content write {ref}: not committed as {digest} (last reply: {last})")
        return Blob(media_type, digest, total)

    def read_to_file(self, digest: str, path: str, progress=None) -> int:
        """A blob streamed into a new file (0600); its size."""
        call = self.channel.unary_stream("/containerd.services.content.v1.Content/Read",
                                         request_serializer=content.ReadContentRequest.SerializeToString,
                                         response_deserializer=content.ReadContentResponse.FromString)
        written = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            for chunk in call(content.ReadContentRequest(digest=digest), metadata=self.metadata, timeout=None):
                if chunk.offset != written:
                    raise OSError(f"content {digest}: chunk at offset {chunk.offset}, expected {written}")
                f.write(chunk.data)
                written += len(chunk.data)
                if progress is not None:
                    progress.add(len(chunk.data))
        return written

    def images(self, *filters: str) -> list[ImageRecord]:
        return list(self._unary("/containerd.services.images.v1.Images/List",
                                images.ListImagesRequest(filters=list(filters)), images.ListImagesResponse).images)

    def delete_image(self, name: str) -> None:
        self._unary("/containerd.services.images.v1.Images/Delete", images.DeleteImageRequest(name=name, sync=True),
                    Empty)

    def create_image(self, name: str, target: Blob, labels: dict[str, str] | None = None) -> ImageRecord:
        record = images.Image(name=name, target=target.descriptor(), labels=labels or {})
        return self._unary("/containerd.services.images.v1.Images/Create", images.CreateImageRequest(image=record),
                           images.CreateImageResponse).image

    def delete_content(self, digest: str) -> None:
        self._unary("/containerd.services.content.v1.Content/Delete", content.DeleteContentRequest(digest=digest),
                    Empty)


def chain_id(diff_ids: list[str]) -> str:
    """The OCI chain ID of a stack of layers (the name containerd gives the committed snapshot of an unpacked
    image): the first diff ID, then sha256("<chain> <next diff ID>") for each next."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain

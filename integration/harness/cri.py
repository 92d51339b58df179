"""A small CRI client: containerd's CRI plugin driven over its gRPC socket as kubelet drives it.

Generic `channel.unary_unary` calls with the messages protos/generate.py builds from protos/cri/runtime/v1/api.proto
(package runtime.v1, the subset the tests use), as harness/grpc_client.py does for containerd's own API. containerd
serves CRI on its main gRPC socket; every call has a deadline. Pods use the host's network namespace (NODE), so no
CNI plugin is involved, and their own PID namespace (CONTAINER), as kubelet asks for by default.
"""

from __future__ import annotations

import json
import time

import grpc
from google.protobuf.message import Message

from shim.api.cri.runtime.v1 import api_pb2 as cri

RUNTIME = "/runtime.v1.RuntimeService/"
IMAGES = "/runtime.v1.ImageService/"
STATE_NAMES = {cri.CONTAINER_CREATED: "CREATED", cri.CONTAINER_RUNNING: "RUNNING", cri.CONTAINER_EXITED: "EXITED",
               cri.CONTAINER_UNKNOWN: "UNKNOWN"}


def pod_config(name: str, uid: str, *, cgroup_parent: str = "") -> cri.PodSandboxConfig:
    """A pod on the host network; cgroup_parent (cgroupfs syntax) places the pod's cgroups."""
    namespaces = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="pyshim-test"),
        labels={"io.pyshim.test": name},
        linux=cri.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent,
                                        security_context=cri.LinuxSandboxSecurityContext(namespace_options=namespaces)),
    )


def container_config(name: str, image: str, *command: str) -> cri.ContainerConfig:
    namespaces = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name),
        image=cri.ImageSpec(image=image),
        command=list(command),
        labels={"io.pyshim.test": name},
        linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(namespace_options=namespaces)),
    )


class CriClient:
    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Message, reply: type[Message], timeout: float | None = None) -> Message:
        call = self.channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                                        response_deserializer=reply.FromString)
        return call(request, timeout=timeout or self.timeout)

    # --- runtime --------------------------------------------------------------------------------------------

    def version(self) -> cri.VersionResponse:
        return self._call(RUNTIME + "Version", cri.VersionRequest(version="v1"), cri.VersionResponse)

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, handler: str) -> str:
        return self._call(RUNTIME + "RunPodSandbox", cri.RunPodSandboxRequest(config=config, runtime_handler=handler),
                          cri.RunPodSandboxResponse, timeout=60).pod_sandbox_id

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(RUNTIME + "StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                   cri.StopPodSandboxResponse, timeout=60)

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(RUNTIME + "RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                   cri.RemovePodSandboxResponse, timeout=60)

    def pod_sandbox_status(self, sandbox_id: str) -> tuple[cri.PodSandboxStatus, dict]:
        """The status and the verbose `info` JSON (pid, runtimeHandler, runtimeType, ...)."""
        reply = self._call(RUNTIME + "PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                                                      verbose=True),
                           cri.PodSandboxStatusResponse)
        return reply.status, json.loads(reply.info.get("info", "{}"))

    def create_container(self, sandbox_id: str, config: cri.ContainerConfig,
                         sandbox_config: cri.PodSandboxConfig) -> str:
        return self._call(RUNTIME + "CreateContainer",
                          cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config,
                                                     sandbox_config=sandbox_config),
                          cri.CreateContainerResponse, timeout=60).container_id

    def start_container(self, container_id: str) -> None:
        self._call(RUNTIME + "StartContainer", cri.StartContainerRequest(container_id=container_id),
                   cri.StartContainerResponse, timeout=60)

    def stop_container(self, container_id: str, timeout: int) -> None:
        """SIGTERM (the image's stop signal), SIGKILL after `timeout` seconds."""
        self._call(RUNTIME + "StopContainer", cri.StopContainerRequest(container_id=container_id, timeout=timeout),
                   cri.StopContainerResponse, timeout=timeout + 30)

    def remove_container(self, container_id: str) -> None:
        self._call(RUNTIME + "RemoveContainer", cri.RemoveContainerRequest(container_id=container_id),
                   cri.RemoveContainerResponse, timeout=60)

    def container_status(self, container_id: str) -> tuple[cri.ContainerStatus, dict]:
        """The status and the verbose `info` JSON (pid, sandboxID, runtimeType, runtimeSpec, ...)."""
        reply = self._call(RUNTIME + "ContainerStatus",
                           cri.ContainerStatusRequest(container_id=container_id, verbose=True),
                           cri.ContainerStatusResponse)
        return reply.status, json.loads(reply.info.get("info", "{}"))

    def state(self, container_id: str) -> str:
        return STATE_NAMES[self.container_status(container_id)[0].state]

    def wait_state(self, container_id: str, wanted: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(container_id)) != wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        return state

    def exec_sync(self, container_id: str, *cmd: str, timeout: int = 10) -> cri.ExecSyncResponse:
        return self._call(RUNTIME + "ExecSync", cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd),
                                                                    timeout=timeout),
                          cri.ExecSyncResponse, timeout=timeout + 30)

    def checkpoint_container(self, container_id: str, location: str, timeout: int = 60) -> None:
        self._call(RUNTIME + "CheckpointContainer",
                   cri.CheckpointContainerRequest(container_id=container_id, location=location, timeout=timeout),
                   cri.CheckpointContainerResponse, timeout=timeout + 30)

    # --- images ---------------------------------------------------------------------------------------------

    def image_status(self, ref: str) -> cri.Image | None:
        reply = self._call(IMAGES + "ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)),
                           cri.ImageStatusResponse)
        return reply.image if reply.HasField("image") else None

    def pull_image(self, ref: str) -> str:
        """PullImage as kubelet calls it; returns the image reference (its id)."""
        return self._call(IMAGES + "PullImage", cri.PullImageRequest(image=cri.ImageSpec(image=ref)),
                          cri.PullImageResponse, timeout=60).image_ref

    def wait_image(self, ref: str, timeout: float = 15.0) -> cri.Image:
        """CRI learns of images imported through containerd's API from events: wait until it knows ref."""
        deadline = time.monotonic() + timeout
        while (image := self.image_status(ref)) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"CRI does not know image {ref} after {timeout}s")
            time.sleep(0.05)
        return image

"""containerd's gRPC API for the tests: the product's client (shim/tool/containerd_api.py, what the `pyshim` command
uses), under the names the tests import."""

from shim.tool.containerd_api import MEDIA_CHECKPOINT_CONFIG, MEDIA_CRIU_TAR, Blob, ContainerdClient, pack

__all__ = ["MEDIA_CHECKPOINT_CONFIG", "MEDIA_CRIU_TAR", "Blob", "ContainerdClient", "pack"]

"""containerd's config.toml for a private test instance, in the schema each containerd line expects.

1.6 and 1.7 read config version 2; 2.x reads version 3 (and migrates 2, slowly and with warnings). Plugins the tests
never use are disabled: CRI (slow to start, and it would want CNI), snapshotters needing special filesystems, NRI
(its socket is a fixed host path shared by every containerd), tracing, and the `opt` plugin (it writes
/opt/containerd). A plugin id a given version does not know is ignored, so one list serves all three.

None of the three versions has a config setting for the runc shim's options outside the CRI plugin (`Root` only
exists under CRI's runtimes), so the private runc root is given per container (`ctr run --runc-root`) instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Fail start-up at once, with the reason in the log, if what every test needs did not load.
REQUIRED_PLUGINS = ("io.containerd.grpc.v1.tasks", "io.containerd.snapshotter.v1.overlayfs")

DISABLED_PLUGINS = (
    # CRI: 1.6/1.7 one plugin, 2.x split in several.
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
    # NRI listens on /var/run/nri/nri.sock: several containerds would fight over it.
    "io.containerd.nri.v1.nri",
    # Writes /opt/containerd. (Not the 2.x image verifier: the transfer service, which 2.x's `ctr images import`
    # uses, fails to load without it.)
    "io.containerd.internal.v1.opt",
    # Snapshotters other than overlayfs/native, which need special filesystems or setup.
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.differ.v1.erofs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def config_version(containerd_version: str) -> int:
    return 3 if int(containerd_version.split(".")[0]) >= 2 else 2


@dataclass(frozen=True)
class ContainerdPaths:
    root: Path
    state: Path
    temp: Path
    address: str
    ttrpc_address: str


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string for the paths used here.
    return json.dumps(value)


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_string(v) for v in values) + "]"


def render_config(containerd_version: str, paths: ContainerdPaths) -> str:
    version = config_version(containerd_version)
    lines = [
        f"version = {version}",
        f"root = {_toml_string(str(paths.root))}",
        f"state = {_toml_string(str(paths.state))}",
        f"temp = {_toml_string(str(paths.temp))}",
        f"disabled_plugins = {_toml_list(DISABLED_PLUGINS)}",
        f"required_plugins = {_toml_list(REQUIRED_PLUGINS)}",
        "",
        "[grpc]",
        f"  address = {_toml_string(paths.address)}",
        "",
        "[ttrpc]",
        f"  address = {_toml_string(paths.ttrpc_address)}",
        "",
        "[debug]",
        '  address = ""',
        '  level = "debug"',
        "",
        "[metrics]",
        '  address = ""',
        "",
    ]
    if version == 2:
        # 1.6/1.7's task service refuses to load without the v1 runtime plugin, so it stays enabled; its
        # runtime root (used only by v1 tasks, which the tests never create) is kept private all the same.
        lines += [
            '[plugins."io.containerd.runtime.v1.linux"]',
            f"  runtime_root = {_toml_string(str(paths.root / 'runtime-v1'))}",
            "",
        ]
    return "\n".join(lines)

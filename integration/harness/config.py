"""containerd's config.toml for a private test instance, in the schema each containerd line expects.

1.6 and 1.7 read config version 2; 2.x reads version 3 (and migrates 2, slowly and with warnings). Plugins the tests
never use are disabled: CRI (slow to start, and it would want CNI), snapshotters needing special filesystems, NRI
(its socket is a fixed host path shared by every containerd), tracing, and the `opt` plugin (it writes
/opt/containerd). A plugin id a given version does not know is ignored, so one list serves all three.

None of the three versions has a config setting for the runc shim's options outside the CRI plugin (`Root` only
exists under CRI's runtimes), so the private runc root is given per container (`ctr run --runc-root`) instead.

CRI is opt-in (`CriSettings`, for integration/test_cri.py only): then the CRI plugins load, with two runtime handlers,
`runc` (the Go shim, its runc state under the private runc root) and `pyshim` (its runc options from a config file
naming the same root), a sandbox image that is a locally imported one, a private registry hosts directory (empty unless
a test serves images on loopback, harness/registry.py), CNI dirs that are empty private directories
(pods use the host network, so CNI is never called), CDI off, and the streaming server on 127.0.0.1 with a port the
kernel picks. CRI's own root and state live under containerd's, which are private already; NRI stays disabled.
`runtime_handlers=False` (test_registration.py) leaves the runtime handlers and the default runtime's name out.
`restrict_oom_score_adj`: CRI gives sandboxes oom_score_adj -998, which only CAP_SYS_RESOURCE may set, and the test
machines' root lacks it (runc's nsexec: "failed to update /proc/self/oom_score_adj: Permission denied"); restricted,
CRI never asks for less than containerd's own value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The CRI plugins: 1.6/1.7 one plugin, 2.x split in several.
CRI_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
)
# Runtime handler names (what kubelet passes as RunPodSandboxRequest.runtime_handler) -> runtime types.
CRI_HANDLERS = {"pyshim": "io.containerd.pyshim.v2", "runc": "io.containerd.runc.v2"}

# Fail start-up at once, with the reason in the log, if what every test needs did not load.
REQUIRED_PLUGINS = ("io.containerd.grpc.v1.tasks", "io.containerd.snapshotter.v1.overlayfs")

DISABLED_PLUGINS = (
    *CRI_PLUGINS,
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


@dataclass(frozen=True)
class CriSettings:
    """What the CRI plugin needs to stay inside the test instance: see the module docstring."""

    sandbox_image: str
    runc_root: Path
    pyshim_config: Path
    cni_bin_dir: Path
    cni_conf_dir: Path
    # containerd's registry host configuration (<dir>/<host>/hosts.toml), read at each pull.
    registry_config_dir: Path
    # False: no runtime handlers and no default_runtime_name, as in a host's minimal config (for a test that
    # registers pyshim with packaging/containerd/register.sh, which must keep the default runtime itself).
    runtime_handlers: bool = True


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string for the paths used here.
    return json.dumps(value)


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_string(v) for v in values) + "]"


def _cri_runtimes(prefix: str, cri: CriSettings, sandboxer: bool) -> list[str]:
    lines = []
    for handler, runtime_type in CRI_HANDLERS.items():
        table = f"{prefix}.runtimes.{handler}"
        lines += [f"  [{table}]", f"    runtime_type = {_toml_string(runtime_type)}"]
        if sandboxer:
            lines.append('    sandboxer = "podsandbox"')
        lines.append(f"    [{table}.options]")
        if handler == "runc":
            # The Go shim keeps runc state in <Root>/<namespace>, as `ctr run --runc-root` does.
            lines += ['      BinaryName = "runc"', f"      Root = {_toml_string(str(cri.runc_root))}"]
        else:
            # Other runtime types get runtimeoptions.v1.Options: a file of runc options (packaging/containerd/).
            lines.append(f"      ConfigPath = {_toml_string(str(cri.pyshim_config))}")
    return lines


def _cri_sections(version: int, cri: CriSettings) -> list[str]:
    if version == 2:
        plugin = '[plugins."io.containerd.grpc.v1.cri"'
        lines = [
            plugin + "]",
            f"  sandbox_image = {_toml_string(cri.sandbox_image)}",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            "  restrict_oom_score_adj = true",
            plugin + ".registry]",
            f"  config_path = {_toml_string(str(cri.registry_config_dir))}",
            plugin + ".cni]",
            f"  bin_dir = {_toml_string(str(cri.cni_bin_dir))}",
            f"  conf_dir = {_toml_string(str(cri.cni_conf_dir))}",
            plugin + ".containerd]",
            *(['  default_runtime_name = "runc"'] if cri.runtime_handlers else []),
            '  snapshotter = "overlayfs"',
            *(_cri_runtimes('plugins."io.containerd.grpc.v1.cri".containerd', cri, sandboxer=False)
              if cri.runtime_handlers else []),
        ]
    else:
        images = '[plugins."io.containerd.cri.v1.images"'
        runtime = '[plugins."io.containerd.cri.v1.runtime"'
        lines = [
            images + "]",
            '  snapshotter = "overlayfs"',
            images + ".pinned_images]",
            f"  sandbox = {_toml_string(cri.sandbox_image)}",
            images + ".registry]",
            f"  config_path = {_toml_string(str(cri.registry_config_dir))}",
            runtime + "]",
            "  enable_selinux = false",
            "  enable_cdi = false",
            "  restrict_oom_score_adj = true",
            runtime + ".cni]",
            f"  bin_dirs = {_toml_list((str(cri.cni_bin_dir),))}",
            f"  conf_dir = {_toml_string(str(cri.cni_conf_dir))}",
            *((runtime + ".containerd]", '  default_runtime_name = "runc"',
               *_cri_runtimes('plugins."io.containerd.cri.v1.runtime".containerd', cri, sandboxer=True))
              if cri.runtime_handlers else ()),
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
        ]
    return [*lines, ""]


def render_config(containerd_version: str, paths: ContainerdPaths, cri: CriSettings | None = None) -> str:
    """The config.toml; with `cri`, the CRI plugins are enabled and configured as the module docstring says."""
    version = config_version(containerd_version)
    disabled = tuple(p for p in DISABLED_PLUGINS if cri is None or p not in CRI_PLUGINS)
    lines = [
        f"version = {version}",
        f"root = {_toml_string(str(paths.root))}",
        f"state = {_toml_string(str(paths.state))}",
        f"temp = {_toml_string(str(paths.temp))}",
        f"disabled_plugins = {_toml_list(disabled)}",
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
    if cri is not None:
        lines += _cri_sections(version, cri)
    return "\n".join(lines)

"""From (container, options) to what CRIU or the OCI runtime is asked to do.

`dump_request` builds the criu_req that runc would send for `runc checkpoint` with the
same options; `runtime_checkpoint_args` and `runtime_restore_args` render the flags for the
runc engine and for restore; `restore_config` is the CRIU configuration file pyshim adds on
restore for what runc has no flag for. These are pure functions: what the container contributes
comes in as a ContainerFacts (and the user's CRIU configuration as text), and the one function
that reads the container, `facts_from_bundle` (its Bundle, config.json as parsed at Create, and
/proc), is the last section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from shim.bundle.config import CRIU_CONFIG_ANNOTATION, Bundle
from shim.criu.options import CheckpointOptions

CLONE_NEWNET = 0x40000000
LOG_LEVEL = 4
DEFAULT_RUNC_CRIU_CONFIG = "/etc/criu/runc.conf"
# criu_cg_mode values (CRIU's rpc.proto)
CGROUP_MODE = {"ignore": 0, "soft": 3, "full": 4, "strict": 5, "": 6}
NETWORK_LOCK = {"iptables": 1, "nftables": 2, "skip": 3}
EXTERNAL_NS_KEY = {"network": "extRootNetNS", "pid": "extRootPidNS"}
EXTERNAL_NS_NAME = {"network": "net", "pid": "pid"}


@dataclass(frozen=True)
class ContainerFacts:
    """What a dump needs to know about a container."""

    rootfs: str
    pid: int
    bind_mounts: tuple[str, ...] = ()  # destinations inside the container
    cgroup_v1_binds: tuple[str, ...] = ()  # destinations of per-hierarchy cgroup binds (v1, no cgroupns)
    masked_files: tuple[str, ...] = ()  # masked paths that exist and are not directories
    devices: tuple[str, ...] = ()
    external_namespaces: dict[str, int] = field(default_factory=dict)  # "network"/"pid" -> inode
    freezer_cgroup: str = ""
    criu_config: str | None = DEFAULT_RUNC_CRIU_CONFIG  # None: the annotation asked for none
    external_unix_sockets: tuple[int, ...] = ()  # inodes CRIU must take as external (shim.criu.external_unix)


def dump_request(rpc, options: CheckpointOptions, facts: ContainerFacts, *, images_dir_fd: int,
                 work_dir_fd: int | None = None):
    """The criu_req for a dump (or pre-dump), field for field what runc sends."""
    opts = rpc.criu_opts(
        images_dir_fd=images_dir_fd, log_level=LOG_LEVEL, log_file="dump.log", root=facts.rootfs,
        manage_cgroups=True, manage_cgroups_mode=CGROUP_MODE[options.manage_cgroups_mode],
        notify_scripts=True, pid=facts.pid, shell_job=options.shell_job,
        leave_running=options.leave_running or options.pre_dump, tcp_established=options.tcp_established,
        tcp_skip_in_flight=options.tcp_skip_in_flight, link_remap=options.link_remap,
        ext_unix_sk=options.ext_unix_sk, file_locks=options.file_locks,
        # runc always asks for an empty network namespace: it does not manage network devices,
        # so their configuration is not dumped (--empty-ns network only repeats it).
        empty_ns=CLONE_NEWNET, orphan_pts_master=True,
        auto_dedup=options.auto_dedup, lazy_pages=options.lazy_pages,
    )
    if work_dir_fd is not None:
        opts.work_dir_fd = work_dir_fd
    if facts.criu_config is not None:
        opts.config_file = facts.criu_config
    for kind, inode in sorted(facts.external_namespaces.items()):
        opts.external.append(f"{EXTERNAL_NS_NAME[kind]}[{inode}]:{EXTERNAL_NS_KEY[kind]}")
    for inode in facts.external_unix_sockets:
        opts.external.append(f"unix[{inode}]")  # what `criu dump --ext-unix-sk=<inode>` declares
    if facts.freezer_cgroup:
        opts.freeze_cgroup = facts.freezer_cgroup
    if options.page_server_address:
        host, port = options.page_server_address
        opts.ps.address = host
        opts.ps.port = port
    if options.parent_path:
        opts.parent_img = options.parent_path
        opts.track_mem = True
    opts.network_lock = NETWORK_LOCK[network_lock(options)]
    if not options.pre_dump:
        for destination in (*facts.bind_mounts, *facts.cgroup_v1_binds):
            opts.ext_mnt.add(key=destination, val=destination)
        for path in facts.masked_files:
            opts.ext_mnt.add(key=path, val="/dev/null")
        for path in facts.devices:
            opts.ext_mnt.add(key=path, val=path)
    kind = rpc.PRE_DUMP if options.pre_dump else rpc.DUMP
    return rpc.criu_req(type=kind, opts=opts)


def network_lock(options: CheckpointOptions) -> str:
    """The lock CRIU puts on the container's network while it works. It exists to keep
    established TCP connections consistent; without tcp-established there are none to keep,
    so pyshim skips it (CRIU's iptables lock execs iptables-restore twice: ~50 ms frozen)."""
    if options.network_lock:
        return options.network_lock
    return "iptables" if options.tcp_established and not options.tcp_close else "skip"


def runtime_checkpoint_args(options: CheckpointOptions, *, image_path: str, work_path: str) -> list[str]:
    """`runc checkpoint` / `crun checkpoint` flags for the same options (the runc engine)."""
    args = ["--image-path", image_path, "--work-path", work_path]
    flags = [("leave_running", "--leave-running"), ("tcp_established", "--tcp-established"),
             ("ext_unix_sk", "--ext-unix-sk"), ("shell_job", "--shell-job"), ("lazy_pages", "--lazy-pages"),
             ("file_locks", "--file-locks"), ("pre_dump", "--pre-dump"), ("auto_dedup", "--auto-dedup"),
             ("tcp_skip_in_flight", "--tcp-skip-in-flight"), ("link_remap", "--link-remap")]
    args += [flag for name, flag in flags if getattr(options, name)]
    if options.parent_path:
        args += ["--parent-path", options.parent_path]
    if options.page_server:
        args += ["--page-server", options.page_server]
    if options.manage_cgroups_mode:
        args += ["--manage-cgroups-mode", options.manage_cgroups_mode]
    for ns in options.empty_ns:
        args += ["--empty-ns", ns]
    return args


def runtime_restore_args(options: CheckpointOptions) -> list[str]:
    """The `runc restore` flags that carry a checkpoint's options into its restore — what the
    Go shim leaves out (it passes none of them). tcp-close replaces tcp-established; lazy
    pages are not implied (a lazy restore needs a page source and is asked for as such)."""
    flags = [("ext_unix_sk", "--ext-unix-sk"), ("shell_job", "--shell-job"), ("file_locks", "--file-locks"),
             ("auto_dedup", "--auto-dedup")]
    args = ["--tcp-established"] if options.tcp_established and not options.tcp_close else []
    args += [flag for name, flag in flags if getattr(options, name)]
    if options.manage_cgroups_mode:
        args += ["--manage-cgroups-mode", options.manage_cgroups_mode]
    for ns in options.empty_ns:
        args += ["--empty-ns", ns]
    return args


def restore_config(options: CheckpointOptions, *, user_config: str = "", action_script: str = "",
                   cgroup_root: str = "") -> str:
    """A CRIU configuration file for restore: the user's own (the text of the file org.criu.config or
    runc.conf names, "" for none) followed by what pyshim adds. CRIU reads it after the RPC options, so
    the lines here win. cgroup_root: the new container's cgroup on cgroup v2 (shim.cgroups.runc_path),
    where the restored processes go instead of the cgroup they were dumped from."""
    lines = user_config.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line, or an empty file
    lines.append("# added by pyshim")
    if options.tcp_close:
        lines.append("tcp-close")
    elif options.tcp_established:
        lines.append("tcp-established")
    if options.manage_cgroups_mode:
        # runc (1.1) takes --manage-cgroups-mode on restore but does not hand it to CRIU, which
        # then restores in its default (soft) mode; said here, it reaches CRIU whatever runc does.
        lines.append(f"manage-cgroups={options.manage_cgroups_mode}")
    lines.append(f"network-lock {network_lock(options)}")
    if cgroup_root:
        lines.append(f"cgroup-root :{cgroup_root}")  # ":" names the unified hierarchy (CRIU calls it "")
    if action_script:
        lines.append(f"action-script {action_script}")
    return "\n".join(lines) + "\n"


# -- reading the facts ------------------------------------------------------------------------


def _resolve_inside(rootfs: str, destination: str) -> str:
    """A mount destination with symlinks resolved inside the rootfs (runc's securejoin)."""
    parts = [p for p in destination.split("/") if p]
    resolved: list[str] = []
    for _ in range(256):  # bounded: a symlink loop must not hang a checkpoint
        if not parts:
            break
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(rootfs, *resolved, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def _cgroup_v1_hierarchies(root: str = "/sys/fs/cgroup") -> list[str]:
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [n for n in names if os.path.ismount(os.path.join(root, n)) and not os.path.islink(os.path.join(root, n))]


def _freezer_cgroup(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return ""
    # By what /sys/fs/cgroup is, as runc and CRIU decide: a v1 freezer line is still listed where the kernel has v1
    # hierarchies mounted elsewhere (a cgroup v2 mount namespace on a hybrid host), but it is not runc's freezer.
    unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    for hierarchy, controllers, path in entries:
        if unified and hierarchy == "0" and controllers == "":
            return os.path.join("/sys/fs/cgroup", path.lstrip("/"))  # cgroup v2: the unified path
        if not unified and "freezer" in controllers.split(","):
            return os.path.join("/sys/fs/cgroup/freezer", path.lstrip("/"))
    return ""


def facts_from_bundle(bundle: Bundle, pid: int, *, rootfs: str | None = None) -> ContainerFacts:
    config = bundle.config
    rootfs = rootfs or bundle.root
    linux = bundle.linux
    namespaces = bundle.namespaces
    has_cgroupns = any(ns.get("type") == "cgroup" for ns in namespaces)
    unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    binds, cgroup_binds = [], []
    for mount in config.get("mounts") or []:
        options = mount.get("options") or []
        destination = _resolve_inside(rootfs, mount.get("destination", ""))
        if mount.get("type") == "bind" or "bind" in options or "rbind" in options:
            binds.append(destination)
        elif mount.get("type") == "cgroup" and not unified and not has_cgroupns:
            cgroup_binds += [f"{destination.rstrip('/')}/{name}" for name in _cgroup_v1_hierarchies()]
    masked = []
    for path in linux.get("maskedPaths") or []:
        target = f"/proc/{pid}/root{path}"
        if os.path.exists(target) and not os.path.isdir(target):
            masked.append(path)
    external = {}
    for ns in namespaces:
        if ns.get("type") in EXTERNAL_NS_KEY and ns.get("path"):
            external[ns["type"]] = os.stat(ns["path"]).st_ino
    annotations = bundle.annotations
    if CRIU_CONFIG_ANNOTATION in annotations:
        criu_config = annotations[CRIU_CONFIG_ANNOTATION] or None
    else:
        criu_config = DEFAULT_RUNC_CRIU_CONFIG
    return ContainerFacts(
        rootfs=rootfs, pid=pid, bind_mounts=tuple(binds), cgroup_v1_binds=tuple(cgroup_binds),
        masked_files=tuple(masked), devices=tuple(d["path"] for d in linux.get("devices") or [] if d.get("path")),
        external_namespaces=external, freezer_cgroup=_freezer_cgroup(pid), criu_config=criu_config)

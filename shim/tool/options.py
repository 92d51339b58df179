"""`pyshim checkpoint create`'s option flags, and the Checkpoint request's Options that carry them to the shim.

Every `runc checkpoint` flag and pyshim's own (shim/criu/options.py, docs/checkpoint.md) is a flag here. They
travel as one containerd.runc.v1.CheckpointOptions, the only type containerd 2.x lets through: its own fields
(exit, image_path, ...) for containerd, which reads image_path to know the shim writes the images itself, and in
the same bytes pyshim's extension message (protos/pyshim/checkpoint/v1/options.proto) naming every option given,
which the shim reads last, so a flag here wins over the container's annotations and the host file.
"""

from __future__ import annotations

import argparse

from google.protobuf.any_pb2 import Any

from shim.api.containerd.runc.options import oci_pb2
from shim.api.pyshim.checkpoint.v1 import options_pb2

CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"

# (flag, pyshim option name, help); booleans
SWITCHES = (
    ("--tcp-established", "tcp-established", "checkpoint and restore established TCP connections"),
    ("--tcp-skip-in-flight", "tcp-skip-in-flight", "skip TCP connections still being set up (in flight)"),
    ("--link-remap", "link-remap", "allow open files that were deleted but still have links"),
    ("--ext-unix-sk", "ext-unix-sk", "allow unix sockets whose peer is outside the container"),
    ("--shell-job", "shell-job", "the container runs with a terminal"),
    ("--file-locks", "file-locks", "checkpoint held file locks"),
    ("--lazy-pages", "lazy-pages", "post-copy: leave memory pages to be served on demand to the restore"),
    ("--pre-dump", "pre-dump", "dump memory only, leaving the task running (needs soft-dirty tracking)"),
    ("--auto-dedup", "auto-dedup", "punch dumped pages out of parent images"),
    ("--keep-network-lock", "keep-network-lock",
     "pyshim: with --exit, leave CRIU's network lock for a restore into the same namespace"),
)
# (flag, pyshim option name, metavar, help); values
VALUES = (
    ("--work-path", "work-path", "DIR", "where CRIU writes its log and statistics (default: a temporary directory)"),
    ("--parent-path", "parent-path", "DIR", "parent image for an incremental dump, relative to the image directory"),
    ("--page-server", "page-server", "ADDRESS:PORT", "send memory pages to a CRIU page server"),
    ("--manage-cgroups-mode", "manage-cgroups-mode", "MODE", "cgroups mode: soft, full, strict or ignore"),
    ("--empty-ns", "empty-ns", "NS", "namespace to dump as empty (only 'network', as runc)"),
    ("--engine", "engine", "ENGINE", "pyshim: criu (its own CRIU client, default) or runc (`runc checkpoint`)"),
    ("--network-lock", "network-lock", "METHOD", "pyshim: iptables, nftables or skip (default: iptables with "
                                                "--tcp-established, else skip)"),
    ("--criu-timeout", "timeout", "SECONDS", "pyshim: seconds before a hung CRIU is killed (default 600)"),
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runc checkpoint options and pyshim's own (docs/checkpoint.md)")
    for flag, _name, text in SWITCHES:
        group.add_argument(flag, action="store_true", help=text)
    for flag, _name, metavar, text in VALUES:
        group.add_argument(flag, metavar=metavar, help=text)


def chosen(args: argparse.Namespace) -> dict[str, str]:
    """The options the flags name, by pyshim's option names (values as text)."""
    options = {"leave-running": "false" if args.exit else "true"}
    for flag, name, _text in SWITCHES:
        if getattr(args, _dest(flag)):
            options[name] = "true"
    for flag, name, _metavar, _text in VALUES:
        value = getattr(args, _dest(flag))
        if value is not None:
            options[name] = str(value)
    return options


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def request_options(options: dict[str, str], image_path: str) -> Any:
    """The Checkpoint request's Options: containerd's message (image_path, exit, the flags it has) followed by
    pyshim's extension, one Any of containerd's type."""
    runc = oci_pb2.CheckpointOptions(
        exit=options.get("leave-running") == "false", image_path=image_path,
        open_tcp=options.get("tcp-established") == "true", external_unix_sockets=options.get("ext-unix-sk") == "true",
        terminal=options.get("shell-job") == "true", file_locks=options.get("file-locks") == "true",
        work_path=options.get("work-path", ""), parent_path=options.get("parent-path", ""),
        cgroups_mode=options.get("manage-cgroups-mode", ""))
    if options.get("empty-ns"):
        runc.empty_namespaces.append(options["empty-ns"])
    extension = options_pb2.CheckpointOptionsExtension(options={**options, "image-path": image_path})
    return Any(type_url=CHECKPOINT_OPTIONS_TYPE, value=runc.SerializeToString() + extension.SerializeToString())

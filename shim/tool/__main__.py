"""`pyshim`: checkpoint, inspect and restore containers of containerd that run under pyshim; check the host.

    pyshim [--address SOCKET] [--namespace NS] [--store DIR] COMMAND ...

Every failure is one line on stderr naming the cause and the fix, exit status 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from shim.tool.errors import ToolError

PROG = "pyshim"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def _page(parser_factory, name: str, *, help: str, description: str, epilog: str = "", **kwargs):
    return parser_factory.add_parser(name, help=help, description=textwrap.dedent(description).strip(),
                                     epilog=textwrap.dedent(epilog).strip(), formatter_class=_formatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_formatter,
        description=textwrap.dedent("""
            Checkpoint a running container of containerd into one archive (or the checkpoint store), inspect it,
            and restore it under a new name on this containerd or another; check the host for what checkpoint
            and restore need. Containers must run under pyshim (runtime io.containerd.pyshim.v2).
        """).strip(),
        epilog=textwrap.dedent("""
            environment:
              CONTAINERD_ADDRESS     containerd's socket (default /run/containerd/containerd.sock)
              CONTAINERD_NAMESPACE   containerd namespace (default "default")
              PYSHIM_CHECKPOINT_DIR  the checkpoint store (default /var/lib/pyshim/checkpoints)

            examples:
              pyshim checkpoint create web --export /srv/web.tar.zst --print-stats
              pyshim restore /srv/web.tar.zst --name web2
              pyshim checkpoint inspect /srv/web.tar.zst
              pyshim doctor

            See docs/cli.md for a walk-through.
        """).strip())
    parser.add_argument("-a", "--address", default=os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS),
                        help="containerd's gRPC socket (default: %(default)s)")
    parser.add_argument("-n", "--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
                        help="containerd namespace (default: %(default)s)")
    parser.add_argument("--store", help="the checkpoint store directory (default: $PYSHIM_CHECKPOINT_DIR or "
                                        "/var/lib/pyshim/checkpoints)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    checkpoint = _page(commands, "checkpoint", help="create, list, inspect and remove checkpoints",
                       description="Create, list, inspect and remove checkpoints.")
    actions = checkpoint.add_subparsers(dest="action", metavar="ACTION", required=True)
    _create_parser(actions)
    _page(actions, "ls", help="list the checkpoints in the store",
          description="""
            List the checkpoints pyshim knows of: directories left in the store by `checkpoint create`
            without --export, archives put there, and checkpoint images (--create-image) in containerd's image
            store (namespace --namespace, when containerd answers). One line each: name, container, image, when,
            size.
          """).add_argument("--json", action="store_true", help="print JSON")
    inspect = _page(actions, "inspect", help="show what a checkpoint holds",
                    description="""
                      Show what a checkpoint (archive, directory or a name in the store) holds: the container and its
                      image, the options it was taken with, CRIU's statistics, the process tree, open files, sockets
                      and TCP connections, and the memory dumped. Images are read with CRIU's pycriu.
                    """,
                    epilog="""
                      exit status: 0 shown; 1 not a checkpoint, corrupt, or pycriu missing (`pyshim doctor` says how
                      to install it).
                    """)
    inspect.add_argument("source", metavar="SOURCE", help="archive, directory or name in the store")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    remove = _page(actions, "rm", help="remove checkpoints from the store",
                   description="Remove checkpoints by name: directories or archives from the store, checkpoint images "
                               "from containerd's image store.")
    remove.add_argument("names", metavar="NAME", nargs="+")

    restore = _page(commands, "restore", help="restore a checkpoint into a new container",
                    description="""
                      Restore a checkpoint into a new container on this containerd: from an archive (.tar, .tar.gz,
                      .tar.zst: pyshim's, containerd CRI's, or as far as the format allows Podman's), a checkpoint
                      directory, a name in the store, or a checkpoint image in containerd's image store
                      (`checkpoint create --create-image`). The checkpointed container's image must be in this
                      containerd's image store (import or pull it first); the container's rootfs changes are applied
                      to a new snapshot of it, and pyshim restores the task from CRIU's images, which keeps the
                      options the checkpoint was taken with.
                    """,
                    epilog="""
                      The new container has the checkpointed spec with its cgroup renamed and private namespaces; a
                      network namespace given by path at checkpoint is replaced by --netns (or kept if it exists
                      here), one of its own comes back new. Bind mounts whose source does not exist here get
                      stand-ins under <store>/.mounts/NAME. Nothing is left behind by a restore that fails.

                      exit status: 0 restored and running; 1 otherwise, with the reason on stderr.
                    """)
    restore.add_argument("source", metavar="SOURCE", help="archive, directory, name in the store, or checkpoint image")
    restore.add_argument("--name", required=True, help="the new container's id (must not exist)")
    restore.add_argument("--netns", metavar="PATH",
                         help="restore into this network namespace (e.g. /var/run/netns/X); for a container whose "
                              "namespace was given by path (CNI, pods, ctr run --with-ns)")
    restore.add_argument("--tcp-close", action="store_true",
                         help="close established TCP connections instead of restoring them")
    restore.add_argument("--image", metavar="REF", help="the image to restore on (default: the checkpoint's)")
    restore.add_argument("--snapshotter", default="overlayfs", help="snapshotter (default: %(default)s)")
    restore.add_argument("--runtime-config", metavar="FILE",
                         help="pyshim runtime options (TOML: BinaryName, Root, SystemdCgroup, ...), as ctr's "
                              "--runtime-config-path")
    restore.add_argument("--log", metavar="FILE", help="the restored task's stdout and stderr go to FILE")
    restore.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the restore")

    doctor = _page(commands, "doctor", help="check this host for checkpoint and restore",
                   description="""
                     What pyshim sees on this host: CRIU (version and `criu check`), pycriu, kernel features
                     (userfaultfd, soft-dirty tracking, time namespaces), cgroup mode, iptables and nftables (CRIU's
                     network lock), runc and crun, containerd and how pyshim is registered with it, the host config
                     /etc/pyshim/pyshim.toml. Every problem is named with its fix.
                   """,
                   epilog="""
                     exit status: 0 checkpoint and restore can work (warnings may remain); 1 they cannot.
                   """)
    doctor.add_argument("--json", action="store_true", help="print JSON")
    _migrate_parsers(commands)
    return parser


def _migrate_parsers(commands) -> None:
    from shim.tool.migrate import precopy

    migrate = _page(commands, "migrate", help="move a running container to another host's containerd over ssh",
                    description="""
                      Move a running container (under pyshim) to another host's containerd: checkpoint it here,
                      carry its images, spec and rootfs changes over ssh to the destination's `pyshim`, restore it
                      there under the same id, and only then remove it here. DEST names the destination containerd's
                      socket, reached through ssh as libvirt's qemu+ssh:

                        ssh://[user@]host[:port]/path/of/containerd.sock[?namespace=NS&pyshim=PATH&store=DIR
                                                                         &runtime-config=FILE]

                      The container's image must be in the destination's image store. A container whose network
                      namespace is given by path (CNI, ctr run --with-ns) keeps its established TCP connections and is
                      restored into the destination's namespace of that path (or --dest-netns), which must hold the
                      container's addresses and be used by nobody else (unless --tcp-close). docs/migrate.md says more.
                    """,
                    epilog="""
                      Progress goes to stderr; the report (JSON: mode, container, frozen_ms, blackout_ms, bytes_moved,
                      total_ms, phases) to stdout and, with --report-json, to FILE.

                      exit status: 0 the container runs on the destination and is gone here; 1 it did not move (it
                      runs on here, nothing is left on the destination; the message says if even that failed);
                      2 a usage error, or --pre-copy where CRIU here cannot track dirty memory (nothing done).
                      With --post-copy the container runs on the destination before its memory has moved: a failure
                      after that (the connection lost before the last page) is exit status 1 with the container
                      ended there by its shim and its full images kept here.
                    """)
    migrate.add_argument("container", metavar="CONTAINER")
    migrate.add_argument("dest", metavar="DEST", help="ssh://[user@]host[:port]/path/of/containerd.sock[?namespace=NS]")
    modes = migrate.add_mutually_exclusive_group()
    modes.add_argument("--stop-copy", dest="mode", action="store_const", const="stop-copy",
                       help="dump, move, restore (the default)")
    modes.add_argument("--stream", dest="mode", action="store_const", const="stream",
                       help="send the memory pages to the destination while dumping (CRIU's page server)")
    modes.add_argument("--post-copy", dest="mode", action="store_const", const="post-copy",
                       help="resume on the destination before the memory has moved: pages follow on demand and in "
                            "the background through the same ssh connection")
    modes.add_argument("--pre-copy", dest="pre_copy", type=int, nargs="?", const=precopy.DEFAULT_ROUNDS,
                       metavar="ROUNDS",
                       help="dump the memory ROUNDS times while the container runs (default %(const)s, at most "
                            f"{precopy.MAX_ROUNDS}), each round sent as it is made, then the final dump of what "
                            "changed since; needs the kernel's soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY), refused "
                            "before anything is dumped without it")
    migrate.set_defaults(mode="stop-copy")
    migrate.add_argument("--tcp-close", action="store_true",
                         help="close established TCP connections on the destination instead of keeping them")
    migrate.add_argument("--dest-netns", metavar="PATH",
                         help="the destination's network namespace for a container whose namespace is given by path "
                              "(default: the same path)")
    migrate.add_argument("--ssh-option", metavar="OPT", action="append", default=[],
                         help="an ssh_config setting for the connection, as Keyword=value (passed to ssh as -o), e.g. "
                              "IdentityFile=/root/.ssh/migrate; repeatable")
    migrate.add_argument("--bandwidth", type=float, default=0.0, metavar="MIB",
                         help="--post-copy: send the pages at most MIB MiB/s (as virsh migrate --bandwidth; default: "
                              "as fast as the connection goes)")
    migrate.add_argument("--report-json", metavar="FILE", help="also write the report to FILE")
    migrate.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                         help="give up (and roll back) after this long (default: %(default)g)")
    # The destination's side, run there by ssh: not for people (no help line, so not listed).
    receive = commands.add_parser("migrate-receive", formatter_class=_formatter)
    receive.add_argument("--runtime-config", metavar="FILE")
    receive.add_argument("--forced", action="store_true")  # an ssh key's forced command (shim.tool.migrate.restricted)


def _create_parser(actions) -> None:
    from shim.tool import options

    create = _page(actions, "create", help="checkpoint a running container",
                   description="""
                     Checkpoint the task of a running container (under pyshim) with CRIU. Without --export or
                     --create-image the checkpoint is kept as a directory in the store (see `checkpoint ls`); with
                     --create-image, as an OCI image in containerd's image store; with --export, as one archive
                     in the layout containerd's CRI and Podman write, which checkpointctl reads:
                     checkpoint/ (CRIU's images), config.dump, spec.dump, status.dump, rootfs-diff.tar (the
                     container's changes to its image), stats-dump and dump.log.

                     Every `runc checkpoint` option and pyshim's own is a flag; they travel to the shim in the
                     Checkpoint request and win over the container's io.pyshim.checkpoint.* annotations and the host
                     file /etc/pyshim/pyshim.toml (docs/checkpoint.md).
                   """,
                   epilog="""
                     The task stops after the checkpoint unless --leave-running (as Podman). Nothing half-written is
                     left where the checkpoint is expected: it is assembled under a hidden name and renamed at the
                     end. The paths and image names written are printed on stdout, one a line.

                     exit status: 0 checkpointed; 1 otherwise, with the reason and what became of the task
                     (left as it was, unless it died during the dump: the message then says so).
                   """)
    create.add_argument("container", metavar="CONTAINER")
    mode = create.add_mutually_exclusive_group()
    mode.add_argument("--leave-running", "-R", action="store_true", help="keep the task running after the checkpoint")
    mode.add_argument("--exit", action="store_true", help="stop the task after the checkpoint (the default)")
    create.add_argument("--export", "-e", metavar="FILE",
                        help="write one archive: FILE ends in .tar, .tar.gz or .tar.zst (the compression)")
    create.add_argument("--create-image", metavar="NAME",
                        help="also (or instead of the store) write the checkpoint as an OCI image NAME in containerd's "
                             "image store, which `ctr images export/import` or a registry move, and `pyshim restore "
                             "NAME` restores")
    create.add_argument("--name", help="the checkpoint's name in the store (default: CONTAINER-<time>)")
    create.add_argument("--ignore-rootfs", action="store_true", help="leave out the container's rootfs changes")
    create.add_argument("--print-stats", action="store_true",
                        help="print CRIU's statistics (times in microseconds, pages) as JSON, as Podman does")
    options.add_flags(create)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "checkpoint" and args.action == "create":
        args.exit = not args.leave_running
    try:
        return _dispatch(args)
    except ToolError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2 if type(exc).__name__ == "UsageRefusal" else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pyshim ... | head`: the reader has gone, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(args) -> int:
    if args.command == "migrate-receive":
        from shim.tool.migrate import receiver

        return receiver.receive(args)
    if args.command == "doctor":
        from shim.tool import doctor

        return doctor.run(args)
    if args.command == "checkpoint" and args.action in ("ls", "inspect", "rm"):
        from shim.tool import listing

        return getattr(listing, {"ls": "list_store", "inspect": "inspect", "rm": "remove"}[args.action])(args)
    if args.command == "migrate":
        from shim.tool.migrate import source

        source.check_mode(args)  # before containerd is asked anything
    client = _client(args)
    try:
        # (imported only now: these need grpcio, whose absence _client has reported)
        if args.command == "restore":
            from shim.tool import restore

            return restore.restore(args, client)
        if args.command == "migrate":
            from shim.tool.migrate import source

            return source.migrate(args, client)
        from shim.tool import checkpoint

        return checkpoint.create(args, client)
    finally:
        client.close()


def _client(args):
    try:
        from shim.tool.containerd_api import ContainerdClient
    except ImportError as exc:
        raise ToolError(f"the pyshim command needs grpcio ({exc}): pip install 'pyshim[tool]'") from None
    if not os.path.exists(args.address):
        raise ToolError(f"containerd's socket {args.address} does not exist: is containerd running? "
                        "(give its socket with --address or CONTAINERD_ADDRESS)")
    return ContainerdClient(args.address, args.namespace, lease_prefix="pyshim")


if __name__ == "__main__":
    sys.exit(main())

"""The Checkpoint request's Options the `pyshim` command sends: containerd's CheckpointOptions with pyshim's extension
in the same bytes, read back by the shim (shim.task.convert.checkpoint_options) with the extension winning."""

from __future__ import annotations

import pytest

from shim import errors
from shim.api.containerd.runc.options import oci_pb2
from shim.api.containerd.task.v2 import shim_pb2
from shim.task.convert import checkpoint_options
from shim.tool.__main__ import build_parser
from shim.tool.options import request_options


def parse(*flags: str):
    args = build_parser().parse_args(["checkpoint", "create", "c1", *flags])
    args.exit = not args.leave_running
    return args


def shim_reads(tmp_path, flags, annotations=None):
    from shim.tool.options import chosen

    request = shim_pb2.CheckpointTaskRequest(id="c1", path="/ignored")
    request.options.CopyFrom(request_options(chosen(parse(*flags)), "/images/c1"))
    return checkpoint_options(request, annotations or {}), request


def test_containerd_sees_a_checkpoint_options_message_with_the_image_path(tmp_path):
    _, request = shim_reads(tmp_path, ["--tcp-established", "--file-locks"])
    assert request.options.type_url == "containerd.runc.v1.CheckpointOptions"
    seen = oci_pb2.CheckpointOptions.FromString(request.options.value)  # what containerd 2.x decodes
    assert (seen.image_path, seen.exit, seen.open_tcp, seen.file_locks) == ("/images/c1", True, True, True)


def test_the_shim_reads_every_flag_including_pyshims_own(tmp_path):
    options, _ = shim_reads(tmp_path, ["--leave-running", "--tcp-established", "--tcp-skip-in-flight",
                                       "--link-remap", "--network-lock", "nftables", "--criu-timeout", "30",
                                       "--engine", "runc", "--manage-cgroups-mode", "soft", "--empty-ns", "network"])
    assert options.leave_running and options.tcp_established and options.tcp_skip_in_flight and options.link_remap
    assert (options.network_lock, options.timeout, options.engine) == ("nftables", 30.0, "runc")
    assert (options.manage_cgroups_mode, options.empty_ns, options.image_path) == ("soft", ("network",), "/images/c1")


def test_flags_win_over_annotations_both_ways(tmp_path):
    annotations = {"io.pyshim.checkpoint.leave-running": "false", "io.pyshim.checkpoint.network-lock": "skip"}
    options, _ = shim_reads(tmp_path, ["--leave-running", "--network-lock", "iptables"], annotations)
    assert options.leave_running and options.network_lock == "iptables"
    options, _ = shim_reads(tmp_path, [], {"io.pyshim.checkpoint.leave-running": "true"})
    assert not options.leave_running  # the command's default is --exit, as Podman's


def test_a_bad_value_is_the_shims_invalid_argument(tmp_path):
    with pytest.raises(errors.InvalidArgument, match="network-lock 'bogus'"):
        shim_reads(tmp_path, ["--network-lock", "bogus"])


def test_leave_running_and_exit_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["checkpoint", "create", "c1", "--leave-running", "--exit"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["checkpoint"], ["checkpoint", "create"], ["checkpoint", "ls"],
                                     ["checkpoint", "inspect"], ["checkpoint", "rm"], ["restore"], ["doctor"]])
def test_every_command_has_a_manual_page(command, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--help"])
    assert exited.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith("usage: pyshim") and len(page.splitlines()) > 5

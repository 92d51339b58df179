"""`pyshim migrate-receive --forced`: a restricted ssh key's forced command serves only requests within its own
settings (shim.tool.migrate.restricted), whatever the source's command line asks."""

import shlex

import pytest

from shim.tool.__main__ import build_parser
from shim.tool.migrate import restricted, transport
from shim.tool.migrate.dest import parse as parse_dest

SOCKET = "/run/containerd/containerd.sock"


def forced(*extra: str):
    return build_parser().parse_args(["--address", SOCKET, "--namespace", "prod", *extra, "migrate-receive",
                                      "--forced"])


def source_command(dest: str) -> str:
    """What the source's ssh asks the destination to run for DEST (sshd's SSH_ORIGINAL_COMMAND)."""
    return shlex.join(transport.remote_command(parse_dest(dest, default_namespace="default")))


def refusal(forced_args, original):
    return restricted.refusal(forced_args, original, build_parser().parse_args)


def test_a_request_within_the_key_s_settings_is_served():
    assert refusal(forced(), source_command(f"ssh://root@b{SOCKET}?namespace=prod")) is None
    with_store = forced("--store", "/srv/ckpt")
    assert refusal(with_store, source_command(f"ssh://root@b{SOCKET}?namespace=prod&store=/srv/ckpt")) is None
    assert refusal(with_store, source_command(f"ssh://root@b{SOCKET}?namespace=prod")) is None  # the key's store


@pytest.mark.parametrize("dest, named", [
    (f"ssh://root@b{SOCKET}?namespace=default", "namespace 'default'"),
    ("ssh://root@b/run/other/containerd.sock?namespace=prod", "socket '/run/other/containerd.sock'"),
    (f"ssh://root@b{SOCKET}?namespace=prod&store=/tmp/elsewhere", "store '/tmp/elsewhere'"),
    (f"ssh://root@b{SOCKET}?namespace=prod&runtime-config=/etc/x.toml", "runtime-config '/etc/x.toml'"),
])
def test_a_request_outside_the_key_s_settings_is_refused_naming_both(dest, named):
    said = refusal(forced(), source_command(dest))
    assert said is not None and named in said
    assert f"only migrates into containerd {SOCKET}, namespace prod" in said


@pytest.mark.parametrize("original", ["bash -i", "pyshim checkpoint rm --all", "pyshim --bogus migrate-receive",
                                      "pyshim 'unterminated"])
def test_anything_but_migrate_receive_is_refused(original):
    said = refusal(forced(), original)
    assert said is not None and said.startswith("this ssh key only runs `pyshim migrate-receive`")


def test_without_sshd_s_original_command_it_is_refused():
    said = refusal(forced(), None)
    assert said is not None and "SSH_ORIGINAL_COMMAND" in said

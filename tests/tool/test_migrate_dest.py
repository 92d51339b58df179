"""DEST of pyshim migrate and the ssh command line it becomes."""

from __future__ import annotations

import shlex

import pytest

from shim.tool.errors import ToolError
from shim.tool.migrate import dest as dest_module
from shim.tool.migrate import transport
from shim.tool.migrate.dest import Destination, parse


def test_a_full_destination():
    got = parse("ssh://admin@host-b:2222/run/containerd/containerd.sock?namespace=k8s.io&pyshim=/opt/pyshim/bin/pyshim"
                "&store=/var/lib/pyshim/migrations&runtime-config=/etc/pyshim/runc.toml", default_namespace="default")
    assert got == Destination(host="host-b", socket="/run/containerd/containerd.sock", namespace="k8s.io",
                              user="admin", port=2222, pyshim="/opt/pyshim/bin/pyshim",
                              store="/var/lib/pyshim/migrations", runtime_config="/etc/pyshim/runc.toml")


def test_defaults_namespace_from_the_source_and_pyshim_from_the_path():
    got = parse("ssh://10.0.0.2/run/containerd/containerd.sock", default_namespace="prod")
    assert (got.host, got.user, got.port, got.namespace, got.pyshim, got.store) == ("10.0.0.2", "", None, "prod",
                                                                                    "pyshim", "")
    assert parse("ssh://[fd00::2]:22/c.sock", default_namespace="d").host == "fd00::2"


@pytest.mark.parametrize("text, why", [
    ("tcp://host/run/containerd.sock", "the scheme must be ssh"),
    ("/run/containerd/containerd.sock", "the scheme must be ssh"),
    ("ssh:///run/containerd.sock", "no host"),
    ("ssh://-oProxyCommand=evil/run/containerd.sock", "no host"),
    ("ssh://host", "absolute path"),
    ("ssh://host/", "absolute path"),
    ("ssh://host/run/../x.sock", "absolute path"),
    ("ssh://host:0/c.sock", "port"),
    ("ssh://host:99999/c.sock", "port"),
    ("ssh://root:secret@host/c.sock", "password"),
    ("ssh://-l@host/c.sock", "not a user name"),
    ("ssh://host/c.sock?nmespace=x", "unknown parameter 'nmespace'"),
    ("ssh://host/c.sock?namespace=", "exactly one non-empty value"),
    ("ssh://host/c.sock?namespace=a&namespace=b", "exactly one"),
    ("ssh://host/c.sock?namespace=bad/ns", "not a containerd namespace"),
    ("ssh://host/c.sock?store=relative/dir", "absolute path on the destination"),
    ("ssh://host/c.sock#frag", "fragment"),
])
def test_wrong_destinations_are_refused_with_the_reason(text, why):
    with pytest.raises(ToolError, match="expected ssh://") as caught:
        parse(text, default_namespace="default")
    assert why in str(caught.value)


def test_the_ssh_command_line_quotes_the_remote_command_and_takes_only_config_options():
    destination = parse("ssh://root@host-b:2200/run/my containerd.sock?store=/srv/x&runtime-config=/etc/r.toml",
                        default_namespace="default")
    argv = transport.ssh_argv(destination, ["IdentityFile=/root/.ssh/migrate", "UserKnownHostsFile /etc/kh"],
                              connect_timeout=30)
    assert argv[0] == "ssh" and "BatchMode=yes" in argv and "ClearAllForwardings=yes" in argv
    assert argv[argv.index("-p") + 1] == "2200" and argv[argv.index("-l") + 1] == "root"
    assert argv[-3:-1] == ["--", "host-b"]
    assert shlex.split(argv[-1]) == ["pyshim", "--address", "/run/my containerd.sock", "--namespace", "default",
                                     "--store", "/srv/x", "migrate-receive", "--runtime-config", "/etc/r.toml"]
    # ssh's first value for a keyword wins: the fixed ones come before the user's
    assert argv.index("BatchMode=yes") < argv.index("IdentityFile=/root/.ssh/migrate")
    for bad in ("-i", "-oProxyCommand=x", "", "Identity File=x\nProxyCommand=y"):
        with pytest.raises(ToolError, match="ssh_config setting"):
            transport.check_ssh_option(bad)


def test_display_names_where_it_goes():
    assert parse("ssh://u@h:2/c.sock", default_namespace="n").display() == "ssh://u@h:2/c.sock (namespace n)"
    assert dest_module.EXAMPLE.startswith("ssh://")

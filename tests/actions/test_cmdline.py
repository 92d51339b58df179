import pytest

from shim.actions.cmdline import UsageError, parse


def test_start_command_line_as_containerd_sends_it():
    args = parse(["-namespace", "default", "-address", "/run/containerd/containerd.sock",
                  "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-debug", "start"])
    assert (args.namespace, args.address, args.publish_binary, args.id) == (
        "default", "/run/containerd/containerd.sock", "/usr/bin/containerd", "c1")
    assert args.debug and args.action == "start"


def test_equals_form_double_dash_and_explicit_boolean():
    args = parse(["--namespace=k8s.io", "-bundle=/b", "-debug=false", "-id", "x", "delete"])
    assert (args.namespace, args.bundle, args.debug, args.action) == ("k8s.io", "/b", False, "delete")


def test_version_and_info_flags_without_action():
    assert parse(["-v"]).version
    assert parse(["-info"]).info and parse(["-info"]).action == ""


def test_parsing_stops_at_the_action():
    args = parse(["-id", "a", "delete", "-id", "b"])
    assert args.id == "a" and args.rest == ["-id", "b"]


@pytest.mark.parametrize("argv", [["-bogus", "start"], ["-id"], ["-debug=maybe"]])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(UsageError):
        parse(argv)

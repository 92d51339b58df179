"""shim.bundle.config: config.json read once into a Bundle, with one failure policy, and the bundle's one writer."""

import json
import os

import pytest

from shim.bundle.config import Bundle
from shim.errors import InvalidArgument


def write(bundle, text: str) -> None:
    (bundle / "config.json").write_text(text)


@pytest.mark.parametrize("content,why", [
    (None, "cannot read config.json: No such file or directory"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
])
def test_an_unreadable_config_is_refused_naming_the_file_and_why(tmp_path, content, why):
    if content is not None:
        write(tmp_path, content)
    with pytest.raises(InvalidArgument, match=why) as refused:
        Bundle.read(str(tmp_path))
    assert str(tmp_path) in str(refused.value)


def test_optional_parts_read_as_empty_and_given_ones_as_written(tmp_path):
    write(tmp_path, "{}")
    bare = Bundle.read(str(tmp_path))
    assert (bare.annotations, bare.namespaces, bare.cgroups_path) == ({}, [], "")
    assert bare.root == os.path.realpath(tmp_path / "rootfs")
    assert not bare.has_own_namespace("pid")  # no pid namespace: the host's

    write(tmp_path, json.dumps({"annotations": {"a": "b"}, "root": {"path": "/srv/root"}, "linux": {
        "cgroupsPath": "/k8s/c1", "namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/n"}]}}))
    full = Bundle.read(str(tmp_path))
    assert (full.annotations, full.cgroups_path, full.root) == ({"a": "b"}, "/k8s/c1", "/srv/root")
    assert full.has_own_namespace("pid") and not full.has_own_namespace("network")
    assert full.namespace_path("network") == "/run/netns/n" and full.namespace_path("pid") == ""
    assert (full.rootfs, full.init_pid_file, full.exec_pid_file("e1")) == (
        str(tmp_path / "rootfs"), str(tmp_path / "init.pid"), str(tmp_path / "e1.pid"))


def test_the_criu_config_written_for_a_restore_changes_only_that_annotation(tmp_path):
    config = {"ociVersion": "1.0.2", "annotations": {"keep": "me"}, "process": {"args": ["sh"]}}
    write(tmp_path, json.dumps(config))
    before = Bundle.read(str(tmp_path))
    after = before.with_criu_config("/work/pyshim-criu.conf")
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == {**config, "annotations": {"keep": "me", "org.criu.config": "/work/pyshim-criu.conf"}}
    assert after.config == on_disk and Bundle.read(str(tmp_path)).config == on_disk
    assert before.annotations == {"keep": "me"}  # a value: the old one is unchanged
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # written atomically, no temporary left

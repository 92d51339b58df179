"""shim.cgroups.runc_path: the container's cgroup v2 path as runc makes it from cgroupsPath."""

from __future__ import annotations

import pytest

from shim.cgroups.runc_path import container_cgroup_v2, expand_slice


@pytest.mark.parametrize(("cgroups_path", "own", "expected"), [
    ("/pyshim-it-1/c1", "/", "/pyshim-it-1/c1"),  # ctr: /<namespace>/<id>, from the hierarchy's root
    ("/k8s.io/c1", "/system.slice/containerd.service", "/k8s.io/c1"),
    ("pods/c1", "/shims", "/shims/pods/c1"),  # relative: below runc's (the shim's) own cgroup
    ("system.slice:cri-containerd:c1", "/", "/system.slice/cri-containerd-c1.scope"),
    ("kubepods-besteffort-pod12.slice:cri-containerd:c1", "/",
     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-c1.scope"),
    (":cri-containerd:c1", "/", "/system.slice/cri-containerd-c1.scope"),  # runc's default slice
    ("-.slice:docker:c1", "/", "/docker-c1.scope"),
    ("system.slice::c1", "/", "/system.slice/c1.scope"),
])
def test_container_cgroup_v2(cgroups_path, own, expected):
    assert container_cgroup_v2(cgroups_path, own) == expected


@pytest.mark.parametrize("bad", ["", "a-.slice:p:c1", "notaslice:p:c1", "a/b.slice:p:c1"])
def test_paths_runc_would_refuse_are_errors(bad):
    with pytest.raises(ValueError):
        container_cgroup_v2(bad, "/")


def test_expand_slice():
    assert expand_slice("-.slice") == "/"
    assert expand_slice("a-b-c.slice") == "/a.slice/a-b.slice/a-b-c.slice"

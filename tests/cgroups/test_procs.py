import pytest

from shim.cgroups import CgroupNotFound, join
from tests.cgroups.fake import v1_tree, v2_tree, write_tree


def test_v2_join(tmp_path):
    root, _ = v2_tree(tmp_path)
    write_tree(root / "shims", {"cgroup.procs": ""})
    assert join("/shims", 77, root=root) == [root / "shims"]
    assert (root / "shims" / "cgroup.procs").read_text() == "77"


def test_v1_join_every_hierarchy_once(tmp_path):
    root, _ = v1_tree(tmp_path)
    for hierarchy in ("memory", "cpu,cpuacct", "pids"):
        write_tree(root / hierarchy / "shims", {"cgroup.procs": ""})
    joined = join("shims", 77, root=root)
    # cpu and cpuacct are symlinks to cpu,cpuacct: one write there, not three
    assert sorted(p.parent.resolve().name for p in joined) == ["cpu,cpuacct", "memory", "pids"]
    assert (root / "cpu,cpuacct" / "shims" / "cgroup.procs").read_text() == "77"


def test_missing_cgroup(tmp_path):
    root, _ = v2_tree(tmp_path)
    with pytest.raises(CgroupNotFound):
        join("/nope", 77, root=root)


def _mountinfo(lines: list[tuple[str, str, str, str]]) -> str:
    """mountinfo lines for (root, mount point, fstype, super options)."""
    return "".join(f"{30 + i} 20 0:{40 + i} {root} {point} rw,nosuid - {fstype} cgroup {options}\n"
                   for i, (root, point, fstype, options) in enumerate(lines))


def test_join_like_moves_into_the_source_cgroups_hierarchy_by_hierarchy(tmp_path):
    from shim.cgroups.procs import join_like

    base = tmp_path / "sys"
    service = "system.slice/containerd.service"
    for hierarchy, path in (("memory", service), ("pids", service), ("systemd", service), ("unified", service),
                            ("cpu,cpuacct", "")):
        write_tree(base / hierarchy / path, {"cgroup.procs": ""})
    decoy = tmp_path / "criu-yard" / "memory"  # another mount of the memory hierarchy
    write_tree(decoy / "system.slice" / "containerd.service", {"cgroup.procs": ""})
    proc = tmp_path / "proc"
    write_tree(proc, {
        "10/cgroup": "5:memory:/system.slice/containerd.service\n4:pids:/system.slice/containerd.service\n"
                     "3:cpu,cpuacct:/\n1:name=systemd:/system.slice/containerd.service\n"
                     "0::/system.slice/containerd.service\n",
        "77/cgroup": "5:memory:/pyshim\n4:pids:/pyshim\n3:cpu,cpuacct:/\n1:name=systemd:/pyshim\n0::/pyshim\n",
        "self/mountinfo": _mountinfo([
            ("/", str(decoy), "cgroup", "rw,memory"),
            ("/", str(base / "memory"), "cgroup", "rw,memory"),
            ("/", str(base / "pids"), "cgroup", "rw,pids"),
            ("/", str(base / "cpu,cpuacct"), "cgroup", "rw,cpu,cpuacct"),
            ("/", str(base / "systemd"), "cgroup", "rw,xattr,name=systemd"),
            ("/", str(base / "unified"), "cgroup2", "rw,nsdelegate"),
        ]),
    })
    assert join_like(10, 77, proc=proc, prefer=base) == []
    for hierarchy in ("memory", "pids", "systemd", "unified"):
        assert (base / hierarchy / "system.slice/containerd.service/cgroup.procs").read_text() == "77"
    assert (base / "cpu,cpuacct" / "cgroup.procs").read_text() == ""  # already the same: not written
    assert (decoy / "system.slice/containerd.service/cgroup.procs").read_text() == ""


def test_join_like_on_v2_with_a_bind_mounted_subtree_and_what_it_cannot_do(tmp_path):
    from shim.cgroups.procs import join_like

    base = tmp_path / "cg"
    write_tree(base / "shims", {"cgroup.procs": ""})
    proc = tmp_path / "proc"
    # cgroupfs mounted from /kubepods/pod1 (a shim in a container without a cgroup namespace).
    write_tree(proc, {"10/cgroup": "0::/kubepods/pod1/shims\n", "77/cgroup": "0::/kubepods/pod1\n",
                      "self/mountinfo": _mountinfo([("/kubepods/pod1", str(base), "cgroup2", "rw")])})
    assert join_like(10, 77, proc=proc, prefer=base) == []
    assert (base / "shims" / "cgroup.procs").read_text() == "77"
    (proc / "10" / "cgroup").write_text("0::/elsewhere/x\n")
    assert join_like(10, 77, proc=proc, prefer=base) == ["no mount of cgroup hierarchy 0: holds /elsewhere/x"]
    assert join_like(11, 77, proc=proc, prefer=base) == ["cgroups of process 11 unreadable"]

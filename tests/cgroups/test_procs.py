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

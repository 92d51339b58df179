import pytest

from shim.cgroups.locate import CgroupNotFound, Mode, V1Cgroup, V2Cgroup, detect_mode, find_cgroup
from tests.cgroups.fake import CONTAINER, PID, fake_proc, v1_tree, v2_tree, write_tree


def test_detect_mode(tmp_path):
    v1_root, _ = v1_tree(tmp_path / "a")
    v2_root, _ = v2_tree(tmp_path / "b")
    assert detect_mode(v1_root) is Mode.V1  # hybrid: has "unified" but controllers are v1
    assert detect_mode(v2_root) is Mode.V2


def test_v1_directories_per_controller(tmp_path):
    root, proc = v1_tree(tmp_path)
    cgroup = find_cgroup(PID, root=root, proc=proc)
    assert isinstance(cgroup, V1Cgroup)
    assert set(cgroup.controllers) == {"pids", "cpu", "cpuacct", "memory", "blkio", "hugetlb"}
    assert cgroup.path("memory") == root / "memory" / CONTAINER.lstrip("/")
    assert cgroup.path("cpu") == root / "cpu" / CONTAINER.lstrip("/")


def test_v1_comounted_without_symlinks(tmp_path):
    root, proc = v1_tree(tmp_path)
    (root / "cpu").unlink()
    (root / "cpuacct").unlink()
    cgroup = find_cgroup(PID, root=root, proc=proc)
    assert cgroup.path("cpuacct") == root / "cpu,cpuacct" / CONTAINER.lstrip("/")


def test_v1_mount_root_is_stripped(tmp_path):
    # cgroupfs mounted from a subtree: /proc/<pid>/cgroup shows /outer/default/c1, while
    # <root>/memory is the /outer subtree.
    root = tmp_path / "cgroup"
    (root / "memory" / "default" / "c1").mkdir(parents=True)
    proc = fake_proc(tmp_path, "9:memory:/outer/default/c1\n")
    write_tree(proc, {"self/mountinfo": f"35 31 0:32 /outer {root / 'memory'} rw - cgroup cgroup rw,memory\n"})
    assert find_cgroup(PID, root=root, proc=proc).path("memory") == root / "memory" / "default" / "c1"


def test_v2_directory(tmp_path):
    root, proc = v2_tree(tmp_path)
    assert find_cgroup(PID, root=root, proc=proc) == V2Cgroup(root / CONTAINER.lstrip("/"))


def test_exited_process_is_not_found(tmp_path):
    root, proc = v2_tree(tmp_path)
    with pytest.raises(CgroupNotFound):
        find_cgroup(PID + 1, root=root, proc=proc)


def test_removed_cgroup_is_not_found(tmp_path):
    root, proc = v2_tree(tmp_path, files={})  # /proc says /default/c1, which does not exist
    with pytest.raises(CgroupNotFound):
        find_cgroup(PID, root=root, proc=proc)
    v1_root, v1_proc = v1_tree(tmp_path / "v1")
    write_tree(v1_proc, {f"{PID}/cgroup": "9:memory:/elsewhere\n"})
    with pytest.raises(CgroupNotFound):
        find_cgroup(PID, root=v1_root, proc=v1_proc)


def test_not_found_is_a_lookup_error():
    assert issubclass(CgroupNotFound, LookupError)

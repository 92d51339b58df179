import pytest

from shim.cgroups.parse import (
    UINT32_MAX,
    UINT64_MAX,
    BlkioLine,
    Pressure,
    hugepage_sizes,
    parse_blkio,
    parse_flat_keyed,
    parse_io_stat,
    parse_limit,
    parse_mountinfo_cgroups,
    parse_nested_keyed,
    parse_partitions,
    parse_pressure,
    parse_proc_cgroup,
    parse_rdma,
    parse_uint,
    parse_uint_list,
)


def test_single_values():
    assert parse_uint("42\n") == 42
    assert parse_uint("-1\n") == 0  # v1 reports some unset values as -1
    assert parse_uint(str(2**70)) == UINT64_MAX
    with pytest.raises(ValueError):
        parse_uint("max")


def test_limits():
    assert parse_limit("max\n", UINT64_MAX) == UINT64_MAX
    assert parse_limit("max\n", 0) == 0
    assert parse_limit("1048576\n", UINT64_MAX) == 1048576


def test_per_cpu_list():
    assert parse_uint_list("100 200 0 3 \n") == [100, 200, 0, 3]
    assert parse_uint_list("\n") == []


def test_flat_keyed_skips_malformed_lines():
    text = "anon 8192\nfile 4096\n\ngarbage\nbad value\nthree fields here\nnegative -5\n"
    assert parse_flat_keyed(text) == {"anon": 8192, "file": 4096, "negative": 0}


def test_nested_keyed():
    text = "8:0 rbytes=1 wbytes=2\n\nlonely\n254:0 rbytes=3 junk\n"
    assert parse_nested_keyed(text) == {"8:0": {"rbytes": "1", "wbytes": "2"}, "254:0": {"rbytes": "3"}}


def test_io_stat():
    devices = parse_io_stat("8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\nnotadevice rbytes=1\n")
    assert len(devices) == 1
    assert (devices[0].major, devices[0].minor) == (8, 0)
    assert devices[0].counters == {"rbytes": 4096, "wbytes": 8192, "rios": 1, "wios": 2, "dbytes": 0, "dios": 0}


def test_pressure():
    text = "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"
    assert parse_pressure(text) == {"some": Pressure(1.5, 0.25, 0.0, 12345), "full": Pressure(0.0, 0.0, 0.0, 7)}
    assert parse_pressure("some avg10=1.0\n") == {}  # incomplete line skipped


def test_blkio_lines():
    text = "8:0 Read 4096\n8:0 Write 8192\n8:16 Total 1\nTotal 12288\n"
    assert parse_blkio(text) == [BlkioLine(8, 0, "Read", 4096), BlkioLine(8, 0, "Write", 8192),
                                 BlkioLine(8, 16, "Total", 1)]
    # sectors_recursive and time_recursive have no op column
    assert parse_blkio("8:0 1024\n") == [BlkioLine(8, 0, "", 1024)]
    assert parse_blkio("Total 0\n") == []


def test_rdma():
    lines = parse_rdma("mlx4_0 hca_handle=2 hca_object=max\nmlx5_1 hca_object=7\n")
    assert [(r.device, r.hca_handles, r.hca_objects) for r in lines] == [("mlx4_0", 2, UINT32_MAX), ("mlx5_1", 0, 7)]


def test_proc_cgroup():
    text = "12:hugetlb:/a\n4:cpu,cpuacct:/a/b\n1:name=systemd:/with:colon\n0::/\n"
    entries = parse_proc_cgroup(text)
    assert [(e.hierarchy, e.controllers, e.path) for e in entries] == [
        (12, ("hugetlb",), "/a"),
        (4, ("cpu", "cpuacct"), "/a/b"),
        (1, ("name=systemd",), "/with:colon"),
        (0, (), "/"),
    ]


def test_mountinfo_cgroups():
    text = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:1 - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n"
    )
    mounts = parse_mountinfo_cgroups(text)
    assert [(m.root, m.mount_point, m.fstype) for m in mounts] == [
        ("/docker/abc", "/sys/fs/cgroup/cpu,cpuacct", "cgroup"),
        ("/", "/sys/fs/cgroup/uni fied", "cgroup2"),
    ]
    assert "cpuacct" in mounts[0].super_options


def test_partitions():
    text = "major minor  #blocks  name\n\n   8        0  500 sda\n   8        1  5 sda1\n 254 0 9 vda\n"
    assert parse_partitions(text) == {(8, 0): "sda", (8, 1): "sda1", (254, 0): "vda"}


def test_hugepage_sizes():
    names = ["hugetlb.1GB.current", "hugetlb.2MB.current", "hugetlb.2MB.rsvd.current", "hugetlb.64KB.current",
             "hugetlb.2MB.max", "memory.current"]
    assert hugepage_sizes(names, "current") == ["64KB", "2MB", "1GB"]

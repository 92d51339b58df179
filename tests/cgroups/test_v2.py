from shim.cgroups.locate import V2Cgroup, find_cgroup
from shim.cgroups.parse import UINT32_MAX, UINT64_MAX
from shim.cgroups.v2 import MEMORY_STAT_FIELDS, v2_metrics
from tests.cgroups.fake import PID, v2_tree


def metrics(tmp_path, files=None):
    root, proc = v2_tree(tmp_path, files)
    return v2_metrics(find_cgroup(PID, root=root, proc=proc))


def test_pids(tmp_path):
    m = metrics(tmp_path)
    assert (m.pids.current, m.pids.limit) == (5, UINT64_MAX)  # "max" is 2^64-1 on v2


def test_cpu(tmp_path):
    cpu = metrics(tmp_path).cpu
    assert (cpu.usage_usec, cpu.user_usec, cpu.system_usec) == (2000, 1500, 500)
    assert (cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec, cpu.nr_bursts, cpu.burst_usec) == (7, 3, 900, 1, 10)
    assert cpu.psi.some.avg10 == 1.5 and cpu.psi.some.total == 12345 and cpu.psi.full.total == 7


def test_memory(tmp_path):
    memory = metrics(tmp_path).memory
    assert (memory.anon, memory.file, memory.kernel_stack, memory.slab) == (8192, 4096, 16384, 300)
    assert (memory.pgfault, memory.pgmajfault, memory.slab_unreclaimable) == (400, 3, 200)
    assert (memory.usage, memory.usage_limit, memory.max_usage) == (16384, UINT64_MAX, 65536)
    assert (memory.swap_usage, memory.swap_limit, memory.swap_max_usage) == (0, 1048576, 0)
    assert memory.HasField("psi")


def test_memory_stat_fields_are_the_proto_fields_1_to_31(tmp_path):
    by_number = {f.number: f.name for f in metrics(tmp_path).memory.DESCRIPTOR.fields}
    assert list(MEMORY_STAT_FIELDS) == [by_number[n] for n in range(1, 32)]


def test_memory_events(tmp_path):
    events = metrics(tmp_path).memory_events
    assert (events.low, events.high, events.max, events.oom, events.oom_kill) == (0, 0, 2, 1, 1)


def test_io(tmp_path):
    io = metrics(tmp_path).io
    assert [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in io.usage] == [
        (8, 0, 4096, 8192, 1, 2),
        (254, 0, 1, 0, 1, 0),
    ]
    assert (io.psi.some.total, io.psi.full.total) == (55, 44)


def test_hugetlb_ignores_reserved_counters(tmp_path):
    hugetlb = metrics(tmp_path).hugetlb
    assert [(h.pagesize, h.current, h.max) for h in hugetlb] == [("2MB", 2097152, UINT64_MAX), ("1GB", 0, 0)]


def test_rdma(tmp_path):
    rdma = metrics(tmp_path).rdma
    assert [(r.device, r.hca_handles, r.hca_objects) for r in rdma.current] == [("mlx4_0", 2, 20)]
    assert [(r.device, r.hca_handles, r.hca_objects) for r in rdma.limit] == [("mlx4_0", UINT32_MAX, 100)]


def test_controllers_not_enabled_are_skipped(tmp_path):
    # A cgroup with only the core files and cpu.stat (always present on v2).
    m = metrics(tmp_path, {"cgroup.events": "populated 1\n", "cpu.stat": "usage_usec 9\n"})
    assert m.cpu.usage_usec == 9
    for part in ("pids", "memory", "memory_events", "io", "rdma"):
        assert not m.HasField(part), part
    assert not m.hugetlb


def test_empty_directory_gives_empty_metrics(tmp_path):
    (tmp_path / "cg").mkdir()
    assert v2_metrics(V2Cgroup(tmp_path / "cg")).SerializeToString() == b""

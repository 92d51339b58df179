from shim.cgroups.locate import V1Cgroup, find_cgroup
from shim.cgroups.v1 import MEMORY_STAT_FIELDS, v1_metrics
from tests.cgroups.fake import PID, v1_tree


def metrics(tmp_path):
    root, proc = v1_tree(tmp_path)
    return v1_metrics(find_cgroup(PID, root=root, proc=proc), proc=proc, clock_ticks=100)


def test_pids(tmp_path):
    m = metrics(tmp_path)
    assert (m.pids.current, m.pids.limit) == (3, 0)  # "max" is 0 on v1


def test_cpu(tmp_path):
    cpu = metrics(tmp_path).cpu
    usage = cpu.usage
    assert usage.total == 123456789
    assert usage.user == 2_500_000_000 and usage.kernel == 500_000_000  # ticks at 100 Hz -> ns
    assert list(usage.per_cpu) == [100000000, 23456789, 0, 0]
    throttling = cpu.throttling
    assert (throttling.periods, throttling.throttled_periods, throttling.throttled_time) == (10, 2, 5000)


def test_memory(tmp_path):
    memory = metrics(tmp_path).memory
    assert memory.cache == 4096 and memory.rss == 8192 and memory.pg_pg_in == 77 and memory.pg_maj_fault == 2
    assert memory.hierarchical_memory_limit == 104857600
    assert memory.hierarchical_swap_limit == 209715200
    assert memory.total_rss == 8192 and memory.total_inactive_file == 2048
    usage = memory.usage
    assert (usage.usage, usage.max, usage.limit, usage.failcnt) == (12288, 65536, 104857600, 4)
    assert (memory.swap.usage, memory.swap.limit) == (12288, 209715200)
    assert (memory.kernel.usage, memory.kernel.limit) == (512, 9223372036854771712)
    assert memory.HasField("kernel_tcp")  # absent files: entry present with zeros


def test_every_memory_stat_key_maps_to_a_field(tmp_path):
    fields = {f.name for f in metrics(tmp_path).memory.DESCRIPTOR.fields}
    assert set(MEMORY_STAT_FIELDS.values()) <= fields
    assert len(MEMORY_STAT_FIELDS) == 32  # fields 1-32 of MemoryStat


def test_oom_control(tmp_path):
    oom = metrics(tmp_path).memory_oom_control
    assert (oom.oom_kill_disable, oom.under_oom, oom.oom_kill) == (0, 0, 1)


def test_blkio_falls_back_to_throttle_files_with_device_names(tmp_path):
    blkio = metrics(tmp_path).blkio
    first = blkio.io_service_bytes_recursive[0]
    assert (first.device, first.major, first.minor, first.op, first.value) == ("/dev/sda", 8, 0, "Read", 4096)
    assert [e.op for e in blkio.io_service_bytes_recursive] == ["Read", "Write", "Sync", "Async", "Discard", "Total"]
    assert [e.value for e in blkio.io_serviced_recursive] == [1, 2, 3]
    assert len(blkio.sectors_recursive) == 0


def test_blkio_prefers_recursive_files(tmp_path):
    root, proc = v1_tree(tmp_path)
    cgroup = find_cgroup(PID, root=root, proc=proc)
    blkio_dir = cgroup.path("blkio")
    (blkio_dir / "blkio.io_serviced_recursive").write_text("8:0 Read 9\nTotal 9\n")
    (blkio_dir / "blkio.sectors_recursive").write_text("8:0 16\n")
    (blkio_dir / "blkio.time_recursive").write_text("8:0 77\n")
    blkio = v1_metrics(cgroup, proc=proc).blkio
    assert [e.value for e in blkio.io_serviced_recursive] == [9]
    assert [(e.op, e.value) for e in blkio.sectors_recursive] == [("", 16)]
    assert [e.value for e in blkio.io_time_recursive] == [77]
    assert len(blkio.io_service_bytes_recursive) == 0  # no throttle fallback


def test_hugetlb(tmp_path):
    hugetlb = metrics(tmp_path).hugetlb
    assert [(h.pagesize, h.usage, h.max, h.failcnt) for h in hugetlb] == [("2MB", 2097152, 4194304, 1),
                                                                          ("1GB", 0, 0, 0)]


def test_missing_controllers_and_files_are_skipped(tmp_path):
    root, proc = v1_tree(tmp_path)
    full = find_cgroup(PID, root=root, proc=proc)
    only_memory = V1Cgroup({"memory": full.path("memory")})
    (full.path("memory") / "memory.stat").unlink()
    m = v1_metrics(only_memory, proc=proc)
    assert not m.HasField("pids") and not m.HasField("cpu") and not m.HasField("blkio") and not m.hugetlb
    assert m.memory.usage.usage == 12288 and m.memory.cache == 0
    assert len(v1_metrics(V1Cgroup({}), proc=proc).SerializeToString()) == 0

"""Fake cgroupfs and procfs trees in a temporary directory, with realistic file contents."""

from __future__ import annotations

from pathlib import Path

CONTAINER = "/default/c1"
PID = 4242


def write_tree(base: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def fake_proc(base: Path, cgroup_lines: str, *, partitions: str = "", pid: int = PID) -> Path:
    proc = base / "proc"
    write_tree(proc, {f"{pid}/cgroup": cgroup_lines, "self/mountinfo": "", "partitions": partitions})
    return proc


V1_PROC_CGROUP = f"""\
12:hugetlb:{CONTAINER}
11:pids:{CONTAINER}
10:blkio:{CONTAINER}
9:memory:{CONTAINER}
4:cpu,cpuacct:{CONTAINER}
1:name=systemd:{CONTAINER}
0::/
"""

PARTITIONS = """\
major minor  #blocks  name

   8        0  500107608 sda
   8        1     524288 sda1
 254        0  268435456 vda
"""

V1_FILES = {
    "pids/pids.current": "3\n",
    "pids/pids.max": "max\n",
    "cpuacct/cpuacct.usage": "123456789\n",
    "cpuacct/cpuacct.stat": "user 250\nsystem 50\n",
    "cpuacct/cpuacct.usage_percpu": "100000000 23456789 0 0 \n",
    "cpu/cpu.stat": "nr_periods 10\nnr_throttled 2\nthrottled_time 5000\nnr_bursts 0\nburst_time 0\n",
    "memory/memory.stat": (
        "cache 4096\nrss 8192\nrss_huge 0\nshmem 0\nmapped_file 1024\ndirty 0\nwriteback 0\n"
        "swap 0\npgpgin 77\npgpgout 55\npgfault 300\npgmajfault 2\ninactive_anon 8192\n"
        "active_anon 0\ninactive_file 2048\nactive_file 2048\nunevictable 0\n"
        "hierarchical_memory_limit 104857600\nhierarchical_memsw_limit 209715200\n"
        "total_cache 4096\ntotal_rss 8192\ntotal_rss_huge 0\ntotal_mapped_file 1024\n"
        "total_dirty 0\ntotal_writeback 0\ntotal_pgpgin 77\ntotal_pgpgout 55\n"
        "total_pgfault 300\ntotal_pgmajfault 2\ntotal_inactive_anon 8192\ntotal_active_anon 0\n"
        "total_inactive_file 2048\ntotal_active_file 2048\ntotal_unevictable 0\n"
    ),
    "memory/memory.usage_in_bytes": "12288\n",
    "memory/memory.max_usage_in_bytes": "65536\n",
    "memory/memory.limit_in_bytes": "104857600\n",
    "memory/memory.failcnt": "4\n",
    "memory/memory.memsw.usage_in_bytes": "12288\n",
    "memory/memory.memsw.max_usage_in_bytes": "65536\n",
    "memory/memory.memsw.limit_in_bytes": "209715200\n",
    "memory/memory.memsw.failcnt": "0\n",
    "memory/memory.kmem.usage_in_bytes": "512\n",
    "memory/memory.kmem.limit_in_bytes": "9223372036854771712\n",
    # kmem.tcp files left out: a kernel without them must still give all four entries.
    "memory/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    "blkio/blkio.throttle.io_service_bytes": (
        "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 12288\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 12288\nTotal 12288\n"
    ),
    "blkio/blkio.throttle.io_serviced": "8:0 Read 1\n8:0 Write 2\n8:0 Total 3\nTotal 3\n",
    "hugetlb/hugetlb.2MB.usage_in_bytes": "2097152\n",
    "hugetlb/hugetlb.2MB.max_usage_in_bytes": "4194304\n",
    "hugetlb/hugetlb.2MB.failcnt": "1\n",
    "hugetlb/hugetlb.2MB.limit_in_bytes": "9223372036854771712\n",
    "hugetlb/hugetlb.1GB.usage_in_bytes": "0\n",
    "hugetlb/hugetlb.1GB.max_usage_in_bytes": "0\n",
    "hugetlb/hugetlb.1GB.failcnt": "0\n",
}


def v1_tree(base: Path) -> tuple[Path, Path]:
    """A v1 root with cpu and cpuacct co-mounted (reached through symlinks, as on most
    hosts), the container's directories, and a matching procfs. Returns (root, proc)."""
    root = base / "cgroup"
    for controller in ("pids", "cpu,cpuacct", "memory", "blkio", "hugetlb", "systemd", "unified"):
        (root / controller / CONTAINER.lstrip("/")).mkdir(parents=True)
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    for name, content in V1_FILES.items():
        controller, file = name.split("/")
        write_tree(root / controller / CONTAINER.lstrip("/"), {file: content})
    return root, fake_proc(base, V1_PROC_CGROUP, partitions=PARTITIONS)


V2_FILES = {
    "cgroup.events": "populated 1\nfrozen 0\n",
    "pids.current": "5\n",
    "pids.max": "max\n",
    "cpu.stat": (
        "usage_usec 2000\nuser_usec 1500\nsystem_usec 500\ncore_sched.force_idle_usec 0\n"
        "nr_periods 7\nnr_throttled 3\nthrottled_usec 900\nnr_bursts 1\nburst_usec 10\n"
    ),
    "cpu.pressure": "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
    "memory.stat": (
        "anon 8192\nfile 4096\nkernel 1024\nkernel_stack 16384\npagetables 0\nsec_pagetables 0\n"
        "percpu 0\nsock 0\nvmalloc 0\nshmem 0\nzswap 0\nzswapped 0\nfile_mapped 1024\n"
        "file_dirty 0\nfile_writeback 0\nswapcached 0\nanon_thp 0\nfile_thp 0\nshmem_thp 0\n"
        "inactive_anon 8192\nactive_anon 0\ninactive_file 2048\nactive_file 2048\nunevictable 0\n"
        "slab_reclaimable 100\nslab_unreclaimable 200\nslab 300\nworkingset_refault_anon 0\n"
        "workingset_refault_file 0\nworkingset_activate_anon 0\nworkingset_activate_file 0\n"
        "workingset_restore_anon 0\nworkingset_restore_file 0\nworkingset_nodereclaim 0\n"
        "pgscan 0\npgsteal 0\npgscan_kswapd 0\npgfault 400\npgmajfault 3\npgrefill 0\n"
        "pgactivate 0\npgdeactivate 0\npglazyfree 0\npglazyfreed 0\nthp_fault_alloc 0\n"
        "thp_collapse_alloc 0\n"
    ),
    "memory.current": "16384\n",
    "memory.max": "max\n",
    "memory.peak": "65536\n",
    "memory.swap.current": "0\n",
    "memory.swap.max": "1048576\n",
    "memory.events": "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
    "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
                       "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "io.stat": "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
               "254:0 rbytes=1 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
    "io.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=55\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=44\n",
    "hugetlb.2MB.current": "2097152\n",
    "hugetlb.2MB.max": "max\n",
    "hugetlb.2MB.rsvd.current": "0\n",
    "hugetlb.2MB.rsvd.max": "max\n",
    "hugetlb.1GB.current": "0\n",
    "hugetlb.1GB.max": "0\n",
    "rdma.current": "mlx4_0 hca_handle=2 hca_object=20\n",
    "rdma.max": "mlx4_0 hca_handle=max hca_object=100\n",
}


def v2_tree(base: Path, files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A unified root holding the container's cgroup, and a matching procfs."""
    root = base / "cgroup"
    write_tree(root, {"cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n"})
    write_tree(root / CONTAINER.lstrip("/"), V2_FILES if files is None else files)
    return root, fake_proc(base, f"0::{CONTAINER}\n")

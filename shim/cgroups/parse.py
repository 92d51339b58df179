"""Parsers for the text formats of cgroupfs and procfs files: pure functions, no I/O.

Each takes a file's content and returns plain Python values. Line-oriented parsers skip
lines they cannot read instead of failing: a Stats call should report what it can, and
kernels add keys and formats over time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UINT64_MAX = 2**64 - 1
UINT32_MAX = 2**32 - 1


def parse_uint(text: str) -> int:
    """A single unsigned number. Negative values (some v1 files report -1) become 0,
    values past 64 bits are clamped, since the protos carry uint64."""
    value = int(text.strip())
    return min(max(value, 0), UINT64_MAX)


def parse_limit(text: str, unlimited: int) -> int:
    """A limit file: a number, or "max" meaning no limit, reported as `unlimited`
    (cgroup v2 reports 2^64-1 like the Go shim; v1 pids reports 0)."""
    text = text.strip()
    return unlimited if text == "max" else parse_uint(text)


def parse_uint_list(text: str) -> list[int]:
    """Whitespace-separated numbers, e.g. cpuacct.usage_percpu."""
    return [parse_uint(field) for field in text.split()]


def parse_flat_keyed(text: str) -> dict[str, int]:
    """"<key> <value>" lines: memory.stat, cpu.stat, cpuacct.stat, memory.events,
    memory.oom_control, cgroup.events."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        try:
            values[fields[0]] = parse_uint(fields[1])
        except ValueError:
            continue
    return values


def parse_nested_keyed(text: str) -> dict[str, dict[str, str]]:
    """"<key> <sub>=<value> ..." lines: io.stat, rdma.current/max, *.pressure. Values are
    left as text because their kinds differ (counts, "max", decimal percentages)."""
    result: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        key, pairs = fields[0], fields[1:]
        entry = result.setdefault(key, {})
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if sep:
                entry[name] = value
    return result


@dataclass(frozen=True, slots=True)
class BlkioLine:
    major: int
    minor: int
    op: str  # "" for files with no operation column (sectors, time)
    value: int


def parse_blkio(text: str) -> list[BlkioLine]:
    """cgroup v1 blkio.* statistics: "<major>:<minor> [<op>] <value>" lines plus a
    "Total <value>" summary line, which is dropped since containerd does not report it."""
    entries: list[BlkioLine] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) not in (2, 3) or fields[0] == "Total":
            continue
        major, sep, minor = fields[0].partition(":")
        if not sep:
            continue
        try:
            entries.append(
                BlkioLine(int(major), int(minor), fields[1] if len(fields) == 3 else "", parse_uint(fields[-1]))
            )
        except ValueError:
            continue
    return entries


@dataclass(frozen=True, slots=True)
class IoDevice:
    major: int
    minor: int
    counters: dict[str, int]


def parse_io_stat(text: str) -> list[IoDevice]:
    """cgroup v2 io.stat: "<major>:<minor> rbytes=.. wbytes=.. rios=.. wios=.. ..."."""
    devices: list[IoDevice] = []
    for key, pairs in parse_nested_keyed(text).items():
        major, sep, minor = key.partition(":")
        if not sep:
            continue
        try:
            counters = {name: parse_uint(value) for name, value in pairs.items() if value.isdigit()}
            devices.append(IoDevice(int(major), int(minor), counters))
        except ValueError:
            continue
    return devices


@dataclass(frozen=True, slots=True)
class Pressure:
    avg10: float
    avg60: float
    avg300: float
    total: int


def parse_pressure(text: str) -> dict[str, Pressure]:
    """A PSI file (cpu/memory/io.pressure): "some ..." and, where the kernel has it,
    "full ..." lines, keyed by that first word."""
    result: dict[str, Pressure] = {}
    for kind, pairs in parse_nested_keyed(text).items():
        try:
            result[kind] = Pressure(
                float(pairs["avg10"]), float(pairs["avg60"]), float(pairs["avg300"]), parse_uint(pairs["total"])
            )
        except (KeyError, ValueError):
            continue
    return result


@dataclass(frozen=True, slots=True)
class RdmaLine:
    device: str
    hca_handles: int
    hca_objects: int


def parse_rdma(text: str) -> list[RdmaLine]:
    """rdma.current / rdma.max: "<device> hca_handle=<n|max> hca_object=<n|max>"."""

    def count(value: str | None) -> int:
        if value is None:
            return 0
        return UINT32_MAX if value == "max" else min(parse_uint(value), UINT32_MAX)

    lines: list[RdmaLine] = []
    for device, pairs in parse_nested_keyed(text).items():
        try:
            lines.append(RdmaLine(device, count(pairs.get("hca_handle")), count(pairs.get("hca_object"))))
        except ValueError:
            continue
    return lines


@dataclass(frozen=True, slots=True)
class ProcCgroup:
    hierarchy: int  # 0 is the unified (v2) hierarchy
    controllers: tuple[str, ...]  # empty for v2; "name=systemd" for named v1 hierarchies
    path: str


def parse_proc_cgroup(text: str) -> list[ProcCgroup]:
    """/proc/<pid>/cgroup: "<hierarchy-id>:<controller,...>:<path>" lines. The path may
    itself contain ':', hence the bounded split."""
    entries: list[ProcCgroup] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        controllers = tuple(c for c in parts[1].split(",") if c)
        entries.append(ProcCgroup(int(parts[0]), controllers, parts[2]))
    return entries


@dataclass(frozen=True, slots=True)
class CgroupMount:
    root: str  # the path inside the hierarchy that is mounted ("/" unless bind-mounted)
    mount_point: str
    fstype: str  # "cgroup" or "cgroup2"
    super_options: tuple[str, ...]  # for v1, includes the controller names


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_cgroups(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts in /proc/<pid>/mountinfo. Fields after the optional
    ones are separated by a lone "-"."""
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            dash = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < dash + 4 or fields[dash + 1] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            CgroupMount(
                root=_unescape_mount(fields[3]),
                mount_point=_unescape_mount(fields[4]),
                fstype=fields[dash + 1],
                super_options=tuple(fields[dash + 3].split(",")),
            )
        )
    return mounts


def parse_partitions(text: str) -> dict[tuple[int, int], str]:
    """/proc/partitions: "major minor #blocks name" rows under a header. The first name
    seen for a device number wins."""
    devices: dict[tuple[int, int], str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 4 or not (fields[0].isdigit() and fields[1].isdigit()):
            continue
        devices.setdefault((int(fields[0]), int(fields[1])), fields[3])
    return devices


_PAGE_SIZE = re.compile(r"^(\d+)([KMG]B)$")
_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def hugepage_sizes(filenames: list[str], suffix: str) -> list[str]:
    """The page sizes ("2MB", "1GB") named by hugetlb.<size>.<suffix> files in a cgroup
    directory, smallest first. Longer names such as hugetlb.2MB.rsvd.<suffix> are other
    counters and are not matched."""
    sizes = []
    for name in filenames:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] == suffix and _PAGE_SIZE.match(parts[1]):
            sizes.append(parts[1])

    def in_bytes(size: str) -> int:
        number, unit = _PAGE_SIZE.match(size).groups()  # type: ignore[union-attr]
        return int(number) * _UNITS[unit]

    return sorted(set(sizes), key=in_bytes)

"""CRIU's network lock: which one a dump left in a network namespace, and removing it when pyshim knows that no
restore will come into that namespace.

While CRIU dumps established TCP connections it locks the container's network namespace so that peers see
neither a reset nor an answer: with `iptables`, a chain CRIU in the filter table of iptables and ip6tables, jumped to
from INPUT and OUTPUT, dropping every packet not marked 0xC114; with `nftables`, a table `inet CRIU-<run id>` (the
dump's CRIU run id, cut to what CRIU's 32-byte buffer holds) whose input and output chains do the same. A dump that
leaves the task running removes the lock at its end; a dump that ends the task (exit) leaves it for the restore: a
restore in that namespace removes it (CRIU reads the method and the run id from the image's inventory). So after a
checkpoint with exit the lock stays in the namespace until a restore there, and forever when none comes; and a
CRIU killed mid-dump (pyshim's timeout) leaves it with the task running behind it, cut off.

pyshim removes a dump's own share of the lock when it knows the namespace will not be restored into:
- after a dump that failed or was killed, whatever the namespace (the task goes on running);
- on Delete of a task whose checkpoint ended it, when its namespace outlives it (a namespace given by path; a
  private one goes with the task), unless the container asked to keep the lock (`keep-network-lock`);
- after a restore elsewhere (another namespace, tcp-close included) of a checkpoint whose lock was kept;
- after a failed restore into a namespace given by path: CRIU locks it (the checkpoint's method and run id) and does
  not unlock on failure; what the failed restore added goes, what the namespace held before it stays.
Which lock is the dump's: nftables, the table named after its run id; iptables, whose chain CRIU shares between
dumps, one INPUT and one OUTPUT jump per family (what each lock adds), and the chain once nothing jumps to it (so
with two checkpoints pending in one namespace, the jumps removed may be the other's: they are indistinguishable).

A container sharing the host's network namespace is locked connection by connection instead (rules naming each
connection; CRIU may use iptables-legacy for them); pyshim does not remove those.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Protocol

from shim.children.reaper import Reaper
from shim.criu import bindings

log = logging.getLogger(__name__)

CHAIN = "CRIU"
TABLE_PREFIX = "CRIU-"
MARK = "0xc114"  # SOCCR_MARK: packets CRIU itself sends through the lock
# CRIU formats "inet CRIU-<run id>" into char[32]: the table name keeps at most 32 - len("inet ") - 1 characters.
TABLE_NAME_MAX = 32 - len("inet ") - 1
INVENTORY_METHODS = {0: "iptables", 1: "nftables", 2: "skip"}  # CRIU's enum network_lock_method, as in inventory.img
NFPROTO = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
IPTABLES_TOOLS = (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore"))
TIMEOUT = 20.0
_RUN_ID = re.compile(r"CRIU run id = (\S+)")


@dataclass(frozen=True)
class Lock:
    """The lock one dump left in one namespace."""

    method: str  # iptables | nftables
    run_id: str = ""  # the dump's CRIU run id: it names the nftables table
    namespace: str = ""  # the namespace file (a path given in config.json, or /proc/<pid>/ns/net)
    inode: int = 0  # the namespace's inode when the lock was taken: a recreated namespace is not touched

    def owns_table(self, family: str, name: str) -> bool:
        """Whether an nftables table is this dump's lock."""
        full = TABLE_PREFIX + self.run_id
        return (family == "inet" and bool(self.run_id) and full.startswith(name)
                and (name == full or len(name) >= TABLE_NAME_MAX))

    def as_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict | None) -> Lock | None:
        if not record or record.get("method") not in ("iptables", "nftables"):
            return None
        return cls(str(record["method"]), str(record.get("run_id") or ""), str(record.get("namespace") or ""),
                   int(record.get("inode") or 0))


# -- what a dump did (its log and inventory) ------------------------------------------------------------------


def log_state(text: str) -> tuple[bool, str]:
    """(whether CRIU's log shows the network locked and not unlocked since, the dump's run id). CRIU logs
    "net: Lock network" whatever the method (skip included) and "net: Unlock network" when it unlocks; in RPC mode
    it logs two run ids, the service's and then the dump's. An unlock CRIU could not carry out stays a lock: CRIU
    enters the namespace through its root task's /proc entry, and when that task died during the dump it logs
    "Unlock network", then "Can't open <pid>/ns/net on procfs", and leaves its rules."""
    locked, unlocking, run_id = False, False, ""
    for line in text.splitlines():
        if "net: Lock network" in line:
            locked, unlocking = True, False
        elif "net: Unlock network" in line:
            locked, unlocking = False, True
        elif unlocking and "Error" in line and "/ns/net on procfs" in line:
            locked, unlocking = True, False
        elif not locked and not unlocking and (match := _RUN_ID.search(line)):
            run_id = match.group(1)
    return locked, run_id


def inventory(image_dir: str) -> tuple[str, str] | None:
    """(lock method, run id) from a complete image's inventory.img, or None without one."""
    path = os.path.join(image_dir, "inventory.img")
    if not os.path.exists(path):
        return None
    codec = bindings.image_codec()
    with open(path, "rb") as f:
        entries = codec.load(f).get("entries") or [{}]
    entry = entries[0]
    return INVENTORY_METHODS.get(entry.get("network_lock_method", 0), "iptables"), entry.get("dump_criu_run_id", "")


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def left_by_dump(*, log_text: str, method: str, image_dir: str | None = None) -> tuple[str, str] | None:
    """(method, run id) of the lock a dump left in place, or None when it left none. `method` is what the dump
    was asked for; a complete image's inventory says what CRIU did."""
    locked, run_id = log_state(log_text)
    recorded = inventory(image_dir) if image_dir else None
    if recorded is not None:
        method, run_id = recorded[0], recorded[1] or run_id
    if not locked or method not in ("iptables", "nftables"):
        return None
    return method, run_id


def namespace_of(config: dict, pid: int) -> str:
    """The network namespace file a container's lock lives in: its path in config.json, or the task's own
    (/proc/<pid>/ns/net) for a private one; "" for a container in the host's namespace (no whole-namespace lock)."""
    for ns in (config.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return ns.get("path") or (f"/proc/{pid}/ns/net" if pid > 0 else "")
    return ""


def is_external(config: dict) -> bool:
    """Whether the container's network namespace is given by path (and so outlives the task)."""
    return any(ns.get("type") == "network" and ns.get("path")
               for ns in (config.get("linux") or {}).get("namespaces") or [])


# -- iptables-save and nft output -----------------------------------------------------------------------------


def iptables_lines(save: str) -> list[str]:
    """The lines of iptables-save output that are CRIU's: its chain (declared and its rules), the jumps to it, and
    per-connection rules (matching CRIU's mark, dropping)."""
    found, table = [], ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if table != "filter":
            continue
        words = line.split()
        if not words:
            continue
        if words[0] == f":{CHAIN}" or (words[0] == "-A" and len(words) > 1 and words[1] == CHAIN):
            found.append(line)
        elif words[0] == "-A" and _jumps_to_chain(words):
            found.append(line)
        elif words[0] == "-A" and MARK in line.lower() and words[-2:] == ["-j", "DROP"]:
            found.append(line)
    return found


def _jumps_to_chain(words: list[str]) -> bool:
    return words[2:] == ["-j", CHAIN]


def iptables_jumps(save: str) -> dict[str, int]:
    """How many jumps to CRIU's chain each chain of the filter table has."""
    table = ""
    counts: dict[str, int] = {}
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        words = line.split()
        if table == "filter" and words[:1] == ["-A"] and _jumps_to_chain(words):
            counts[words[1]] = counts.get(words[1], 0) + 1
    return counts


def iptables_release(save: str, *, jumps: int | None = 1, keep: dict[str, int] | None = None) -> str:
    """iptables-restore --noflush input removing a lock from what iptables-save shows: up to `jumps` jumps to
    CRIU's chain from each chain that has one (None: all of them), or with `keep` (counts from iptables_jumps()
    before a restore) the jumps beyond those; then the chain itself once nothing jumps to it. "" when there is
    nothing to remove."""
    counts = iptables_jumps(save)
    has_chain = any(line.split()[:1] == [f":{CHAIN}"] for line in _filter_table(save))
    commands = []
    for chain, count in counts.items():
        if keep is not None:
            removed = max(0, count - keep.get(chain, 0))
        else:
            removed = count if jumps is None else min(count, jumps)
        commands += [f"-D {chain} -j {CHAIN}"] * removed
        counts[chain] = count - removed
    if has_chain and not any(counts.values()):
        commands += [f"-F {CHAIN}", f"-X {CHAIN}"]
    if not commands:
        return ""
    return "*filter\n" + "\n".join(commands) + "\nCOMMIT\n"


def _filter_table(save: str) -> list[str]:
    lines, table = [], ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table == "filter":
            lines.append(line)
    return lines


def nft_tables(ruleset: str) -> list[tuple[str, str]]:
    """(family, name) of each table in `nft list ruleset` (or `nft list tables`) output."""
    found = []
    for line in ruleset.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table":
            found.append((words[1], words[2].rstrip("{").strip()))
    return found


def is_criu_table(family: str, name: str) -> bool:
    """An nftables table of CRIU's (a namespace lock `CRIU-<run id>` or a connection lock `CRIU-<pid>`)."""
    return family == "inet" and name.startswith(TABLE_PREFIX)


# -- inside a namespace ---------------------------------------------------------------------------------------


class Firewall(Protocol):
    """A network namespace's packet filter, as removing a lock reads and changes it; the namespace is open at fd
    while it is used. NamespaceFirewall is the real one; unit tests give a fake."""

    async def iptables_save(self, fd: int, tool: str) -> str:
        """What `tool` (iptables-save or ip6tables-save) prints in the namespace."""
        ...

    async def iptables_restore(self, fd: int, tool: str, commands: str) -> None:
        """`tool -w --noflush` (iptables-restore or ip6tables-restore) fed commands in the namespace."""
        ...

    async def nft_tables(self, fd: int) -> list[tuple[str, str]]:
        """(family, name) of every nftables table in the namespace."""
        ...

    async def nft_delete(self, fd: int, names: list[str]) -> None:
        """Delete these inet tables in the namespace."""
        ...


class NamespaceFirewall:
    """The namespace's own tools: iptables-save/-restore under nsenter (children of ours, so through the reaper),
    nftables over netlink (pyroute2) from a thread that enters the namespace."""

    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper

    async def iptables_save(self, fd: int, tool: str) -> str:
        return await _in_namespace(self.reaper, fd, [tool])

    async def iptables_restore(self, fd: int, tool: str, commands: str) -> None:
        await _in_namespace(self.reaper, fd, [tool, "-w", "--noflush"], input=commands.encode())

    async def nft_tables(self, fd: int) -> list[tuple[str, str]]:
        return await asyncio.to_thread(nft_list, f"/proc/self/fd/{fd}")

    async def nft_delete(self, fd: int, names: list[str]) -> None:
        await asyncio.to_thread(nft_delete, f"/proc/self/fd/{fd}", names)


class CommandFirewall:
    """The same tools for a process without a reaper (the shim's `delete` action, the pyshim command): iptables under
    nsenter as plain child processes (their output captured: `delete`'s stdout is its answer to containerd),
    nftables as above."""

    async def iptables_save(self, fd: int, tool: str) -> str:
        return await asyncio.to_thread(_run_in_namespace, fd, [tool])

    async def iptables_restore(self, fd: int, tool: str, commands: str) -> None:
        await asyncio.to_thread(_run_in_namespace, fd, [tool, "-w", "--noflush"], commands)

    async def nft_tables(self, fd: int) -> list[tuple[str, str]]:
        return await asyncio.to_thread(nft_list, f"/proc/self/fd/{fd}")

    async def nft_delete(self, fd: int, names: list[str]) -> None:
        await asyncio.to_thread(nft_delete, f"/proc/self/fd/{fd}", names)


def _run_in_namespace(fd: int, argv: list[str], input: str | None = None) -> str:
    import subprocess

    result = subprocess.run(["nsenter", f"--net=/proc/self/fd/{fd}", *argv], input=input, capture_output=True,
                            text=True, pass_fds=(fd,), timeout=TIMEOUT, stdin=None if input else subprocess.DEVNULL)
    if result.returncode != 0:
        raise OSError(f"{' '.join(argv)}: exit status {result.returncode}: {result.stderr.strip()[-300:]}")
    return result.stdout


def nft_list(namespace: str) -> list[tuple[str, str]]:
    """(family, name) of every nftables table in the namespace at path."""
    from pyroute2.nftables.main import NFTables

    from shim.netns.enter import run_in

    def work() -> list[tuple[str, str]]:
        with NFTables(nfgen_family=0) as nft:
            return [(NFPROTO.get(t["nfgen_family"], str(t["nfgen_family"])), t.get_attr("NFTA_TABLE_NAME"))
                    for t in nft.get_tables()]

    return run_in(namespace, work)


def nft_delete(namespace: str, names: list[str]) -> None:
    from pyroute2.nftables.main import NFTables

    from shim.netns.enter import run_in

    def work() -> None:
        with NFTables(nfgen_family=1) as nft:  # NFPROTO_INET
            for name in names:
                nft.table("del", name=name)

    run_in(namespace, work)


async def _in_namespace(reaper: Reaper, fd: int, argv: list[str], *, input: bytes | None = None) -> str:
    """argv run inside the namespace open at fd (nsenter, the descriptor passed as its fd 3); its stdout."""
    from shim.children.spawn import run

    result = await run(reaper, ["nsenter", "--net=/proc/self/fd/3", *argv], input=input, pass_fds={3: fd},
                       timeout=TIMEOUT)
    if result.status != 0:
        raise OSError(f"{' '.join(argv)}: exit status {result.status}: "
                      f"{result.stderr.decode(errors='replace').strip()[-300:]}")
    return result.stdout.decode(errors="replace")


@dataclass(frozen=True)
class Held:
    """What of a lock a namespace held at some moment (before a restore): the jumps to CRIU's chain per iptables
    tool and chain, whether the lock's nftables table was there."""

    jumps: dict[str, dict[str, int]]
    table: bool

    def as_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict | None) -> Held | None:
        if not isinstance(record, dict):
            return None
        jumps = record.get("jumps") or {}
        return cls({str(tool): {str(chain): int(n) for chain, n in chains.items()} for tool, chains in jumps.items()},
                   bool(record.get("table")))


def _open(lock: Lock) -> int | None:
    """The lock's namespace, open, if it still exists and is the namespace that was locked."""
    try:
        fd = os.open(lock.namespace, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # the namespace is gone, and its rules with it
    if lock.inode and os.fstat(fd).st_ino != lock.inode:
        os.close(fd)
        return None  # the path names another namespace now
    return fd


async def held(firewall: Firewall, lock: Lock) -> Held | None:
    """What of this lock its namespace holds now (None: the namespace is gone or another)."""
    fd = _open(lock)
    if fd is None:
        return None
    try:
        if lock.method == "nftables":
            tables = await firewall.nft_tables(fd)
            return Held({}, any(lock.owns_table(family, name) for family, name in tables))
        return Held({save: iptables_jumps(await firewall.iptables_save(fd, save)) for save, _ in IPTABLES_TOOLS},
                    False)
    finally:
        os.close(fd)


async def release(firewall: Firewall, lock: Lock, *, before: Held | None = None) -> list[str]:
    """Remove this dump's lock from its namespace, if the namespace still exists and is the one locked; with
    `before`, only what was added since. What was removed, as readable lines (empty when nothing was there)."""
    fd = _open(lock)
    if fd is None:
        return []
    try:
        if lock.method == "nftables":
            if before is not None and before.table:
                return []
            names = [name for family, name in await firewall.nft_tables(fd) if lock.owns_table(family, name)]
            if names:
                await firewall.nft_delete(fd, names)
            return [f"nftables: table inet {name}" for name in names]
        removed = []
        for save, restore in IPTABLES_TOOLS:
            keep = before.jumps.get(save, {}) if before is not None else None
            commands = iptables_release(await firewall.iptables_save(fd, save), keep=keep)
            if commands:
                await firewall.iptables_restore(fd, restore, commands)
                removed += [f"{save.split('-')[0]}: {line}" for line in commands.splitlines()[1:-1]]
        return removed
    finally:
        os.close(fd)


async def release_logged(firewall: Firewall, lock: Lock, why: str, *, before: Held | None = None) -> list[str]:
    """release(), logged, never raising: a lock that cannot be removed is reported, not fatal."""
    try:
        removed = await release(firewall, lock, before=before)
    except Exception as exc:  # noqa: BLE001 - the caller's work must go on
        log.warning("CRIU's %s network lock in %s could not be removed (%s): %s", lock.method, lock.namespace, why,
                    exc)
        return []
    if removed:
        log.info("removed CRIU's %s network lock from %s (%s): %s", lock.method, lock.namespace, why,
                 "; ".join(removed))
    return removed


# -- what a checkpoint leaves -----------------------------------------------------------------------------------


def requested_method(options) -> str:
    """The lock method a dump runs with: pyshim's choice for its own CRIU requests; CRIU's default (iptables) under
    `runc checkpoint`, which sets none."""
    from shim.criu.plan import network_lock

    return "iptables" if options.engine == "runc" else network_lock(options)


def after_dump(options, *, config: dict, pid: int, log_text: str, image_dir: str | None = None) -> Lock | None:
    """The lock a dump (done, failed or killed) left in the container's namespace, or None."""
    left = left_by_dump(log_text=log_text, method=requested_method(options), image_dir=image_dir)
    namespace = namespace_of(config, pid)
    if left is None or not namespace:
        return None
    try:
        inode = os.stat(namespace).st_ino
    except OSError:
        return None  # gone already, and its rules with it
    return Lock(left[0], left[1], namespace, inode)


def same_namespace(config: dict, lock: Lock) -> bool:
    """Whether a container (its config.json) is networked in the namespace a lock is in."""
    for ns in (config.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            try:
                return os.stat(ns["path"]).st_ino == lock.inode
            except OSError:
                return False
    return False


async def after_restore(firewall: Firewall, record: dict | None, config: dict) -> list[str]:
    """A restore elsewhere (another namespace; tcp-close included) of a checkpoint whose lock was kept past its
    task's Delete (keep-network-lock) means no restore is coming into the lock's namespace: remove it. A restore
    into that namespace had CRIU remove it; without keep-network-lock, Delete removed it."""
    try:
        record = record or {}
        lock = Lock.from_record((record.get("network") or {}).get("lock"))
        if lock is None or not (record.get("options") or {}).get("keep_network_lock") or same_namespace(config, lock):
            return []
    except (TypeError, ValueError, AttributeError) as exc:
        log.warning("the checkpoint's record of its network lock is unreadable: %s", exc)
        return []
    return await release_logged(firewall, lock, "its checkpoint was restored elsewhere")


async def before_restore(firewall: Firewall, image_path: str, config: dict) -> tuple[Lock, Held] | None:
    """Before a restore into a namespace given by path: the lock a failing restore would leave there (CRIU locks
    the namespace with the checkpoint's method and run id, and a failed restore does not unlock), and what of it
    the namespace holds already (a lock kept for this restore stays). None when there is nothing to watch."""
    try:
        # The namespace first: reading the inventory imports pycriu's messages (~20 ms), and a restore into a
        # private namespace (the common case) has nothing to watch.
        namespace = namespace_of(config, 0) if is_external(config) else ""
        if not namespace:
            return None
        recorded = inventory(image_path)
        if recorded is None or recorded[0] not in ("iptables", "nftables"):
            return None
        lock = Lock(recorded[0], recorded[1], namespace, os.stat(namespace).st_ino)
        state = await held(firewall, lock)
    except Exception as exc:  # noqa: BLE001 - the restore goes on; only its cleanup is weaker
        log.warning("the network lock of the restore's namespace could not be read: %s", exc)
        return None
    return None if state is None else (lock, state)


async def after_failed_restore(firewall: Firewall, watched: tuple[Lock, Held] | None) -> list[str]:
    """Remove the lock a failed restore added to its namespace (nothing that was there before it)."""
    if watched is None:
        return []
    lock, before = watched
    return await release_logged(firewall, lock, "the restore failed", before=before)

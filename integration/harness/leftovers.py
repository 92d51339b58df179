"""What the integration suite leaves on the host's network: network namespaces and veths the tests made, iptables and
nftables rules of CRIU's or naming the tests' subnets.

A session snapshot (`ip netns list`, `ip -o link`, `iptables-save`, `ip6tables-save`, `nft list ruleset` on the
host) is taken at the start and compared with one at the end. Only what the tests make counts, so that nothing else
on the host (another test session included) can fail the suite:
- namespaces and links this session made: `watch()` notes every name made through shim.netns (named.create,
  links.add_veth) and through harness.commands.run (`ip netns add`, `ip link add ... [peer name ...]`); those still
  there at the end are left behind, with whatever iptables rules and nftables tables they hold;
- host rules that appeared during the session and are CRIU's (its chain, its marks, its tables) or name a test subnet
  (10.123/16: netns_hosts, 10.124/16: the page-server test, 10.125/16: migration_lab).
Namespaces and links with a test prefix that appeared but were not made through those paths are reported as notes
(another session's, or made some other way), not failures.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field

from shim.criu import netlock

TEST_NAMESPACE_PREFIXES = ("pyshim-",)
TEST_LINK_PREFIXES = ("pv", "ps")
TEST_SUBNETS = ("10.123.", "10.124.", "10.125.")


@dataclass
class Made:
    namespaces: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)

    def note_argv(self, argv) -> None:
        """Names an `ip netns add` or `ip link add` command line makes."""
        words = [str(word) for word in argv]
        if not words or words[0].rsplit("/", 1)[-1] != "ip":
            return
        words = _without_ip_options(words[1:])
        if words[:2] == ["netns", "add"] and len(words) > 2:
            self.namespaces.add(words[2])
        elif words[:2] == ["link", "add"] and len(words) > 2:
            rest = words[2:]
            if rest[0] == "name" and len(rest) > 1:
                rest = rest[1:]
            self.links.add(rest[0])
            for i, word in enumerate(rest[:-2]):
                if word == "peer" and rest[i + 1] == "name":
                    self.links.add(rest[i + 2])


def _without_ip_options(words: list[str]) -> list[str]:
    """`ip` arguments after its global options (-n NS, -o, -4, ...)."""
    while words and words[0].startswith("-"):
        words = words[2:] if words[0] in ("-n", "-netns", "-b", "-batch") else words[1:]
    return words


MADE = Made()


def watch(monkeypatch) -> None:
    """Note every namespace and link made through shim.netns and harness.commands.run from now on."""
    from shim.netns import links, named

    from . import commands

    create, add_veth, run = named.create, links.add_veth, commands.run

    @functools.wraps(create)
    def noting_create(name, *args, **kwargs):
        MADE.namespaces.add(name)
        return create(name, *args, **kwargs)

    @functools.wraps(add_veth)
    def noting_add_veth(name, peer, *args, **kwargs):
        MADE.links.update((name, peer))
        return add_veth(name, peer, *args, **kwargs)

    @functools.wraps(run)
    def noting_run(argv, *args, **kwargs):
        MADE.note_argv(argv)
        return run(argv, *args, **kwargs)

    monkeypatch.setattr(named, "create", noting_create)
    monkeypatch.setattr(links, "add_veth", noting_add_veth)
    monkeypatch.setattr(commands, "run", noting_run)


def _output(argv: list[str], namespace: str | None = None) -> str:
    if namespace is not None:
        argv = ["ip", "netns", "exec", namespace, *argv]
    if not shutil.which(argv[0]):
        return ""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def link_names(ip_o_link: str) -> list[str]:
    """Link names from `ip -o link` ("2: pvab12s0@if3: <...>")."""
    names = []
    for line in ip_o_link.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def rule_lines(save: str) -> list[str]:
    """iptables-save rules and chain declarations, without comments and counters."""
    lines = []
    for line in save.splitlines():
        if line.startswith("-A") or line.startswith("*"):
            lines.append(line)
        elif line.startswith(":"):
            lines.append(line.split(" [", 1)[0])
    return lines


@dataclass(frozen=True)
class Snapshot:
    namespaces: frozenset[str]
    links: frozenset[str]
    rules: tuple[str, ...]  # "iptables: -A ...", "ip6tables: ..."
    nft: str

    @property
    def nft_tables(self) -> frozenset[tuple[str, str]]:
        return frozenset(netlock.nft_tables(self.nft))


def snapshot() -> Snapshot:
    namespaces = frozenset(line.split()[0] for line in _output(["ip", "netns", "list"]).splitlines() if line.split())
    rules = tuple(f"{tool.split('-')[0]}: {line}" for tool in ("iptables-save", "ip6tables-save")
                  for line in rule_lines(_output([tool])))
    return Snapshot(namespaces, frozenset(link_names(_output(["ip", "-o", "link"]))), rules,
                    _output(["nft", "list", "ruleset"]))


def _test_rule(line: str) -> bool:
    rule = line.split(": ", 1)[-1]
    return bool(netlock.iptables_lines(f"*filter\n{rule}\n")) or any(subnet in rule for subnet in TEST_SUBNETS)


def inside(namespace: str) -> list[str]:
    """What a namespace holds that a test may have put there: iptables rules and chains, nftables tables."""
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        for line in rule_lines(_output([tool], namespace)):
            if line.startswith("-A") or (line.startswith(":") and line[1:].split()[0] not in
                                         ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING")):
                found.append(f"{tool.split('-')[0]}: {line}")
    found += [f"nftables: table {family} {name}" for family, name in
              netlock.nft_tables(_output(["nft", "list", "tables"], namespace))
              if netlock.is_criu_table(family, name)]
    return found


def left_behind(start: Snapshot, end: Snapshot, made: Made = MADE) -> tuple[list[str], list[str]]:
    """(what this session left behind, notes on test-looking things it did not make)."""
    failures, notes = [], []
    for name in sorted(made.namespaces & end.namespaces - start.namespaces):
        failures.append(f"network namespace {name}" + "".join(f"\n    {item}" for item in inside(name)))
    for name in sorted(made.links & end.links - start.links):
        failures.append(f"link {name} on the host")
    new_rules = Counter(end.rules) - Counter(start.rules)
    failures += [f"host {line}" for line in sorted(new_rules.elements()) if _test_rule(line)]
    failures += [f"host nftables: table {family} {name}"
                 for family, name in sorted(end.nft_tables - start.nft_tables) if netlock.is_criu_table(family, name)]
    started = set(start.nft.splitlines())
    failures += [f"host nftables: {line.strip()}" for line in end.nft.splitlines()
                 if line not in started and any(subnet in line for subnet in TEST_SUBNETS)]
    notes += [f"network namespace {name} (not made by this session)"
              for name in sorted(end.namespaces - start.namespaces - made.namespaces)
              if name.startswith(TEST_NAMESPACE_PREFIXES)]
    notes += [f"link {name} on the host (not made by this session)"
              for name in sorted(end.links - start.links - made.links) if name.startswith(TEST_LINK_PREFIXES)]
    return failures, notes

"""The suite's network leftovers check (harness.leftovers): which names a command line makes, what counts as left."""

from __future__ import annotations

from harness.leftovers import Made, Snapshot, left_behind, link_names, rule_lines

# `ip -o link` output: one line a link, its second line folded in after a backslash.
IP_O_LINK = (
    "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000"
    "\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n"
    "2: eth0@if9: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default "
    "\\    link/ether 02:42:ac:11:00:02 brd ff:ff:ff:ff:ff:ff link-netnsid 0\n"
    "7: psab12cdh@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default "
    "\\    link/ether 5e:1c:3a:00:11:22 brd ff:ff:ff:ff:ff:ff link-netns pyshim-it-ab12cd-ps\n"
)


def test_the_names_ip_command_lines_make():
    made = Made()
    made.note_argv(["ip", "netns", "add", "pyshim-it-ab12cd-ps"])
    made.note_argv(["ip", "link", "add", "psab12cdh", "type", "veth", "peer", "name", "psab12cdn", "netns", "x"])
    made.note_argv(["/usr/sbin/ip", "-n", "x", "link", "add", "name", "dummy0", "type", "dummy"])
    made.note_argv(["ip", "-n", "x", "addr", "add", "10.124.1.1/30", "dev", "psab12cdh"])
    made.note_argv(["ctr", "run", "netns", "add"])
    assert made.namespaces == {"pyshim-it-ab12cd-ps"}
    assert made.links == {"psab12cdh", "psab12cdn", "dummy0"}


def test_parsing_links_and_rules():
    assert link_names(IP_O_LINK) == ["lo", "eth0", "psab12cdh"]
    assert rule_lines("# Generated\n*filter\n:INPUT ACCEPT [12:345]\n:CRIU - [0:0]\n-A INPUT -j CRIU\nCOMMIT\n") == [
        "*filter", ":INPUT ACCEPT", ":CRIU -", "-A INPUT -j CRIU"]


def snapshot(namespaces=(), links=(), rules=(), nft="") -> Snapshot:
    return Snapshot(frozenset(namespaces), frozenset(links), tuple(rules), nft)


def test_only_what_this_session_made_or_criu_s_and_test_subnet_rules_count():
    made = Made({"pyshim-it-1-srv0", "pyshim-it-2-srv0"}, {"pv1s0", "ps2h"})
    start = snapshot(namespaces={"cni-1234", "pyshim-it-2-srv0"}, links={"lo", "eth0", "ps2h"},
                     rules=["iptables: *filter", "iptables: -A INPUT -j DOCKER"],
                     nft="table ip filter {\n}\n")
    end = snapshot(namespaces={"cni-1234", "cni-5678", "pyshim-it-1-srv0", "pyshim-it-2-srv0", "pyshim-it-3-srv0"},
                   links={"lo", "eth0", "ps2h", "pv1s0", "pv3s0", "veth123"},
                   rules=["iptables: *filter", "iptables: -A INPUT -j DOCKER", "iptables: -A INPUT -j DOCKER",
                          "iptables: :CRIU -", "iptables: -A INPUT -j CRIU",
                          "ip6tables: -A FORWARD -s 10.123.0.0/24 -j ACCEPT"],
                   nft="table ip filter {\n}\ntable inet CRIU-0123456789abcdef01234 {\n}\ntable inet other {\n"
                       "\t\tip saddr 10.124.1.1 accept\n}\n")
    failures, notes = left_behind(start, end, made)
    assert failures[0].startswith("network namespace pyshim-it-1-srv0")  # what it holds follows, if anything
    assert failures[1:] == [
        "link pv1s0 on the host",
        "host ip6tables: -A FORWARD -s 10.123.0.0/24 -j ACCEPT", "host iptables: -A INPUT -j CRIU",
        "host iptables: :CRIU -",
        "host nftables: table inet CRIU-0123456789abcdef01234",
        "host nftables: ip saddr 10.124.1.1 accept"]
    # there before the session, someone else's, or not the tests' at all: notes at most
    assert notes == ["network namespace pyshim-it-3-srv0 (not made by this session)",
                     "link pv3s0 on the host (not made by this session)"]
    assert left_behind(start, start, made) == ([], [])

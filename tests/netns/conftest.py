"""Scratch network namespaces for the netns tests: uniquely named, always removed, and checked
to be gone (with their veths) when the test ends. Root-only tests skip, saying so, otherwise."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from shim.netns import named

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (run the suite as root)")
PREFIX = "pyshim-t-"


def unique(prefix: str = PREFIX) -> str:
    return prefix + secrets.token_hex(4)


def veth_name() -> str:
    return "psv" + secrets.token_hex(4)  # 11 characters: under IFNAMSIZ


@pytest.fixture
def scratch():
    """scratch() -> the name of a new empty namespace, removed after the test."""
    made: list[str] = []

    def make() -> str:
        name = unique()
        named.create(name)
        made.append(name)
        return name

    yield make
    for name in made:
        named.remove(name, missing_ok=True)
    assert not [n for n in named.names() if n in made], "a test namespace survived its test"


def host_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout

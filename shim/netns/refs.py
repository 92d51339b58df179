"""Naming a network namespace: a name in /var/run/netns, an absolute path, or None (the caller's own)."""

from __future__ import annotations

import os

RUN_DIR = "/var/run/netns"
NamespaceRef = str | None


def path_of(ref: str) -> str:
    """The namespace file a reference names: a bare name lives in /var/run/netns (as with `ip netns`)."""
    if not ref:
        raise ValueError("empty network namespace reference")
    if os.path.isabs(ref):
        return ref
    if "/" in ref or ref in (".", ".."):
        raise ValueError(f"network namespace {ref!r}: a name must not contain '/' (or give an absolute path)")
    return os.path.join(RUN_DIR, ref)


def open_namespace(ref: str) -> int:
    """An O_RDONLY descriptor of the namespace; never creates one (FileNotFoundError if absent)."""
    return os.open(path_of(ref), os.O_RDONLY | os.O_CLOEXEC)

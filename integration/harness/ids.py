"""Names unique to one test, so containerds, namespaces and containers never collide with each other or the host's."""

from __future__ import annotations

import re
import uuid


def unique(prefix: str, length: int = 10) -> str:
    """prefix + '-' + random hex; prefix is squeezed to the characters containerd accepts in ids and namespaces."""
    clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40] or "x"
    return f"{clean}-{uuid.uuid4().hex[:length]}"


NAMESPACE_PREFIX = "pyshim-it"


def namespace() -> str:
    return unique(NAMESPACE_PREFIX)


def is_test_namespace(name: str) -> bool:
    """True for names namespace() makes (so cleanup never touches anything else's)."""
    return re.fullmatch(rf"{NAMESPACE_PREFIX}-[0-9a-f]{{10}}", name) is not None


def container_id(prefix: str = "c") -> str:
    return unique(prefix)

"""Where `pyshim checkpoint create` keeps checkpoints it does not export, and what `checkpoint ls` lists.

The store is a directory (default /var/lib/pyshim/checkpoints; PYSHIM_CHECKPOINT_DIR or --store name another)
holding one directory per checkpoint, in the archive layout, and any checkpoint archives put there. Hidden entries
(`.name.pyshim-staging-*`, `.name.pyshim-partial-*`) are work in progress and never listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shim.tool import archive
from shim.tool.errors import ToolError

DEFAULT = "/var/lib/pyshim/checkpoints"
ENV = "PYSHIM_CHECKPOINT_DIR"


@dataclass(frozen=True)
class Store:
    root: str

    @classmethod
    def default(cls, given: str | None = None) -> Store:
        return cls(os.path.abspath(given or os.environ.get(ENV) or DEFAULT))

    def ensure(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def path(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ToolError(f"checkpoint name {name!r}: use letters, digits, '-', '_' and '.', not starting with '.'")
        return os.path.join(self.root, name)

    def entries(self) -> list[str]:
        """Checkpoint directories and archives in the store, by name."""
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(self.root, name)
            if os.path.isdir(os.path.join(path, archive.CHECKPOINT_DIR)) or any(
                    name.endswith(suffix) for suffix in archive.SUFFIXES):
                found.append(name)
        return found

    def resolve(self, source: str) -> str:
        """A checkpoint named on the command line: a path, else a name in the store."""
        if os.path.exists(source):
            return os.path.abspath(source)
        if "/" not in source and os.path.exists(os.path.join(self.root, source)):
            return os.path.join(self.root, source)
        raise ToolError(f"no checkpoint {source!r}: neither a path nor a name in the store {self.root} "
                        "(`pyshim checkpoint ls` lists them)")

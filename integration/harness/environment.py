"""Reading /opt/pyshim/env: where the installers put the shim, CRIU, the venv and each containerd.

packaging/install-test.sh writes shell `KEY=VALUE` lines; this module parses them without running a
shell and answers "where is containerd X" and "which version did the installer unpack".
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# PYSHIM_ENV_FILE points the suite at another installation (e.g. a worktree's own launcher and venv).
ENV_FILE = Path(os.environ.get("PYSHIM_ENV_FILE") or "/opt/pyshim/env")

# The containerd lines the project supports; test ids and fixture params use these names.
CONTAINERD_VERSIONS: tuple[str, ...] = ("1.6", "1.7", "2")


def _env_key(version: str) -> str:
    """`1.6` -> `PYSHIM_CONTAINERD_1_6` (the installer's key for that version's bin dir)."""
    return "PYSHIM_CONTAINERD_" + version.replace(".", "_")


def parse_env_text(text: str) -> dict[str, str]:
    """Parse shell-style `KEY=VALUE` lines (optional `export`, quotes, comments) without executing anything."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, raw = line.partition("=")
        if not sep or not key.isidentifier():
            continue
        words = shlex.split(raw, comments=True)
        values[key] = " ".join(words)
    return values


@dataclass(frozen=True)
class Environment:
    """The installed tool set, as the installer described it."""

    values: Mapping[str, str]

    def _path(self, key: str) -> Path:
        try:
            return Path(self.values[key])
        except KeyError:
            raise KeyError(f"{key} is missing from {ENV_FILE}; re-run packaging/install-test.sh") from None

    @property
    def venv(self) -> Path:
        return self._path("PYSHIM_VENV")

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def shim(self) -> Path:
        """The shim containerd runs: the installed one (the pyshim .deb's /usr/bin/containerd-shim-pyshim-v2), or
        a developer's launcher; never one the test venv provides."""
        return self._path("PYSHIM_SHIM")

    @property
    def tool(self) -> Path | None:
        """The installed `pyshim` command (the .deb's /usr/bin/pyshim), or None (a developer's env without one: the
        tool tests then run the checkout's shim.tool)."""
        value = self.values.get("PYSHIM_TOOL")
        return Path(value) if value and os.access(value, os.X_OK) else None

    @property
    def criu(self) -> Path:
        return self._path("PYSHIM_CRIU")

    @property
    def criu_version(self) -> str:
        return self.values.get("PYSHIM_CRIU_VERSION", "")

    @property
    def pycriu_dir(self) -> Path | None:
        value = self.values.get("PYSHIM_PYCRIU_DIR")
        return Path(value) if value else None

    def containerd_bin_dir(self, version: str) -> Path:
        return self._path(_env_key(version))

    def containerd_expected_version(self, version: str) -> str | None:
        """The exact version the installer recorded for a containerd line, if it recorded one."""
        value = self.values.get(_env_key(version) + "_VERSION")
        return value.lstrip("v") if value else None

    @property
    def runc(self) -> Path:
        return Path(self.values.get("PYSHIM_RUNC", "/usr/sbin/runc"))

    @property
    def crun(self) -> Path:
        return Path(self.values.get("PYSHIM_CRUN", "/usr/bin/crun"))

    @property
    def busybox(self) -> Path:
        return Path(self.values.get("PYSHIM_BUSYBOX", "/bin/busybox"))

    @property
    def redis(self) -> Path:
        """The unpacked redis-server and redis-tools .debs (<prefix>/usr/bin/redis-server, ...)."""
        return self._path("PYSHIM_REDIS")


def load_environment(path: Path = ENV_FILE) -> Environment:
    return Environment(parse_env_text(path.read_text()))


def unavailable_reason(path: Path = ENV_FILE) -> str | None:
    """Why the integration suite cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "integration tests need root (containerd, runc and criu run as root)"
    if not path.is_file():
        return f"{path} is missing: run packaging/install-test.sh first"
    return None

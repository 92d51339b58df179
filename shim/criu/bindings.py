"""pycriu, CRIU's Python bindings, found where distributions and pyshim's own packages put them.

pycriu is not on PyPI. Debian ships it as python3-pycriu (13 and later) or inside the criu package (12), Fedora as
python3-criu, and pyshim's .deb carries a copy in its prefix. A shim installed from a wheel into a virtual environment
does not see the system's dist-packages, so this module looks in those places itself. It loads pycriu alone from such a
directory: the directory is not put on sys.path, so the distribution's other packages (an older protobuf among them)
stay out of the shim.

Every pycriu import of the shim goes through here, so a host without pycriu runs containers as usual and a checkpoint
fails before it touches the task, with an error that says how to install pycriu.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from shim.errors import Unavailable

# Colon-separated directories that hold `pycriu/`; when set, the only places looked in (besides a pycriu the
# interpreter can import already).
PATH_VARIABLE = "PYSHIM_PYCRIU_PATH"

FIX = ("install CRIU's Python bindings: Debian 13 and later `apt install python3-pycriu`, Debian 12 `apt install "
       "criu`, Fedora `dnf install python3-criu`, or pyshim's .deb, which carries them; or set "
       f"{PATH_VARIABLE} in containerd's environment to the directory that holds pycriu/")


class PycriuMissing(Unavailable):
    """pycriu is in none of the places looked in."""

    def __init__(self, looked_in: list[str]) -> None:
        self.looked_in = looked_in
        where = ", ".join(looked_in) if looked_in else "nowhere"
        super().__init__(f"checkpoint/restore needs pycriu, which this host lacks (looked on sys.path and in {where}): "
                         f"{FIX}")


def candidate_dirs(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Where pycriu is looked for when the interpreter cannot import it, in order."""
    configured = environ.get(PATH_VARIABLE)
    if configured is not None:
        return [d for d in configured.split(":") if d]
    carried = Path(__file__).resolve().parents[3] / "pycriu"  # <prefix>/site/shim/criu -> <prefix>/pycriu
    version = f"python3.{sys.version_info.minor}"
    return [
        str(carried),
        "/usr/lib/python3/dist-packages",  # Debian and Ubuntu
        *sorted(glob.glob("/usr/lib64/python3*/site-packages"), reverse=True),  # Fedora, RHEL
        *sorted(glob.glob("/usr/lib/python3*/site-packages"), reverse=True),
        f"/usr/local/lib/{version}/dist-packages",
        "/opt/pyshim/pycriu/usr/lib/python3/dist-packages",  # packaging/install.sh's private copy
    ]


def _load_from(directory: str) -> ModuleType | None:
    spec = importlib.machinery.PathFinder.find_spec("pycriu", [directory])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pycriu"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        # A pycriu that does not load (built for another protobuf, say) is no pycriu: try the next place.
        for name in [n for n in sys.modules if n == "pycriu" or n.startswith("pycriu.")]:
            del sys.modules[name]
        return None
    return module


def pycriu() -> ModuleType:
    """The pycriu package, loaded once; PycriuMissing when no place has a usable one."""
    loaded = sys.modules.get("pycriu")
    if loaded is not None:
        return loaded
    try:
        return importlib.import_module("pycriu")
    except ImportError:
        pass
    looked_in = candidate_dirs()
    for directory in looked_in:
        module = _load_from(directory)
        if module is not None:
            return module
    raise PycriuMissing(looked_in)


def rpc_messages() -> ModuleType:
    """pycriu.rpc_pb2: the messages of CRIU's RPC (criu_req, criu_resp, criu_opts)."""
    pycriu()
    return importlib.import_module("pycriu.rpc_pb2")


def image_codec() -> ModuleType:
    """pycriu.images: CRIU's image files to and from dicts (load, dump)."""
    pycriu()
    return importlib.import_module("pycriu.images")


def image_messages() -> ModuleType:
    """pycriu's image message classes (pycriu.images.pb): decoding one kind of image without pycriu's
    conversion to dicts."""
    pycriu()
    return importlib.import_module("pycriu.images.pb")

"""The shim the suite runs is the INSTALLED one (the pyshim .deb), and it needs nothing from this checkout.

packaging/install-test.sh installs the .deb that packaging/build.sh made from this checkout and points PYSHIM_SHIM at
/usr/bin/containerd-shim-pyshim-v2. Here: every module of the checkout's `shim` package imports from the package's
prefix under the launcher's own interpreter and paths (a file the package lacks fails), and a containerd whose mount
namespace hides the checkout behind an empty tmpfs runs and checkpoints a container through it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import track_containerd
from harness import processes
from harness.containerd import PYSHIM, Containerd
from harness.environment import Environment
from harness.image import TestImage

REPO = Path(__file__).resolve().parent.parent
COUNTER = "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done"


def launcher_of(environment: Environment) -> tuple[Path, list[str], list[str]]:
    """The launcher PYSHIM_SHIM resolves to: its path, its interpreter line and the import paths it names."""
    launcher = environment.shim.resolve()
    lines = launcher.read_text().splitlines()
    interpreter = lines[0].removeprefix("#!").split()
    paths_line = next(text for text in lines if text.startswith("sys.path[1:1] = "))
    return launcher, interpreter, ast.literal_eval(paths_line.split("=", 1)[1].strip())


@pytest.fixture
def installed(environment: Environment) -> tuple[Path, list[str], list[str]]:
    launcher, interpreter, paths = launcher_of(environment)
    if any(Path(path) == REPO or REPO in Path(path).parents for path in paths):
        pytest.skip(f"PYSHIM_SHIM={environment.shim} is a developer launcher that runs this checkout "
                    f"({launcher}); packaging/install-test.sh installs the .deb's shim, which these tests check")
    return launcher, interpreter, paths


def checkout_modules() -> set[str]:
    modules = set()
    for path in (REPO / "shim").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


IMPORT_ALL = """
import importlib, json, pkgutil, sys
sys.path[1:1] = {paths!r}
import shim
found = {{"shim": shim.__file__}}
for info in pkgutil.walk_packages(shim.__path__, "shim."):
    if info.name.startswith({skip!r}):
        continue  # the pyshim command's modules: its own launcher adds their dependencies (grpcio)
    found[info.name] = importlib.import_module(info.name).__file__
import google.protobuf, pyroute2
from shim.criu import bindings  # pycriu is off the launcher's paths: found in the prefix
bindings.rpc_messages(), bindings.image_codec()
for name in ("google.protobuf", "pyroute2", "pycriu.rpc_pb2", "pycriu.images"):
    found[name] = sys.modules[name].__file__
print(json.dumps(found))
"""


def test_every_module_of_the_checkout_imports_from_the_package_prefix(installed):
    launcher, interpreter, paths = installed
    result = run_from_root([*interpreter, "-c", IMPORT_ALL.format(paths=paths, skip="shim.tool.")])
    found: dict[str, str] = json.loads(result.stdout)
    missing = {m for m in checkout_modules() if not m.startswith("shim.tool.")} - found.keys()
    assert not missing, f"modules of the checkout that the installed package lacks: {sorted(missing)}"
    # pycriu comes from <prefix>/pycriu beside the launcher's site directory (shim.criu.bindings looks there).
    roots = [*paths, *(str(Path(p).parent / "pycriu") for p in paths)]
    outside = {name: file for name, file in found.items() if not any(file.startswith(r + "/") for r in roots)}
    assert not outside, f"modules imported from outside the launcher's paths {paths}: {outside}"
    assert not [file for file in found.values() if file.startswith(str(REPO) + "/")]
    version = run_from_root([str(launcher), "-v"]).stdout
    assert "Runtime:  io.containerd.pyshim.v2" in version, version


TOOL_IMPORTS = """
import importlib, json, pkgutil, sys
{paths_line}
import shim.tool
found = {{name: importlib.import_module(name).__file__
         for name in ["shim.tool", *(i.name for i in pkgutil.walk_packages(shim.tool.__path__, "shim.tool."))]}}
import grpc, zstandard
found.update(grpc=grpc.__file__, zstandard=zstandard.__file__)
print(json.dumps(found))
"""


def test_the_pyshim_command_imports_from_the_package_prefix(installed, environment: Environment):
    """The installed `pyshim` (PYSHIM_TOOL): every module of shim.tool and its grpcio/zstandard import under its own
    launcher's interpreter and paths (the tool directory of that interpreter's version), all inside the prefix."""
    launcher, _, paths = installed
    if environment.tool is None:
        pytest.skip("no installed pyshim command (PYSHIM_TOOL) in this environment")
    tool = environment.tool.resolve()
    lines = tool.read_text().splitlines()
    paths_line = next(text for text in lines if text.startswith("sys.path[1:1] = "))
    result = run_from_root([*lines[0].removeprefix("#!").split(), "-c", TOOL_IMPORTS.format(paths_line=paths_line)])
    found: dict[str, str] = json.loads(result.stdout)
    missing = {m for m in checkout_modules() if m.startswith("shim.tool")} - found.keys()
    assert not missing, f"modules of the pyshim command that the installed package lacks: {sorted(missing)}"
    prefix = str(Path(paths[0]).parent) + "/"  # <prefix>/site -> <prefix>/
    outside = {name: file for name, file in found.items() if not file.startswith(prefix)}
    assert not outside, f"the pyshim command imported from outside {prefix}: {outside}"
    assert "usage: pyshim" in run_from_root([str(tool), "--help"]).stdout


def run_from_root(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run with / as the working directory, so nothing can come from the checkout through it."""
    result = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{argv[:3]}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def hiding_containerd_bin(real_bin: Path, into: Path) -> Path:
    """A bin dir whose `containerd` runs the real one in a new mount namespace (propagation slave: the host's mounts
    reach it, its own stay inside) in which an empty read-only tmpfs covers the checkout."""
    into.mkdir(parents=True)
    wrapper = into / "containerd"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# the test's containerd: the checkout is hidden from it and from every shim it starts\n"
        "exec unshare --mount --propagation slave -- sh -c "
        "'mount -t tmpfs -o ro,size=4k,mode=0555 pyshim-hidden-checkout \"$1\" && shift && exec \"$@\"' "
        f"sh {REPO} {real_bin / 'containerd'} \"$@\"\n")
    wrapper.chmod(0o755)
    for name in ("ctr", "containerd-shim-runc-v2"):
        (into / name).symlink_to(real_bin / name)
    return into


def test_a_container_runs_and_checkpoints_with_the_checkout_hidden(
        installed, request: pytest.FixtureRequest, environment: Environment, test_image: TestImage,
        containerd_log_dir: Path, tmp_path: Path):
    launcher, interpreter, _ = installed
    instance = Containerd("2", environment, log_dir=containerd_log_dir)
    track_containerd(request, instance)
    real_bin = instance.bin_dir
    instance.bin_dir = hiding_containerd_bin(real_bin, tmp_path / "bin")
    instance.env["PATH"] = instance.env["PATH"].replace(str(real_bin), str(instance.bin_dir))
    try:
        instance.start()
        # containerd itself sees an empty checkout: the tmpfs is there, not the files.
        assert os.listdir(f"/proc/{instance.pid}/root{REPO}") == []
        instance.import_image(test_image)
        container = instance.new_id("hidden")
        instance.run(container, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
        shim = instance.shim_pid(container)
        assert shim is not None, instance.log_tail()
        # The shim server runs the installed launcher and cannot see the checkout at all.
        argv = processes.cmdline(shim)
        assert argv[:2] == interpreter and Path(argv[2]).resolve() == launcher, argv
        assert os.listdir(f"/proc/{shim}/root{REPO}") == []
        time.sleep(0.5)
        images = tmp_path / "checkpoint"
        instance.ctr("task", "checkpoint", "--image-path", str(images), container, timeout=120)
        record = json.loads((images / "pyshim-checkpoint.json").read_text())
        assert (images / "inventory.img").is_file(), sorted(p.name for p in images.iterdir())
        assert record["stats"], record
        # The task kept running (leave-running is the default) and still counts.
        first = int(instance.ctr("task", "exec", "--exec-id", "look1", container, "cat", "/tmp/count").stdout)
        time.sleep(0.5)
        second = int(instance.ctr("task", "exec", "--exec-id", "look2", container, "cat", "/tmp/count").stdout)
        assert second > first > 0
    finally:
        instance.stop()

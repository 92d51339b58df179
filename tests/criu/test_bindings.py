"""Where pycriu comes from: an interpreter that cannot import it (no site processing, as the shim's launcher runs)
finds it in the configured places, loads it without putting those places on sys.path, skips a broken copy, and
without any copy fails on the first CRIU import with an error that names the fix."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pycriu

import shim

REPO = Path(shim.__file__).resolve().parent.parent
# The directory that holds the test interpreter's pycriu/ (put on sys.path by a .pth file, which -S ignores).
PYCRIU_HOME = str(Path(pycriu.__file__).resolve().parent.parent)


def run_without_site(code: str, pycriu_path: str) -> dict:
    """Run code in `python -I -S` with only the repo and the venv's packages (protobuf) on sys.path."""
    prelude = f"import sys; sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYSHIM_PYCRIU_PATH": pycriu_path}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_launcher_style_interpreter_cannot_import_pycriu_by_itself():
    seen = run_without_site("""
        import importlib.util, json
        print(json.dumps({"found": importlib.util.find_spec("pycriu") is not None}))
    """, "")
    assert seen == {"found": False}


def test_pycriu_is_loaded_from_a_configured_directory_which_stays_off_sys_path():
    seen = run_without_site(f"""
        import json, sys
        from shim.criu import bindings
        rpc = bindings.rpc_messages()
        codec = bindings.image_codec()
        print(json.dumps({{"request": rpc.criu_req(type=rpc.DUMP).type == rpc.DUMP,
                           "codec": hasattr(codec, "load"),
                           "file": sys.modules["pycriu"].__file__,
                           "on_path": {PYCRIU_HOME!r} in sys.path}}))
    """, f"/nonexistent:{PYCRIU_HOME}")
    assert seen["request"] and seen["codec"]
    assert seen["file"].startswith(PYCRIU_HOME)
    assert seen["on_path"] is False


def test_a_broken_copy_is_skipped_for_a_working_one(tmp_path):
    broken = tmp_path / "broken"
    (broken / "pycriu").mkdir(parents=True)
    (broken / "pycriu" / "__init__.py").write_text("raise ImportError('built for another protobuf')\n")
    seen = run_without_site("""
        import json, sys
        from shim.criu import bindings
        print(json.dumps({"file": bindings.pycriu().__file__}))
    """, f"{broken}:{PYCRIU_HOME}")
    assert seen["file"].startswith(PYCRIU_HOME)


def test_without_pycriu_the_checkpoint_path_fails_with_the_fix_named(tmp_path):
    seen = run_without_site("""
        import json
        from shim.criu.bindings import PycriuMissing
        from shim.errors import Unavailable
        try:
            import shim.criu.checkpoint
        except PycriuMissing as exc:
            print(json.dumps({"error": str(exc), "unavailable": isinstance(exc, Unavailable)}))
        else:
            print(json.dumps({"error": None}))
    """, str(tmp_path))
    assert seen["unavailable"] is True
    assert "needs pycriu" in seen["error"]
    assert "python3-pycriu" in seen["error"] and "PYSHIM_PYCRIU_PATH" in seen["error"]
    assert str(tmp_path) in seen["error"]  # where it looked


def test_default_places_include_the_distributions_and_the_package_prefix():
    from shim.criu.bindings import candidate_dirs

    places = candidate_dirs({})
    assert "/usr/lib/python3/dist-packages" in places
    assert places[0].endswith("/pycriu")  # what pyshim's .deb carries, beside its site directory
    assert candidate_dirs({"PYSHIM_PYCRIU_PATH": "/a::/b"}) == ["/a", "/b"]

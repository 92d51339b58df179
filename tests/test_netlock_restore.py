"""What a restore asks of the network lock before runc runs: nothing, for a private network namespace."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import asyncio, sys
    from shim.criu import netlock
    config = {"linux": {"namespaces": [{"type": "network"}]}}  # private: runc makes it, nobody else holds it
    print(asyncio.run(netlock.before_restore(None, sys.argv[1], config)), "pycriu.images" in sys.modules)
""")


def test_restore_into_a_private_namespace_watches_no_lock_and_reads_no_image(tmp_path):
    # An inventory that pycriu could not parse: reading it would log a warning; it must not be read at all,
    # since loading pycriu's messages costs ~20 ms inside the container's downtime.
    (tmp_path / "inventory.img").write_bytes(b"\x00not an image")
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "False"]
    assert result.stderr == ""

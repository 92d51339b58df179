#!/usr/bin/env python3
"""The main job: a stateful container under pyshim, checkpointed and restored with ctr.

Starts a private containerd (containerd 2.x by default: its ctr passes checkpoint options to
any runtime; its own root, state and sockets in a temp dir), imports a locally built busybox
image, then drives everything through `ctr` with `--runtime io.containerd.pyshim.v2`,
printing each command and what it answered: a counter kept only in a shell variable is
checkpointed, the original is killed, and a new container restored from the checkpoint
carries on counting from where it was.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "integration"))
sys.path.insert(0, str(REPO))

from harness.containerd import PYSHIM, Containerd  # noqa: E402
from harness.environment import load_environment  # noqa: E402
from harness.image import build_test_image  # noqa: E402

from shim.criu.stats import summary  # noqa: E402

# Rewritten in place at a fixed width in the image's /tmp/count (integration/harness/image.py): the restore goes into
# a fresh rootfs, where a file the shell had open at the checkpoint must exist at the same size.
COUNTER = "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done"


def show(containerd: Containerd, *args: str, check: bool = True, input: str | None = None) -> str:
    print(f"\n$ ctr {' '.join(shlex.quote(a) for a in args)}")
    result = containerd.ctr(*args, check=check, input=input)
    output = (result.stdout + result.stderr).rstrip()
    if output:
        print("  " + output.replace("\n", "\n  "))
    return result.stdout


def read_counter(containerd: Containerd, container_id: str) -> int:
    """The counter as the container's rootfs (mounted by the shim in its bundle) holds it."""
    value = int((containerd.bundle(container_id) / "rootfs/tmp/count").read_text())
    print(f"  counter = {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containerd", default="2", choices=("1.6", "1.7", "2"))
    version = parser.parse_args().containerd
    environment = load_environment()
    work = Path("/tmp/pyshim-demo")
    image = build_test_image(work / "image", busybox=environment.busybox)
    with Containerd(version, environment, log_dir=work / "logs") as containerd:
        containerd.import_image(image)
        print(f"pyshim demo on a private containerd {containerd.server_version()} ({containerd.address})")
        flags = containerd.runtime_flags(PYSHIM)

        show(containerd, "run", "--rm", *flags, image.ref, containerd.new_id("hello"),
             "sh", "-c", "echo hello from a container run by pyshim; exit 0")

        counter = containerd.new_id("counter")
        show(containerd, "run", "-d", *flags, image.ref, counter, "sh", "-c", COUNTER)
        time.sleep(1)
        show(containerd, "task", "ls")
        show(containerd, "task", "exec", "--exec-id", "look", counter, "cat", "/tmp/count")
        first = read_counter(containerd, counter)

        # Checkpoint into a directory (the task keeps running), then stop the original.
        images = work / "checkpoint"
        shutil.rmtree(images, ignore_errors=True)
        show(containerd, "task", "checkpoint", "--image-path", str(images), counter)
        checkpointed = read_counter(containerd, counter)
        record = json.loads((images / "pyshim-checkpoint.json").read_text())
        print(f"  checkpoint in {images}: {len(list(images.iterdir()))} files; CRIU: {summary(record['stats'])}")
        show(containerd, "task", "kill", "-s", "KILL", counter)
        time.sleep(0.3)
        show(containerd, "task", "rm", counter)

        # Restore under a new id: pyshim takes the image from its runtime options (CriuImagePath).
        restored = containerd.new_id("restored")
        options = work / "restore.toml"
        options.write_text(f'Root = "{containerd.runc_root}"\nCriuImagePath = "{images}"\n')
        show(containerd, "containers", "create", "--runtime", PYSHIM, "--runtime-config-path", str(options),
             image.ref, restored, "sh", "-c", COUNTER)
        show(containerd, "task", "start", "-d", restored)
        time.sleep(0.5)
        show(containerd, "task", "ls")
        resumed = read_counter(containerd, restored)
        show(containerd, "task", "kill", "-s", "KILL", restored)
        time.sleep(0.3)
        show(containerd, "task", "rm", restored)
        show(containerd, "containers", "rm", restored, counter)
        ok = first > 0 and resumed > checkpointed >= first
        print(f"\ncounter: {first} when first read, {checkpointed} at the checkpoint, {resumed} after the restore "
              f"under a new id: {'it resumed where it was' if ok else 'UNEXPECTED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

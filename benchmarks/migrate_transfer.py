"""The migration's archive transfer alone, beside scp and `ssh 'cat > file'`, through one private sshd on loopback.
A benchmark script, not a test. Run as root (sshd):

    /opt/pyshim/venv/bin/python benchmarks/migrate_transfer.py [--mib 1024] [--runs 1] \
        [--ciphers default aes128-gcm@openssh.com]

No containerd, no CRIU: a staging directory shaped like a migration's (checkpoint/pages-1.img of --mib MiB of random
bytes, a few small images, spec.dump, rootfs-diff.tar) goes to a directory on the same file system three ways, for
each cipher ("default": ssh's own choice):
- `scp -r` (the manual baseline's copy);
- `ssh HOST 'cat > FILE'` with the pages file on stdin (ssh's own throughput, one process at each end);
- pyshim's archive: shim/tool/migrate/tarstream.send_tree over a Channel on ssh's pipes, received by this script
  run on the "destination" (`--receive DIR`) with the receiver's code (Channel, tarstream.reading, tarsafe).
It prints the seconds of each, and the receiver's CPU time (user, system). What benchmarks/migrate.py measures
end to end, this one takes apart: the numbers in docs/benchmarks.md's "Live migration's data path" came from it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "integration"), str(ROOT)]

from harness.sshd import Sshd  # noqa: E402

from shim.tool import archive, tarsafe  # noqa: E402
from shim.tool.migrate import frames, tarstream  # noqa: E402
from shim.tool.migrate.channel import Channel  # noqa: E402


def receive(work: str) -> int:
    """The destination's end: greet, take one archive into work, say how long it took and what it cost."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    channel = Channel(read_fd, write_fd, peer="the source").start()
    channel.send_message("hello", protocol_name=frames.HELLO, protocol=frames.PROTOCOL_VERSION)
    channel.next_message(60, waiting_for="archive")
    started = time.monotonic()
    reader = channel.archive_reader(timeout=60)
    with tarstream.reading(reader) as tar:
        for member in tar:
            tarsafe.extract(tar, member, work, data=True)
    reader.drain()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    channel.send_message("archive-received", bytes=reader.count, seconds=time.monotonic() - started,
                         user=usage.ru_utime, system=usage.ru_stime)
    channel.close_sending()
    return 0


def send(ssh: list[str], staging: Path) -> tuple[float, dict]:
    process = subprocess.Popen(ssh, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert process.stdin and process.stdout
    channel = Channel(process.stdout.fileno(), process.stdin.fileno(), peer="the receiver",
                      close_write=process.stdin.close).start()
    frames.check_hello(channel.next_message(60))
    started = time.monotonic()
    channel.send_message("archive")
    tarstream.send_tree(channel, str(staging), archive._entries(str(staging)), filter=archive._owned_by_root)
    answer = channel.next_message(600)
    seconds = time.monotonic() - started
    channel.close_sending()
    process.wait(30)
    return seconds, answer


def make_staging(directory: Path, mib: int) -> Path:
    staging = directory / "staging"
    images = staging / "checkpoint"
    images.mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(images / "pages-1.img", "wb") as f:
        for _ in range(mib):
            f.write(block)
    for name in ("inventory.img", "core-1.img", "mm-1.img", "pagemap-1.img"):
        (images / name).write_bytes(os.urandom(4096))
    for name in ("spec.dump", "config.dump", "rootfs-diff.tar"):
        (staging / name).write_bytes(os.urandom(10240))
    return staging


def timed(argv: list[str], **kwargs) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, timeout=600, **kwargs)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--ciphers", nargs="+", default=["default", "aes128-gcm@openssh.com"])
    parser.add_argument("--receive", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        return receive(args.receive)
    work = Path(tempfile.mkdtemp(prefix="pyshim-transfer-bench-", dir="/var/tmp"))
    sshd = Sshd(work / "sshd")
    try:
        staging = make_staging(work, args.mib)
        sshd.start()
        print(f"{args.mib} MiB, load average {os.getloadavg()}", flush=True)
        for _ in range(args.runs):
            for cipher in args.ciphers:
                options = [*sshd.ssh_options(), *([f"Ciphers={cipher}"] if cipher != "default" else [])]
                flags = [flag for option in options for flag in ("-o", option)]
                target = work / "received"
                scp = timed(["scp", "-q", "-r", "-P", str(sshd.port), *flags, str(staging), f"root@127.0.0.1:{target}"])
                shutil.rmtree(target)
                with open(staging / "checkpoint" / "pages-1.img", "rb") as pages:
                    cat = timed(["ssh", *flags, "-p", str(sshd.port), "root@127.0.0.1", f"cat > {work}/cat.out"],
                                stdin=pages)
                os.unlink(work / "cat.out")
                target.mkdir()
                ssh = ["ssh", "-T", *flags, "-p", str(sshd.port), "root@127.0.0.1",
                       f"{sys.executable} {Path(__file__).resolve()} --receive {target}"]
                seconds, answer = send(ssh, staging)
                shutil.rmtree(target)
                print(f"{cipher}: scp -r {scp:.2f} s, ssh cat {cat:.2f} s, pyshim archive {seconds:.2f} s (receiver "
                      f"CPU user {answer['user']:.2f} s, system {answer['system']:.2f} s)", flush=True)
        return 0
    finally:
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

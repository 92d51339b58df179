"""Live migration between two hosts: the downtime a client sees, CRIU's frozen time, total time and bytes moved, for
each `pyshim migrate` mode beside the baseline a user has today. A benchmark script, not a test. Run as root:

    /opt/pyshim/venv/bin/python benchmarks/migrate.py [--mib 64 256 1024] [--runs 3] [--modes baseline stop-copy ...]

The two hosts are those of the integration tests (integration/harness/migration.py): two private containerd 2.x, the
network lab (host A and host B network namespaces with bridges, the container's namespace made as CNI makes it, a
client namespace routing the container's address to the host that serves it; the route follows the destination's
/tasks/start event) and a private sshd standing for host B's. The workload is memfill (integration/harness/memfill.c):
N MiB of private memory filled with a pattern, serving `ping` (a counter) and `check` (the pattern) over TCP.

For each size, mode and run, a fresh container on A, then one client connection that sends `ping` every 1 ms and
waits for each answer (so at most one request is in flight). Measured:
- downtime: the longest gap between two consecutive answers from the start of the move until 0.5 s after it ended
  (what the workload's client saw; it includes TCP's retransmission backoff after the blackout);
- frozen: CRIU's frozen_time (stats-dump; for `pyshim migrate` its report's frozen_ms);
- total: the wall time of the move (for the baseline: checkpoint, copy and restore; for migrate: the command);
- moved: bytes copied to the destination (the baseline: the image directory; migrate: its report's bytes_moved).
After each move the same connection must answer `check` with `ok N` (the memory arrived intact), else the run fails.

The baseline: `ctr task checkpoint --exit --image-path DIR` on A (the container runs under pyshim, with
io.pyshim.checkpoint.tcp-established=true, since the Go shim refuses an established connection), `scp -r DIR` to B
through B's sshd (the copy a user makes between hosts, encrypted like the migration's), a container created on B with
CriuImagePath=<copy> in its runtime options and `ctr task start` (the restore), then the source removed. Modes
`pyshim migrate` does not offer are reported as such. Results: medians over the runs, written as a dated section at
the top of docs/benchmarks.md (`--out`), with the command line, the load average and the median run's phases.

A mode may name the ssh cipher it must use, `MODE:CIPHER` (`baseline:aes128-gcm@openssh.com` is `scp -c`, a
migrate mode gets `--ssh-option Ciphers=CIPHER`): ssh's encryption bounds the transfer, so a comparison holds only
between rows of the same cipher. Each row says the cipher ssh negotiated (read from ssh's own debug output: scp -v,
migrate's ssh with LogLevel=DEBUG1). The tool and shim measured are those of the environment (PYSHIM_ENV_FILE):
another checkout's launchers measure that checkout's code with this script.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "integration"), str(ROOT)]

from harness import memfill  # noqa: E402
from harness.containerd import PYSHIM, Containerd  # noqa: E402
from harness.environment import load_environment  # noqa: E402
from harness.image import TestImage  # noqa: E402
from harness.migration import TwoHosts, mode_skip_reason  # noqa: E402
from harness.migration_lab import CONTAINER_ADDRESS, MigrationLab, RouteFollower  # noqa: E402
from harness.sshd import Sshd  # noqa: E402

from shim.criu.stats import read_stats  # noqa: E402

PORT = 7002
MODES = ("baseline", "stop-copy", "stream", "post-copy")
TAIL = 0.5  # seconds of answers counted after the move ended
TCP_ESTABLISHED = "io.pyshim.checkpoint.tcp-established=true"
NEGOTIATED = re.compile(r"kex: client->server cipher: (\S+)")


def negotiated_cipher(ssh_debug: str) -> str:
    """The cipher of the last connection in ssh's debug output (the migration's own, after any probe)."""
    found = NEGOTIATED.findall(ssh_debug)
    return found[-1] if found else "?"


def mode_argument(text: str) -> str:
    mode = text.split(":", 1)[0]
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"{text!r}: MODE or MODE:CIPHER, MODE one of {', '.join(MODES)}")
    return text


class Pinger:
    """`ping` every 1 ms over one connection, each answer's time kept; runs in a thread until stopped."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.answers: list[float] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pinger", daemon=True)

    def start(self) -> Pinger:
        self._thread.start()
        return self

    def _run(self) -> None:
        self.sock.settimeout(120)
        next_send = time.monotonic()
        while not self._stop.is_set():
            try:
                memfill.pongs(self.sock)
            except (OSError, AssertionError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                return
            now = time.monotonic()
            self.answers.append(now)
            next_send += 0.001
            if next_send > now:
                time.sleep(next_send - now)
            else:
                next_send = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(130)

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t in self.answers if start <= t <= end]
        edges = [start, *times, end] if times else [start, end]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))


@dataclass
class Result:
    downtime: float
    frozen: float  # seconds, or nan
    total: float
    moved: int
    phases: str = ""  # migrate's report: where its time went
    cipher: str = "?"  # what ssh negotiated


@dataclass
class Bench:
    hosts: TwoHosts
    image: TestImage
    notes: list[str] = field(default_factory=list)

    def start_workload(self, mib: int) -> tuple[str, str, str, socket.socket]:
        lab = self.hosts.lab
        on_a, on_b = lab.container_netns(lab.a), lab.container_netns(lab.b)
        lab.serve(CONTAINER_ADDRESS, lab.a)
        container_id = self.hosts.source.new_id(f"mem{mib}")
        self.hosts.source.run(container_id, self.image, *memfill.command(mib, PORT), runtime=PYSHIM,
                              extra=["--with-ns", f"network:{on_a}", "--annotation", TCP_ESTABLISHED])
        client = memfill.wait_ready(lambda: lab.connect(CONTAINER_ADDRESS, PORT, timeout=2), timeout=120)
        return container_id, on_a, on_b, client

    def one(self, mib: int, variant: str) -> Result:
        mode, _, cipher = variant.partition(":")
        container_id, on_a, on_b, client = self.start_workload(mib)
        pinger = Pinger(client).start()
        time.sleep(0.2)  # a steady rhythm before the move
        try:
            with RouteFollower(self.hosts.lab, self.hosts.destination, container_id, CONTAINER_ADDRESS,
                               self.hosts.lab.b):
                started = time.monotonic()
                frozen, moved, phases, used = (self.baseline(container_id, mib, on_b, cipher) if mode == "baseline"
                                               else self.migrate(container_id, mode, on_b, cipher))
                ended = time.monotonic()
            time.sleep(TAIL)
        finally:
            pinger.stop()
        if pinger.error:
            raise RuntimeError(f"{mode} {mib} MiB: the client's connection failed: {pinger.error}")
        check = memfill.ask(client, "check")
        client.close()
        if check != f"ok {mib}":
            raise RuntimeError(f"{mode} {mib} MiB: the memory arrived damaged: {check!r}")
        self.remove(container_id)
        for netns in (on_a, on_b):
            if left := self.hosts.lab.remove_container_netns(netns):
                raise RuntimeError(f"{mode} {mib} MiB: left in {netns}: {left}")
        return Result(pinger.longest_gap(started, ended + TAIL), frozen, ended - started, moved, phases, used)

    def migrate(self, container_id: str, mode: str, on_b: str, cipher: str) -> tuple[float, int, str, str]:
        forced = ["--ssh-option", f"Ciphers={cipher}"] if cipher else []
        run = self.hosts.migrate(container_id, f"--{mode}", "--dest-netns", on_b, *forced, "--ssh-option",
                                 "LogLevel=DEBUG1", timeout=1200)
        if run.returncode != 0:
            raise RuntimeError(f"pyshim migrate --{mode} failed: {run.stderr[-2000:]}")
        phases = ", ".join(f"{name} {ms / 1000:.2f}" for name, ms in (run.report.get("phases") or {}).items())
        return (run.report.get("frozen_ms", float("nan")) / 1000, int(run.report.get("bytes_moved", 0)), phases,
                negotiated_cipher(run.stderr))

    def baseline(self, container_id: str, mib: int, on_b: str, cipher: str) -> tuple[float, int, str, str]:
        source, destination = self.hosts.source, self.hosts.destination
        images = source.tmp / f"checkpoint-{container_id}"
        started = time.monotonic()
        source.ctr("task", "checkpoint", "--exit", "--image-path", str(images), container_id, timeout=600)
        stats = read_stats(str(images))
        copy_started = time.monotonic()
        copied = destination.tmp / f"checkpoint-{container_id}"
        sshd = self.hosts.sshd
        options = [flag for option in sshd.ssh_options() for flag in ("-o", option)]
        forced = ["-c", cipher] if cipher else []
        scp = subprocess.run(["scp", "-v", "-r", "-P", str(sshd.port), *options, *forced, str(images),
                              f"root@127.0.0.1:{copied}"], check=True, timeout=600, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        moved = sum(p.stat().st_size for p in copied.rglob("*") if p.is_file())
        restore_started = time.monotonic()
        runtime_options = destination.tmp / f"{container_id}.toml"
        runtime_options.write_text(f'Root = "{destination.runc_root}"\nCriuImagePath = "{copied}"\n')
        destination.ctr("containers", "create", "--runtime", PYSHIM, "--runtime-config-path", str(runtime_options),
                        "--with-ns", f"network:{on_b}", "--annotation", TCP_ESTABLISHED, self.image.ref,
                        container_id, *memfill.command(mib, PORT))
        destination.ctr("task", "start", "-d", "--fifo-dir", str(destination.fifo_dir), container_id, timeout=600)
        source.ctr("task", "rm", "-f", container_id, check=False)
        source.ctr("containers", "rm", container_id, check=False)
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(copied, ignore_errors=True)
        return stats.get("frozen_time", float("nan")) / 1e6, moved, f"checkpoint {copy_started - started:.2f}, " \
            f"scp {restore_started - copy_started:.2f}, restore {time.monotonic() - restore_started:.2f}", \
            negotiated_cipher(scp.stderr)

    def remove(self, container_id: str) -> None:
        for host in (self.hosts.destination, self.hosts.source):
            host.ctr("task", "rm", "-f", container_id, check=False)
            host.ctr("containers", "rm", container_id, check=False)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(command: str, loads: tuple[tuple[float, ...], tuple[float, ...]], rows: list[tuple], runs: int,
           skipped: dict[str, str], revision: str, tool: str) -> str:
    today = datetime.date.today().isoformat()
    sizes = sorted({mib for mib, _, _ in rows})
    lines = [f"## Live migration between two hosts: {', '.join(str(m) for m in sizes)} MiB ({today})", "",
             f"    {command}", "",
             f"Script from checkout {revision}, tool {tool}; containerd 2.x, runc, CRIU and the workload as in "
             "`benchmarks/migrate.py`'s "
             f"docstring; medians of {runs} run(s). Load average (1/5/15 min) at the start "
             f"{'/'.join(f'{x:.2f}' for x in loads[0])}, at the end {'/'.join(f'{x:.2f}' for x in loads[1])} "
             "(2 cores, shared with other jobs).", "",
             "| touched memory | mode | ssh cipher | downtime (longest gap, 1 ms pings) | CRIU frozen | total | moved "
             "| phases of the median run (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for mib, mode, result in rows:
        frozen = "n/a" if result.frozen != result.frozen else f"{result.frozen * 1000:.0f} ms"
        lines.append(f"| {mib} MiB | {mode} | {result.cipher} | {result.downtime * 1000:.0f} ms | {frozen} | "
                     f"{result.total:.2f} s | {result.moved / (1 << 20):.1f} MiB | {result.phases} |")
    lines.append("")
    for mode, reason in skipped.items():
        lines.append(f"- {mode}: not measured: {reason}")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), type=mode_argument,
                        help=f"MODE or MODE:CIPHER (that ssh cipher forced), MODE one of {', '.join(MODES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    command = "/opt/pyshim/venv/bin/python benchmarks/migrate.py " + " ".join(sys.argv[1:])
    environment = load_environment()
    work = Path(tempfile.mkdtemp(prefix="pyshim-migrate-bench-", dir="/var/tmp"))
    loads_start = os.getloadavg()
    instances: list[Containerd] = []
    lab = MigrationLab()
    sshd = Sshd(work / "sshd", tool=environment.tool)
    hosts: TwoHosts | None = None
    try:
        image = memfill.build_memfill_image(work / "image-cache", busybox=environment.busybox)
        for _ in range(2):
            instance = Containerd("2", environment, log_dir=work / "logs")
            instances.append(instance)
            instance.start()
            instance.import_image(image)
        sshd.start()
        (work / "migrate").mkdir()
        hosts = TwoHosts(instances[0], instances[1], lab, sshd, environment.tool, work / "migrate")
        bench = Bench(hosts, image)
        skipped = {variant: reason for variant in args.modes if not variant.startswith("baseline")
                   if (reason := mode_skip_reason(environment.tool, variant.split(":", 1)[0]))}
        rows = []
        for mib in args.mib:
            for mode in [m for m in args.modes if m not in skipped]:
                results = []
                for run in range(args.runs):
                    result = bench.one(mib, mode)
                    print(f"{mib} MiB {mode} run {run + 1}: downtime {result.downtime * 1000:.0f} ms, frozen "
                          f"{result.frozen * 1000:.0f} ms, total {result.total:.2f} s, moved "
                          f"{result.moved / (1 << 20):.1f} MiB, cipher {result.cipher} ({result.phases})", flush=True)
                    results.append(result)
                middle = sorted(results, key=lambda r: r.total)[len(results) // 2]
                rows.append((mib, mode, Result(median([r.downtime for r in results]),
                                               median([r.frozen for r in results]),
                                               median([r.total for r in results]),
                                               int(median([r.moved for r in results])), middle.phases,
                                               "/".join(sorted({r.cipher for r in results})))))
        revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
        section = render(command, (loads_start, os.getloadavg()), rows, args.runs, skipped, revision,
                         str(environment.tool))
        print(section)
        document = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
        head, found, rest = document.partition("\n## ")
        args.out.write_text(f"{head}\n{section}\n## {rest}" if found else f"{document.rstrip()}\n\n{section}")
        return 0
    finally:
        if hosts is not None:
            for note in hosts.end_leftover_processes():
                print(note, file=sys.stderr)
        sshd.stop()
        for instance in instances:
            instance.stop()
        left = lab.close()
        if left:
            print(f"left behind by the lab: {left}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

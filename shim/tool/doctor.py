"""`pyshim doctor`: the host as pyshim sees it, each problem with its fix.

Checks are grouped by what they decide. A failing check that checkpoint/restore cannot do without (CRIU and
`criu check`, pycriu, an OCI runtime, the shim binary where containerd looks, a readable host config) makes the exit
status 1; the rest (kernel features for lazy pages and pre-dump, iptables for TCP, containerd not running here) are
warnings, which name what will not work and how to get it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_CRIU = (4, 2)
SHIM_BINARY = "containerd-shim-pyshim-v2"
PYSHIM_CONTAINERD_DIRS = "/opt/pyshim/containerd/*/bin"
INSTALL = "bash packaging/install.sh (pyshim's installer) installs it"


@dataclass
class Check:
    area: str
    status: str
    found: str
    fix: str = ""


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_criu() -> list[Check]:
    criu = shutil.which("criu")
    if criu is None:
        return [Check("criu", FAIL, "criu is not on PATH",
                      f"install CRIU >= 4.2 ({INSTALL}; Debian 13: apt install criu) and put it on containerd's PATH")]
    version = _run([criu, "--version"])
    text = (version.stdout if version else "") or ""
    match = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    checks = []
    if match is None:
        checks.append(Check("criu", FAIL, f"{criu} does not tell its version: {_first_line(text) or 'no output'}",
                            f"reinstall CRIU >= 4.2 ({INSTALL})"))
        return checks
    numbers = tuple(int(n or 0) for n in match.groups())
    shown = ".".join(map(str, numbers))
    if numbers[:2] < MIN_CRIU:
        checks.append(Check("criu", FAIL, f"CRIU {shown} at {criu} is older than 4.2",
                            f"install CRIU >= 4.2 ({INSTALL})"))
    else:
        checks.append(Check("criu", OK, f"CRIU {shown} at {criu}"))
    result = _run([criu, "check"], timeout=60)
    if result is not None and result.returncode == 0:
        checks.append(Check("criu check", OK, _first_line(result.stdout + result.stderr) or "passed"))
    else:
        said = _first_line((result.stderr + result.stdout) if result else "did not finish") or "failed"
        checks.append(Check("criu check", FAIL, f"`criu check` failed: {said}",
                            "run `criu check` as root for the details; a kernel without checkpoint support needs "
                            "CONFIG_CHECKPOINT_RESTORE and friends (CRIU's docs list them)"))
    for feature, what, fix in (
            ("uffd-noncoop", "userfaultfd (lazy pages, post-copy)", "lazy pages need CONFIG_USERFAULTFD"),
            ("mem_dirty_track", "soft-dirty memory tracking (pre-dump, incremental checkpoints)",
             "pre-dump needs CONFIG_MEM_SOFT_DIRTY"),
            ("timens", "time namespaces", "containers with a time namespace need a kernel >= 5.6")):
        result = _run([criu, "check", "--feature", feature], timeout=30)
        if result is not None and result.returncode == 0:
            checks.append(Check("kernel", OK, what))
        else:
            checks.append(Check("kernel", WARN, f"no {what}", fix))
    return checks


def check_pycriu() -> Check:
    from shim.criu import bindings

    try:
        module = bindings.pycriu()
    except bindings.PycriuMissing as exc:
        return Check("pycriu", FAIL, f"not found (looked in {', '.join(exc.looked_in) or 'nowhere'})", bindings.FIX)
    return Check("pycriu", OK, os.path.dirname(getattr(module, "__file__", "") or "") or "loaded")


def check_cgroups() -> Check:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return Check("cgroups", OK, "cgroup v2 (unified)")
    if os.path.isdir("/sys/fs/cgroup/unified"):
        return Check("cgroups", OK, "cgroup v1 hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified)")
    if os.path.isdir("/sys/fs/cgroup/memory"):
        return Check("cgroups", OK, "cgroup v1")
    return Check("cgroups", WARN, "no cgroup hierarchy found under /sys/fs/cgroup",
                 "mount cgroup2 on /sys/fs/cgroup (systemd does it at boot)")


def check_network_lock() -> list[Check]:
    checks = []
    iptables = [name for name in ("iptables-restore", "ip6tables-restore") if shutil.which(name) is None]
    if iptables:
        checks.append(Check("network lock", WARN, f"{' and '.join(iptables)} not on PATH: CRIU cannot lock the "
                                                  "network while it dumps established TCP connections",
                            "apt install iptables (or checkpoint with --network-lock nftables, or without "
                            "--tcp-established)"))
    else:
        checks.append(Check("network lock", OK, "iptables-restore and ip6tables-restore (CRIU's default lock)"))
    if shutil.which("nft"):
        checks.append(Check("network lock", OK, "nft (for --network-lock nftables)"))
    else:
        checks.append(Check("network lock", WARN, "nft not on PATH: --network-lock nftables will not work",
                            "apt install nftables, or keep CRIU's iptables lock"))
    return checks


def check_runtimes() -> list[Check]:
    checks, found = [], 0
    for name in ("runc", "crun"):
        path = shutil.which(name)
        if path is None:
            checks.append(Check("oci runtime", WARN, f"{name} not on PATH", f"apt install {name}"))
            continue
        result = _run([path, "--version"])
        found += 1
        checks.append(Check("oci runtime", OK, f"{_first_line(result.stdout) if result else name} at {path}"))
    if not found:
        checks.append(Check("oci runtime", FAIL, "neither runc nor crun is on PATH",
                            "apt install runc (pyshim runs containers with runc by default)"))
    return checks


def check_containerd(address: str, namespace: str) -> list[Check]:
    checks = []
    binaries = [p for p in [shutil.which("containerd"), *sorted(glob.glob(f"{PYSHIM_CONTAINERD_DIRS}/containerd"))]
                if p]
    for path in dict.fromkeys(binaries):
        result = _run([path, "--version"])
        checks.append(Check("containerd", OK, f"{_first_line(result.stdout) if result else '?'} ({path})"))
    if not binaries:
        checks.append(Check("containerd", WARN, "no containerd binary on PATH or in /opt/pyshim/containerd",
                            f"install containerd ({INSTALL})"))
    shim = shutil.which(SHIM_BINARY)
    if shim:
        checks.append(Check("registration", OK, f"{SHIM_BINARY} at {shim}: containerd on this PATH runs runtime "
                                                "io.containerd.pyshim.v2"))
    else:
        checks.append(Check("registration", FAIL, f"{SHIM_BINARY} is not on PATH: containerd cannot start "
                                                  "io.containerd.pyshim.v2",
                            f"ln -s /opt/pyshim/venv/bin/{SHIM_BINARY} /usr/local/bin/ ({INSTALL})"))
    runc_shim = shutil.which("containerd-shim-runc-v2")
    if runc_shim and os.path.realpath(runc_shim).endswith(SHIM_BINARY):
        checks.append(Check("registration", OK, f"containerd-shim-runc-v2 ({runc_shim}) is pyshim: runc.v2 "
                                                "containers run under pyshim"))
    if os.path.exists(address):
        try:
            from shim.tool.containerd_api import ContainerdClient

            with ContainerdClient(address, namespace) as client:
                version, _ = client.version()
        except Exception as exc:  # noqa: BLE001 - any failure here is the finding
            checks.append(Check("containerd", WARN, f"{address} does not answer: {exc}",
                                "start containerd, or give its socket with --address"))
        else:
            major = version.lstrip("v").split(".")[0]
            sends = ("forwards Checkpoint options to every runtime" if major.isdigit() and int(major) >= 2 else
                     "forwards Checkpoint options it is given; `ctr task checkpoint` sends them only to "
                     "io.containerd.runc.*, `pyshim checkpoint create` always")
            checks.append(Check("containerd", OK, f"containerd {version} at {address}: {sends}"))
    else:
        checks.append(Check("containerd", WARN, f"no containerd socket at {address}",
                            "start containerd, or give its socket with --address / CONTAINERD_ADDRESS"))
    return checks


def check_host_config() -> Check:
    from shim.criu.options import HOST_CONFIG, OptionError, from_host_config

    if not os.path.exists(HOST_CONFIG):
        return Check("host config", OK, f"{HOST_CONFIG} absent: pyshim's defaults")
    try:
        settings = from_host_config()
    except OptionError as exc:
        return Check("host config", FAIL, str(exc), f"fix or remove {HOST_CONFIG} (docs/checkpoint.md lists the keys)")
    shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "no [checkpoint] settings"
    return Check("host config", OK, f"{HOST_CONFIG}: {shown}")


def run(args) -> int:
    checks = [*check_criu(), check_pycriu(), check_cgroups(), *check_network_lock(), *check_runtimes(),
              *check_containerd(args.address, args.namespace), check_host_config()]
    failed = [c for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "checkpoint_can_work": not failed}, indent=2))
    else:
        for check in checks:
            print(f"{check.status:<4}  {check.area:<13} {check.found}")
            if check.fix and check.status != OK:
                print(f"{'':<4}  {'':<13} fix: {check.fix}")
        print("checkpoint and restore can work here" if not failed else
              f"checkpoint and restore cannot work here: {len(failed)} problem(s) above")
    return 1 if failed else 0

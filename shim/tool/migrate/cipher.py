"""The cipher the migration's ssh asks for first: AES-GCM where this CPU has AES instructions, unless someone chose.

ssh's own order puts chacha20-poly1305 first, the right choice for a CPU without AES instructions. With them (x86's
AES-NI, ARMv8's crypto extension) AES-GCM costs ssh less CPU per byte, and a migration's bulk (the memory) goes
through ssh's encryption on both hosts: `ssh host 'cat > file'` through sshd on loopback moved 1 GiB in 1.9-2.7 s
with aes128-gcm against 3.3-4.0 s with ssh's default (a 2-core test machine; docs/benchmarks.md has the
migrations). So when nobody chose ciphers, the migration's ssh gets ssh's default list with aes128-gcm@openssh.com
moved to the front: the server still decides among what it accepts, and a server refusing AES-GCM negotiates the
next as before.

"Nobody chose" means: no `--ssh-option Ciphers=...` and no Ciphers in the ssh configuration that applies to this
destination (`ssh -G` with and without the configuration files give the same list). Whoever wants another cipher
says so there. Only this host's CPU is looked at: the destination's is assumed to be alike.
"""

from __future__ import annotations

import subprocess

AES_GCM = "aes128-gcm@openssh.com"
CPUINFO = "/proc/cpuinfo"
PROBE_TIMEOUT = 10.0


def has_aes_instructions(cpuinfo: str = CPUINFO) -> bool:
    """The CPU's flags (x86: `flags`, arm64: `Features`) include `aes`."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def keyword(option: str) -> str:
    """The keyword of an ssh_config setting given as `Keyword=value` or `Keyword value`."""
    return option.replace("=", " ").split(" ", 1)[0].lower()


def ciphers_of(ssh_g_output: str) -> list[str] | None:
    """The cipher list `ssh -G` printed, or None."""
    for line in ssh_g_output.splitlines():
        key, _, value = line.partition(" ")
        if key == "ciphers":
            return value.strip().split(",")
    return None


def preferred_order(default: list[str], configured: list[str] | None) -> list[str] | None:
    """ssh's default list with AES-GCM first, when what applies (configured) is that default and it offers AES-GCM;
    None when someone chose, or there is nothing to change."""
    if configured != default or AES_GCM not in default or default[0] == AES_GCM:
        return None
    return [AES_GCM, *(name for name in default if name != AES_GCM)]


def preference(config_argv: list[str], host: str, ssh_options: list[str], *,
               aes: bool | None = None) -> str | None:
    """The `Ciphers=...` setting to give ssh after the user's options, or None to leave ssh's choice alone.
    config_argv: the ssh command line up to the host (its -o, -p, -l), so that `ssh -G` sees what ssh will."""
    if any(keyword(option) == "ciphers" for option in ssh_options):
        return None
    if not (has_aes_instructions() if aes is None else aes):
        return None
    default = _ssh_g(["ssh", "-G", "-F", "/dev/null", host])
    configured = _ssh_g([config_argv[0], "-G", *config_argv[1:], host])
    order = preferred_order(default, configured) if default else None
    return f"Ciphers={','.join(order)}" if order else None


def _ssh_g(argv: list[str]) -> list[str] | None:
    """The ciphers ssh would offer (`ssh -G` evaluates the configuration and connects to nothing); None when ssh
    cannot say (too old for -G, not installed)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return ciphers_of(done.stdout) if done.returncode == 0 else None

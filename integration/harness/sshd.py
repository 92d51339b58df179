"""A private OpenSSH server standing for the destination host's sshd, for `pyshim migrate`'s ssh transport.

Everything lives in a directory the test owns: a fresh host key, a client key, authorized_keys holding only that
key, known_hosts holding only that host key, and the config. sshd listens on 127.0.0.1 (a free port), runs in the
foreground as the test's child (ended by pid), and gives its sessions a PATH whose first directory holds the `pyshim`
under test, so that `ssh ... pyshim` on the "destination" runs the same code as the source.

Loopback, not an address in a test namespace: containerd, the shims and CRIU run in the host's namespace, and so
does whatever the migrate command starts on either side; a transport inside the hosts' namespaces would measure the
lab, not the command.

`ssh_options()` is what `pyshim migrate --ssh-option` takes (ssh's `-o` key=value); `destination()` renders DEST.
`session_pids()` lists the per-connection sshd processes (to cut a transfer by killing one).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from . import processes

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
# sshd refuses to start without its privilege separation directory (the package makes it at boot, not at install).
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable_reason() -> str | None:
    if not os.access(SSHD, os.X_OK) or not shutil.which(SSH_KEYGEN) or not shutil.which("ssh"):
        return f"{SSHD}, ssh or ssh-keygen missing (packaging/install-test.sh installs openssh-server)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "pyshim-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


class Sshd:
    """An sshd for root on 127.0.0.1:<port>, keys and config in `directory`. Use as a context manager."""

    def __init__(self, directory: Path, *, tool: Path | None = None):
        """tool: the `pyshim` the sessions find first on PATH (None: the system's PATH only)."""
        self.directory = directory
        self.tool = tool
        self.port = 0
        self.host_key = directory / "host_ed25519"
        self.client_key = directory / "client_ed25519"
        self.known_hosts = directory / "known_hosts"
        self.config = directory / "sshd_config"
        self.log = directory / "sshd.log"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> Sshd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.client_key):
            if not key.exists():
                _keygen(key)
        (self.directory / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        path = SYSTEM_PATH
        if self.tool is not None:
            bin_dir = self.directory / "bin"
            bin_dir.mkdir(exist_ok=True)
            link = bin_dir / "pyshim"
            link.unlink(missing_ok=True)
            link.symlink_to(self.tool)
            path = f"{bin_dir}:{path}"
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        for _attempt in range(5):  # another process may take the free port first
            self.port = _free_port()
            host_key_line = Path(f"{self.host_key}.pub").read_text().split()
            self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key_line[0]} {host_key_line[1]}\n")
            self.config.write_text(self._config_text(path))
            with open(self.log, "ab") as log:
                self._process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=log)
            if self._wait_listening():
                return
            self._end_process()
        raise RuntimeError(f"sshd did not start listening:\n{self.log.read_text(errors='replace')[-2000:]}")

    def _config_text(self, path: str) -> str:
        return "\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # the test's temp dir is not root-owned all the way up as StrictModes wants
            "StrictModes no",
            "PidFile none",
            "PrintMotd no",
            "LogLevel VERBOSE",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",
            f"SetEnv PATH={path}",
            "",
        ])

    def _wait_listening(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            with socket.socket() as probe:
                probe.settimeout(1)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return True
            time.sleep(0.05)
        return False

    def restrict(self, forced_command: str) -> None:
        """The client key allowed only forced_command (authorized_keys' command=, with every forwarding off), as an
        operator restricts a migration key; sshd reads authorized_keys at each login."""
        key = Path(f"{self.client_key}.pub").read_text().strip()
        (self.directory / "authorized_keys").write_text(f'command="{forced_command}",restrict {key}\n')

    @property
    def pid(self) -> int:
        assert self._process is not None, "sshd not started"
        return self._process.pid

    def ssh_options(self) -> list[str]:
        """ssh `-o` settings (key=value) that log in with the client key and trust only this server's host key."""
        return [f"IdentityFile={self.client_key}", "IdentitiesOnly=yes", f"UserKnownHostsFile={self.known_hosts}",
                "StrictHostKeyChecking=yes", "BatchMode=yes", "GlobalKnownHostsFile=/dev/null"]

    def ssh_argv(self, *command: str) -> list[str]:
        """An ssh command line to this server running `command` as root (to check what the sessions see)."""
        return ["ssh", *[flag for option in self.ssh_options() for flag in ("-o", option)], "-p", str(self.port),
                "root@127.0.0.1", *command]

    def destination(self, containerd_socket: str, namespace: str | None = None) -> str:
        """`pyshim migrate`'s DEST for a containerd reached through this server."""
        query = f"?namespace={namespace}" if namespace else ""
        return f"ssh://root@127.0.0.1:{self.port}{containerd_socket}{query}"

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener), oldest first."""
        if self._process is None or self._process.poll() is not None:
            return []
        return sorted(processes.children_of(self._process.pid))

    def kill_sessions(self, signum: int = signal.SIGKILL) -> list[int]:
        """Signal every session (each is this sshd's child: checked through a pidfd); the pids signalled."""
        pids = self.session_pids()
        for pid in pids:
            processes.kill_child_of(self.pid, pid, signum)
        return pids

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _end_process(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()  # our child, by pid; its sessions end with their connections
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def stop(self) -> list[str]:
        """End sshd and every session still open; the notes on what had to be killed (empty when tidy)."""
        notes = [f"killed ssh session {pid}" for pid in self.kill_sessions()]
        self._end_process()
        # /run/sshd stays even if this one made it: another test's sshd (tests run side by side) may be using it,
        # and without it every new connection to that one is reset ("Missing privilege separation directory").
        return notes

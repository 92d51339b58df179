"""The way to the destination: ssh running the destination's `pyshim migrate-receive`, the framed protocol over
ssh's stdin and stdout, ssh's own messages (and the receiver's progress lines) on its stderr.

ssh does the authentication and encryption operators already trust: keys come from the user's ssh config, agent, or
`--ssh-option IdentityFile=FILE`; host keys are checked as ssh always does (BatchMode: nothing is asked, an unknown
host key is a refusal). No listener is opened anywhere, no forwarding is asked for (ClearAllForwardings), and nothing
secret is on any command line.
"""

from __future__ import annotations

import collections
import shlex
import subprocess
import sys
import threading
import time

from shim.tool.errors import ToolError
from shim.tool.migrate import cipher, frames
from shim.tool.migrate.channel import Channel, ChannelClosed
from shim.tool.migrate.dest import Destination

HELLO_TIMEOUT = 60.0
CLOSE_TIMEOUT = 10.0
# Settings every migration's ssh runs with, before the user's own --ssh-option (ssh takes the first value given
# for a keyword, so these cannot be overridden by accident).
FIXED_OPTIONS = ("BatchMode=yes", "ClearAllForwardings=yes", "RequestTTY=no", "ServerAliveInterval=5",
                 "ServerAliveCountMax=6", "ForwardAgent=no", "ForwardX11=no", "PermitLocalCommand=no")


def check_ssh_option(option: str) -> str:
    """An ssh_config setting (`Keyword=value` or `Keyword value`), passed as `-o` (ssh's other flags are not)."""
    if not option or option.startswith("-") or not cipher.keyword(option).isalnum() or "\n" in option:
        raise ToolError(f"--ssh-option {option!r}: give an ssh_config setting as Keyword=value (passed to ssh as "
                        "-o), e.g. IdentityFile=/root/.ssh/migrate or UserKnownHostsFile=/etc/pyshim/known_hosts")
    return option


def remote_command(dest: Destination) -> list[str]:
    argv = [dest.pyshim, "--address", dest.socket, "--namespace", dest.namespace]
    if dest.store:
        argv += ["--store", dest.store]
    argv.append("migrate-receive")
    if dest.runtime_config:
        argv += ["--runtime-config", dest.runtime_config]
    return argv


def ssh_argv(dest: Destination, ssh_options: list[str], *, connect_timeout: float,
             cipher_preference: str | None = None) -> list[str]:
    """cipher_preference: a `Ciphers=` setting (shim/tool/migrate/cipher.py), after the user's options, which it
    thus cannot override."""
    argv = ["ssh", "-T", "-x", "-a"]
    for option in (*FIXED_OPTIONS, f"ConnectTimeout={max(1, int(connect_timeout))}"):
        argv += ["-o", option]
    for option in ssh_options:
        argv += ["-o", check_ssh_option(option)]
    if cipher_preference:
        argv += ["-o", cipher_preference]
    if dest.port:
        argv += ["-p", str(dest.port)]
    if dest.user:
        argv += ["-l", dest.user]
    # ssh hands the remote command to the user's shell as one string: quoted word by word
    return [*argv, "--", dest.host, shlex.join(remote_command(dest))]


class Session:
    """One ssh connection to one receiver."""

    def __init__(self, dest: Destination, ssh_options: list[str], *, echo=None) -> None:
        self.dest = dest
        argv = ssh_argv(dest, ssh_options, connect_timeout=30)
        self.cipher_preference = cipher.preference(argv[:argv.index("--")], dest.host, ssh_options)
        self.argv = ssh_argv(dest, ssh_options, connect_timeout=30, cipher_preference=self.cipher_preference)
        self.echo = echo or (lambda line: print(f"  destination: {line}", file=sys.stderr, flush=True))
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.process: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.hello: dict = {}

    def open(self, timeout: float = HELLO_TIMEOUT) -> Session:
        if self.cipher_preference:
            print(f"pyshim migrate: ssh asks for {cipher.AES_GCM} first (this CPU has AES instructions; "
                  "--ssh-option Ciphers=... chooses otherwise)", file=sys.stderr, flush=True)
        try:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        except FileNotFoundError:
            raise ToolError("ssh is not installed on this host (apt-get install openssh-client): pyshim migrate "
                            "reaches the destination over ssh only") from None
        assert self.process.stdin and self.process.stdout and self.process.stderr
        threading.Thread(target=self._read_stderr, args=(self.process.stderr,), daemon=True,
                         name="migrate-ssh-stderr").start()
        self.channel = Channel(self.process.stdout.fileno(), self.process.stdin.fileno(),
                               peer=f"the destination {self.dest.host}", close_write=self.process.stdin.close).start()
        try:
            hello = self.channel.next_message(timeout, waiting_for="greeting")
            frames.check_hello(hello)
        except (ChannelClosed, TimeoutError, frames.ProtocolError) as exc:
            raise ToolError(self.failure(f"connecting to {self.dest.display()}", exc)) from None
        self.hello = hello
        return self

    def _read_stderr(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                self.echo(line)

    def ssh_said(self) -> str:
        return " / ".join(self._stderr_tail)

    def failure(self, what: str, exc: BaseException) -> str:
        """One paragraph: what failed, ssh's or the receiver's last words, and the likely fix."""
        self._wait_exit(2.0)
        said = self.ssh_said()
        status = self.process.returncode if self.process else None
        hint = ""
        if status == 255 or "Permission denied" in said or "Host key verification failed" in said:
            hint = ("; check that ssh reaches the destination non-interactively (`ssh -o BatchMode=yes "
                    f"{self.dest.host} true`: keys from your ssh config or agent, or --ssh-option IdentityFile=FILE; "
                    "its host key known)")
        elif status == 127 or "not found" in said:
            hint = (f"; the destination has no {self.dest.pyshim!r} on the PATH ssh gives it: install pyshim there, "
                    "or name it with ?pyshim=/path/to/pyshim in DEST")
        detail = f" (ssh said: {said})" if said else ""
        code = f", ssh exit status {status}" if status is not None else ""
        return f"{what} failed: {exc}{code}{detail}{hint}"

    def request(self, message_type: str, *, timeout: float, expect: str, **fields) -> dict:
        """Send one message and wait for its answer; the receiver's refusal becomes a ToolError with its words."""
        assert self.channel is not None
        self.channel.send_message(message_type, **fields)
        return self.answer(expect=expect, timeout=timeout)

    def answer(self, *, expect: str, timeout: float) -> dict:
        assert self.channel is not None
        message = self.channel.next_message(timeout, waiting_for=f"'{expect}'")
        if message["type"] == "error":
            raise RemoteRefusal(str(message.get("message") or "the destination failed without saying why"))
        if message["type"] != expect:
            raise frames.ProtocolError(f"expected '{expect}' from the destination, got {message}")
        return message

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close_sending()
        self._wait_exit(CLOSE_TIMEOUT)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # our own ssh, by its pid
            self._wait_exit(CLOSE_TIMEOUT)

    def _wait_exit(self, timeout: float) -> None:
        if self.process is None:
            return
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.process.poll() is not None:
            if self.channel is not None:
                self.channel.close_sending()

    def pid(self) -> int | None:
        return self.process.pid if self.process else None


class RemoteRefusal(ToolError):
    """The receiver said no (or failed), in its own words."""



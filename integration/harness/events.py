"""`ctr events` in the background: collects its output lines for a test to wait on.

ctr gives no sign of when its subscription is live, so `start()` proves it: it creates and removes a probe
namespace (containerd publishes /namespaces/create for it) until that event shows up in the stream.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence


class EventStream:
    """Lines printed by one `ctr events` process (`<timestamp> <namespace> <topic> <json>`)."""

    def __init__(self, ctr_argv: Sequence[str], env: Mapping[str, str],
                 create_probe_namespace: Callable[[str], None], remove_probe_namespace: Callable[[str], None]):
        self._argv = [*ctr_argv, "events"]
        self._env = dict(env)
        self._create_probe = create_probe_namespace
        self._remove_probe = remove_probe_namespace
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> EventStream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        self._process = subprocess.Popen(self._argv, env=self._env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, name="ctr-events", daemon=True)
        self._reader.start()
        try:
            self._wait_subscribed(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_subscribed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = f"pyshim-events-probe-{uuid.uuid4().hex[:8]}"
            self._create_probe(probe)
            try:
                if self.wait_for(rf"/namespaces/create .*{probe}", timeout=0.5, raising=False):
                    return
            finally:
                self._remove_probe(probe)
        raise TimeoutError(f"`ctr events` showed no events after {timeout}s:\n" + "\n".join(self.lines()))

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def wait_for(self, pattern: str, timeout: float = 10.0, *, start: int = 0, raising: bool = True) -> str | None:
        """The first collected line (from index start on) matching the regex pattern, waiting up to timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines[start:]:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            seen = "\n".join(self._lines)
        if raising:
            raise TimeoutError(f"no event matching {pattern!r} within {timeout}s; events seen:\n{seen}")
        return None

    def stop(self, timeout: float = 5.0) -> None:
        if self._process is None:
            return
        self._process.terminate()  # our own child, by pid
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        self._process = None


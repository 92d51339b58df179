"""Terminal sessions driven as a person would: ctr in a tmux pane, keys typed, the screen read.

Each scenario runs twice in the same containerd (1.6, 1.7, 2.x), once under the Go runc shim and once under
pyshim, with the same keystrokes in a pane of the same size. The outcomes are asserted for each, then what the
person saw (the pane's whole history) must be the same under both shims. Nothing on those screens varies from run
to run (no pids, ids or times), so they are compared as they are; only `ctr task attach` starts from the first
command typed, because how much of the banner the earlier `ctr run -d -t` read before leaving is a race.

Scenarios: `ctr run -t --rm ... sh` (echo, `stty size`, a tmux resize seen by `stty size`, `exit 3`, the task
gone); `ctr task exec -t` into a detached non-tty container (the same, plus ^C, `exit 5`, the container still
running); the exec's exit while a background job it left holds the pty (ctr returns at once); ^C and ^D in
`ctr run -t`; the complete output of short-lived tty processes and no `resize pty` error from ctr when they end
before its first resize; `ctr run -d -t` then `ctr task attach`.

The pane runs ctr under `sh -c '...; echo EXIT=$?; exec sleep ...'` so that ctr's exit status shows on the screen
once it ends. Every wait is a bounded poll of `tmux capture-pane`; every tmux server is private (its socket lives
in the containerd instance's temp dir) and killed at the end of the test.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import commands, ids
from harness.containerd import PYSHIM, RUNC_V2, Containerd
from harness.image import TestImage

WAIT = 10.0
POLL = 0.05
WIDTH, HEIGHT = 80, 24
WIDE, TALL = 100, 30
PROMPT = "/ # "
# The test image has no stty link (integration/harness/image.py APPLETS); busybox runs the applet by name.
STTY_SIZE = "busybox stty size"
# Bounded by the test's wait, not by the shell: the size reaches the container after tmux resized the pane, ctr
# saw SIGWINCH and called ResizePty, which may be after the next keystrokes arrive.
STTY_SIZE_CHANGED = f'until [ "$({STTY_SIZE})" != "{HEIGHT} {WIDTH}" ]; do sleep 0.1; done; {STTY_SIZE}'
EXIT_LINE = re.compile(r"EXIT=(\d+)$", re.MULTILINE)
HOLD = "exec sleep 3600"  # keeps the pane (and what it shows) after ctr ended

RUNTIMES = {"go": RUNC_V2, "pyshim": PYSHIM}


@dataclass
class Pane:
    """One tmux session with one pane, on a private tmux server."""

    socket: Path
    name: str
    env: dict[str, str]
    log: list[str] = field(default_factory=list)  # what was typed, for failure messages

    @property
    def config(self) -> Path:
        return self.socket.with_suffix(".conf")

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return commands.run(["tmux", "-S", str(self.socket), "-f", str(self.config), *args], env=self.env,
                            check=check, timeout=10)

    def start(self, command: str, width: int = WIDTH, height: int = HEIGHT) -> None:
        # Not the user's ~/.tmux.conf; enough history for a few thousand lines of output.
        self.config.write_text("set-option -g history-limit 10000\n")
        self.tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), command)

    def kill(self) -> None:
        self.tmux("kill-server", check=False)
        self.socket.unlink(missing_ok=True)
        self.config.unlink(missing_ok=True)

    def screen(self) -> str:
        """The pane's history and screen, wrapped lines joined, trailing blanks dropped."""
        text = self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name).stdout
        return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")

    def size(self) -> tuple[int, int]:
        out = self.tmux("display-message", "-p", "-t", self.name, "#{pane_width} #{pane_height}").stdout.split()
        return int(out[0]), int(out[1])

    def wait_for(self, predicate: Callable[[str], object], what: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() >= deadline:
                typed = "\n".join(self.log)
                raise AssertionError(f"{what}: not on the screen after {timeout}s\n--- typed ---\n{typed}\n"
                                     f"--- screen ---\n{screen}")
            time.sleep(POLL)

    def type(self, text: str) -> None:
        self.log.append(text)
        self.tmux("send-keys", "-t", self.name, "-l", text)
        self.tmux("send-keys", "-t", self.name, "Enter")

    def key(self, key: str) -> None:
        self.log.append(f"<{key}>")
        self.tmux("send-keys", "-t", self.name, key)

    def resize(self, width: int, height: int) -> None:
        self.log.append(f"<resize {width}x{height}>")
        self.tmux("resize-window", "-t", self.name, "-x", str(width), "-y", str(height))
        deadline = time.monotonic() + WAIT
        while self.size() != (width, height):
            assert time.monotonic() < deadline, f"tmux did not resize the pane to {width}x{height}"
            time.sleep(POLL)

    def command(self, text: str, expect: str) -> str:
        """Type a command line, wait for a line matching `expect` after it and the prompt after that; return the
        command's output lines (between the command line and the next prompt)."""
        self.type(text)
        line = PROMPT + text
        pattern = re.compile(expect)

        def answered(screen: str) -> bool:
            after = _after_last(screen, line)
            return after is not None and bool(pattern.search(after)) and _ends_with_prompt(after)

        screen = self.wait_for(answered, f"{expect!r} after {text!r}")
        after = _after_last(screen, line)
        assert after is not None
        return "\n".join(after.split("\n")[:-1])  # without the prompt that ends it


def _after_last(screen: str, line: str) -> str | None:
    lines = screen.split("\n")
    for index in range(len(lines) - 1, -1, -1):
        if lines[index] == line:
            return "\n".join(lines[index + 1:])
    return None


def _prompt_lines(screen: str) -> int:
    return screen.split("\n").count(PROMPT.rstrip())


def _ends_with_prompt(text: str) -> bool:
    return text.split("\n")[-1] == PROMPT.rstrip()  # screen lines are right-stripped


@contextlib.contextmanager
def pane(containerd: Containerd, label: str) -> Iterator[Pane]:
    name = ids.unique(f"tty-{label}", 8)
    session = Pane(socket=containerd.tmp / f"{name}.tmux", name=name, env={**containerd.env, "TERM": "xterm"})
    try:
        yield session
    finally:
        session.kill()


def in_pane_shell(argv: list[str]) -> str:
    """What the pane runs: argv, then `EXIT=<its status>` (after whatever ctr left on the line), then nothing: the
    pane, and what it shows, stay until the session is killed."""
    return f"{shlex.join(argv)}; echo EXIT=$?; {HOLD}"


def exit_status(session: Pane) -> int:
    screen = session.wait_for(EXIT_LINE.search, "ctr's exit status (EXIT=n)")
    match = EXIT_LINE.search(screen)
    assert match
    return int(match.group(1))


def task_status(containerd: Containerd, container_id: str) -> str | None:
    for line in containerd.ctr("tasks", "ls", timeout=10).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return fields[-1]
    return None


def wait_for_process(containerd: Containerd, container_id: str, comm: str, count: int = 1) -> None:
    """Until `count` of the task's processes run `comm` (have exec'd it: the shell has made it the terminal's
    foreground job by then). `ctr task ps` lists host pids."""
    deadline = time.monotonic() + WAIT
    while True:
        listed = containerd.ctr("tasks", "ps", container_id, timeout=10).stdout.split("\n")[1:]
        found = 0
        for pid in (line.split()[0] for line in listed if line.strip()):
            try:
                found += Path(f"/proc/{pid}/comm").read_text().strip() == comm
            except OSError:
                continue
        if found >= count:
            return
        assert time.monotonic() < deadline, f"not {count} {comm!r} processes in task {container_id} after {WAIT}s"
        time.sleep(POLL)


def from_line(screen: str, prefix: str) -> str:
    """The screen from the first line starting with prefix on."""
    lines = screen.split("\n")
    for index, line in enumerate(lines):
        if line.startswith(prefix):
            return "\n".join(lines[index:])
    raise AssertionError(f"no line starting with {prefix!r} on the screen:\n{screen}")


def tasks(containerd: Containerd) -> set[str]:
    return set(containerd.ctr("tasks", "ls", "-q", timeout=10).stdout.split())


def containers(containerd: Containerd) -> set[str]:
    return set(containerd.ctr("containers", "ls", "-q", timeout=10).stdout.split())


def check_echo_and_resize(session: Pane) -> None:
    """The interaction both scenarios share: a command's output, the terminal's size before and after a resize."""
    session.wait_for(lambda s: s.endswith(PROMPT.rstrip()), "the container's shell prompt")
    assert session.command("echo hello-$((6*7))", r"(?m)^hello-42$") == "hello-42"
    assert session.command(STTY_SIZE, r"(?m)^\d+ \d+$") == f"{HEIGHT} {WIDTH}"
    session.resize(WIDE, TALL)
    assert session.command(STTY_SIZE_CHANGED, r"(?m)^\d+ \d+$") == f"{TALL} {WIDE}"


# --- 1. ctr run -t --rm ---------------------------------------------------------------------------------------


def run_interactive(containerd: Containerd, image: TestImage, runtime: str, label: str) -> str:
    container_id = containerd.new_id(f"tty-{label}")
    argv = [*containerd.ctr_argv(), "run", "-t", "--rm", *containerd.runtime_flags(runtime), image.ref,
            container_id, "sh"]
    with pane(containerd, label) as session:
        session.start(in_pane_shell(argv))
        check_echo_and_resize(session)
        session.type("exit 3")
        assert exit_status(session) == 3
        screen = session.screen()
    assert container_id not in tasks(containerd)
    assert container_id not in containers(containerd)  # --rm
    return screen


def test_ctr_run_tty(containerd: Containerd, test_image: TestImage):
    screens = {label: run_interactive(containerd, test_image, runtime, label) for label, runtime in RUNTIMES.items()}
    assert screens["pyshim"] == screens["go"]


# --- 2. ctr task exec -t into a running non-tty container ------------------------------------------------------


def exec_interactive(containerd: Containerd, image: TestImage, runtime: str, label: str) -> str:
    container_id = containerd.new_id(f"exec-{label}")
    containerd.run(container_id, image, "sleep", "1000", runtime=runtime)
    try:
        argv = [*containerd.ctr_argv(), "task", "exec", "-t", "--fifo-dir", str(containerd.fifo_dir),
                "--exec-id", f"sh-{label}", container_id, "sh"]
        with pane(containerd, label) as session:
            session.start(in_pane_shell(argv))
            check_echo_and_resize(session)
            # The container's own `sleep 1000` is not the exec's foreground job: wait for a second sleep.
            check_interrupt(session, containerd, container_id, already=1)
            session.type("exit 5")
            assert exit_status(session) == 5
            screen = session.screen()
        assert task_status(containerd, container_id) == "RUNNING"  # only the exec ended
    finally:
        containerd.ctr("tasks", "rm", "-f", container_id, check=False, timeout=15)
        containerd.ctr("containers", "rm", container_id, check=False, timeout=15)
    return screen


def test_ctr_exec_tty(containerd: Containerd, test_image: TestImage):
    screens = {label: exec_interactive(containerd, test_image, runtime, label) for label, runtime in RUNTIMES.items()}
    assert screens["pyshim"] == screens["go"]


def exec_leaving_a_job(containerd: Containerd, image: TestImage, runtime: str, label: str) -> tuple[str, float]:
    container_id = containerd.new_id(f"job-{label}")
    containerd.run(container_id, image, "sleep", "1000", runtime=runtime)
    try:
        argv = [*containerd.ctr_argv(), "task", "exec", "-t", "--fifo-dir", str(containerd.fifo_dir),
                "--exec-id", f"sh-{label}", container_id, "sh"]
        with pane(containerd, label) as session:
            session.start(in_pane_shell(argv))
            session.wait_for(lambda s: s.endswith(PROMPT.rstrip()), "the exec's shell prompt")
            session.command("sleep 60 &", r"")
            typed = time.monotonic()
            session.type("exit 4")
            assert exit_status(session) == 4
            elapsed = time.monotonic() - typed
            screen = session.screen()
        assert task_status(containerd, container_id) == "RUNNING"
    finally:
        containerd.ctr("tasks", "rm", "-f", container_id, check=False, timeout=15)
        containerd.ctr("containers", "rm", container_id, check=False, timeout=15)
    return screen, elapsed


def test_exec_exit_is_prompt_while_a_job_it_left_holds_the_tty(containerd: Containerd, test_image: TestImage):
    """The exec's shell leaves `sleep 60 &` behind, holding the pty. The Go shim ends the output copy when the
    exec exits (its console is shut down), so ctr returns at once; waiting for end of file on the pty instead
    would keep the person waiting for the shim's drain timeout (2 s) at Delete."""
    results = {label: exec_leaving_a_job(containerd, test_image, runtime, label)
               for label, runtime in RUNTIMES.items()}
    for label, (_, elapsed) in results.items():
        assert elapsed < 1.5, f"{label}: ctr task exec took {elapsed:.2f}s to return after `exit 4`"
    assert results["pyshim"][0] == results["go"][0]


# --- 3. Ctrl-C through the tty ------------------------------------------------------------------------------------


def check_interrupt(session: Pane, containerd: Containerd, container_id: str, already: int = 0) -> None:
    """Ctrl-C is a byte on the terminal; the container's line discipline turns it into SIGINT for the foreground
    job, so the shell survives and says how its child ended."""
    session.type("sleep 100")
    # A ^C before sleep runs would interrupt the shell instead. `already`: sleeps the task ran before.
    wait_for_process(containerd, container_id, "sleep", already + 1)
    session.key("C-c")
    session.wait_for(lambda s: _ends_with_prompt(_after_last(s, PROMPT + "sleep 100") or ""), "the prompt after ^C")
    assert session.command("echo status=$?", r"(?m)^status=\d+$") == "status=130"  # 128 + SIGINT


def interrupt_interactive(containerd: Containerd, image: TestImage, runtime: str, label: str) -> str:
    container_id = containerd.new_id(f"intr-{label}")
    argv = [*containerd.ctr_argv(), "run", "-t", "--rm", *containerd.runtime_flags(runtime), image.ref,
            container_id, "sh"]
    with pane(containerd, label) as session:
        session.start(in_pane_shell(argv))
        session.wait_for(lambda s: s.endswith(PROMPT.rstrip()), "the container's shell prompt")
        check_interrupt(session, containerd, container_id)
        session.key("C-d")  # end of input at an empty prompt: the shell exits with the last status
        assert exit_status(session) == 0
        screen = session.screen()
    assert container_id not in tasks(containerd)
    return screen


def test_ctrl_c_interrupts_the_foreground_process(containerd: Containerd, test_image: TestImage):
    screens = {label: interrupt_interactive(containerd, test_image, runtime, label)
               for label, runtime in RUNTIMES.items()}
    assert screens["pyshim"] == screens["go"]


# --- output of a process that ends at once --------------------------------------------------------------------


def short_lived(containerd: Containerd, image: TestImage, runtime: str, label: str, *command: str) -> str:
    container_id = containerd.new_id(f"short-{label}")
    argv = [*containerd.ctr_argv(), "run", "-t", "--rm", *containerd.runtime_flags(runtime), image.ref,
            container_id, *command]
    with pane(containerd, label) as session:
        session.start(in_pane_shell(argv))
        assert exit_status(session) == 0
        screen = session.screen()
    assert container_id not in tasks(containerd)
    return screen


def test_output_of_a_short_lived_tty_process_is_complete(containerd: Containerd, test_image: TestImage):
    screens = {label: short_lived(containerd, test_image, runtime, label, "seq", "1", "3000")
               for label, runtime in RUNTIMES.items()}
    for label, screen in screens.items():
        assert screen.split("\n") == [*map(str, range(1, 3001)), "EXIT=0"], f"{label}:\n{screen[-500:]}"
    assert screens["pyshim"] == screens["go"]


def test_resize_right_after_a_tty_process_ended_is_not_an_error(containerd: Containerd, test_image: TestImage):
    """ctr run -t resizes the pty right after Start; the process may be gone by then. The Go shim resizes an
    init's pty until Delete, so ctr prints no `resize pty` error. A few rounds: the race is usually lost."""
    for _ in range(3):
        screens = {label: short_lived(containerd, test_image, runtime, label, "echo", "bye")
                   for label, runtime in RUNTIMES.items()}
        for label, screen in screens.items():
            assert screen == "bye\nEXIT=0", f"{label}:\n{screen}"


# --- 4. a detached tty container, attached to later -------------------------------------------------------------


def attach_interactive(containerd: Containerd, image: TestImage, runtime: str, label: str) -> str:
    """`ctr run -d -t` in one pane (ctr sets up the terminal and leaves), `ctr task attach` in another."""
    container_id = containerd.new_id(f"att-{label}")
    run_argv = [*containerd.ctr_argv(), "run", "-d", "-t", *containerd.runtime_flags(runtime), image.ref,
                container_id, "sh"]
    try:
        with pane(containerd, f"{label}-run") as session:
            session.start(in_pane_shell(run_argv))
            assert exit_status(session) == 0
        # The shell outlived ctr's end of the fifos: the shim holds a writer on stdin (closed only by CloseIO).
        assert task_status(containerd, container_id) == "RUNNING"
        attach_argv = [*containerd.ctr_argv(), "task", "attach", container_id]
        with pane(containerd, f"{label}-attach") as session:
            session.start(in_pane_shell(attach_argv))
            # What ctr run read of the banner and first prompt before it left is a race: start afresh.
            prompts = _prompt_lines(session.screen())
            session.type("")
            session.wait_for(lambda s: _prompt_lines(s) > prompts and _ends_with_prompt(s), "a new prompt after Enter")
            check_echo_and_resize(session)
            session.type("exit 3")
            assert exit_status(session) == 3
            screen = session.screen()
        # ctr task attach deletes the task once it has its exit status; the container stays.
        assert container_id not in tasks(containerd)
        assert container_id in containers(containerd)
    finally:
        containerd.ctr("tasks", "rm", "-f", container_id, check=False, timeout=15)
        containerd.ctr("containers", "rm", container_id, check=False, timeout=15)
    return from_line(screen, PROMPT + "echo hello")


def test_attach_to_a_detached_tty_container(containerd: Containerd, test_image: TestImage):
    # The Go shim's reference run is tried a second time if it fails: under it, `ctr task attach` once lost the
    # first keys typed ("echo hello" of "echo hello-$((6*7))" never reached the shell, containerd 1.7, a CI run of
    # 2026-12-04); the reference is not what is under test. pyshim's run is tried once.
    try:
        reference = attach_interactive(containerd, test_image, RUNTIMES["go"], "go")
    except AssertionError as failed:
        print(f"the Go shim's reference attach failed once, tried again: {failed}")
        reference = attach_interactive(containerd, test_image, RUNTIMES["go"], "go-again")
    assert attach_interactive(containerd, test_image, RUNTIMES["pyshim"], "pyshim") == reference

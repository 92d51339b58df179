import asyncio
import os
import signal
import subprocess

from shim.children.reaper import Reaper, exit_status


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_exit_status_codes_and_signals():
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 128 + 9


def test_exit_before_wait_is_not_lost():
    async def scenario():
        reaper = Reaper()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, reaper.reap)  # no subreaper needed for direct children
        seen = []
        reaper.add_listener(seen.append)
        with reaper.subscribe() as exits:
            child = subprocess.Popen(["sh", "-c", "exit 7"])
            await asyncio.sleep(0.3)  # the child is long gone and reaped before anyone waits
            result = await exits.wait(child.pid)
        loop.remove_signal_handler(signal.SIGCHLD)
        return child.pid, result, seen

    pid, result, seen = run(scenario())
    assert (result.pid, result.status) == (pid, 7)
    # Listeners see it exactly once. Only this child's exits count: when other tests made pytest a child subreaper,
    # the fork servers' spares they ended can be re-parented here and exit during this test.
    assert [e.pid for e in seen if e.pid == pid] == [pid]


def test_signalled_child_reports_128_plus_signal():
    async def scenario():
        reaper = Reaper()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
        with reaper.subscribe() as exits:
            child = subprocess.Popen(["sleep", "30"])
            os.kill(child.pid, signal.SIGTERM)
            result = await exits.wait(child.pid)
        loop.remove_signal_handler(signal.SIGCHLD)
        return result.status

    assert run(scenario()) == 128 + signal.SIGTERM


def test_spawn_pass_fds_survive_overlapping_targets(tmp_path):
    """Child fd 3 <- our fd 4 and child fd 4 <- our fd 3: a naive dup2 order loses one."""
    from shim.children.spawn import run as run_command

    async def scenario():
        reaper = Reaper()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
        a, b = tmp_path / "a", tmp_path / "b"
        a.write_text("A")
        b.write_text("B")
        fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
        # make sure the sources are fds 3 and 4 or at least collide with the targets
        fds = {3: fb, 4: fa} if fa < fb else {3: fa, 4: fb}
        result = await run_command(reaper, ["sh", "-c", "cat <&3; cat <&4"], pass_fds=fds)
        loop.remove_signal_handler(signal.SIGCHLD)
        expected = "".join(open(f"/proc/self/fd/{fds[n]}").read() for n in (3, 4))
        os.close(fa)
        os.close(fb)
        return result.stdout.decode(), expected

    out, expected = run(scenario())
    assert out == expected and sorted(out) == ["A", "B"]


def test_children_start_with_default_signal_dispositions():
    """The shim ignores SIGPIPE (Python does); its children, and so containers, must not."""
    from shim.children.spawn import run as run_command

    async def scenario():
        reaper = Reaper()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
        result = await run_command(reaper, ["sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"])
        loop.remove_signal_handler(signal.SIGCHLD)
        return dict(line.split(":\t") for line in result.stdout.decode().splitlines())

    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # the premise
    masks = run(scenario())
    standard = (1 << 31) - 1  # signals 1-31 (32 and 33 belong to glibc's threading and are left alone)
    assert int(masks["SigIgn"], 16) & standard == 0 and int(masks["SigBlk"], 16) & standard == 0


def test_a_timed_out_command_is_killed_with_what_it_started(tmp_path):
    from shim.children.spawn import run as run_command

    marker = tmp_path / "grandchild.pid"

    async def scenario():
        reaper = Reaper()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
        try:
            # the grandchild would outlive a plain kill of its parent
            await run_command(reaper, ["sh", "-c", f"sleep 30 & echo $! > {marker}; wait"], timeout=0.5)
        except TimeoutError as exc:
            error = exc
        await asyncio.sleep(0.2)
        loop.remove_signal_handler(signal.SIGCHLD)
        return error

    error = run(scenario())
    grandchild = int(marker.read_text())
    assert "killed" in str(error)
    try:
        with open(f"/proc/{grandchild}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")

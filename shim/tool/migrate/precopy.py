"""--pre-copy: the rounds of memory dumped while the container runs, before the final dump stops it.

Round N is a pre-dump (memory only, the task left running) into round-N/ beside the final images (checkpoint/)
in the staging directory, its parent the round before. The final dump names the last round as its parent: CRIU
writes only the pages dirtied since, and links each images directory to its parent with a `parent` symlink of the
path given, relative to that images directory (as runc's --parent-path). The same layout on the destination makes
the links hold there, and the restore reads pages through the chain.

Soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY) is what tells CRIU which pages changed: without it there are no rounds,
and the preflight refuses before anything is dumped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ROUNDS = 2
MAX_ROUNDS = 8
NAME = re.compile(r"round-([1-9][0-9]*)\Z")


@dataclass(frozen=True)
class Round:
    number: int

    @property
    def directory(self) -> str:
        """Its images directory, beside checkpoint/ in the staging (and on the destination, work) directory."""
        return f"round-{self.number}"

    @property
    def parent(self) -> str:
        """The parent-path for this round's pre-dump (relative to its images directory); "" for the first."""
        return f"../round-{self.number - 1}" if self.number > 1 else ""

    def options(self, timeout: int) -> dict[str, str]:
        """The Checkpoint options of this round: a pre-dump, the task left running."""
        chosen = {"pre-dump": "true", "leave-running": "true", "timeout": str(timeout)}
        if self.parent:
            chosen["parent-path"] = self.parent
        return chosen


def check_rounds(rounds: int) -> str:
    """Why ROUNDS is refused; "" when it is in range."""
    if not 1 <= rounds <= MAX_ROUNDS:
        return (f"--pre-copy {rounds}: give 1 to {MAX_ROUNDS} rounds (each dumps the memory dirtied since the last; "
                "past a few, the final dump gains little). Nothing was done")
    return ""


def plan(rounds: int) -> list[Round]:
    return [Round(number) for number in range(1, rounds + 1)]


def final_parent(rounds: list[Round]) -> str:
    """The final dump's parent-path: the last round, relative to checkpoint/."""
    return f"../{rounds[-1].directory}"


def is_round(name: str, rounds: int = MAX_ROUNDS) -> bool:
    """Whether name is a round's directory (of at most rounds rounds)."""
    match = NAME.match(name)
    return match is not None and int(match.group(1)) <= rounds


def refusal(container_id: str, problem: str) -> str:
    return (f"--pre-copy dumps {container_id}'s memory in rounds while it runs, which needs the kernel's soft-dirty "
            f"memory tracking (CONFIG_MEM_SOFT_DIRTY) to tell which pages changed between rounds; CRIU here cannot "
            f"track dirty memory ({problem}). Nothing was done: {container_id} runs on here untouched and nothing "
            "was sent to the destination. Migrate it with --stream (pages sent while the one dump runs) or "
            "--post-copy (pages follow after it runs there), or from a host whose kernel has CONFIG_MEM_SOFT_DIRTY")


def destination_refusal(container_id: str, hello: dict) -> str | None:
    """Why the destination cannot take the rounds, from its greeting (which lists the requests it serves; a
    receiver older than the rounds lists none): None when it can."""
    if "round" in (hello.get("requests") or ()):
        return None
    host = hello.get("host") or "the destination"
    return (f"--pre-copy sends {container_id}'s memory in rounds, and the pyshim on {host} does not take them (an "
            "older pyshim): install this version there, or migrate with --stream or --post-copy. Nothing was done: "
            f"{container_id} runs on here untouched")

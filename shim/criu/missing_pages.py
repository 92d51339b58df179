"""The pages one restored process still lacks, while its memory comes lazily: address ranges in the process as it
runs now, each with where its pages are in the checkpoint (an mremap moves a range; its pages stay where the
checkpoint has them). Used by shim.criu.lazy_daemon, one set per userfaultfd."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

PAGE_SIZE = 4096


def _start(item: list[int]) -> int:
    return item[0]


class MissingPages:
    """Disjoint ranges [start, end), sorted, each with the checkpoint address of its start."""

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        """runs: (address, pages) as the checkpoint lists them (where the process had them then)."""
        self._items: list[list[int]] = sorted([vaddr, vaddr + pages * PAGE_SIZE, vaddr] for vaddr, pages in runs
                                              if pages > 0)
        self.pages = sum(end - start for start, end, _ in self._items) // PAGE_SIZE
        self.moved = False  # an mremap moved some: checkpoint addresses no longer equal addresses

    def copy(self) -> MissingPages:
        """What a forked child lacks: what its parent lacked at the fork."""
        twin = MissingPages()
        twin._items = [list(item) for item in self._items]
        twin.pages = self.pages
        twin.moved = self.moved
        return twin

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """(start, end, checkpoint address of start), in address order."""
        return (tuple(item) for item in self._items)  # type: ignore[misc]

    def image_address(self, address: int) -> int | None:
        """Where the checkpoint has the page at address, if the process still lacks it."""
        index = bisect.bisect_right(self._items, address, key=_start) - 1
        if index >= 0 and address < self._items[index][1]:
            start, _, image = self._items[index]
            return image + address - start
        return None

    def cut(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Forget [start, end) (served, or no longer mapped); the pieces forgotten, as __iter__ gives them."""
        items = self._items
        index = max(bisect.bisect_right(items, start, key=_start) - 1, 0)
        removed = []
        while index < len(items) and items[index][0] < end:
            first, last, image = items[index]
            if last <= start:
                index += 1
                continue
            low, high = max(first, start), min(last, end)
            removed.append((low, high, image + low - first))
            kept = []
            if first < low:
                kept.append([first, low, image])
            if high < last:
                kept.append([high, last, image + high - first])
            items[index:index + 1] = kept
            index += len(kept)
            self.pages -= (high - low) // PAGE_SIZE
        return removed

    def remap(self, old: int, new: int, length: int) -> None:
        """mremap moved [old, old + length) to new: what was missing there is missing at new."""
        moved = self.cut(old, old + length)
        self.cut(new, new + length)  # whatever was at new before is gone
        self.moved = self.moved or (bool(moved) and new != old)
        for low, high, image in moved:
            bisect.insort(self._items, [low + new - old, high + new - old, image], key=_start)
            self.pages += (high - low) // PAGE_SIZE

    def in_image(self, image_start: int, image_end: int) -> list[tuple[int, int, int]]:
        """The missing pieces whose checkpoint pages lie in [image_start, image_end): (address, checkpoint address,
        length)."""
        pieces = []
        items = self._items
        # Unless an mremap moved pages, each range is where the checkpoint had it: look there only.
        first = 0 if self.moved else max(bisect.bisect_right(items, image_start, key=_start) - 1, 0)
        for start, end, image in items[first:] if first else items:
            if not self.moved and start >= image_end:
                break
            low, high = max(image, image_start), min(image + end - start, image_end)
            if low < high:
                pieces.append((start + low - image, low, high - low))
        return pieces

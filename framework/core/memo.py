"""Explicit, bounded caches for work that repeats across the runs of one process.

The runs of a sweep (or a benchmark) re-check the same settings and plugin parameters through
OmegaConf schemas, which costs milliseconds each time; these caches keep the checked results. Every
cache is a named :class:`Memo` listed in :data:`MEMOS`, so what a process remembers is visible and
:func:`clear` forgets it all (tests that need a cold start call it).
"""
from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class Memo(Generic[V]):
    """A dict of at most ``size`` entries, emptied when full; ``get(key, make)`` computes misses."""

    def __init__(self, name: str, size: int = 1024):
        self.name, self.size = name, size
        self.data: dict[Hashable, V] = {}
        MEMOS.append(self)

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        if key not in self.data:
            if len(self.data) >= self.size:
                self.data.clear()
            self.data[key] = make()
        return self.data[key]

    def clear(self) -> None:
        self.data.clear()


#: Every cache of the process, by creation order.
MEMOS: list[Memo] = []


def clear() -> None:
    """Empty every cache."""
    for memo in MEMOS:
        memo.clear()

"""The data position of a run, defined over the whole pass rather than per worker.

A pass is one read of the training shards in the order fixed by (``data.shuffle_seed``, pass).
What a pass has consumed is the set of samples trained on, over all workers: the good samples by
their dense ``idx`` (kept as sorted ``[start, end)`` intervals, small because workers consume
whole blocks of consecutive samples), the corrupt ones by ``shard:key (reason)``. A resume, at
any world size, reads the same pass without those samples, so the count of samples continues
exactly and no sample of the pass is trained on twice or left out. Which worker gets which of
the remaining samples is Ray Data's ``streaming_split`` (equal shares) at the new size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def to_intervals(idx: np.ndarray) -> list[list[int]]:
    """Distinct ``idx`` values as sorted disjoint ``[start, end)`` intervals."""
    values = np.unique(np.asarray(idx, dtype=np.int64))
    if not len(values):
        return []
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    starts = values[np.concatenate([[0], breaks])]
    ends = values[np.concatenate([breaks - 1, [len(values) - 1]])] + 1
    return [[int(s), int(e)] for s, e in zip(starts, ends, strict=True)]


def from_intervals(intervals: Iterable[Iterable[int]]) -> np.ndarray:
    """The ``idx`` values that intervals cover."""
    parts = [np.arange(start, end, dtype=np.int64) for start, end in intervals]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass
class PassProgress:
    """Which samples of pass ``pass_index`` are consumed, over all workers and launches."""

    pass_index: int = 0
    intervals: list[list[int]] = field(default_factory=list)  # idx of good samples trained on
    corrupt: list[str] = field(default_factory=list)  # corrupt samples met

    @property
    def consumed(self) -> int:
        return sum(end - start for start, end in self.intervals) + len(self.corrupt)

    def merged(self, idx: Iterable[np.ndarray], corrupt: Iterable[str]) -> PassProgress:
        """This progress plus more consumed samples of the same pass."""
        values = np.concatenate([from_intervals(self.intervals), *idx])
        problems = sorted({*self.corrupt, *corrupt})
        return PassProgress(self.pass_index, to_intervals(values), problems)


@dataclass(frozen=True)
class ConsumedFilter:
    """Membership test of a :class:`PassProgress`, shipped to the Ray Data decode tasks."""

    starts: np.ndarray
    ends: np.ndarray
    corrupt: frozenset[str]

    @classmethod
    def of(cls, progress: PassProgress) -> ConsumedFilter:
        bounds = np.asarray(progress.intervals, dtype=np.int64).reshape(-1, 2)
        return cls(bounds[:, 0].copy(), bounds[:, 1].copy(), frozenset(progress.corrupt))

    def good_consumed(self, idx: np.ndarray) -> np.ndarray:
        """Per ``idx``: was this good sample already trained on in the pass?"""
        idx = np.asarray(idx, dtype=np.int64)
        slot = np.searchsorted(self.starts, idx, side="right") - 1
        inside = slot >= 0
        inside[inside] = idx[inside] < self.ends[slot[inside]]
        return inside

    def corrupt_consumed(self, problems: np.ndarray) -> np.ndarray:
        """Per problem text: was this corrupt sample already met in the pass?"""
        return np.array([str(p) in self.corrupt for p in problems], dtype=bool)

"""Points split into blocks, and where the per-block kernels run: in this process or as Ray tasks.

A :class:`PointSet` is a list of float32 blocks plus their sizes. With :class:`LocalExecutor` the
blocks are numpy arrays and kernels are plain calls; with :class:`RayExecutor` the blocks are
ObjectRefs in the object store, each kernel call is a Ray task next to its block, per-point results
stay in the object store as refs, and only small summaries come back to the driver. The k-means
drivers (:mod:`ray_ssl.curation.hkmeans`) are written once against this interface, so a
single-process run and a distributed run execute the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Handle = Any  # a value (LocalExecutor) or a ray.ObjectRef to it (RayExecutor)
REDUCE_FAN_IN = 8  # partial sums combined per reduction task


def _sum_arrays(*parts: np.ndarray) -> np.ndarray:
    total = np.array(parts[0], copy=True)
    for part in parts[1:]:
        total += part
    return total


def as_points(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float32 [n, d] array (no copy when it already is one)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _take(block: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return as_points(block)[ids]


class LocalExecutor:
    """Runs kernels in this process, one block after another."""

    distributed = False

    def put(self, value: Any) -> Handle:
        return value

    def get(self, handles: Sequence[Handle]) -> list[Any]:
        return list(handles)

    def map(
        self,
        fn: Callable[..., Any],
        per_block: Sequence[tuple],
        shared: tuple = (),
        num_returns: int = 1,
    ) -> list[Any]:
        """``fn(*per_block[i], *shared)`` for every block; tuples when ``num_returns`` > 1."""
        return [fn(*args, *shared) for args in per_block]

    def sum(self, handles: Sequence[Handle]) -> np.ndarray:
        return _sum_arrays(*handles)


class RayExecutor:
    """Runs each kernel call as a Ray task; results stay in the object store until fetched."""

    distributed = True

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self._apply = ray.remote(_apply)

    def put(self, value: Any) -> Handle:
        return self._ray.put(value)

    def get(self, handles: Sequence[Handle]) -> list[Any]:
        return self._ray.get(list(handles))

    def map(
        self,
        fn: Callable[..., Any],
        per_block: Sequence[tuple],
        shared: tuple = (),
        num_returns: int = 1,
    ) -> list[Any]:
        """One task per block; arrays in ``shared`` are put in the object store once."""
        shared = tuple(self.put(s) if isinstance(s, np.ndarray) else s for s in shared)
        task = self._apply.options(num_returns=num_returns)
        return [task.remote(fn, *args, *shared) for args in per_block]

    def sum(self, handles: Sequence[Handle]) -> np.ndarray:
        """Elementwise sum of many arrays by a tree of tasks, so the driver fetches one."""
        handles = list(handles)
        while len(handles) > REDUCE_FAN_IN:
            groups = [handles[i : i + REDUCE_FAN_IN] for i in range(0, len(handles), REDUCE_FAN_IN)]
            handles = [self._apply.remote(_sum_arrays, *g) for g in groups]
        return _sum_arrays(*self.get(handles))


def _apply(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


Executor = LocalExecutor | RayExecutor


@dataclass
class PointSet:
    """Rows of a [n, d] float32 matrix held as blocks, in global row order."""

    executor: Executor
    blocks: list[Handle]
    sizes: np.ndarray  # rows per block
    dim: int

    @property
    def n(self) -> int:
        return int(self.sizes.sum())

    @property
    def offsets(self) -> np.ndarray:
        """Global index of each block's first row."""
        return np.r_[0, np.cumsum(self.sizes)[:-1]].astype(np.int64)

    @classmethod
    def from_array(cls, x: np.ndarray, executor: Executor, n_blocks: int = 1) -> PointSet:
        """Split ``x`` into ``n_blocks`` contiguous blocks (fewer when x has fewer rows)."""
        x = as_points(x)
        parts = [p for p in np.array_split(x, max(1, min(n_blocks, len(x)))) if len(p)]
        return cls(
            executor,
            [executor.put(p) for p in parts],
            np.array([len(p) for p in parts]),
            x.shape[1],
        )

    def map(
        self,
        fn: Callable[..., Any],
        *per_block: Sequence[Any],
        shared: tuple = (),
        num_returns: int = 1,
    ) -> list[Any]:
        """``fn(block_i, per_block[0][i], ..., *shared)`` for every block i."""
        args = [
            (block, *(column[i] for column in per_block)) for i, block in enumerate(self.blocks)
        ]
        return self.executor.map(fn, args, shared, num_returns)

    def subset(self, local_ids: Sequence[np.ndarray]) -> PointSet:
        """The rows ``local_ids[i]`` of every block i, as a new PointSet (blocks stay put)."""
        keep = [i for i, ids in enumerate(local_ids) if len(ids)]
        blocks = self.executor.map(_take, [(self.blocks[i], local_ids[i]) for i in keep])
        sizes = np.array([len(local_ids[i]) for i in keep], dtype=np.int64)
        return PointSet(self.executor, blocks, sizes, self.dim)

    def gather(self) -> np.ndarray:
        """All rows in one array in this process."""
        if not self.blocks:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(self.executor.get(self.blocks))

    def concat(self, handles: Sequence[Handle]) -> np.ndarray:
        """Per-block arrays (e.g. labels) joined in global order in this process."""
        return np.concatenate(self.executor.get(handles)) if handles else np.zeros(0)

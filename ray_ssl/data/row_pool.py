"""Where a worker's decoded rows wait to become batches: in arrival order, or shuffled.

Blocks arrive shard by shard (shard order shuffled per pass, rows shuffled within a shard), so
in arrival order a batch holds rows of one or two shards, and all of a batch's samples were last
seen together. For InstDisc that couples their memory-bank rows' staleness: a whole batch of
positives is fresh or a whole batch is stale. Measured (benchmarks/RESULTS.md, "InstDisc data
order"): lemniscate's loop on a 5000-image set reaches kNN 0.739 with a full permutation per
epoch and 0.715 when it replays this stream's order; ray-ssl's run went from 0.713 to 0.739
with a buffer of the whole set. :class:`ShuffledRows` is that buffer (webdataset's
``shuffle(n)``); a buffer at least as large as a worker's share of the pass is a full
permutation.

Rows are ``{column: array}`` blocks; a batch is a list of row pieces (one per block it draws
from), the form ``to_batch_contract`` assembles with one copy.
"""

from __future__ import annotations

import numpy as np

Rows = dict[str, np.ndarray]


def split_rows(parts: list[Rows], n: int) -> tuple[list[Rows], list[Rows]]:
    """The first ``n`` rows of ``parts`` and the rest, as slices (no copy)."""
    head: list[Rows] = []
    for i, part in enumerate(parts):
        rows = len(part["idx"])
        if rows >= n:
            head.append({name: column[:n] for name, column in part.items()})
            rest = [{name: column[n:] for name, column in part.items()}] if rows > n else []
            return head, rest + parts[i + 1 :]
        head.append(part)
        n -= rows
    raise ValueError(f"{n} rows missing from the parts to split")


class FifoRows:
    """Rows in arrival order; a batch is the next ``n`` of them (slices, no copy)."""

    def __init__(self) -> None:
        self._parts: list[Rows] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def ready(self, batch_size: int) -> bool:
        return self._count >= batch_size

    def add(self, block: Rows) -> None:
        self._parts.append(block)
        self._count += len(block["idx"])

    def take(self, n: int) -> list[Rows]:
        batch, self._parts = split_rows(self._parts, n)
        self._count -= n
        return batch


class ShuffledRows:
    """A shuffle buffer: a batch is ``n`` rows drawn uniformly, without replacement, from all the
    rows held, once at least ``size`` are held (then drained at the pass's end).

    Rows stay in their blocks (a block is released when its last row is taken); a batch copies
    only its own rows. Seeded: the same arrivals and seed give the same batches.
    """

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"a shuffle buffer of {size} rows holds nothing; use FifoRows")
        self.size = size
        self._rng = np.random.default_rng(seed)
        self._blocks: dict[int, tuple[Rows, int]] = {}  # number -> (block, its rows still held)
        self._slots = np.empty((0, 2), np.int64)  # (block number, row in block) of each row held
        self._next_block = 0

    def __len__(self) -> int:
        return len(self._slots)

    def ready(self, batch_size: int) -> bool:
        return len(self._slots) >= max(self.size, batch_size)

    def add(self, block: Rows) -> None:
        count = len(block["idx"])
        number = self._next_block
        self._next_block += 1
        self._blocks[number] = (block, count)
        slots = np.column_stack([np.full(count, number, np.int64), np.arange(count)])
        self._slots = np.concatenate([self._slots, slots])

    def take(self, n: int) -> list[Rows]:
        picked = self._rng.choice(len(self._slots), size=n, replace=False)
        chosen = self._slots[picked]
        self._slots = np.delete(self._slots, picked, axis=0)
        pieces = []
        for number in np.unique(chosen[:, 0]).tolist():
            rows = chosen[chosen[:, 0] == number, 1]
            block, held = self._blocks[number]
            pieces.append({name: column[rows] for name, column in block.items()})
            if held == len(rows):
                del self._blocks[number]  # its last row was taken
            else:
                self._blocks[number] = (block, held - len(rows))
        return pieces

"""The row pools that batches are cut from: arrival order, and the seeded shuffle buffer."""

from __future__ import annotations

import numpy as np
import pytest

from ray_ssl.data.row_pool import FifoRows, ShuffledRows


def _block(first: int, count: int) -> dict[str, np.ndarray]:
    idx = np.arange(first, first + count)
    return {"idx": idx, "crop": np.repeat(idx[:, None], 3, axis=1)}  # a crop that names its row


def _drain(pool: FifoRows | ShuffledRows, blocks: list, batch: int) -> list[np.ndarray]:
    out = []
    for block in blocks:
        pool.add(block)
        while pool.ready(batch):
            out.append(pool.take(batch))
    while len(pool) >= batch:
        out.append(pool.take(batch))
    return [np.concatenate([piece["idx"] for piece in pieces]) for pieces in out]


def test_fifo_batches_follow_arrival_order():
    batches = _drain(FifoRows(), [_block(0, 5), _block(5, 7), _block(12, 4)], 4)
    assert np.concatenate(batches).tolist() == list(range(16))


def test_shuffled_rows_draw_each_row_once_from_the_whole_buffer():
    blocks = [_block(10 * b, 10) for b in range(8)]
    pool = ShuffledRows(size=30, seed=1)
    for block in blocks[:3]:
        pool.add(block)
    pieces = pool.take(8)  # the first batch once 30 rows are held
    for piece in pieces:
        np.testing.assert_array_equal(piece["crop"][:, 0], piece["idx"])  # rows stay whole
    assert len({int(i) // 10 for p in pieces for i in p["idx"]}) >= 2  # across blocks
    drained = ShuffledRows(size=30, seed=1)
    batches = _drain(drained, blocks, 8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(80))
    assert len(drained) == 0 and not drained._blocks  # every block released once emptied
    assert np.concatenate(batches).tolist() != list(range(80))
    assert [b.tolist() for b in _drain(ShuffledRows(30, 1), blocks, 8)] == [
        b.tolist() for b in batches
    ]  # seeded


def test_shuffled_rows_release_emptied_blocks_and_refuse_size_zero():
    pool = ShuffledRows(size=4, seed=0)
    pool.add(_block(0, 4))
    pool.take(4)
    assert len(pool) == 0 and not pool._blocks
    with pytest.raises(ValueError, match="holds nothing"):
        ShuffledRows(size=0, seed=0)

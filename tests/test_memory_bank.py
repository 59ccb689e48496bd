"""The sharded memory bank against one in-process numpy array, under real Ray actors."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import ray

from ray_ssl.memory_bank.bank import BankSpec, ShardedMemoryBank, shard_bounds
from ray_ssl.memory_bank.shard import BankShard, MemoryBankError

DIM = 8
STEPS = 15  # updates per concurrent worker


def _spec(**kwargs) -> BankSpec:
    defaults = {
        "size": 301,
        "dim": DIM,
        "num_shards": 3,
        "name": f"bank-{uuid.uuid4().hex[:8]}",
        "cpus_per_shard": 0.1,
    }
    return BankSpec(**{**defaults, **kwargs})


def _reference_update(ref: np.ndarray, rows: np.ndarray, feats: np.ndarray, m: float) -> None:
    """The paper's update applied one row at a time, in order, in float32."""
    for row, feat in zip(rows, feats, strict=True):
        v = m * ref[row].astype(np.float32) + (1.0 - m) * feat.astype(np.float32)
        ref[row] = v / max(float(np.sqrt(np.sum(v * v))), 1e-12)


def _brute_topk(ref: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return -np.sort(-(q @ ref.astype(np.float32).T), axis=1)[:, :k]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_random_operation_sequences_match_numpy(ray_local, dtype: str) -> None:
    bank = ShardedMemoryBank(_spec(dtype=dtype, max_inflight_updates=3))
    atol = 1e-5 if dtype == "float32" else 2e-3
    try:
        ref = bank.read_all().copy()
        assert ref.dtype == np.dtype(dtype)
        np.testing.assert_allclose(np.linalg.norm(ref.astype(np.float32), axis=1), 1.0, atol=atol)
        rng = np.random.default_rng(0)
        for step in range(30):
            op = rng.choice(["update", "gather", "sample", "topk"], p=[0.5, 0.2, 0.15, 0.15])
            if op == "update":  # with repeated rows: order inside one call matters too
                rows = rng.integers(0, bank.size, size=int(rng.integers(1, 40)))
                feats = rng.normal(size=(rows.size, DIM)).astype(np.float32)
                m = float(rng.uniform(0.0, 1.0))
                bank.update(rows, feats, m)
                _reference_update(ref, rows, feats, m)
            elif op == "gather":
                rows = rng.integers(0, bank.size, size=int(rng.integers(0, 50)))
                np.testing.assert_allclose(bank.gather(rows), ref[rows], atol=atol)
            elif op == "sample":
                neg = bank.sample_negatives(int(rng.integers(0, 64)), seed=step)
                np.testing.assert_allclose(neg.features, ref[neg.rows], atol=atol)
            else:
                queries = rng.normal(size=(5, DIM)).astype(np.float32)
                sims, rows = bank.topk(queries, 7)
                np.testing.assert_allclose(sims, _brute_topk(ref, queries, 7), atol=atol * 10)
                q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
                np.testing.assert_allclose(
                    np.take_along_axis(q @ ref.astype(np.float32).T, rows, 1), sims, atol=atol * 10
                )
        np.testing.assert_allclose(bank.read_all(), ref, atol=atol)
    finally:
        bank.shutdown()


def test_async_updates_apply_in_submission_order(ray_local) -> None:
    """Many un-awaited updates to the same rows: the result is the sequential one."""
    bank = ShardedMemoryBank(_spec(max_inflight_updates=64))
    try:
        ref = bank.read_all().copy()
        rng = np.random.default_rng(1)
        rows = np.array([0, 100, 200, 300])  # one row in every shard
        for _ in range(50):
            feats = rng.normal(size=(rows.size, DIM)).astype(np.float32)
            bank.update(rows, feats, 0.1)  # small momentum: the last writes dominate
            _reference_update(ref, rows, feats, 0.1)
        assert bank.inflight_updates == 50
        np.testing.assert_allclose(bank.gather(rows), ref[rows], atol=1e-5)  # ordered after them
        assert bank.flush() == 50
    finally:
        bank.shutdown()


@ray.remote(num_cpus=0.1)
def _worker_updates(spec: BankSpec, rows: np.ndarray, seed: int, steps: int) -> int:
    bank = ShardedMemoryBank(spec, create=False)  # attaches to the pool by name
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = rng.choice(rows, size=8)  # each worker updates its own rows, with repeats
        bank.update(batch, rng.normal(size=(8, DIM)).astype(np.float32), 0.5)
    bank.flush()
    return steps * 8


def test_concurrent_workers_lose_no_update(ray_local) -> None:
    spec = _spec(max_inflight_updates=2)
    bank = ShardedMemoryBank(spec)
    try:
        ref = bank.read_all().copy()
        owned = np.array_split(np.random.default_rng(2).permutation(spec.size), 3)
        written = ray.get(
            [_worker_updates.remote(spec, rows, seed, STEPS) for seed, rows in enumerate(owned)]
        )
        for seed, rows in enumerate(owned):  # replay each worker's stream sequentially
            rng = np.random.default_rng(seed)
            for _ in range(STEPS):
                batch = rng.choice(rows, size=8)
                _reference_update(ref, batch, rng.normal(size=(8, DIM)).astype(np.float32), 0.5)
        assert sum(info["rows_updated"] for info in bank.info()) == sum(written) == 3 * STEPS * 8
        np.testing.assert_allclose(bank.read_all(), ref, atol=1e-5)
    finally:
        bank.shutdown()


def _wait_for_restart(bank: ShardedMemoryBank, shard: int, old_pid: int) -> None:
    """ray.kill is asynchronous: calls may still reach the old process for a moment."""
    for _ in range(1000):
        if ray.get(bank.handles[shard].info.remote())["pid"] != old_pid:
            return
        time.sleep(0.01)
    raise AssertionError("the killed shard never restarted")


def test_killed_shard_restarts_from_snapshot(ray_local, tmp_path) -> None:
    bank = ShardedMemoryBank(_spec(snapshot_uri=str(tmp_path / "bank"), num_shards=2))
    try:
        rng = np.random.default_rng(3)
        rows = np.arange(bank.size)
        bank.update(rows, rng.normal(size=(bank.size, DIM)), 0.5)
        manifest = bank.snapshot(step=7)
        at_snapshot = bank.read_all().copy()
        bank.update(rows, rng.normal(size=(bank.size, DIM)), 0.5)
        after = bank.read_all().copy()
        lo, hi = int(bank.bounds[0]), int(bank.bounds[1])

        old_pid = bank.info()[0]["pid"]
        ray.kill(bank.handles[0], no_restart=False)  # Ray restarts it; __init__ restores
        _wait_for_restart(bank, 0, old_pid)
        now = bank.read_all()
        np.testing.assert_array_equal(now[lo:hi], at_snapshot[lo:hi])
        np.testing.assert_array_equal(now[hi:], after[hi:])
        assert bank.info()[0]["source"] == manifest["uris"][0]

        bank.update([lo, hi], rng.normal(size=(2, DIM)), 0.5)  # operations continue
        assert bank.gather([lo, hi]).shape == (2, DIM)
        bank.restore(manifest)  # resume: the whole bank is back at the checkpoint's step
        np.testing.assert_array_equal(bank.read_all(), at_snapshot)
    finally:
        bank.shutdown()


def test_snapshots_through_s3_are_atomic_and_found_on_start(s3_bucket: str) -> None:
    prefix = f"{s3_bucket}/run/bank/shard-000"
    shard = BankShard(10, 20, DIM, "float16", seed=4, snapshot_prefix=prefix)
    shard.update(np.arange(10, 20), np.ones((10, DIM), np.float32), 0.5)
    for step in range(4):
        shard.snapshot(f"{prefix}/step-{step:012d}.npy")
    assert len(shard.prune(keep=2)) == 2
    restarted = BankShard(10, 20, DIM, "float16", seed=99, snapshot_prefix=prefix)
    np.testing.assert_array_equal(restarted.gather(np.arange(10, 20)), shard.features)
    assert restarted.source == f"{prefix}/step-{3:012d}.npy"
    wrong = BankShard(10, 21, DIM, "float16", seed=0)
    with pytest.raises(MemoryBankError, match="must match the run"):
        wrong.restore(restarted.source)


def test_negatives_are_uniform_over_all_rows(ray_local) -> None:
    """P_n = 1/N: shard shares follow shard sizes and rows are hit evenly (chi-square)."""
    bank = ShardedMemoryBank(_spec(size=30, num_shards=4))  # shard sizes 7, 8, 7, 8
    try:
        counts = np.zeros(30)
        for seed in range(20):
            np.add.at(counts, bank.sample_negatives(1500, seed).rows, 1)
        expected = 20 * 1500 / 30
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 58.3  # chi-square 0.999 quantile at 29 degrees of freedom
        per_shard = np.add.reduceat(counts, shard_bounds(30, 4)[:-1])
        np.testing.assert_allclose(per_shard / counts.sum(), np.diff(bank.bounds) / 30, atol=0.01)
    finally:
        bank.shutdown()


def test_bad_input_is_one_line_error(ray_local) -> None:
    spec = _spec(size=50, num_shards=2)
    bank = ShardedMemoryBank(spec)
    try:
        table = ray.util.placement_group_table(bank._placement_group)  # shards spread over nodes
        assert table["strategy"] == "SPREAD" and len(table["bundles"]) == bank.num_shards
        cases = [
            (lambda: bank.gather([0, 50]), "outside"),
            (lambda: bank.gather([-1]), "outside"),
            (lambda: bank.gather(np.array([0.5])), "integer"),
            (lambda: bank.update([1, 2], np.zeros((2, DIM + 1)), 0.5), "expected"),
            (lambda: bank.update([1, 2], np.zeros((3, DIM)), 0.5), "expected"),
            (lambda: bank.topk(np.zeros((1, DIM - 1)), 3), "expected"),
            (lambda: ShardedMemoryBank(BankSpec(**{**spec.__dict__, "size": 60})), "already"),
            (lambda: bank.restore({"size": 60, "dim": DIM, "num_shards": 2, "uris": []}), "match"),
            (lambda: BankSpec(size=3, dim=DIM, num_shards=4).validate(), "shards"),
            (lambda: BankShard(0, 5, DIM).gather(np.array([5])), "outside"),
        ]
        for call, fragment in cases:
            with pytest.raises(MemoryBankError, match=fragment) as err:
                call()
            assert "\n" not in str(err.value)
    finally:
        bank.shutdown()

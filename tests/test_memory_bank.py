"""The sharded memory bank against one in-process numpy array, under real Ray actors."""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pytest
import ray

from ray_ssl.memory_bank.bank import BankSpec, ShardedMemoryBank, shard_bounds
from ray_ssl.memory_bank.shard import BankFaultError, BankShard, MemoryBankError, initial_rows

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


def _kill_shard(bank: ShardedMemoryBank, shard: int, how: str) -> None:
    """Kill a shard mid-run the two ways a process dies: through Ray or by a signal."""
    if how == "ray_kill":
        ray.kill(bank.handles[shard], no_restart=False)  # Ray restarts it (max_restarts)
    else:
        os.kill(bank.info()[shard]["pid"], signal.SIGKILL)


def _random_op(bank: ShardedMemoryBank, ref: np.ndarray, rng: np.random.Generator, step: int):
    """One random operation on ``bank`` and the same on ``ref``; every read must match it."""
    op = rng.choice(["update", "gather", "sample"], p=[0.5, 0.3, 0.2])
    if op == "update":
        rows = rng.integers(0, bank.size, size=int(rng.integers(1, 40)))
        feats = rng.normal(size=(rows.size, DIM)).astype(np.float32)
        bank.update(rows, feats, 0.5)
        _reference_update(ref, rows, feats, 0.5)
    elif op == "gather":
        rows = rng.integers(0, bank.size, size=int(rng.integers(1, 50)))
        np.testing.assert_allclose(bank.gather(rows), ref[rows], atol=1e-5)
    else:
        neg = bank.sample_negatives(int(rng.integers(1, 64)), seed=step)
        np.testing.assert_allclose(neg.features, ref[neg.rows], atol=1e-5)


@pytest.mark.parametrize("how", ["ray_kill", "os_kill"])
def test_killed_shard_fails_loudly_until_the_whole_bank_is_restored(
    ray_local, tmp_path, how: str
) -> None:
    """Updates in flight when a shard dies: no read ever returns rows that differ from the
    sequential reference; the client fails with one line until every shard is restored from
    one snapshot step, and then it matches the snapshot exactly."""
    bank = ShardedMemoryBank(_spec(snapshot_uri=str(tmp_path / "bank"), max_inflight_updates=16))
    try:
        ref = bank.read_all().copy()
        rng = np.random.default_rng(3)
        for step in range(8):
            _random_op(bank, ref, rng, step)
        manifest = bank.snapshot(step=8)
        at_snapshot = ref.copy()
        failure = None
        for step in range(8, 60):
            if step == 14:
                _kill_shard(bank, 1, how)
            try:
                _random_op(bank, ref, rng, step)
            except MemoryBankError as err:
                failure, transient = str(err), err.transient
                break
        assert failure is not None and "\n" not in failure
        assert step >= 14 and transient  # a fault, which Ray Train retries; not bad input
        with pytest.raises(MemoryBankError) as refused:  # the client refuses, whatever it is asked
            bank.gather([0])
        assert refused.value.transient
        late = ShardedMemoryBank(bank.spec)  # a client attaching to the restarted pool
        with pytest.raises(MemoryBankError, match="not consistent") as err:
            late.gather([0])
        assert "\n" not in str(err.value) and err.value.transient

        bank.restore(manifest)  # what a run's resume from its checkpoint does
        np.testing.assert_array_equal(bank.read_all(), at_snapshot)
        late.reattach()
        np.testing.assert_array_equal(late.read_all(), at_snapshot)
        ref = at_snapshot.copy()
        for step in range(60, 70):  # exact again from the snapshot on
            _random_op(bank, ref, rng, step)
        np.testing.assert_allclose(bank.read_all(), ref, atol=1e-5)
    finally:
        bank.shutdown()


def test_restarted_shard_without_snapshots_never_reinitialises(ray_local) -> None:
    bank = ShardedMemoryBank(_spec(num_shards=2))  # no snapshot_uri: nothing to roll back to
    try:
        bank.update(np.arange(bank.size), np.ones((bank.size, DIM)), 0.5)
        bank.flush()
        _kill_shard(bank, 0, "ray_kill")
        with pytest.raises(MemoryBankError) as err:
            for _ in range(1000):  # ray.kill is asynchronous: the old process may still answer
                bank.gather([0])
        assert "\n" not in str(err.value)
        other = ShardedMemoryBank(bank.spec)
        with pytest.raises(MemoryBankError, match=r"shards \[0\] hold no rows"):
            other.gather([bank.size - 1])
        assert bank.info()[0]["generation"] is None  # empty, not re-initialised
        bank.reset()  # only an explicit whole-bank reset brings rows back
        np.testing.assert_array_equal(bank.read_all(), _fresh_rows(bank.spec))
    finally:
        bank.shutdown()


def test_update_from_a_client_that_missed_a_restore_never_lands(ray_local) -> None:
    spec = _spec()
    writer, other = ShardedMemoryBank(spec), ShardedMemoryBank(spec)
    try:
        other.update(np.arange(spec.size), np.ones((spec.size, DIM)), 0.5)
        other.reset()  # a whole-bank rollback the writer has not seen
        writer.update(np.arange(spec.size), np.ones((spec.size, DIM)), 0.5)
        with pytest.raises(MemoryBankError, match="not applied") as err:
            writer.flush()
        assert "\n" not in str(err.value)
        np.testing.assert_array_equal(other.read_all(), _fresh_rows(spec))
    finally:
        other.shutdown()


def _fresh_rows(spec: BankSpec) -> np.ndarray:
    bounds = shard_bounds(spec.size, spec.num_shards)
    return np.concatenate(
        [
            initial_rows(int(lo), int(hi), spec.dim, spec.seed, np.dtype(spec.dtype).type)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )


def test_shutdown_with_a_dead_shard_cleans_up(ray_local) -> None:
    bank = ShardedMemoryBank(_spec(max_restarts=0))
    ray.kill(bank.handles[1], no_restart=True)  # permanently dead
    bank.update(np.arange(bank.size), np.ones((bank.size, DIM)), 0.5)  # fails in flight
    pg = bank._placement_group
    bank.shutdown()  # raises nothing: it must not mask the error that ended a run
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    for handle in bank.handles:
        with pytest.raises(ray.exceptions.RayActorError):
            for _ in range(1000):  # ray.kill is asynchronous
                ray.get(handle.info.remote())
                time.sleep(0.01)


def test_snapshots_through_s3_are_atomic_and_pruned(s3_bucket: str) -> None:
    prefix = f"{s3_bucket}/run/bank/shard-000"
    shard = BankShard(10, 20, DIM, "float16", seed=4, snapshot_prefix=prefix)
    with pytest.raises(BankFaultError, match="holds no rows"):  # a fault: empty until restored
        shard.gather(np.arange(10, 20))
    shard.reset(generation=1)
    shard.update(np.arange(10, 20), np.ones((10, DIM), np.float32), 0.5, generation=1)
    for step in range(4):
        shard.snapshot(f"{prefix}/step-{step:012d}.npy")
    assert len(shard.prune(keep=2)) == 2
    restarted = BankShard(10, 20, DIM, "float16", seed=99, snapshot_prefix=prefix)
    state = restarted.restore(f"{prefix}/step-{3:012d}.npy", generation=2)
    assert state == (restarted.incarnation, 2) and restarted.incarnation != shard.incarnation
    _, rows = restarted.gather(np.arange(10, 20))
    np.testing.assert_array_equal(rows, shard.features)
    wrong = BankShard(10, 21, DIM, "float16", seed=0)
    with pytest.raises(MemoryBankError, match="must match the run"):
        wrong.restore(restarted.source, generation=3)


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


def _reset_shard(shard: BankShard) -> BankShard:
    shard.reset(generation=0)
    return shard


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
            (lambda: ShardedMemoryBank(BankSpec(**{**spec.__dict__, "dim": 4})), "already"),
            (
                lambda: ShardedMemoryBank(BankSpec(**{**spec.__dict__, "dtype": "float16"})),
                "float16",
            ),
            (lambda: ShardedMemoryBank(BankSpec(**{**spec.__dict__, "num_shards": 3})), "not 3"),
            (lambda: bank.restore({"size": 60, "dim": DIM, "num_shards": 2, "uris": []}), "match"),
            (lambda: BankSpec(size=3, dim=DIM, num_shards=4).validate(), "shards"),
            (lambda: _reset_shard(BankShard(0, 5, DIM)).gather(np.array([5])), "outside"),
        ]
        for call, fragment in cases:
            with pytest.raises(MemoryBankError, match=fragment) as err:
                call()
            assert "\n" not in str(err.value)
    finally:
        bank.shutdown()

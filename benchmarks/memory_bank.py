"""Per-step cost of the InstDisc memory bank: Ray actor pool vs one in-process tensor.

One InstDisc step touches the bank three times: sample K negatives (shared by the batch), gather
the B positives v_i of the batch, update those B rows (v <- normalize(m v + (1 - m) f)). We time

- ``inprocess``: the three operations on one torch tensor in this process (lemniscate's layout);
- ``pool round trip``: the same three through the actor pool, each waited for in turn;
- ``pool step wait``: what a training step actually waits for when it uses the pool as
  ``InstDiscMethod`` does: the gather is issued before the step's compute and collected after
  it, the negatives were prefetched by the previous step, the update is enqueued without
  waiting. The compute is modelled as ``--compute-ms`` of host idle time, as when the host
  waits on the accelerator; only the time spent inside bank calls is counted.

Defaults: N = 1.28M (ImageNet), D = 128, K = 4096, B = 256, float32, 4 shards. Full mode also
shows capacity: N = 10M x 128 float16 (2.56 GB) over 4 shards, with its per-step cost. The last
line is ``actor_pool_vs_inprocess=<pool step wait / inprocess>``.

    python benchmarks/memory_bank.py            # full (several minutes)
    python benchmarks/memory_bank.py --quick    # N = 128k, under a minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import numpy as np
import ray
import torch
import torch.nn.functional as F

from ray_ssl.memory_bank.bank import BankSpec, ShardedMemoryBank

MOMENTUM = 0.5  # the paper's bank momentum
IMAGENET_N = 1_281_167
CAPACITY_N = 10_000_000
QUICK_N = 128_000
INIT_CHUNK = 1 << 20  # rows per initialisation chunk of the in-process bank


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def _batches(
    n: int, batch: int, dim: int, steps: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        rows = rng.choice(n, size=batch, replace=False)
        feats = rng.normal(size=(batch, dim)).astype(np.float32)
        out.append((rows, feats / np.linalg.norm(feats, axis=1, keepdims=True)))
    return out


def inprocess_step_ms(
    n: int, dim: int, k: int, batch: int, steps: int, dtype: torch.dtype
) -> float:
    """Sample + gather + update on one in-process tensor, per step (median)."""
    bank = torch.empty(n, dim, dtype=dtype)
    for start in range(0, n, INIT_CHUNK):  # chunked: no float32 copy of a 10M-row bank
        chunk = torch.rand(min(INIT_CHUNK, n - start), dim) * 2 - 1
        bank[start : start + chunk.shape[0]] = F.normalize(chunk, dim=1).to(dtype)
    gen = torch.Generator().manual_seed(0)
    times = []
    for rows_np, feats_np in _batches(n, batch, dim, steps, seed=1):
        rows, feats = torch.from_numpy(rows_np), torch.from_numpy(feats_np)
        start = time.perf_counter()
        negatives = bank.index_select(0, torch.randint(0, n, (k,), generator=gen)).float()
        positives = bank.index_select(0, rows).float()
        updated = F.normalize(MOMENTUM * positives + (1 - MOMENTUM) * feats, dim=1)
        bank.index_copy_(0, rows, updated.to(dtype))
        times.append(time.perf_counter() - start)
        del negatives
    return _median_ms(times)


def pool_round_trip_ms(bank: ShardedMemoryBank, k: int, batches: list) -> float:
    """Sample, gather and update through the pool, each waited for, per step (median)."""
    times = []
    for step, (rows, feats) in enumerate(batches):
        start = time.perf_counter()
        bank.sample_negatives(k, seed=step)
        bank.gather(rows)
        bank.update(rows, feats, MOMENTUM)
        bank.flush()
        times.append(time.perf_counter() - start)
    return _median_ms(times)


def pool_step_wait_ms(bank: ShardedMemoryBank, k: int, batches: list, compute_s: float) -> float:
    """Time a training step spends inside bank calls, used as InstDiscMethod uses them."""
    times = []
    prefetched = bank.prefetch_negatives(k, seed=0)
    for step, (rows, feats) in enumerate(batches):
        start = time.perf_counter()
        positives = bank.gather_async(rows)
        waited = time.perf_counter() - start
        time.sleep(compute_s)  # the step's forward/backward on the accelerator
        start = time.perf_counter()
        positives.result()
        prefetched.result()
        bank.update(rows, feats, MOMENTUM)
        prefetched = bank.prefetch_negatives(k, seed=step + 1)
        times.append(waited + time.perf_counter() - start)
    bank.flush()
    prefetched.result()
    return _median_ms(times)


def measure_pool(
    n: int, dim: int, k: int, batch: int, steps: int, shards: int, dtype: str, compute_s: float
) -> tuple[float, float, float]:
    """(creation s, round trip ms, step wait ms) of a fresh pool of ``shards`` actors."""
    start = time.perf_counter()
    spec = BankSpec(
        size=n,
        dim=dim,
        num_shards=shards,
        dtype=dtype,
        name=f"bench-{uuid.uuid4().hex[:8]}",
        cpus_per_shard=0.25,
        max_inflight_updates=4,
    )
    bank = ShardedMemoryBank(spec)
    created = time.perf_counter() - start
    try:
        warmup = _batches(n, batch, dim, 5, seed=2)
        pool_round_trip_ms(bank, k, warmup)
        round_trip = pool_round_trip_ms(bank, k, _batches(n, batch, dim, steps, seed=3))
        wait = pool_step_wait_ms(bank, k, _batches(n, batch, dim, steps, seed=4), compute_s)
    finally:
        bank.shutdown()
    return created, round_trip, wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_N}, fewer steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--negatives", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--compute-ms", type=float, default=100.0)
    args = parser.parse_args()
    n = QUICK_N if args.quick else IMAGENET_N
    steps = args.steps or (20 if args.quick else 100)
    compute_s = args.compute_ms / 1e3
    torch.set_num_threads(1)  # the baseline's ops are small; threads only add noise here
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False)

    k, b, d = args.negatives, args.batch, args.dim
    print(f"per-step bank cost: K={k} negatives, B={b} positives + updates, D={d}, {steps} steps")
    inproc = inprocess_step_ms(n, d, k, b, steps, torch.float32)
    created, round_trip, wait = measure_pool(n, d, k, b, steps, args.shards, "float32", compute_s)
    print(f"N={n:,} float32  inprocess tensor          {inproc:8.2f} ms/step")
    print(f"N={n:,} float32  pool round trip ({args.shards} shards) {round_trip:8.2f} ms/step")
    print(
        f"N={n:,} float32  pool step wait ({args.shards} shards)  {wait:8.2f} ms/step "
        f"(with {args.compute_ms:.0f} ms of compute to overlap; pool created in {created:.1f} s)"
    )
    if not args.quick:
        cap_steps = max(steps // 2, 10)
        cap_inproc = inprocess_step_ms(CAPACITY_N, d, k, b, cap_steps, torch.float16)
        cap = measure_pool(CAPACITY_N, d, k, b, cap_steps, 4, "float16", compute_s)
        gigabytes = CAPACITY_N * d * 2 / 1e9
        print(
            f"capacity: N={CAPACITY_N:,} x {d} float16 = {gigabytes:.2f} GB over 4 shards, "
            f"created in {cap[0]:.1f} s"
        )
        print(f"N={CAPACITY_N:,} float16 inprocess tensor          {cap_inproc:8.2f} ms/step")
        print(f"N={CAPACITY_N:,} float16 pool round trip (4 shards) {cap[1]:8.2f} ms/step")
        print(f"N={CAPACITY_N:,} float16 pool step wait (4 shards)  {cap[2]:8.2f} ms/step")
    print(f"pool_round_trip_vs_inprocess={round_trip / inproc:.2f}")
    print(f"actor_pool_vs_inprocess={wait / inproc:.2f}")


if __name__ == "__main__":
    main()

"""Loss-test helpers: central finite differences in float64; a run on 2 gloo ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
FD_STEP = 1e-6


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray) -> np.ndarray:
    """d f / d x by central differences, entry by entry (float64)."""
    grad = np.zeros_like(x, dtype=np.float64)
    for index in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[index] += FD_STEP
        down[index] -= FD_STEP
        grad[index] = (f(up) - f(down)) / (2 * FD_STEP)
    return grad


LossFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _rank_worker(
    rank: int, init_file: str, out_dir: str, loss: LossFn, batches: list[tuple[Path, Path]]
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    for scenario, pair in enumerate(batches):
        z_a, z_b = (torch.load(path)[rank].clone().requires_grad_() for path in pair)
        value = loss(z_a, z_b, True)
        value.backward()
        local = loss(z_a.detach(), z_b.detach(), False)  # distributed=False stays on this rank
        torch.save(
            {"value": value.detach(), "local": local, "grad_a": z_a.grad, "grad_b": z_b.grad},
            f"{out_dir}/s{scenario}_r{rank}.pt",
        )
    dist.destroy_process_group()


def run_two_ranks(
    tmp_path: Path, loss: LossFn, scenarios: list[tuple[list[torch.Tensor], list[torch.Tensor]]]
) -> list[list[dict[str, torch.Tensor]]]:
    """Run ``loss(z_a, z_b, distributed)`` on 2 gloo ranks, each with its rows of each scenario.

    A scenario is (z_a per rank, z_b per rank). Returns per scenario the per-rank results: the
    distributed value, the local (distributed=False) value and the gradients w.r.t. z_a and z_b.
    """
    batches = []
    for scenario, (parts_a, parts_b) in enumerate(scenarios):
        paths = (tmp_path / f"a{scenario}.pt", tmp_path / f"b{scenario}.pt")
        torch.save(parts_a, paths[0])
        torch.save(parts_b, paths[1])
        batches.append(paths)
    args = (str(tmp_path / "pg"), str(tmp_path), loss, batches)
    mp.spawn(_rank_worker, args=args, nprocs=WORLD)
    return [
        [torch.load(tmp_path / f"s{s}_r{r}.pt") for r in range(WORLD)]
        for s in range(len(scenarios))
    ]

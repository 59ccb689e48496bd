"""Sinkhorn-Knopp teacher targets (SwAV, arXiv 2006.09882 sec. 3.1; DINOv2 arXiv 2304.07193 sec. 4).

The teacher's prototype scores of B samples (all ranks together) over K prototypes become soft
assignments with equal mass per prototype: Q* = Diag(u) exp(S / tau) Diag(v) (SwAV eq. 3, with
epsilon = the teacher temperature), found by alternately normalising prototype (column) sums to
1/K and sample (row) sums to 1/B. With ``distributed=True`` the column sums and B are all-reduced
across ranks, so every rank computes its rows of the same global Q (as lightly's losses, the
caller says so explicitly). Rows flagged invalid (padding) take no part and come back as zeros.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SINKHORN_ITERATIONS = 3  # DINOv2 / Franca


def _world_size(distributed: bool) -> int:
    """Ranks whose rows form the batch: 1 unless asked and a process group is up (as lightly)."""
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    temperature: float,
    iterations: int = SINKHORN_ITERATIONS,
    valid: torch.Tensor | None = None,
    distributed: bool = False,
) -> torch.Tensor:
    """Balanced soft assignments [N, K] of this rank's rows, computed in fp32.

    Args:
        scores: teacher prototype scores [N, K] of this rank (any dtype).
        temperature: the teacher temperature tau.
        iterations: Sinkhorn-Knopp iterations (column then row normalisation each).
        valid: bool [N], False for padding rows; None means every row is real.
        distributed: all ranks' rows form one batch B (all-reduced) when a process group is
            initialised; every rank must then call this, even with N = 0.

    Real rows of the result sum to 1; over all ranks each prototype receives B/K mass.
    """
    reduce = _world_size(distributed) > 1

    def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        if reduce:
            dist.all_reduce(tensor, op=op)

    scores = scores.float()
    rows, prototypes = scores.shape
    if valid is None:
        valid = torch.ones(rows, dtype=torch.bool, device=scores.device)
    valid_col = valid.view(rows, 1)
    total_rows = valid.sum().to(torch.float32)
    _all_reduce(total_rows)
    # Subtracting the global max cancels in the normalisation and keeps exp() finite.
    masked = torch.where(valid_col, scores, -torch.inf)
    peak = masked.amax() if rows > 0 else torch.full((), -torch.inf, device=scores.device)
    _all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.where(valid_col, torch.exp((masked - peak) / temperature), 0.0)
    tiny = torch.finfo(torch.float32).tiny
    mass = q.sum()
    _all_reduce(mass)
    q /= mass.clamp_min(tiny)
    for _ in range(iterations):
        column_sums = q.sum(dim=0, keepdim=True)
        _all_reduce(column_sums)
        q /= (column_sums * prototypes).clamp_min(tiny)  # each prototype: mass 1/K
        q /= (q.sum(dim=1, keepdim=True) * total_rows).clamp_min(tiny)  # each sample: mass 1/B
    return q * total_rows  # each real row is a distribution over prototypes

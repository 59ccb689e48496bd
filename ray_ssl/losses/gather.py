"""Autograd-aware all-gather of rows across ranks, for losses over the global batch.

Every rank computes its loss from the gathered rows; in backward each rank sums the gradients that
all ranks computed for its rows (as the official VICReg code's FullGatherLayer), so after the
data-parallel gradient average (DDP, DeepSpeed) the parameters receive the gradient of the
global-batch loss. Ranks may hold different row counts (a short last batch): rows are padded to
the longest for the collective and trimmed after. Works on gloo (no reduce-scatter needed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of ranks, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def row_counts(rows: int, device: torch.device | None = None) -> list[int]:
    """Every rank's row count, in rank order (a collective: every rank must call it)."""
    if world_size() == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine)
    return [int(c) for c in counts]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        padded = rows.new_zeros((max(counts), *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's gradient w.r.t. these rows, summed
        return grad[ctx.start : ctx.stop], None


def gather_rows(rows: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Rows [N_r, ...] of every rank concatenated in rank order, [sum_r N_r, ...]; differentiable.

    A collective: every rank must call it. ``counts`` (from :func:`row_counts`) saves one
    collective when the caller already has them. Without torch.distributed it returns ``rows``.
    """
    if world_size() == 1:
        return rows
    if counts is None:
        counts = row_counts(rows.shape[0], rows.device)
    return _GatherRows.apply(rows, counts)

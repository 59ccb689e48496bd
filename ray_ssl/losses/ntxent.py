"""NT-Xent, SimCLR's contrastive loss (Chen et al., ICML 2020, arXiv 2002.05709, eq. 1).

For 2N L2-normalised embeddings (two views of N pairs), anchor i with positive j:
l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau), sim the cosine;
the loss is the mean of l over all 2N ordered positive pairs. Each anchor has 2N - 2 negatives.

With ``distributed=True`` the candidates (positives and negatives) are the 2N embeddings of the
global batch gathered from every rank with gradients, while each rank scores only its own anchors
(an [2n, 2N] logit matrix, as lightly's NTXentLoss). A rank returns the sum of its anchors' terms
times world size / 2N, so the mean over ranks of the returned values, and the gradient after the
data-parallel average, are those of the global-batch loss (for equal batches it is the rank's mean).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_ssl.losses.gather import gather_rows, row_counts, world_size


def nt_xent_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, distributed: bool = False
) -> torch.Tensor:
    """NT-Xent over the (global) batch.

    Args:
        z_a: projections [N, D] of the first views, any float dtype (normalised here).
        z_b: projections [N, D] of the second views; row i of each is a positive pair.
        temperature: tau > 0 (SimCLR uses 0.1 to 0.5 depending on batch size).
        distributed: take negatives from every rank (every rank must then call this). A no-op
            without torch.distributed.

    Computed in fp32 (fp64 inputs stay fp64).
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(
            f"z_a and z_b must both be [N, D], got {tuple(z_a.shape)}, {tuple(z_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, dim = z_a.shape
    pairs = torch.cat([z_a, z_b], dim=1)
    pairs = pairs.to(torch.promote_types(pairs.dtype, torch.float32))  # no logits in fp16/bf16
    pairs = F.normalize(pairs.unflatten(1, (2, dim)), dim=2).flatten(1)  # sim = cosine
    ranks = world_size() if distributed else 1
    start = 0
    if ranks > 1:
        counts = row_counts(n, pairs.device)
        start = sum(counts[: dist.get_rank()])
        pairs = gather_rows(pairs, counts)
    total = pairs.shape[0]
    if total < 2:
        raise ValueError(f"NT-Xent needs at least 2 pairs in the batch, got {total}")
    candidates = torch.cat([pairs[:, :dim], pairs[:, dim:]])  # [2N, D]: first views, then second
    mine = torch.arange(start, start + n, device=pairs.device)
    anchors = candidates[torch.cat([mine, mine + total])]  # [2n, D]: this rank's rows
    logits = anchors @ candidates.T / temperature
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(2 * n, device=pairs.device), torch.cat([mine, mine + total])] = (
        True  # k != i in eq. 1
    )
    positive = torch.cat([mine + total, mine])  # the other view of the same pair
    loss_sum = F.cross_entropy(logits.masked_fill(own, -torch.inf), positive, reduction="sum")
    return loss_sum * ranks / (2 * total)

"""Random-walk partners over the batch similarity graph (SAG-VICReg, arXiv 2506.18104).

The paper builds a similarity graph over the batch and takes the nodes a weighted random walk
reaches as extra cross-image positives. Its exact kernel and walk are not published in a form we
could read, so every choice here is ours and is named where it is made:

- the affinity is SpectralNet's (Shaham et al., ICLR 2018, sec. 4.1): a Gaussian kernel kept only
  over each point's k nearest neighbours, with the self-tuning local scale of Zelnik-Manor & Perona
  (NIPS 2004, eq. 3): sigma_i = the distance from x_i to its ``scale_neighbor``-th neighbour;
- the graph is made symmetric by W = max(W, W^T), so an edge exists if either end chose it;
- the walk is the Markov chain P = D^-1 W (Lovasz 1993; the normalised random-walk matrix of
  spectral clustering) run for t steps; partners are drawn from the rows of P^t.
"""

from __future__ import annotations

import torch


def knn_gaussian_affinity(
    features: torch.Tensor, neighbors: int, scale_neighbor: int
) -> torch.Tensor:
    """Symmetric kNN-sparsified self-tuning Gaussian affinity W [n, n] with a zero diagonal.

    W_ij = exp(-||x_i - x_j||^2 / (sigma_i sigma_j)) when j is among i's ``neighbors`` nearest
    neighbours or i among j's (Zelnik-Manor & Perona eq. 3, sparsified as SpectralNet sec. 4.1).
    """
    n = features.shape[0]
    if not 1 <= scale_neighbor <= neighbors < n:
        raise ValueError(
            f"need 1 <= scale_neighbor ({scale_neighbor}) <= neighbors ({neighbors}) < batch ({n})"
        )
    x = features.detach().float()
    dist2 = torch.cdist(x, x).square()
    dist2.fill_diagonal_(float("inf"))
    knn_dist2, knn_idx = dist2.topk(neighbors, dim=1, largest=False)
    sigma = knn_dist2[:, scale_neighbor - 1].sqrt().clamp_min(torch.finfo(x.dtype).tiny)
    kernel = torch.exp(-knn_dist2 / (sigma[:, None] * sigma[knn_idx]))
    affinity = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    affinity.scatter_(1, knn_idx, kernel)
    return torch.maximum(affinity, affinity.T)


def walk_matrix(affinity: torch.Tensor, steps: int) -> torch.Tensor:
    """P^t for the random walk P = D^-1 W on ``affinity``: row i is where t steps from i end."""
    if steps < 1:
        raise ValueError(f"walk steps must be >= 1, got {steps}")
    degree = affinity.sum(dim=1, keepdim=True)
    transition = affinity / degree.clamp_min(torch.finfo(affinity.dtype).tiny)
    return torch.linalg.matrix_power(transition, steps)


def sample_walk_partners(
    walk: torch.Tensor, exclude: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One partner per row of ``walk`` drawn from that row, never a node ``exclude`` marks.

    ``exclude`` is bool [n, n] (True = not a partner of row i: the anchor itself and its own
    augmentation). A row with no mass left falls back to a uniform draw over allowed nodes.
    Returns int64 [n].
    """
    probs = walk.masked_fill(exclude, 0.0)
    empty = probs.sum(dim=1) <= 0
    if empty.any():
        probs[empty] = (~exclude[empty]).to(probs.dtype)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

"""KoLeo regulariser (Sablayrolles et al., arXiv 1806.03198 sec. 3.2; DINOv2 2304.07193 sec. 4).

L_koleo = -(1/n) sum_i log(d_{n,i}), d_{n,i} = min_{j != i} ||x_i - x_j|| over L2-normalised
features of one batch: a Kozachenko-Leonenko entropy estimate that spreads features uniformly.
Computed on this rank's batch only, as DINOv2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KOLEO_EPS = 1e-8  # DINOv2's eps in normalisation, pairwise distance and log


def koleo_loss(features: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """KoLeo loss of features [n, D] (n >= 2), in fp32."""
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples, got {features.shape[0]}")
    x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-torch.inf)  # a point is not its own neighbour
        nearest = similarity.argmax(dim=1)  # max cosine = min distance on the sphere
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()

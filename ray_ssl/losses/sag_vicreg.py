"""SAG-VICReg loss (Simai, Talmon, Shaham, arXiv 2506.18104): VICReg plus random-walk positives.

VICReg's invariance term joins only the two augmentations of one image. SAG-VICReg adds pairs
of different images found by a random walk on the batch similarity graph
(:mod:`ray_ssl.losses.random_walk`) and weighs the two kinds of positive pair:

    loss = lambda [(1 - w) s(Z, Z') + w s_walk] + mu v + nu c

with s, v, c VICReg's terms over the (global) batch (:mod:`ray_ssl.losses.vicreg`) and
s_walk = mean over the 2N nodes of ||z_i - z_{p(i)}||^2 / d, p(i) node i's walk partner. The
weighting and its warm-up of w from 0 are ours (the paper's exact weights are not available to
us); with w = 0 the loss is VICReg's exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_ssl.losses.gather import gather_rows
from ray_ssl.losses.random_walk import knn_gaussian_affinity, sample_walk_partners, walk_matrix
from ray_ssl.losses.vicreg import (
    COV_COEFF,
    SIM_COEFF,
    STD_COEFF,
    VICRegTerms,
    covariance_term,
    invariance_term,
    variance_term,
)


def walk_partners(
    features: torch.Tensor,
    neighbors: int,
    scale_neighbor: int,
    steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each node's walk partner among the 2N nodes of ``features`` [2N, D] (views a, then b).

    Node i and node i + N are two augmentations of one image; neither is the other's partner,
    nor is a node its own. ``features`` should be detached and the same on every rank (gathered)
    so that every rank draws the same partners from the same seeded ``generator``.
    """
    nodes = features.shape[0]
    if nodes % 2:
        raise ValueError(f"walk features must hold two views per image, got {nodes} rows")
    walk = walk_matrix(knn_gaussian_affinity(features, neighbors, scale_neighbor), steps)
    exclude = torch.eye(nodes, dtype=torch.bool, device=features.device)
    exclude |= exclude.roll(nodes // 2, dims=1)  # i's own augmentation, i +- N
    return sample_walk_partners(walk, exclude, generator)


def walk_invariance_term(z: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """s_walk: mean over nodes and dimensions of (z_i - z_{p(i)})^2, z [2N, D]."""
    return F.mse_loss(z, z[partners])


def sag_vicreg_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    partners: torch.Tensor,
    walk_weight: float,
    sim_coeff: float = SIM_COEFF,
    std_coeff: float = STD_COEFF,
    cov_coeff: float = COV_COEFF,
    distributed: bool = False,
) -> tuple[torch.Tensor, VICRegTerms, torch.Tensor]:
    """(loss, VICReg's terms, s_walk) for one step.

    Args:
        z_a, z_b: this rank's expander outputs [n, D]; row i of each is a positive pair.
        partners: int64 [2N] over the global batch's nodes (all a-views, then all b-views), as
            :func:`walk_partners` returns.
        walk_weight: w in [0, 1].
        distributed: gather rows from every rank with gradients (every rank must call this).
    """
    if not 0.0 <= walk_weight <= 1.0:
        raise ValueError(f"walk_weight must be within [0, 1], got {walk_weight}")
    dim = z_a.shape[1]
    both = torch.cat([z_a, z_b], dim=1)
    both = both.to(torch.promote_types(both.dtype, torch.float32))
    if distributed:
        both = gather_rows(both)
    a, b = both[:, :dim], both[:, dim:]
    if partners.shape != (2 * a.shape[0],):
        raise ValueError(f"partners must be [2N] = [{2 * a.shape[0]}], got {tuple(partners.shape)}")
    terms = VICRegTerms(
        invariance=invariance_term(a, b),
        variance=(variance_term(a) + variance_term(b)) / 2,
        covariance=covariance_term(a) + covariance_term(b),
    )
    walk = walk_invariance_term(torch.cat([a, b]), partners)
    invariance = (1.0 - walk_weight) * terms.invariance + walk_weight * walk
    loss = sim_coeff * invariance + std_coeff * terms.variance + cov_coeff * terms.covariance
    return loss, terms, walk

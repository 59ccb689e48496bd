"""VICReg loss (Bardes, Ponce, LeCun, ICLR 2022, arXiv 2105.04906), with the official code's
normalisation (facebookresearch/vicreg ``main_vicreg.py``).

For embeddings Z, Z' [n, d] of two views (row i of each a positive pair):
- invariance s(Z, Z') (eq. 4): mean squared error over all n x d entries (the paper sums over d;
  the official code, and therefore the 25/25/1 coefficients, use the mean);
- variance v(Z) (eq. 1): mean over dimensions of relu(gamma - sqrt(Var(z^j) + eps)), gamma = 1,
  eps = 1e-4, unbiased variance; averaged over the two branches (official code; the paper sums);
- covariance c(Z) (eqs. 2-3): sum of the squared off-diagonal entries of the covariance matrix
  C(Z) = (1 / (n - 1)) sum_i (z_i - mean)(z_i - mean)^T, divided by d; summed over the branches;
- loss (eq. 5): lambda s + mu v + nu c, with lambda = mu = 25, nu = 1.

With ``distributed=True`` all three statistics run over the global batch gathered from every rank,
with gradients, as the official code does for variance and covariance. The official invariance
term is each rank's local MSE; the global MSE computed here has the same value averaged over ranks
and the same gradient after the data-parallel average when ranks hold equal batches, and stays
exact when they do not. Every rank returns the same value.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ray_ssl.losses.gather import gather_rows

SIM_COEFF = 25.0  # lambda, official code and paper sec. 4.1
STD_COEFF = 25.0  # mu
COV_COEFF = 1.0  # nu
STD_TARGET = 1.0  # gamma in eq. 1
VARIANCE_EPS = 1e-4  # eps in eq. 1


class VICRegTerms(NamedTuple):
    """The three unweighted VICReg terms, each a scalar tensor."""

    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def invariance_term(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """s(Z, Z') (eq. 4, official normalisation): mean of (z_a - z_b)^2 over all n x d entries."""
    return F.mse_loss(z_a, z_b)


def variance_term(z: torch.Tensor, eps: float = VARIANCE_EPS) -> torch.Tensor:
    """v(Z) (eq. 1): mean over dimensions of relu(1 - sqrt(Var + eps)), unbiased variance."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(STD_TARGET - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """c(Z) (eqs. 2-3): sum of squared off-diagonal entries of C(Z), divided by d."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d


def vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor, distributed: bool = False) -> VICRegTerms:
    """Invariance, variance (mean of both branches) and covariance (sum of both branches).

    Args:
        z_a: embeddings [N, D] of the first views (expander output), any float dtype.
        z_b: embeddings [N, D] of the second views; row i of each is a positive pair.
        distributed: gather rows from every rank (with gradients) so that the statistics span
            the global batch; every rank must then call this. A no-op without torch.distributed.

    Computed in fp32 (fp64 stays fp64). The global batch needs at least 2 rows (for the variance).
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(
            f"z_a and z_b must both be [N, D], got {tuple(z_a.shape)}, {tuple(z_b.shape)}"
        )
    dim = z_a.shape[1]
    both = torch.cat([z_a, z_b], dim=1)
    both = both.to(torch.promote_types(both.dtype, torch.float32))  # no statistics in fp16/bf16
    if distributed:
        both = gather_rows(both)  # one collective for both branches
    if both.shape[0] < 2:
        raise ValueError(f"VICReg needs a batch of at least 2 rows, got {both.shape[0]}")
    a, b = both[:, :dim], both[:, dim:]
    return VICRegTerms(
        invariance=invariance_term(a, b),
        variance=(variance_term(a) + variance_term(b)) / 2,
        covariance=covariance_term(a) + covariance_term(b),
    )


def vicreg_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    sim_coeff: float = SIM_COEFF,
    std_coeff: float = STD_COEFF,
    cov_coeff: float = COV_COEFF,
    distributed: bool = False,
) -> torch.Tensor:
    """VICReg loss (eq. 5): sim_coeff * s + std_coeff * v + cov_coeff * c (:func:`vicreg_terms`)."""
    terms = vicreg_terms(z_a, z_b, distributed=distributed)
    return sim_coeff * terms.invariance + std_coeff * terms.variance + cov_coeff * terms.covariance

"""VICReg loss (Bardes et al., ICLR 2022) against a float64 NumPy loop reference of eqs. 1-5 with
the official code's normalisation, value and gradient (finite differences); 2 gloo ranks with
gathered statistics equal one process holding the whole batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from loss_reference import WORLD, numerical_gradient, run_two_ranks

from ray_ssl.losses.vicreg import vicreg_loss, vicreg_terms

EPS = 1e-4


def _variance(z: np.ndarray) -> float:
    """v(Z) (eq. 1): mean over dimensions j of max(0, 1 - sqrt(Var(z^j) + eps))."""
    n, d = z.shape
    total = 0.0
    for j in range(d):
        mean = sum(z[i, j] for i in range(n)) / n
        var = sum((z[i, j] - mean) ** 2 for i in range(n)) / (n - 1)
        total += max(0.0, 1.0 - np.sqrt(var + EPS))
    return total / d


def _covariance(z: np.ndarray) -> float:
    """c(Z) (eqs. 2-3): (1/d) sum over j != k of C(Z)_jk^2, C with 1/(n-1)."""
    n, d = z.shape
    mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
    total = 0.0
    for j in range(d):
        for k in range(d):
            if j != k:
                c = sum((z[i, j] - mean[j]) * (z[i, k] - mean[k]) for i in range(n)) / (n - 1)
                total += c**2
    return total / d


def _invariance(a: np.ndarray, b: np.ndarray) -> float:
    """s(Z, Z') (eq. 4) as the official code: mean of squared differences over n x d."""
    n, d = a.shape
    return sum((a[i, j] - b[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)


def _reference(a: np.ndarray, b: np.ndarray, sim: float, std: float, cov: float) -> float:
    """Eq. 5 with the official normalisation: variance halved over branches, covariance summed."""
    return (
        sim * _invariance(a, b)
        + std * (_variance(a) + _variance(b)) / 2
        + cov * (_covariance(a) + _covariance(b))
    )


def _embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated views; column scales around 1 so some dimensions sit below the std target
    (variance hinge active) and some above it (inactive)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    b = a + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return a, b


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_value_and_gradient_match_reference(coeffs: tuple[float, float, float]) -> None:
    a, b = _embeddings(9, 5, seed=1)
    a.requires_grad_()
    b.requires_grad_()
    loss = vicreg_loss(a, b, *coeffs)
    loss.backward()
    an, bn = a.detach().numpy(), b.detach().numpy()
    assert loss.item() == pytest.approx(_reference(an, bn, *coeffs), rel=1e-12)
    grad_a = numerical_gradient(lambda x: _reference(x, bn, *coeffs), an)
    grad_b = numerical_gradient(lambda x: _reference(an, x, *coeffs), bn)
    np.testing.assert_allclose(a.grad.numpy(), grad_a, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.grad.numpy(), grad_b, rtol=1e-6, atol=1e-8)


def test_terms_and_fp32() -> None:
    a, b = _embeddings(12, 6, seed=2)
    terms = vicreg_terms(a, b)
    an, bn = a.numpy(), b.numpy()
    assert terms.invariance.item() == pytest.approx(_invariance(an, bn), rel=1e-12)
    assert terms.variance.item() == pytest.approx((_variance(an) + _variance(bn)) / 2, rel=1e-12)
    assert terms.covariance.item() == pytest.approx(_covariance(an) + _covariance(bn), rel=1e-12)
    half = vicreg_loss(a.bfloat16(), b.bfloat16())
    assert half.dtype == torch.float32  # statistics in fp32 even from bf16 embeddings
    assert half.item() == pytest.approx(vicreg_loss(a, b).item(), rel=2e-2)


def test_collapse_is_penalised() -> None:
    """Identical constant embeddings: invariance 0, full variance hinge (1 - sqrt(eps)), no cov."""
    z = torch.ones(8, 4)
    terms = vicreg_terms(z, z)
    assert terms.invariance.item() == 0.0
    assert terms.variance.item() == pytest.approx(1 - np.sqrt(EPS))
    assert terms.covariance.item() == 0.0


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="both be"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))


def _distributed_vicreg(z_a: torch.Tensor, z_b: torch.Tensor, distributed: bool) -> torch.Tensor:
    return vicreg_loss(z_a, z_b, distributed=distributed)


# Rows per rank: equal batches, and a short last batch on one rank.
SPLITS = [(6, 6), (4, 9)]


def test_two_ranks_gathered_equal_one_process(tmp_path: Path) -> None:
    scenarios, whole = [], []
    for seed, split in enumerate(SPLITS):
        a, b = _embeddings(sum(split), 5, seed=10 + seed)
        scenarios.append((list(a.split(split)), list(b.split(split))))
        whole.append((a, b))
    results = run_two_ranks(tmp_path, _distributed_vicreg, scenarios)
    for split, (a, b), ranks in zip(SPLITS, whole, results, strict=True):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        single = vicreg_loss(a, b)
        single.backward()
        for rank, (result, grad_a, grad_b) in enumerate(
            zip(ranks, a.grad.split(split), b.grad.split(split), strict=True)
        ):
            torch.testing.assert_close(result["value"], single.detach())  # same on every rank
            # Each rank holds the summed gradient of all ranks' (identical) losses for its rows;
            # the data-parallel average (/ WORLD) is the whole-batch gradient.
            torch.testing.assert_close(result["grad_a"] / WORLD, grad_a)
            torch.testing.assert_close(result["grad_b"] / WORLD, grad_b)
            local = vicreg_loss(*(x.detach().split(split)[rank] for x in (a, b)))
            torch.testing.assert_close(result["local"], local)  # distributed=False: no gather
        assert not torch.isclose(ranks[0]["local"], single).item()  # the gather matters

"""NT-Xent (SimCLR, Chen et al., ICML 2020, eq. 1) against a float64 NumPy loop over the paper's
interleaved 2N samples, value and gradient (finite differences); 2 gloo ranks with negatives
gathered from both equal one process holding the whole batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from loss_reference import WORLD, numerical_gradient, run_two_ranks

from ray_ssl.losses.ntxent import nt_xent_loss


def _reference(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    """Eq. 1: L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)],
    l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t), s the cosine similarity."""
    n = a.shape[0]
    z = np.empty((2 * n, a.shape[1]))
    z[0::2], z[1::2] = a, b  # sample 2k-1 and 2k of the paper (0-based: 2k, 2k+1) are a pair

    def sim(i: int, j: int) -> float:
        return float(z[i] @ z[j] / (np.linalg.norm(z[i]) * np.linalg.norm(z[j])))

    def ell(i: int, j: int) -> float:
        denominator = sum(math.exp(sim(i, k) / temperature) for k in range(2 * n) if k != i)
        return -math.log(math.exp(sim(i, j) / temperature) / denominator)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def _projections(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, a + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_value_and_gradient_match_reference(temperature: float) -> None:
    a, b = _projections(7, 4, seed=3)
    a.requires_grad_()
    b.requires_grad_()
    loss = nt_xent_loss(a, b, temperature)
    loss.backward()
    an, bn = a.detach().numpy(), b.detach().numpy()
    assert loss.item() == pytest.approx(_reference(an, bn, temperature), rel=1e-12)
    grad_a = numerical_gradient(lambda x: _reference(x, bn, temperature), an)
    grad_b = numerical_gradient(lambda x: _reference(an, x, temperature), bn)
    np.testing.assert_allclose(a.grad.numpy(), grad_a, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.grad.numpy(), grad_b, rtol=1e-6, atol=1e-8)


def test_limits_and_fp32() -> None:
    """Perfect pairs far from all others: loss -> 0; all embeddings equal: log(2N - 1)."""
    eye = torch.eye(6, dtype=torch.float64)
    assert nt_xent_loss(eye, 3 * eye, 0.05).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.ones(6, 3)
    assert nt_xent_loss(same, same, 0.5).item() == pytest.approx(math.log(2 * 6 - 1), rel=1e-6)
    a, b = _projections(8, 5, seed=4)
    half = nt_xent_loss(a.bfloat16(), b.bfloat16(), 0.2)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(nt_xent_loss(a, b, 0.2).item(), rel=2e-2)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.ones(3, 2), torch.ones(3, 2), 0.0)
    with pytest.raises(ValueError, match="both be"):
        nt_xent_loss(torch.ones(3, 2), torch.ones(2, 2), 0.1)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        nt_xent_loss(torch.ones(1, 2), torch.ones(1, 2), 0.1)


TEMPERATURE = 0.2


def _distributed_ntxent(z_a: torch.Tensor, z_b: torch.Tensor, distributed: bool) -> torch.Tensor:
    return nt_xent_loss(z_a, z_b, TEMPERATURE, distributed=distributed)


SPLITS = [(5, 5), (3, 8)]  # rows per rank: equal batches, and a short last batch on one rank


def test_two_ranks_gathered_equal_one_process(tmp_path: Path) -> None:
    scenarios, whole = [], []
    for seed, split in enumerate(SPLITS):
        a, b = _projections(sum(split), 6, seed=20 + seed)
        scenarios.append((list(a.split(split)), list(b.split(split))))
        whole.append((a, b))
    results = run_two_ranks(tmp_path, _distributed_ntxent, scenarios)
    for split, (a, b), ranks in zip(SPLITS, whole, results, strict=True):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        single = nt_xent_loss(a, b, TEMPERATURE)
        single.backward()
        # The mean over ranks of the values is the whole-batch loss (2N-2 negatives per anchor).
        mean = sum(result["value"] for result in ranks) / WORLD
        torch.testing.assert_close(mean, single.detach())
        for rank, (result, grad_a, grad_b) in enumerate(
            zip(ranks, a.grad.split(split), b.grad.split(split), strict=True)
        ):
            # The data-parallel average (/ WORLD) of the rank gradients is the whole-batch one.
            torch.testing.assert_close(result["grad_a"] / WORLD, grad_a)
            torch.testing.assert_close(result["grad_b"] / WORLD, grad_b)
            local = nt_xent_loss(*(x.detach().split(split)[rank] for x in (a, b)), TEMPERATURE)
            torch.testing.assert_close(result["local"], local)  # distributed=False: own batch
            assert not torch.isclose(result["value"], local).item()  # the other rank's negatives

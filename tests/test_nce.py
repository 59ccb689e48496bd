"""NCE, Z, proximal and exact-softmax losses against independent float64 computations."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ray_ssl.losses.nce import (
    exact_softmax_loss,
    monte_carlo_log_z,
    nce_logits,
    nce_loss,
    proximal_term,
    running_log_z,
)

TAU = 0.07


def _unit(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=gen), dim=1)


def _lemniscate_nce(x: np.ndarray, n: int) -> float:
    """NCECriterion of zhirongw/lemniscate.pytorch (eq. 5.1/5.2 there), eps = 0, in float64.

    ``x`` is [B, K+1]: P(i|v) of the data sample in column 0, of the noise samples after it.
    """
    k = x.shape[1] - 1
    pn = 1.0 / n
    ln_pmt = np.log(x[:, 0] / (x[:, 0] + k * pn))
    ln_pon = np.log(k * pn / (x[:, 1:] + k * pn))
    return float(-(ln_pmt.sum() + ln_pon.sum()) / x.shape[0])


def test_nce_loss_matches_the_reference_criterion() -> None:
    gen = torch.Generator().manual_seed(0)
    n, batch, m, dim = 1000, 6, 50, 16
    features, positives, negatives = (
        _unit(batch, dim, gen),
        _unit(batch, dim, gen),
        _unit(m, dim, gen),
    )
    data, noise = nce_logits(features, positives, negatives, TAU)
    log_z = monte_carlo_log_z(noise, n)
    ours = float(nce_loss(data, noise, log_z, n))

    f, p, v = (t.double().numpy() for t in (features, positives, negatives))
    scores = np.exp(np.concatenate([(f * p).sum(1, keepdims=True), f @ v.T], axis=1) / TAU)
    z = n * np.exp(f @ v.T / TAU).mean()  # eq. 8 over the noise samples
    assert math.isclose(float(log_z), math.log(z), rel_tol=1e-6)
    assert math.isclose(ours, _lemniscate_nce(scores / z, n), rel_tol=1e-5)


def test_running_z_averages_in_z_space() -> None:
    first = running_log_z(None, torch.tensor(math.log(100.0)), 0.9)
    assert math.isclose(float(first), math.log(100.0), rel_tol=1e-7)
    second = running_log_z(first, torch.tensor(math.log(1100.0)), 0.9)
    assert math.isclose(math.exp(float(second)), 0.9 * 100.0 + 0.1 * 1100.0, rel_tol=1e-5)


def test_exact_softmax_and_proximal_term() -> None:
    gen = torch.Generator().manual_seed(1)
    bank, features = _unit(40, 8, gen), _unit(5, 8, gen)
    rows = torch.tensor([3, 0, 39, 7, 3])
    sims = features.double() @ bank.double().T / TAU
    expected = -(sims[torch.arange(5), rows] - torch.logsumexp(sims, dim=1)).mean()
    assert math.isclose(
        float(exact_softmax_loss(features, bank, rows, TAU)), float(expected), rel_tol=1e-5
    )
    previous = bank[rows]
    expected_prox = (
        30.0 * sum(float(((a - b) ** 2).sum()) for a, b in zip(features, previous, strict=True)) / 5
    )
    assert math.isclose(float(proximal_term(features, previous, 30.0)), expected_prox, rel_tol=1e-5)


def test_gradient_reaches_features_only() -> None:
    gen = torch.Generator().manual_seed(2)
    features = _unit(4, 8, gen).requires_grad_(True)
    positives, negatives = _unit(4, 8, gen), _unit(16, 8, gen)
    data, noise = nce_logits(features, positives, negatives, TAU)
    loss = nce_loss(data, noise, monte_carlo_log_z(noise, 100), 100) + proximal_term(
        features, positives, 1.0
    )
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_nce_ranks_models_like_the_exact_softmax_as_m_grows() -> None:
    """Criterion: over 16 candidate embeddings of one small bank (N = 64), the Spearman rank
    correlation between the NCE loss (m noise samples, MC Z) and the exact softmax loss (eq. 2),
    averaged over 8 noise draws, grows with m and reaches >= 0.98 at m = 4096 (the paper's m).

    It does not reach 1: NCE uses one Z for all i (eq. 8) where the softmax normalises each i by
    its own Z_i. Measured: rho = 0.66 / 0.91 / 0.99 / 0.99 at m = 1 / 16 / 256 / 4096.
    """
    n, dim = 64, 16
    gen = torch.Generator().manual_seed(0)
    bank, rows = _unit(n, dim, gen), torch.arange(n)
    candidates = []
    for _ in range(16):  # mixtures of the right and a wrong bank entry, plus noise: close losses
        alpha = 0.3 + 0.4 * float(torch.rand(1, generator=gen))
        wrong = bank[torch.randperm(n, generator=gen)]
        noise = 0.5 * torch.randn(n, dim, generator=gen)
        candidates.append(F.normalize(alpha * bank + (1 - alpha) * wrong + noise, dim=1))
    exact = torch.tensor([float(exact_softmax_loss(f, bank, rows, TAU)) for f in candidates])

    def mean_rho(m: int) -> float:
        rhos = []
        for seed in range(8):
            draw = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(seed))
            values = []
            for f in candidates:
                data, noise = nce_logits(f, bank, bank[draw], TAU)
                values.append(float(nce_loss(data, noise, monte_carlo_log_z(noise, n), n)))
            rhos.append(_spearman(torch.tensor(values), exact))
        return sum(rhos) / len(rhos)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of small matmuls: threading only adds overhead here
    try:
        rho = {m: mean_rho(m) for m in (1, 16, 256, 4096)}
    finally:
        torch.set_num_threads(threads)
    assert rho[1] < rho[16] < rho[256] <= rho[4096] + 0.01, rho
    assert rho[1] < 0.8 and rho[4096] >= 0.98, rho

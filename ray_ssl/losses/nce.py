"""Instance discrimination losses (Wu et al., arXiv 1805.01978): NCE, its proximal term, and
the exact non-parametric softmax.

Notation of the paper: f_i is the current L2-normalised feature of instance i, v_j the memory-bank
entry of instance j (from the previous pass, "t-1"), tau the temperature, n the number of
instances and m the number of noise samples drawn from P_n = 1/n.

- eq. 2:   P(i|f) = exp(v_i.f / tau) / sum_j exp(v_j.f / tau)  (exact, over the whole bank)
- eq. 4-5: P(i|f) = exp(v_i.f / tau) / Z, with Z estimated by Monte Carlo (eq. 8):
           Z ~= n / m * sum_k exp(v_jk.f / tau)
- eq. 6:   h(i, v) = P(i|v) / (P(i|v) + m P_n(i))
- eq. 7:   J_NCE = -E_Pd[log h(i, v)] - m E_Pn[log(1 - h(i, v'))]
- sec. 3.3 (eq. 10): + lambda ||f_i - v_i||^2 for the data sample (proximal regularisation)

Everything is computed from logits s / tau in log space: h = sigmoid(log P - log(m P_n)),
which is eq. 6 rearranged and needs no epsilon (lemniscate's NCECriterion adds 1e-7 instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nce_logits(
    features: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled similarities: data logits [B] = f_i.v_i / tau, noise logits [B, K] = f_i.v'_k / tau.

    ``features`` [B, D] and ``positives`` [B, D] (bank entries of the batch rows) pair up;
    ``negatives`` [K, D] are one set of noise samples shared by the whole batch.
    """
    positive = (features * positives).sum(dim=1) / temperature
    negative = features @ negatives.T / temperature
    return positive, negative


def monte_carlo_log_z(noise_logits: torch.Tensor, num_instances: int) -> torch.Tensor:
    """log Z with Z = n * E[exp(v'.f / tau)] over all batch x noise pairs (eq. 8), no gradient.

    One constant for every i, as in the paper; computed in log space (exp(1/0.07) ~ 1.6e6).
    """
    with torch.no_grad():
        flat = noise_logits.detach().float().reshape(-1)
        return math.log(num_instances) + torch.logsumexp(flat, 0) - math.log(flat.numel())


def running_log_z(
    previous: torch.Tensor | None, batch: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Exponential moving average of Z (in Z space, stored as log Z): Z <- mu Z + (1 - mu) Z_batch.

    The reference code freezes Z after the first batch. We keep averaging because at the start
    the bank is random and features move fast, so the first batch's Z (about n, for random unit
    vectors) understates later values by orders of magnitude and would bias h throughout training.
    Measured (3000 Fashion-MNIST images, ResNet-10t): log Z went from 8.8 on the first batch to
    ~18 by epoch 3; with Z frozen at 8.8 the NCE loss rose from 200 to 1200 in 6 epochs, with the
    running average it fell from 32 to 9.
    """
    if previous is None or not torch.isfinite(previous):
        return batch.detach()
    stacked = torch.stack([previous + math.log(momentum), batch.detach() + math.log1p(-momentum)])
    return torch.logsumexp(stacked, 0)


def nce_loss(
    data_logits: torch.Tensor, noise_logits: torch.Tensor, log_z: torch.Tensor, num_instances: int
) -> torch.Tensor:
    """J_NCE (eq. 7): mean over the batch of -log h(data) - sum_k log(1 - h(noise_k)).

    ``noise_logits`` is [B, m]; h = P / (P + m / n) (eq. 6) with P = exp(logit) / Z.
    """
    m = noise_logits.shape[1]
    log_noise_odds = math.log(m / num_instances)  # log(m P_n)
    data = F.logsigmoid(data_logits - log_z - log_noise_odds)
    noise = F.logsigmoid(-(noise_logits - log_z - log_noise_odds)).sum(dim=1)
    return -(data + noise).mean()


def proximal_term(features: torch.Tensor, previous: torch.Tensor, weight: float) -> torch.Tensor:
    """lambda * E ||v_i(t) - v_i(t-1)||^2 (sec. 3.3, eq. 10); ``previous`` is the bank entry."""
    return weight * (features - previous.detach()).pow(2).sum(dim=1).mean()


def exact_softmax_loss(
    features: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, temperature: float
) -> torch.Tensor:
    """-log P(i|f_i) with the non-parametric softmax over the whole bank (eq. 2-3)."""
    logits = features @ bank.detach().T / temperature
    return F.cross_entropy(logits, rows)

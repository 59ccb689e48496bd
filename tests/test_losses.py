"""Franca's losses against independent computations (NumPy/SciPy loops), single process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from scipy.special import log_softmax

from ray_ssl.losses.dino import dino_loss
from ray_ssl.losses.ibot import ibot_loss
from ray_ssl.losses.koleo import koleo_loss
from ray_ssl.losses.sinkhorn import sinkhorn_knopp


def _cosine_scores(rows: int, prototypes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(rows, 16, generator=g), dim=1)
    w = F.normalize(torch.randn(prototypes, 16, generator=g), dim=1)
    return x @ w.T


def _sinkhorn_numpy(scores: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """SwAV's Algorithm (arXiv 2006.09882, appendix A.1) in float64, rows = samples."""
    q = np.exp(scores.astype(np.float64) / temp)
    rows, prototypes = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=0, keepdims=True) * prototypes
        q /= q.sum(axis=1, keepdims=True) * rows
    return q * rows


@pytest.mark.parametrize("temp", [0.04, 0.07, 0.2])
def test_sinkhorn_matches_numpy_reference(temp: float) -> None:
    scores = _cosine_scores(48, 32)
    ours = sinkhorn_knopp(scores, temp, iterations=3).double().numpy()
    np.testing.assert_allclose(ours, _sinkhorn_numpy(scores.numpy(), temp, 3), rtol=1e-4, atol=1e-9)


def test_sinkhorn_is_balanced() -> None:
    scores = _cosine_scores(64, 32)
    rows, prototypes = scores.shape
    softmax_imbalance = (F.softmax(scores / 0.1, dim=1).sum(0) * prototypes / rows - 1).abs().max()
    few = sinkhorn_knopp(scores, 0.1, iterations=3)
    many = sinkhorn_knopp(scores, 0.1, iterations=200)
    for q in (few, many):
        torch.testing.assert_close(q.sum(dim=1), torch.ones(rows))  # rows: exactly 1 (1/B of P)
        assert (q >= 0).all()
    # Columns (prototypes) approach B/K each (1/K of P): 3 iterations already beat the softmax.
    assert (few.sum(0) * prototypes / rows - 1).abs().max() < 0.2 * softmax_imbalance
    torch.testing.assert_close(many.sum(0), torch.full((prototypes,), rows / prototypes))


def test_sinkhorn_solution_has_scaling_form() -> None:
    """Converged Q = Diag(u) exp(S / tau) Diag(v) (SwAV eq. 3): log Q - S/tau is additive."""
    scores, temp = _cosine_scores(40, 20).double(), 0.1
    q = sinkhorn_knopp(scores, temp, iterations=500).double()
    residual = torch.log(q) - scores / temp
    centred = residual - residual.mean(0, keepdim=True) - residual.mean(1, keepdim=True)
    centred += residual.mean()
    assert centred.abs().max() < 1e-4


def test_sinkhorn_ignores_padding_rows() -> None:
    scores = _cosine_scores(30, 16)
    garbage = torch.full((5, 16), torch.nan)
    padded = torch.cat([scores[:10], garbage, scores[10:], torch.ones(3, 16)])
    valid = torch.ones(len(padded), dtype=torch.bool)
    valid[10:15] = False
    valid[-3:] = False
    out = sinkhorn_knopp(padded, 0.07, valid=valid)
    torch.testing.assert_close(out[valid], sinkhorn_knopp(scores, 0.07))
    assert (out[~valid] == 0).all()
    empty = sinkhorn_knopp(torch.zeros(0, 16), 0.07)
    assert empty.shape == (0, 16)


def _cross_entropy_np(teacher: np.ndarray, student: np.ndarray, temp: float) -> float:
    """Batch mean of -sum_k t_k log softmax(s / temp)_k."""
    return float(np.mean(-(teacher * log_softmax(student / temp, axis=-1)).sum(-1)))


def test_dino_loss_matches_explicit_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    crops_g, crops_l, batch, k = 2, 3, 5, 12
    student_global = torch.randn(crops_g * batch, k, generator=g)
    student_local = torch.randn(crops_l * batch, k, generator=g)
    teacher = F.softmax(torch.randn(crops_g * batch, k, generator=g), dim=1)
    ours = dino_loss(student_global, student_local, teacher, crops_g, student_temp=0.1)
    sg = student_global.numpy().reshape(crops_g, batch, k)
    sl = student_local.numpy().reshape(crops_l, batch, k)
    t = teacher.numpy().reshape(crops_g, batch, k)
    terms = []
    for tg in range(crops_g):
        for sgi in range(crops_g):
            if sgi != tg:  # never a crop against itself
                terms.append(_cross_entropy_np(t[tg], sg[sgi], 0.1))
        for li in range(crops_l):
            terms.append(_cross_entropy_np(t[tg], sl[li], 0.1))
    assert len(terms) == crops_g * (crops_g - 1) + crops_g * crops_l
    assert ours.item() == pytest.approx(np.mean(terms), rel=1e-5)
    globals_only = dino_loss(student_global, None, teacher, crops_g, student_temp=0.1)
    assert globals_only.item() == pytest.approx(np.mean(terms[:1] + terms[4:5]), rel=1e-5)


def test_dino_loss_three_global_crops() -> None:
    g = torch.Generator().manual_seed(2)
    student = torch.randn(3 * 4, 6, generator=g)
    teacher = F.softmax(torch.randn(3 * 4, 6, generator=g), dim=1)
    s, t = student.numpy().reshape(3, 4, 6), teacher.numpy().reshape(3, 4, 6)
    pairs = [_cross_entropy_np(t[a], s[b], 0.1) for a in range(3) for b in range(3) if a != b]
    assert dino_loss(student, None, teacher, 3).item() == pytest.approx(np.mean(pairs), rel=1e-5)


def test_ibot_loss_matches_per_image_loop() -> None:
    g = torch.Generator().manual_seed(3)
    images, patches, k = 6, 9, 10
    masks = torch.rand(images, patches, generator=g) < 0.4
    masks[0] = False  # an unmasked image still counts in the denominator (DINOv2)
    masks[1, :] = True
    m = int(masks.sum())
    student = torch.randn(m, k, generator=g)
    teacher = F.softmax(torch.randn(m, k, generator=g), dim=1)
    ours = ibot_loss(student, teacher, masks, student_temp=0.1)
    # Independent: scatter rows back to [images, patches] and loop over images.
    s_full = np.zeros((images, patches, k))
    t_full = np.zeros((images, patches, k))
    s_full[masks.numpy()] = student.numpy()
    t_full[masks.numpy()] = teacher.numpy()
    total = 0.0
    for n in range(images):
        idx = np.flatnonzero(masks[n].numpy())
        if len(idx):
            total += _cross_entropy_np(t_full[n, idx], s_full[n, idx], 0.1)
    assert ours.item() == pytest.approx(total / images, rel=1e-5)
    with pytest.raises(ValueError, match="masked-patch scores"):
        ibot_loss(student[:-1], teacher[:-1], masks)


def test_koleo_matches_pairwise_distances() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 8, generator=g)
    unit = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    d = cdist(unit, unit)
    np.fill_diagonal(d, np.inf)
    expected = -np.mean(np.log(d.min(axis=1)))
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(x[:1])


def test_koleo_gradient_spreads_points() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0]], requires_grad=True)
    koleo_loss(x).backward()
    step = x.detach() - 0.01 * x.grad
    assert koleo_loss(step) < koleo_loss(x.detach())

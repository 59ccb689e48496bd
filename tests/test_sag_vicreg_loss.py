"""SAG-VICReg's loss: VICReg exactly at w = 0, the walk term against a loop, partner exclusions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_ssl.losses.sag_vicreg import sag_vicreg_loss, walk_invariance_term, walk_partners
from ray_ssl.losses.vicreg import vicreg_loss


def embeddings(n: int = 16, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=g, dtype=torch.float64)
    return z_a, z_a + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_with_no_walk_weight_the_loss_is_vicreg_exactly() -> None:
    z_a, z_b = embeddings()
    partners = torch.randint(0, 32, (32,), generator=torch.Generator().manual_seed(1))
    loss, _, _ = sag_vicreg_loss(z_a, z_b, partners, walk_weight=0.0)
    assert torch.equal(loss, vicreg_loss(z_a, z_b))


def test_walk_term_matches_a_loop_and_weights_mix_linearly() -> None:
    z_a, z_b = embeddings()
    z = torch.cat([z_a, z_b])
    partners = torch.randint(0, 32, (32,), generator=torch.Generator().manual_seed(2))
    by_loop = np.mean(
        [np.mean((z[i].numpy() - z[p].numpy()) ** 2) for i, p in enumerate(partners.tolist())]
    )
    assert walk_invariance_term(z, partners).item() == pytest.approx(by_loop, rel=1e-12)
    loss_0, terms, walk = sag_vicreg_loss(z_a, z_b, partners, walk_weight=0.0)
    loss_w, _, _ = sag_vicreg_loss(z_a, z_b, partners, walk_weight=0.3)
    expected = loss_0 + 25.0 * 0.3 * (walk - terms.invariance)
    assert loss_w.item() == pytest.approx(expected.item(), rel=1e-12)


def test_gradient_flows_through_the_walk_pairs() -> None:
    z_a, z_b = (t.requires_grad_() for t in embeddings())
    partners = torch.arange(32).roll(3)
    loss, _, _ = sag_vicreg_loss(z_a, z_b, partners, walk_weight=1.0, std_coeff=0, cov_coeff=0)
    loss.backward()
    z = torch.cat([z_a, z_b]).detach()
    # d/dz_k of 25 * mean((z_i - z_p(i))^2) over 2N x D: own term plus the term where k is p(i).
    expected = 2 * 25.0 * ((z - z[partners]) - (z[partners.argsort()] - z)) / z.numel()
    torch.testing.assert_close(torch.cat([z_a.grad, z_b.grad]), expected)


def test_partners_are_never_the_anchor_or_its_own_augmentation() -> None:
    z_a, z_b = embeddings(n=32)
    features = torch.cat([z_a, z_b]).float()
    for seed in range(20):
        partners = walk_partners(features, 6, 3, 2, torch.Generator().manual_seed(seed))
        nodes = torch.arange(64)
        assert torch.all(partners != nodes)
        assert torch.all(partners != (nodes + 32) % 64)


def test_seeded_partners_are_reproducible() -> None:
    features = torch.cat(embeddings(n=32)).float()
    draw = [walk_partners(features, 6, 3, 2, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*draw)

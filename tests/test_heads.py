"""DINO head, Matryoshka heads: true slicing, prototype counts, weight norm, frozen last layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ray_ssl.models.heads import (
    DINOHead,
    MatryoshkaHeads,
    is_last_layer_param,
    nesting_dims,
    prototype_counts,
)


def test_nesting_dims_and_prototype_counts_at_vit_g_scale() -> None:
    dims = nesting_dims(1536, 5)
    assert dims == [96, 192, 384, 768, 1536]  # D/16 .. D
    assert prototype_counts(131072, dims) == [8192, 16384, 32768, 65536, 131072]
    with torch.device("meta"):
        heads = MatryoshkaHeads(1536, 131072, 2048, 384, 3, 5)
    for head, d, k in zip(heads.levels, dims, heads.prototype_counts, strict=True):
        assert head.mlp[0].in_features == d
        assert head.last_layer.weight.shape == (k, 384)
    assert nesting_dims(192, 1) == [192]
    with pytest.raises(ValueError, match="cannot be halved"):
        nesting_dims(100, 5)


def test_each_level_sees_exactly_its_first_features() -> None:
    torch.manual_seed(0)
    heads = MatryoshkaHeads(64, 256, 32, 16, 3, 4)  # dims 8, 16, 32, 64
    assert heads.dims == [8, 16, 32, 64]
    x = torch.randn(5, 64)
    with torch.no_grad():
        base = heads(x)
        for feature in (0, 7, 8, 15, 16, 40, 63):
            bumped = x.clone()
            bumped[:, feature] += 3.0
            out = heads(bumped)
            for level, d in enumerate(heads.dims):
                same = torch.equal(out[level], base[level])
                assert same == (feature >= d), (feature, d)
    assert [o.shape[-1] for o in base] == [32, 64, 128, 256]


def test_dino_head_scores_are_cosines_with_normalised_prototypes() -> None:
    torch.manual_seed(1)
    head = DINOHead(12, 40, 24, 8, 3)
    x = torch.randn(6, 12)
    with torch.no_grad():
        z = F.normalize(head.mlp(x), dim=-1)
        expected = z @ F.normalize(head.last_layer.weight, dim=-1).T
        torch.testing.assert_close(head(x), expected)
        assert head(x).abs().max() <= 1.0 + 1e-6
        head.last_layer.weight.mul_(7.0)  # weight norm with unit gain: scale-free prototypes
        torch.testing.assert_close(head(x), expected)
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2  # none after the bottleneck


def test_frozen_last_layer_gets_no_gradient() -> None:
    torch.manual_seed(2)
    heads = MatryoshkaHeads(32, 64, 16, 8, 2, 3)
    sum(o.square().sum() for o in heads(torch.randn(4, 32), freeze_last_layer=True)).backward()
    for name, param in heads.named_parameters():
        if is_last_layer_param(name):
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    heads.zero_grad(set_to_none=True)
    sum(o.square().sum() for o in heads(torch.randn(4, 32))).backward()
    assert all(p.grad is not None for p in heads.parameters())


def test_last_layer_names() -> None:
    heads = MatryoshkaHeads(32, 64, 16, 8, 2, 3)
    names = [n for n, _ in heads.named_parameters() if is_last_layer_param(n)]
    assert names == [f"levels.{i}.last_layer.weight" for i in range(3)]
    assert is_last_layer_param("student.dino_head.levels.0.last_layer.weight")
    assert not is_last_layer_param("student.backbone.blocks.0.mlp.fc1.weight")

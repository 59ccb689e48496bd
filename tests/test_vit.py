"""ViT factory: shapes, iBOT mask token, timm-compatible export, ViT-G on meta, FLOP count."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ray_ssl.config import ModelConfig
from ray_ssl.models.vit import ViT, build_vit, vit_forward_flops

TINY = ModelConfig(arch="tiny", depth=2, patch_size=4, img_size=28, in_chans=1, num_registers=2)


def _tiny(**overrides: object) -> ViT:
    torch.manual_seed(0)
    fields = {**TINY.__dict__, **overrides}
    return build_vit(ModelConfig(**fields)).eval()


@pytest.fixture(scope="module")
def tiny() -> ViT:
    return _tiny()


def test_shapes_global_and_local_crops(tiny: ViT) -> None:
    vit = tiny
    out = vit(torch.randn(3, 1, 28, 28))
    assert out.cls_token.shape == (3, 192)
    assert out.patch_tokens.shape == (3, 49, 192)  # registers are not patch tokens
    local = vit(torch.randn(3, 1, 16, 16))  # dynamic_img_size: resampled position embedding
    assert local.patch_tokens.shape == (3, 16, 192)
    assert vit.embed_dim == 192


def test_masked_patches_replaced_by_mask_token() -> None:
    vit = _tiny(num_registers=0)
    with torch.no_grad():
        vit.mask_token.normal_()
    images = torch.randn(2, 1, 28, 28)
    masks = torch.zeros(2, 49, dtype=torch.bool)
    masks[:, :7] = True  # the first row of 4x4 patches: pixel rows 0..3
    changed_inside = images.clone()
    changed_inside[:, :, :4, :] += 5.0
    changed_outside = images.clone()
    changed_outside[:, :, 4:8, :] += 5.0
    with torch.no_grad():
        base = vit(images, masks)
        inside = vit(changed_inside, masks)
        outside = vit(changed_outside, masks)
        unmasked = vit(changed_inside)
    torch.testing.assert_close(inside.cls_token, base.cls_token)
    torch.testing.assert_close(inside.patch_tokens, base.patch_tokens)
    assert not torch.allclose(outside.cls_token, base.cls_token)
    assert not torch.allclose(unmasked.cls_token, vit(images).cls_token)


def test_mask_token_learns_and_bad_mask_shape_is_an_error(tiny: ViT) -> None:
    vit = tiny
    masks = torch.zeros(2, 49, dtype=torch.bool)
    masks[0, 3] = True
    vit(torch.randn(2, 1, 28, 28), masks).cls_token.sum().backward()
    assert vit.mask_token.grad is not None and vit.mask_token.grad.abs().sum() > 0
    try:
        vit(torch.randn(2, 1, 28, 28), torch.zeros(2, 16, dtype=torch.bool))
    except ValueError as err:
        assert "patch mask has shape" in str(err)
    else:
        raise AssertionError("a wrong mask shape must raise")


def test_export_loads_into_plain_timm_model(tiny: ViT) -> None:
    vit = tiny
    name, kwargs = vit.timm_name_and_kwargs()
    plain = timm.create_model(name, pretrained=False, **kwargs).eval()
    plain.load_state_dict(vit.timm_state_dict(), strict=True)
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(images)[:, 0], vit(images).cls_token)


def test_activation_checkpointing_matches() -> None:
    vit = _tiny(act_checkpointing=True)
    assert vit.grad_checkpointing
    images = torch.randn(2, 1, 28, 28)
    grads = []
    for checkpointing in (True, False):
        vit.set_grad_checkpointing(checkpointing)
        vit.zero_grad()
        vit(images).cls_token.square().sum().backward()
        grads.append(vit.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_uniform_and_linear() -> None:
    uniform = _tiny(drop_path=0.3)
    rates = [b.drop_path1.drop_prob for b in uniform.blocks]
    assert rates == [0.3] * len(uniform.blocks) and len(rates) == 2
    linear = _tiny(drop_path=0.3, drop_path_uniform=False)
    assert isinstance(linear.blocks[0].drop_path1, torch.nn.Identity)
    assert isinstance(linear.blocks[-1].drop_path2, DropPath)
    assert abs(linear.blocks[-1].drop_path2.drop_prob - 0.3) < 1e-9
    assert all(b.attn.fused_attn for b in uniform.blocks)


def test_vit_giant_on_meta_device() -> None:
    config = ModelConfig(arch="giant", patch_size=14, img_size=224)
    with torch.device("meta"):
        vit = build_vit(config)
        name, kwargs = vit.timm_name_and_kwargs()
        reference = timm.create_model(name, pretrained=False, **kwargs)
    assert vit.mask_token.is_meta
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (1536, 40, 24)
    block = vit.blocks[0]
    assert block.mlp.fc1.weight.shape == (2 * 4096, 1536)  # SwiGLU: gate and value packed
    assert block.mlp.fc2.weight.shape == (1536, 4096)
    assert vit.pos_embed.shape == (1, 16 * 16 + 1, 1536)
    params = sum(p.numel() for p in vit.parameters())
    assert 1.10e9 < params < 1.15e9  # DINOv2 ViT-g/14: 1.1B
    ours = {k: tuple(v.shape) for k, v in vit.timm_state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_forward_flops_against_torch_flop_counter(tiny: ViT) -> None:
    # The math backend runs attention as matmuls, which every torch release's counter sees
    # (torch 2.14 does not count the fused CPU kernel).
    for size in (28, 16):
        with (
            FlopCounterMode(display=False) as counter,
            sdpa_kernel(SDPBackend.MATH),
            torch.no_grad(),
        ):
            tiny(torch.randn(2, 1, size, size))
        assert vit_forward_flops(TINY, size, batch=2) == counter.get_total_flops()
    # ViT-B/16 at 224: the well-known 17.6 GMACs per image.
    base = vit_forward_flops(ModelConfig(arch="base", patch_size=16), 224, batch=1)
    assert abs(base / 2e9 - 17.56) < 0.05

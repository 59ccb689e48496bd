"""ViT backbones from timm, with an iBOT mask token, and their forward FLOP count.

:func:`build_vit` turns a :class:`~ray_ssl.config.ModelConfig` into a :class:`ViT`: timm's
VisionTransformer (its :meth:`ViT.timm_state_dict` loads into
``timm.create_model(name, **kwargs)`` with ``name, kwargs = vit.timm_name_and_kwargs()``) plus a
learnable mask token that replaces masked patch embeddings before the position embedding is added
(iBOT, arXiv 2111.07832 sec. 3.2).
Attention runs through PyTorch SDPA (timm's fused attention); activation checkpointing is timm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from timm.layers import DropPath, SwiGLUPacked
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ray_ssl.config import ModelConfig


@dataclass(frozen=True)
class ArchSpec:
    """Shape of one ViT size; ``ffn_hidden`` is the width of the FFN's inner layer."""

    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn_hidden: int
    timm_mlp_ratio: float = 4.0
    swiglu: bool = False


# Sizes of ViT-Ti/S/B/L (Dosovitskiy et al.; DeiT) and DINOv2's vit_giant2 (arXiv 2304.07193,
# sec. 5: dim 1536, 40 blocks, 24 heads, SwiGLU FFN with (int(4*1536*2/3)+7)//8*8 = 4096 hidden).
ARCHS: dict[str, ArchSpec] = {
    "tiny": ArchSpec("vit_tiny_patch16_224", 192, 12, 3, 4 * 192),
    "small": ArchSpec("vit_small_patch16_224", 384, 12, 6, 4 * 384),
    "base": ArchSpec("vit_base_patch16_224", 768, 12, 12, 4 * 768),
    "large": ArchSpec("vit_large_patch16_224", 1024, 24, 16, 4 * 1024),
    # timm packs SwiGLU's two 4096-wide projections into one: mlp_ratio 2.66667 * 2 (timm's value).
    "giant": ArchSpec("vit_giant_patch14_dinov2", 1536, 40, 24, 4096, 2.66667 * 2, swiglu=True),
}

# Pixel statistics for normalisation: ImageNet's (the convention of every timm/DINOv2 backbone);
# for one channel, the mean of the three channels' statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GRAY_STD = (sum(IMAGENET_STD) / 3,)
UINT8_MAX = 255.0


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float32 normalised with ImageNet mean/std, same device."""
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"images have {channels} channels; expected 1 or 3")
    mean, std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    mean_t = torch.tensor(mean, device=images.device).view(1, channels, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, channels, 1, 1)
    return (images.float() / UINT8_MAX - mean_t) / std_t


class BackboneOutput(NamedTuple):
    """CLS token [B, D] and patch tokens [B, Np, D], both after the final norm."""

    cls_token: torch.Tensor
    patch_tokens: torch.Tensor


class ViT(VisionTransformer):
    """timm's VisionTransformer plus an iBOT mask token.

    A subclass rather than a wrapper so that every parameter belongs to the module whose
    ``forward`` runs (DeepSpeed ZeRO-3 gathers a module's own parameters around its forward);
    the state dict keeps timm's key names, plus ``mask_token``.

    ``forward(images, masks)`` takes float images [B, C, H, W] (any size divisible by the patch
    size: the position embedding is resampled, ``dynamic_img_size``) and an optional bool patch
    mask [B, Np] (row-major patch order); returns :class:`BackboneOutput`.
    """

    def __init__(self, timm_name: str, timm_kwargs: dict[str, Any], **arch_kwargs: Any) -> None:
        super().__init__(**{**arch_kwargs, **timm_kwargs})  # timm_kwargs win, as in timm
        self.patch_size: int = self.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))  # zeros as DINOv2
        self._timm_name = timm_name
        self._timm_kwargs = dict(timm_kwargs)

    def timm_name_and_kwargs(self) -> tuple[str, dict[str, Any]]:
        """``timm.create_model(name, **kwargs)`` builds the same network; kwargs are JSON-able."""
        return self._timm_name, dict(self._timm_kwargs)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with timm's keys only (no mask token), loadable by the timm model."""
        return {k: v for k, v in self.state_dict().items() if k != "mask_token"}

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, masks: torch.Tensor | None = None
    ) -> BackboneOutput:
        x = self.patch_embed(images)  # [B, h, w, D] with dynamic_img_size (flattened after pos)
        if masks is not None:
            batch, grid_h, grid_w, dim = x.shape
            if masks.shape != (batch, grid_h * grid_w):
                raise ValueError(
                    f"patch mask has shape {tuple(masks.shape)}; expected ({batch}, "
                    f"{grid_h * grid_w}) for {images.shape[-2]}x{images.shape[-1]} images with "
                    f"patch size {self.patch_size}"
                )
            masked = masks.view(batch, grid_h, grid_w, 1)
            x = torch.where(masked, self.mask_token.to(x.dtype).view(1, 1, 1, dim), x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return BackboneOutput(x[:, 0], x[:, self.num_prefix_tokens :])


def timm_kwargs_for(model: ModelConfig) -> tuple[str, dict[str, Any]]:
    """timm model name and architecture kwargs (no training-only options) for ``model``."""
    if model.arch not in ARCHS:
        raise ValueError(f"unknown ViT arch '{model.arch}'; choose one of {', '.join(ARCHS)}")
    spec = ARCHS[model.arch]
    kwargs: dict[str, Any] = {
        "patch_size": model.patch_size,
        "img_size": model.img_size,
        "in_chans": model.in_chans,
        "num_classes": 0,
        "dynamic_img_size": True,
        "reg_tokens": model.num_registers,
        "init_values": model.layerscale,
    }
    if model.depth is not None:
        if model.depth < 1:
            raise ValueError(f"model depth must be >= 1, got {model.depth}")
        kwargs["depth"] = model.depth
    return spec.timm_name, kwargs


def build_vit(model: ModelConfig) -> ViT:
    """The ViT of ``model`` (random init). Build under ``torch.device('meta')`` to skip memory."""
    name, kwargs = timm_kwargs_for(model)
    vit = ViT(name, kwargs, **_arch_kwargs(ARCHS[model.arch]))
    _set_drop_path(vit, model.drop_path, uniform=model.drop_path_uniform)
    for block in vit.blocks:
        block.attn.fused_attn = True  # F.scaled_dot_product_attention whatever TIMM_FUSED_ATTN is
    vit.set_grad_checkpointing(model.act_checkpointing)
    return vit


def _arch_kwargs(spec: ArchSpec) -> dict[str, Any]:
    """The arguments timm's registered model function passes for this size."""
    args: dict[str, Any] = {
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,  # overridden by timm_kwargs_for when ModelConfig.depth is set
        "num_heads": spec.num_heads,
        "mlp_ratio": spec.timm_mlp_ratio,
    }
    if spec.swiglu:
        args.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return args


def _set_drop_path(vit: nn.Module, rate: float, uniform: bool) -> None:
    """Stochastic depth: uniform over blocks (DINOv2's drop_path_uniform) or linear 0 -> rate."""
    depth = len(vit.blocks)
    for i, block in enumerate(vit.blocks):
        block_rate = rate if uniform else rate * i / max(depth - 1, 1)
        block.drop_path1 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(block_rate) if block_rate > 0 else nn.Identity()


def vit_forward_flops(model: ModelConfig, img_size: int, batch: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over ``batch`` square images.

    Patch embedding, per block the QKV/output projections, QK^T and attention x V, and the FFN;
    norms, softmax and element-wise ops are ignored (the usual MFU convention, PaLM app. B).
    """
    spec = ARCHS[model.arch]
    dim, patch = spec.embed_dim, model.patch_size
    patches = (img_size // patch) ** 2
    tokens = patches + 1 + model.num_registers
    embed = 2 * patches * (model.in_chans * patch * patch) * dim
    projections = 2 * tokens * (3 * dim * dim + dim * dim)
    attention = 2 * 2 * tokens * tokens * dim
    ffn_in = 2 * spec.ffn_hidden if spec.swiglu else spec.ffn_hidden  # SwiGLU: gate + value
    ffn = 2 * tokens * (dim * ffn_in + spec.ffn_hidden * dim)
    depth = spec.depth if model.depth is None else model.depth
    return batch * (embed + depth * (projections + attention + ffn))

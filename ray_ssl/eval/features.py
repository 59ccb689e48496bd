"""Frozen backbone features of a set of images, in batches: the image embedding (CLS), the mean
patch token and, on request, every patch token; optionally with a subspace (RASA's positional
basis) removed from the patch tokens.

Backbones: our :class:`~ray_ssl.models.vit.ViT` (its forward returns final-norm CLS and patch
tokens) or any timm model (``forward_features`` then ``forward_head(pre_logits=True)``: the CLS
token, or the model's own pooling when it has none); a module whose forward returns [B, D] gives
CLS features only.

Works on any rank layout: the caller hands each rank its slice. Under DeepSpeed ZeRO-3 every rank
must make the same number of forward calls (each gathers parameters collectively), so the caller
gives every rank a slice of the same length (:func:`rank_slice` pads by repeating the last row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

Preprocess = Callable[[torch.Tensor], torch.Tensor]  # uint8 [B,C,H,W] -> float [B,C,H,W]


class Features(NamedTuple):
    """float32 CPU features of N images."""

    cls: torch.Tensor  # [N, D] image embedding (CLS token)
    patch_mean: torch.Tensor | None  # [N, D] mean patch token (DINOv2's linear "avgpool")
    patches: torch.Tensor | None  # [N, Np, D] patch tokens, when asked for


def remove_subspace(tokens: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``z - (z Q^T) Q`` on the last dim of ``tokens`` for a basis Q [k, D] with orthonormal rows
    (RASA, Franca arXiv 2507.14137 sec. 3.3: the projection onto Q's span removed). An empty
    basis removes nothing."""
    if basis.numel() == 0:
        return tokens
    if basis.ndim != 2 or basis.shape[1] != tokens.shape[-1]:
        raise ValueError(
            f"basis of shape {tuple(basis.shape)} does not fit tokens of width {tokens.shape[-1]}"
        )
    q = basis.to(device=tokens.device, dtype=tokens.dtype)
    return tokens - (tokens @ q.T) @ q


def cls_features(output: object) -> torch.Tensor:
    """The CLS embedding [B, D] of a backbone output: a tensor or a (cls, patches) tuple."""
    if isinstance(output, torch.Tensor):
        return output if output.ndim == 2 else output[:, 0]
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot take CLS features from a backbone output of type {type(output)}")


def backbone_tokens(
    backbone: nn.Module, x: torch.Tensor, patches: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CLS [B, D], patch tokens [B, Np, D] or None) of preprocessed images ``x``.

    The module is called as a whole (ZeRO-3 gathers a module's own parameters around its
    forward) unless patch tokens are wanted from a timm model, which then goes through
    ``forward_features``; our ViT's forward returns both.
    """
    whole = hasattr(backbone, "timm_name_and_kwargs") or not hasattr(backbone, "forward_features")
    if whole or not patches:
        output = backbone(x)
        if isinstance(output, tuple) and len(output) == 2:
            return output[0], output[1]
        return cls_features(output), None
    tokens = backbone.forward_features(x)
    if tokens.ndim != 3:  # a convolutional network's feature map [B, D, h, w]
        patches = tokens.flatten(2).transpose(1, 2)
    else:
        patches = tokens[:, getattr(backbone, "num_prefix_tokens", 0) :]
    return backbone.forward_head(tokens, pre_logits=True), patches


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(images, np.ndarray):
        if len(images) == 0:
            raise ValueError("no images to extract features from")
        return (images[start : start + batch_size] for start in range(0, len(images), batch_size))
    return images


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: np.ndarray | Iterable[np.ndarray],
    batch_size: int,
    device: torch.device,
    preprocess: Preprocess,
    patch_tokens: bool = False,
    rasa_basis: torch.Tensor | None = None,
    patch_mean: bool = False,
) -> Features:
    """Features of uint8 images [N, H, W, C] (or of an iterable of such batches, e.g. a stream),
    in the backbone's dtype, returned as float32 on the CPU.

    ``patch_mean`` / ``patch_tokens`` ask for the mean patch token / all of them. ``rasa_basis``
    (Q, [2T, D], orthonormal rows) is removed from the patch tokens only, before their mean is
    taken; the CLS token is left untouched (RASA).
    """
    want_patches = patch_tokens or patch_mean
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    cls, means, patches = [], [], []
    try:
        for chunk in _batches(images, batch_size):
            host = torch.from_numpy(np.ascontiguousarray(chunk))
            x = preprocess(host.to(device).permute(0, 3, 1, 2)).to(param.dtype)
            c, p = backbone_tokens(backbone, x, want_patches)
            cls.append(c.float().cpu())
            if not want_patches:
                continue
            if p is None:
                raise ValueError(f"{type(backbone).__name__} gives no patch tokens")
            p = p.float()
            if rasa_basis is not None:
                p = remove_subspace(p, rasa_basis)
            means.append(p.mean(dim=1).cpu())
            if patch_tokens:
                patches.append(p.cpu())
    finally:
        backbone.train(was_training)
    if not cls:
        raise ValueError("no images to extract features from")
    return Features(
        torch.cat(cls),
        torch.cat(means) if means else None,
        torch.cat(patches) if patches else None,
    )


def rank_slice(num_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Row indices of ``rank``'s equal-length share of ``num_rows`` (the last row repeated)."""
    per_rank = math.ceil(num_rows / world_size)
    rows = np.arange(rank * per_rank, (rank + 1) * per_rank)
    return np.minimum(rows, num_rows - 1)

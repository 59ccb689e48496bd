"""Projection heads: the DINO head and Franca's nested Matryoshka heads.

DINO head (Caron et al., arXiv 2104.14294 sec. 3.1; DINOv2 arXiv 2304.07193): an MLP with GELU
down to a bottleneck, L2 normalisation, then a weight-normalised linear layer whose rows are the
prototypes. Matryoshka heads (Franca, arXiv 2507.14137, nested Matryoshka clustering): level i
reads the first d_i features of the backbone output, d_i in [D/16, D/8, D/4, D/2, D], with its
own MLP and ``prototypes * d_i / D`` prototypes (the counts of the released MRLDINOHead; how its
levels read the embedding differs, see :class:`MatryoshkaHeads`).

Weight norm: :class:`Prototypes` holds one ordinary weight and L2-normalises its rows inside
``forward`` (``weight_norm`` with the gain fixed at 1, DINO's ``norm_last_layer``; DINOv2 leaves
the gain trainable from 1, but with unit-norm inputs a fixed gain bounds the logits by
1/temperature). Not ``torch.nn.utils.weight_norm``: under DeepSpeed ZeRO-3 a parameter is only
materialised around its own module's forward, while the old hook rebuilds ``weight`` from
``weight_g``/``weight_v`` as a plain attribute that ZeRO-3 neither partitions nor gathers, and the
parametrization version keeps the parameters in a side module whose gathering depends on hook
order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

INIT_STD = 0.02  # truncated-normal init of every Linear (DINOv2's DINOHead)
NORM_EPS = 1e-6  # L2 normalisation epsilon, safe in bf16 (DINOv2's DINOHead under fp16)


def nesting_dims(embed_dim: int, levels: int) -> list[int]:
    """Matryoshka feature widths, smallest first: [D/2^(levels-1), ..., D/2, D]."""
    if levels < 1:
        raise ValueError(f"nesting levels must be >= 1, got {levels}")
    dims = [embed_dim >> (levels - 1 - i) for i in range(levels)]
    if dims[0] < 1 or dims[0] << (levels - 1) != embed_dim:
        raise ValueError(
            f"embed dim {embed_dim} cannot be halved {levels - 1} times; use fewer nesting levels"
        )
    return dims


def prototype_counts(prototypes: int, dims: list[int]) -> list[int]:
    """Prototypes per level, proportional to the level's width (Franca's MRLDINOHead)."""
    return [max(1, prototypes * d // dims[-1]) for d in dims]


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers with GELU between them, ending at the bottleneck (no final GELU)."""
    if layers < 1:
        raise ValueError(f"head layers must be >= 1, got {layers}")
    widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(widths[i], widths[i + 1]))
        if i < layers - 1:
            modules.append(nn.GELU())
    return nn.Sequential(*modules)


class Prototypes(nn.Module):
    """Cosine scores against L2-normalised prototype rows (the DINO head's ``last_layer``)."""

    def __init__(self, in_dim: int, count: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, in_dim))
        trunc_normal_(self.weight, std=INIT_STD)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        # Frozen: detach so no gradient reaches the prototypes (ZeRO-safe: nothing to cancel later).
        weight = self.weight.detach() if frozen else self.weight
        return F.linear(x, F.normalize(weight, dim=-1, eps=NORM_EPS))


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalise -> prototype scores.

    Franca's released MRLDINOHead adds a GELU after the bottleneck and skips the L2 normalisation;
    this keeps DINOv2's head (the recipe Franca builds on), whose cosine scores stay in [-1, 1].
    """

    def __init__(
        self, in_dim: int, prototypes: int, hidden_dim: int, bottleneck_dim: int, layers: int
    ) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, layers)
        self.last_layer = Prototypes(bottleneck_dim, prototypes)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=NORM_EPS)
        return self.last_layer(z, frozen=freeze_last_layer)


class MatryoshkaHeads(nn.Module):
    """One :class:`DINOHead` per nesting level; level i sees exactly the first ``dims[i]`` features.

    This follows the paper (arXiv 2507.14137 sec. 3): a level reads a prefix of the embedding.
    Franca's released MRLDINOHead differs: each level first maps the FULL D-wide embedding with
    its own ``Linear(D -> d_i)`` (``matryoshka_projections``) and feeds that to its MLP, so every
    level sees all D features through a learned rank-d_i map rather than a nested prefix.
    """

    def __init__(
        self,
        embed_dim: int,
        prototypes: int,
        hidden_dim: int,
        bottleneck_dim: int,
        layers: int,
        levels: int,
    ) -> None:
        super().__init__()
        self.dims = nesting_dims(embed_dim, levels)
        self.prototype_counts = prototype_counts(prototypes, self.dims)
        self.levels = nn.ModuleList(
            DINOHead(d, k, hidden_dim, bottleneck_dim, layers)
            for d, k in zip(self.dims, self.prototype_counts, strict=True)
        )

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> list[torch.Tensor]:
        """x [..., D] -> one score tensor [..., K_i] per level, smallest level first."""
        return [
            head(x[..., :d], freeze_last_layer=freeze_last_layer)
            for d, head in zip(self.dims, self.levels, strict=True)
        ]


def is_last_layer_param(name: str) -> bool:
    """Whether a parameter name (from ``named_parameters``) is a prototype (last-layer) weight."""
    return ".last_layer." in f".{name}"


class BatchNormMLP(nn.Module):
    """``Linear -> BatchNorm -> ReLU`` for every hidden width, then a bias-free ``Linear``.

    The VICReg expander (Bardes et al., ICLR 2022 sec. 4.2; facebookresearch/vicreg ``Projector``:
    widths 8192-8192-8192 on ResNet-50) and, with one hidden layer, the SimCLR projection head
    g(h) = W2 ReLU(W1 h) (Chen et al., ICML 2020 sec. 2.1; BatchNorm after W1 as in its
    released code). ``dims`` = [input, hidden..., output].
    """

    def __init__(self, dims: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"MLP widths must be >= 1 and at least [in, out], got {list(dims)}")
        layers: list[nn.Module] = []
        for width_in, width_out in zip(dims[:-2], dims[1:-1], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out), nn.ReLU(True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

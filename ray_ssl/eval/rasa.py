"""RASA, Removal of Absolute Spatial Attributes (Franca, arXiv 2507.14137 sec. 3.3).

Round t trains a position regressor ``sigmoid(W z)`` (``W``: 2 x D, no bias) with MSE to each
patch's (row, col) on the grid scaled to [0, 1], on frozen final-norm patch tokens from which the
planes of rounds 1..t-1 are already removed; the plane spanned by ``W``'s rows then joins one
orthonormal basis ``Q`` (2t x D), re-orthonormalised by QR. Patch tokens are debiased by
``z - (z Q^T) Q``; the CLS and register tokens are left alone.

Reference: valeoai/Franca ``rasa/src/rasa.py`` (targets, loss, AdamW + cosine schedule) and
``rasa/src/rasa_head.py`` (``decompose_pos_2D``, which applies one Gram-Schmidt plane after the
other; keeping a single orthonormal ``Q`` removes the span of all planes at once).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ray_ssl.config import RasaConfig, StorageConfig
from ray_ssl.eval.errors import RasaError
from ray_ssl.eval.features import remove_subspace
from ray_ssl.storage import read_bytes, resolve, write_bytes_atomic

log = logging.getLogger(__name__)

BASIS_KEY = "basis"
POSITION_DIMS = 2  # (row, col)
DEGENERATE_NORM = 1e-6  # a new direction this much of its length outside the basis is noise
RIDGE = 1e-6  # relative Tikhonov term of the least-squares probe (numerical safety only)

TokenSource = Callable[[], torch.Tensor]  # next batch of raw patch tokens [B, N, D]


def grid_positions(grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(row, col) / (grid - 1) of each patch in row-major order, float32 [grid * grid, 2]."""
    if grid < 2:
        raise ValueError(f"RASA needs a patch grid of at least 2 x 2, got {grid} x {grid}")
    axis = torch.arange(grid, dtype=torch.float32, device=device) / (grid - 1)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack((rows.flatten(), cols.flatten()), dim=-1)


def chance_position_mse(grid: int) -> float:
    """MSE per coordinate of always predicting the mean 1/2: the variance of a uniform position on
    {0, 1/(g-1), ..., 1}, (g^2 - 1) / (12 (g-1)^2) = (g + 1) / (12 (g - 1))."""
    return (grid + 1) / (12 * (grid - 1))


def grid_side(num_patches: int) -> int:
    """The side g of a square g x g patch grid of ``num_patches`` patches."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side


def orthonormalize(vectors: torch.Tensor) -> torch.Tensor:
    """Rows spanning the same space as ``vectors`` [k, D], orthonormal (QR in float64).

    Rows that are already orthonormal keep their direction up to sign, so appending a new plane
    to a basis leaves the span of the earlier planes unchanged.
    """
    q, r = torch.linalg.qr(vectors.double().T)
    diagonal = r.diagonal().abs()
    if diagonal.numel() and diagonal.min() < DEGENERATE_NORM * diagonal.max():
        log.warning("a RASA direction lies (almost) in the span of the earlier ones")
    return q.T.to(vectors.dtype)


def apply_rasa(
    tokens: torch.Tensor, basis: torch.Tensor, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Remove ``basis`` from the patch tokens of ``tokens`` [..., T, D]; the first
    ``num_prefix_tokens`` (CLS, registers) are returned unchanged."""
    if num_prefix_tokens == 0:
        return remove_subspace(tokens, basis)
    prefix, patches = tokens[..., :num_prefix_tokens, :], tokens[..., num_prefix_tokens:, :]
    return torch.cat((prefix, remove_subspace(patches, basis)), dim=-2)


class PositionRegressor(nn.Module):
    """``sigmoid(W z)``, ``W``: Linear(D, 2, bias=False): a patch token -> its (row, col)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, POSITION_DIMS, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(tokens))


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay from ``lr`` to ``min_lr`` over ``total`` steps (SGDR eq. 5, as the reference's
    ``CosineAnnealingLR`` stepped per iteration)."""
    progress = min(step / max(total, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def position_mse(regressor: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """MSE, averaged over patches and both coordinates, of ``regressor`` on tokens [B, N, D]."""
    target = grid_positions(grid_side(tokens.shape[-2]), tokens.device)
    prediction = regressor(tokens)
    return F.mse_loss(prediction, target.expand_as(prediction))


def train_position_regressor(
    batches: Iterator[torch.Tensor], steps: int, dim: int, cfg: RasaConfig
) -> tuple[PositionRegressor, float]:
    """A fresh regressor trained for ``steps`` batches of patch tokens [B, N, D] (AdamW, cosine
    lr, as one reference round); returns it and its mean loss over the last tenth of the steps."""
    if steps < 1:
        raise ValueError(f"a position regressor needs >= 1 step, got {steps}")
    first = next(batches)
    regressor = PositionRegressor(dim).to(first.device)
    optimizer = torch.optim.AdamW(regressor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tail = max(steps // 10, 1)
    tail_loss = 0.0
    tokens = first
    for step in range(steps):
        if step:
            tokens = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, cfg.lr, cfg.min_lr)
        loss = position_mse(regressor, tokens.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - tail:
            tail_loss += float(loss.detach()) / tail
    return regressor, tail_loss


@dataclass
class RasaFit:
    """The basis Q [2T, D], the final training loss of every round, and round 1's regressor
    (trained on the raw tokens: the "before" probe)."""

    basis: torch.Tensor
    first_regressor: PositionRegressor
    round_losses: list[float] = field(default_factory=list)


def debiased_batches(next_tokens: TokenSource, basis: torch.Tensor) -> Iterator[torch.Tensor]:
    """Batches of ``next_tokens`` with the span of ``basis`` [k, D] removed, forever."""
    while True:
        tokens = next_tokens().float()
        yield remove_subspace(tokens, basis.to(tokens.device))


def fit_rasa(next_tokens: TokenSource, dim: int, steps_per_round: int, cfg: RasaConfig) -> RasaFit:
    """Fit ``cfg.rounds`` planes on raw patch tokens from ``next_tokens`` (one call per step)."""
    if cfg.rounds < 1:
        raise ValueError(f"RASA needs >= 1 round, got {cfg.rounds}")
    basis = torch.zeros(0, dim)
    losses: list[float] = []
    first: PositionRegressor | None = None
    for round_index in range(cfg.rounds):
        batches = debiased_batches(next_tokens, basis)
        regressor, loss = train_position_regressor(batches, steps_per_round, dim, cfg)
        first = first or regressor
        plane = regressor.linear.weight.detach().float().cpu()
        basis = orthonormalize(torch.cat((basis, plane)))
        losses.append(loss)
        log.info("RASA round %d/%d: position MSE %.5f", round_index + 1, cfg.rounds, loss)
    assert first is not None  # rounds >= 1
    return RasaFit(basis, first, losses)


def train_next_round_probe(
    next_tokens: TokenSource, basis: torch.Tensor, steps: int, cfg: RasaConfig
) -> PositionRegressor:
    """Round T+1: a fresh regressor trained exactly as a round, on the same token source with all
    of Q removed. Its held-out MSE is the "after" score, as the reference scores every round by
    its own regressor on validation images (valeoai/Franca rasa.py ``validation_step``, Eval 1)."""
    regressor, loss = train_position_regressor(
        debiased_batches(next_tokens, basis), steps, basis.shape[1], cfg
    )
    log.info("RASA probe (round %d): position MSE %.5f", basis.shape[0] // 2 + 1, loss)
    return regressor


@torch.no_grad()
def held_out_position_mse(
    regressor: nn.Module, tokens: torch.Tensor, basis: torch.Tensor | None = None
) -> float:
    """MSE of a trained ``regressor`` on held-out tokens [M, N, D], with ``basis`` removed first."""
    tokens = tokens.float()
    if basis is not None:
        tokens = remove_subspace(tokens, basis.to(tokens.device))
    return float(position_mse(regressor, tokens))


def shuffled_batches(tokens: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled batches of ``batch_size`` images' tokens, epoch after epoch, forever."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(tokens), generator=generator)
        for start in range(0, len(tokens), batch_size):
            yield tokens[order[start : start + batch_size]]


def least_squares_position_mse(train_tokens: torch.Tensor, test_tokens: torch.Tensor) -> float:
    """Test MSE of the best affine map tokens -> (row, col), fitted in closed form on the train
    tokens [M, N, D] (normal equations, float64): a stricter probe than the sigmoid regressor."""

    def design(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = tokens.reshape(-1, tokens.shape[-1]).double()
        ones = torch.ones(len(flat), 1, dtype=flat.dtype)
        target = grid_positions(grid_side(tokens.shape[-2])).double()
        return torch.cat((flat, ones), 1), target.repeat(tokens.shape[0], 1)

    x, y = design(train_tokens)
    gram = x.T @ x
    gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    weights = torch.linalg.solve(gram, x.T @ y)
    x_test, y_test = design(test_tokens)
    return float(((x_test @ weights - y_test) ** 2).mean())


def removed_cosine(
    tokens: torch.Tensor, basis: torch.Tensor, pos_embed: torch.Tensor
) -> tuple[float, float]:
    """Mean cosine of the removed part ``(z Q^T) Q`` and of the kept part of each patch token
    [M, N, D] to that patch's positional embedding [N, D] (the reference's validation evals 4-5)."""
    removed = tokens - remove_subspace(tokens, basis)
    kept = tokens - removed
    target = pos_embed.to(tokens.dtype).expand_as(tokens)
    return (
        float(F.cosine_similarity(removed, target, dim=-1).mean()),
        float(F.cosine_similarity(kept, target, dim=-1).mean()),
    )


def save_rasa_basis(
    path: str,
    basis: torch.Tensor,
    meta: dict[str, object],
    storage: StorageConfig | None = None,
) -> None:
    """Write Q [k, D] as safetensors (key ``basis``; ``meta`` JSON-encoded into the header),
    atomically; ``path`` is a local path or an s3:// URI."""
    from safetensors.torch import save

    header = {name: json.dumps(value) for name, value in meta.items()}
    data = save({BASIS_KEY: basis.detach().float().cpu().contiguous()}, metadata=header)
    write_bytes_atomic(resolve(path, storage), data)


def load_rasa_basis(path: str, storage: StorageConfig | None = None) -> torch.Tensor:
    """Q [k, D] (float32) from a file written by :func:`save_rasa_basis`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(read_bytes(resolve(path, storage)))
    except FileNotFoundError as err:
        raise RasaError(f"no RASA basis at {path}; fit one with `ray-ssl rasa EXPORT`") from err
    except SafetensorError as err:
        raise RasaError(f"{path} is not a safetensors file ({err})") from err
    basis = tensors.get(BASIS_KEY)
    if basis is None or basis.ndim != 2:
        raise RasaError(f"{path} holds no 2-D '{BASIS_KEY}' tensor; it is not a RASA basis")
    return basis.float()

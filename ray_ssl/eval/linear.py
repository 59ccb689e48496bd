"""Linear probe on frozen features: DINOv2's linear evaluation (arXiv 2304.07193 sec. 7;
facebookresearch/dinov2 ``eval/linear.py``), scaled down, as a Ray Train job.

DINOv2 trains many linear heads at once on the same frozen features, one per (input, learning
rate): inputs are the CLS token alone or CLS concatenated with the mean patch token ("avgpool");
learning rates sweep 1e-5 .. 0.1, each scaled by batch x workers / 256; SGD with momentum 0.9, no
weight decay, cosine decay to 0 per iteration, heads initialised N(0, 0.01) with zero bias. The
head with the best accuracy on validation data is reported. Scaled down: the features are
computed once (centre view, no augmentation), ``holdout_fraction`` of the training split is the
validation data, and the selected head's accuracy on the test split is the result.

The job: the driver puts the features in the object store, ``TorchTrainer`` runs
:func:`probe_worker` on ``num_workers`` workers (DDP over the heads; each rank trains on its
equal share of the rows), rank 0 reports every head's held-out and test accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
LR_REFERENCE_BATCH = 256  # DINOv2: lr * batch_size * world_size / 256
MOMENTUM = 0.9  # DINOv2 linear eval SGD
HEAD_INIT_STD = 0.01  # DINOv2 LinearClassifier: weight N(0, 0.01), bias 0
HOLDOUT_KEY, TEST_KEY = "holdout", "test"
METRICS_FILE = "probe_metrics.json"

FeatureSets = dict[str, torch.Tensor]  # input name ("cls", "cls+avgpool") -> [N, D_input]


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe sweeps and how long it trains."""

    lrs: tuple[float, ...] = DINOV2_LRS
    epochs: int = 100
    batch_size: int = 256
    holdout_fraction: float = 0.1
    num_workers: int = 1
    use_gpu: bool = False
    seed: int = 0


def head_name(inputs: str, lr: float) -> str:
    return f"{inputs}|lr={lr:g}"


class LinearHeads(nn.Module):
    """One ``nn.Linear`` per (input, learning rate); forward gives every head's logits by name."""

    def __init__(self, dims: dict[str, int], lrs: tuple[float, ...], num_classes: int):
        super().__init__()
        pairs = [(i, lr) for i in dims for lr in lrs]
        self.names = [head_name(i, lr) for i, lr in pairs]
        self.inputs = [i for i, _ in pairs]
        self.lrs = {head_name(i, lr): lr for i, lr in pairs}
        self.heads = nn.ModuleList(nn.Linear(dims[i], num_classes) for i in self.inputs)
        for head in self.heads:
            nn.init.normal_(head.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(head.bias)

    def forward(self, features: FeatureSets) -> dict[str, torch.Tensor]:
        return {
            name: head(features[i])
            for name, i, head in zip(self.names, self.inputs, self.heads, strict=True)
        }


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): a seeded random ``fraction`` of ``range(n)`` held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    held = max(1, round(n * fraction))
    if held >= n:
        raise ValueError(f"{n} labelled training samples are too few to hold out {fraction:.0%}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def feature_sets(cls: torch.Tensor, patch_mean: torch.Tensor | None) -> FeatureSets:
    """DINOv2's linear inputs: the CLS token, and CLS concatenated with the mean patch token."""
    sets = {"cls": cls.float()}
    if patch_mean is not None:
        sets["cls+avgpool"] = torch.cat((cls, patch_mean), dim=1).float()
    return sets


def train_heads(
    heads: nn.Module,
    fit: FeatureSets,
    labels: torch.Tensor,
    settings: ProbeSettings,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """SGD over ``rank``'s equal share of the rows, every head of a :class:`LinearHeads` (maybe
    DDP-wrapped) at its own scaled learning rate, cosine decay to 0 per iteration."""
    n = len(labels) // world_size  # equal shares: every rank takes the same number of steps
    if n == 0:
        raise ValueError(f"{len(labels)} rows cannot be shared by {world_size} workers")
    rows = torch.arange(rank, n * world_size, world_size)
    module = heads.module if hasattr(heads, "module") else heads
    scale = settings.batch_size * world_size / LR_REFERENCE_BATCH
    optimizer = torch.optim.SGD(
        [
            {"params": head.parameters(), "lr": module.lrs[name] * scale}
            for name, head in zip(module.names, module.heads, strict=True)
        ],
        momentum=MOMENTUM,
        weight_decay=0.0,
    )
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
    device = next(module.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + rank)
    for _ in range(settings.epochs):
        order = rows[torch.randperm(n, generator=generator)]
        for start in range(0, n, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            x = {k: v[batch].to(device) for k, v in fit.items()}
            y = labels[batch].to(device)
            loss = sum(F.cross_entropy(logits, y) for logits in heads(x).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def head_accuracies(heads: nn.Module, features: FeatureSets, labels: torch.Tensor) -> dict:
    """Head name -> top-1 accuracy in [0, 1] on ``features``."""
    device = next(heads.parameters()).device
    logits = heads({k: v.to(device) for k, v in features.items()})
    return {
        name: float((out.argmax(dim=1).cpu() == labels).float().mean())
        for name, out in logits.items()
    }


def probe_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: train every head, report held-out and test accuracy."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    settings = ProbeSettings(**config["settings"])
    data = ray.get(config["data"])
    torch.manual_seed(settings.seed)
    module = LinearHeads(
        {k: v.shape[1] for k, v in data["fit"].items()}, settings.lrs, config["num_classes"]
    )
    heads = ray.train.torch.prepare_model(module) if world_size > 1 else module
    if world_size == 1:
        heads = heads.to(ray.train.torch.get_device())
    train_heads(heads, data["fit"], data["fit_labels"], settings, rank, world_size)
    module.eval()
    metrics = {
        **{
            f"{HOLDOUT_KEY}/{k}": v
            for k, v in head_accuracies(module, data["holdout"], data["holdout_labels"]).items()
        },
        **{
            f"{TEST_KEY}/{k}": v
            for k, v in head_accuracies(module, data["test"], data["test_labels"]).items()
        },
    }
    # Train V2 keeps a run's metrics with its checkpoints only: rank 0 attaches a small one.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            Path(directory, METRICS_FILE).write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def select_best(metrics: dict[str, float], lrs: dict[str, float]) -> dict[str, Any]:
    """The head with the best held-out accuracy (the smaller learning rate on a tie) and its
    test accuracy, with every head's figures."""
    names = sorted(lrs, key=lambda name: (-metrics[f"{HOLDOUT_KEY}/{name}"], lrs[name]))
    best = names[0]
    return {
        "best_head": best,
        "best_inputs": best.split("|")[0],
        "best_lr": lrs[best],
        "holdout_top1": metrics[f"{HOLDOUT_KEY}/{best}"],
        "test_top1": metrics[f"{TEST_KEY}/{best}"],
        "heads": {
            name: {
                "holdout_top1": metrics[f"{HOLDOUT_KEY}/{name}"],
                "test_top1": metrics[f"{TEST_KEY}/{name}"],
            }
            for name in names
        },
    }


def run_linear_probe(
    train: FeatureSets,
    train_labels: torch.Tensor,
    test: FeatureSets,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: ProbeSettings,
) -> dict[str, Any]:
    """Hold out part of the training split, sweep the heads in a Ray Train job, return
    :func:`select_best`'s summary plus the split sizes and the protocol's settings."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fit_rows, held_rows = holdout_split(len(train_labels), settings.holdout_fraction, settings.seed)
    fit_index, held_index = torch.from_numpy(fit_rows), torch.from_numpy(held_rows)
    data = ray.put(
        {
            "fit": {k: v[fit_index] for k, v in train.items()},
            "fit_labels": train_labels[fit_index],
            "holdout": {k: v[held_index] for k, v in train.items()},
            "holdout_labels": train_labels[held_index],
            "test": test,
            "test_labels": test_labels,
        }
    )
    with tempfile.TemporaryDirectory(prefix="ray-ssl-linear-") as storage:
        trainer = TorchTrainer(
            probe_worker,
            train_loop_config={
                "data": data,
                "settings": asdict(settings),
                "num_classes": num_classes,
            },
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers, use_gpu=settings.use_gpu
            ),
            run_config=RunConfig(name="linear_probe", storage_path=storage),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("the linear probe job reported no results")
        with result.checkpoint.as_directory() as directory:
            metrics = json.loads(Path(directory, METRICS_FILE).read_text())
    lrs = {head_name(i, lr): lr for i in train for lr in settings.lrs}
    summary = select_best(metrics, lrs)
    log.info(
        "linear probe: best %s, held-out %.4f, test %.4f",
        summary["best_head"],
        summary["holdout_top1"],
        summary["test_top1"],
    )
    return {
        **summary,
        "fit_samples": len(fit_rows),
        "holdout_samples": len(held_rows),
        "settings": {**asdict(settings), "lrs": list(settings.lrs)},
    }

"""Learning quality side by side: ray-ssl's local presets against independent minimal references.

For each method (Franca, InstDisc, VICReg, SimCLR, SAG-VICReg), in one run: ray-ssl trains its
local preset through the whole system (``ray_ssl.train.pretrain.pretrain``: Ray Data streaming
the Fashion-MNIST shards, the project's views, Ray Train, DeepSpeed, schedules, EMA, the InstDisc
bank actors), and ``quality_reference.py`` trains a plain PyTorch loop with lightly's losses and
torchvision transforms (no ray-ssl code) for the same steps, batch, backbone and seed. Both
backbones (ours loaded from the run's timm export) are scored by the project's weighted kNN
(``eval.knn_k`` = 20, ``eval.knn_temperature`` = 0.07; DINO's eval_knn) on pooled, L2-normalised
features: the first ``memory`` training images as the labelled memory, the first ``queries``
test images as queries (full mode: 10000 and the whole 10000-image test split). Raw pixels and
each backbone at random init are printed for scale.

Last line: ``ours_vs_reference_knn=<min over methods of ours / reference kNN>`` (target >= 1.0).
``--quick`` checks the plumbing on SimCLR alone (2 steps on the first 2000 images say nothing of
quality; the run skips its own online kNN, report and evaluation, which this script does not
need); the figure comes from the full mode. Usage:
``python benchmarks/quality.py [--quick] [--steps S] [--methods franca,instdisc] [--seeds 0,1,2]``;
run it from the repository root (the presets' shard paths are relative; shards are written on
first use). A single run per side varies by about a point from seed to seed; the ratio of the
means over several seeds resolves smaller differences.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from quality_reference import (
    GRAY_MEAN,
    GRAY_STD,
    ClsFeatures,
    MaskedViT,
    RunSpec,
    cnn,
    train_reference,
)
from torch import nn

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PRESETS = {
    "franca": "local",
    "instdisc": "instdisc_local",
    "vicreg": "vicreg_local",
    "simclr": "simclr_local",
    "sag_vicreg": "sag_vicreg_local",
}
# (steps, batch or None for the preset's, kNN memory images, kNN queries)
SIZES = {True: (2, 16, 1000, 500), False: (100, None, 10000, 10000)}  # full: the whole test split
PRESET_BATCH = {"franca": 64, "instdisc": 128, "vicreg": 128, "simclr": 128, "sag_vicreg": 128}
# --quick trains one method: each whole-system run starts Ray Train and DeepSpeed (20-40 s alone),
# on its own small shard set in the run's temporary directory (writing the presets' 60k-image set
# cold took 35 s of the minute).
QUICK_METHOD = "simclr"
QUICK_TRAIN_IMAGES = 2000
KNN_K, KNN_T = 20, 0.07  # ray-ssl's eval.knn_k / eval.knn_temperature
SEED = 0  # the default --seeds
FEATURE_BATCH = 512
IDX_HEADER = {"images": 16, "labels": 8}  # bytes before the data in Fashion-MNIST idx files


def read_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels of a split, straight from the idx files."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz") as fh:
        images = (
            np.frombuffer(fh.read()[IDX_HEADER["images"] :], np.uint8).reshape(-1, 28, 28).copy()
        )
    with gzip.open(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read()[IDX_HEADER["labels"] :], np.uint8).astype(np.int64)
    return images, labels


@torch.no_grad()
def features(backbone: nn.Module, images: np.ndarray) -> torch.Tensor:
    """L2-normalised pooled features of uint8 images (the normalisation both sides train with)."""
    backbone.eval()
    out = []
    for start in range(0, len(images), FEATURE_BATCH):
        x = torch.from_numpy(images[start : start + FEATURE_BATCH])[:, None].float() / 255.0
        out.append(F.normalize(backbone((x - GRAY_MEAN) / GRAY_STD).float(), dim=1))
    return torch.cat(out)


def flat_pixels(images: np.ndarray) -> torch.Tensor:
    """Raw pixels as L2-normalised vectors (the kNN floor learning must beat)."""
    return F.normalize(torch.from_numpy(images).reshape(len(images), -1).float(), dim=1)


def knn(
    train_f: torch.Tensor, train_y: np.ndarray, test_f: torch.Tensor, test_y: np.ndarray
) -> float:
    """ray-ssl's weighted kNN top-1 (the same evaluation for both sides)."""
    from ray_ssl.eval.knn import weighted_knn_accuracy

    classes = int(max(train_y.max(), test_y.max())) + 1
    return weighted_knn_accuracy(
        train_f, torch.from_numpy(train_y), test_f, torch.from_numpy(test_y), classes, KNN_K, KNN_T
    )


def overrides(
    method: str, spec: RunSpec, memory: int, queries: int, work: Path, own_eval: bool
) -> list[str]:
    """The preset at the benchmark's length: one epoch of ``spec.steps``, no warm-ups (the
    references have none), the final kNN only; without ``own_eval`` no held-out split, so the
    run skips its own online kNN, report and evaluation (this script scores both sides itself)."""
    out = [
        f"data.batch_size={spec.batch}",
        "train.epochs=1",
        f"train.steps_per_epoch={spec.steps}",
        f"train.seed={spec.seed}",
        f"data.shuffle_seed={spec.seed}",  # the data order follows the seed, as the reference's
        f"train.run_name=quality-{method}-seed{spec.seed}",  # a run per seed, none resumed
        f"train.storage_path={work / 'ray_results'}",
        f"train.checkpoint_every={spec.steps}",
        f"train.log_every={spec.steps}",
        "optim.warmup_epochs=0",
        "eval.knn_every=0",
        f"eval.knn_max_train={memory}",
        f"eval.knn_max_test={queries}",
    ]
    if not own_eval:
        out.append("data.eval_uri=null")
    if method == "franca":  # a 1-epoch run would hold these warm-ups for the whole run
        out += ["franca.teacher_temp_warmup_epochs=0", "franca.freeze_last_layer_epochs=0"]
    if method == "sag_vicreg":  # the walk weight at its value from the first step
        out.append("sag_vicreg.walk_warmup_epochs=0")
    return out


def train_ours(
    method: str,
    spec: RunSpec,
    memory: int,
    queries: int,
    work: Path,
    own_eval: bool,
    extra: list[str],
) -> tuple[nn.Module, dict[str, float]]:
    """The preset trained by the whole system; (its exported backbone, its own evaluation)."""
    from ray_ssl.models.export import load_exported_backbone
    from ray_ssl.train.pretrain import pretrain

    settings = [*overrides(method, spec, memory, queries, work, own_eval), *extra]
    outcome = pretrain(PRESETS[method], settings)
    return load_exported_backbone(outcome.export_uri), outcome.evaluation


def shard_overrides(quick: bool, work: Path) -> list[str]:
    """Quick: a small train set of its own under ``work``; full: the presets' shard sets."""
    if not quick:
        return []
    return [f"data.uri={work / 'shards' / 'train'}", f"shards.max_samples={QUICK_TRAIN_IMAGES}"]


def write_shards(methods: list[str], extra: list[str]) -> None:
    """The shard sets, written once before anything is timed (reused afterwards)."""
    from ray_ssl.config import load_config
    from ray_ssl.paths import resolve_config_paths
    from ray_ssl.train.pretrain import ensure_builtin_shards

    for method in methods:
        ensure_builtin_shards(resolve_config_paths(load_config(PRESETS[method], extra)))


def training_images(method: str, extra: list[str]) -> int | None:
    """How many of the first training images the run trains on (``shards.max_samples``)."""
    from ray_ssl.config import load_config

    return load_config(PRESETS[method], extra).shards.max_samples


def per_seed_spread(ratios: list[float]) -> str:
    """'' for one seed; else ' (per-seed ratios <mean> +- <standard error of the mean>)'."""
    if len(ratios) < 2:
        return ""
    values = np.asarray(ratios)
    sem = values.std(ddof=1) / np.sqrt(len(values))
    return f" (per-seed ratios {values.mean():.3f} +- {sem:.3f})"


def random_init(method: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if method == "franca":
        return ClsFeatures(MaskedViT())
    return cnn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps of batch 16, small kNN")
    parser.add_argument("--steps", type=int, help="training steps per run (default 100; quick 2)")
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated (default: all; --quick: {QUICK_METHOD})"
    )
    parser.add_argument(
        "--seeds",
        default=str(SEED),
        help="comma-separated seeds of both sides' runs; with several, a method's ratio is its "
        "mean kNN over them, ours over the reference's",
    )
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    logging.basicConfig(level=logging.WARNING)
    steps, batch, memory, queries = SIZES[args.quick]
    steps = args.steps or steps
    chosen = args.methods or (QUICK_METHOD if args.quick else ",".join(PRESETS))
    methods = [m.strip() for m in chosen.split(",")]
    unknown = sorted(set(methods) - set(PRESETS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(PRESETS)}")
    torch.set_num_threads(2)
    import ray

    train_x, train_y = read_fashion_mnist("train")
    test_x, test_y = read_fashion_mnist("test")
    mem_x, mem_y, q_x, q_y = train_x[:memory], train_y[:memory], test_x[:queries], test_y[:queries]
    pixels = knn(flat_pixels(mem_x), mem_y, flat_pixels(q_x), q_y)
    print(f"kNN k={KNN_K} T={KNN_T}, {memory} train images as memory, {queries} test queries")
    print(f"raw pixels: {pixels:.4f}")
    work = Path(tempfile.mkdtemp(prefix="ray-ssl-quality-"))
    extra = shard_overrides(args.quick, work)
    write_shards(methods, extra)
    ray.init(num_cpus=4, include_dashboard=False)  # 1 Train worker, Ray Data, the bank actors
    ratios = {}
    try:
        for method in methods:
            totals = {"ours": 0.0, "reference": 0.0}
            seed_ratios = []
            for seed in seeds:
                spec = RunSpec(steps=steps, batch=batch or PRESET_BATCH[method], seed=seed)
                start = time.perf_counter()
                ours, evaluation = train_ours(
                    method, spec, memory, queries, work, not args.quick, extra
                )
                ours_s = time.perf_counter() - start
                start = time.perf_counter()
                images = train_x[: training_images(method, extra)]
                reference = train_reference(method, images, spec)
                ref_s = time.perf_counter() - start
                scores = {
                    name: knn(features(net, mem_x), mem_y, features(net, q_x), q_y)
                    for name, net in (
                        ("ours", ours),
                        ("reference", reference),
                        ("random_init", random_init(method, seed)),
                    )
                }
                totals["ours"] += scores["ours"]
                totals["reference"] += scores["reference"]
                seed_ratios.append(scores["ours"] / scores["reference"])
                own = "".join(f", {k}={v:.4f}" for k, v in evaluation.items() if "knn" in k)
                print(
                    f"{method} seed {seed}: {spec.steps} steps of batch {spec.batch}: ours "
                    f"{scores['ours']:.4f} ({ours_s:.0f} s, whole system), reference "
                    f"{scores['reference']:.4f} ({ref_s:.0f} s), random init "
                    f"{scores['random_init']:.4f}, ratio "
                    f"{scores['ours'] / scores['reference']:.3f}{own}",
                    flush=True,
                )
            ratios[method] = totals["ours"] / totals["reference"]
            print(
                f"{method}: ratio of the means over seeds {seeds}: {ratios[method]:.3f}"
                f"{per_seed_spread(seed_ratios)}",
                flush=True,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"ours_vs_reference_knn={min(ratios.values()):.3f}")


if __name__ == "__main__":
    main()

"""VICReg vs SAG-VICReg on Fashion-MNIST: does the random walk improve global structure?

Both sides are the project's method plug-ins built from their local presets (ResNet-10t backbone,
the same expander), trained in one process on the same augmented batches (views from the
project's ViewBuilder, one seeded draw shared by both), with the same optimizer (LARS, the
presets' schedule), batch, step count and seed. Ray Train and the data plane are not in the
loop: this measures the methods, not the system. For each method it prints, on the test split:
weighted kNN (k=20, T=0.07; the train split as memory), a linear probe (scikit-learn logistic
regression on frozen features), the label-free global-structure metric and the class-tree
Spearman/Kendall (:mod:`ray_ssl.eval.global_structure`). It also times the graph and walk of a
SAG-VICReg step at batch 256 against the whole step (target < 5%).

Last line: ``sag_vs_vicreg_spearman=<class-tree Spearman of SAG-VICReg / VICReg>`` (the paper's
claim is > 1). Usage: ``python benchmarks/global_structure.py [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from ray_ssl.config import Config, ShardsConfig, load_config, training_views
from ray_ssl.data.sources import open_source
from ray_ssl.data.views import ViewBuilder
from ray_ssl.eval.class_tree import load_class_tree
from ray_ssl.eval.global_structure import class_tree_structure, label_free_structure
from ray_ssl.eval.knn import weighted_knn_accuracy
from ray_ssl.methods.registry import build_method
from ray_ssl.models.backbone import pooled_features
from ray_ssl.models.vit import normalize_images
from ray_ssl.train.engine import build_optimizer
from ray_ssl.train.schedules import TrainSchedules

# (train steps, batch, train images as kNN memory / probe set, test images)
SIZES = {True: (16, 64, 1000, 500), False: (300, 128, 10000, 2000)}
EXPANDER = "[512,512,512]"  # both sides; smaller than the presets' 1024 to fit --quick
COST_BATCH, COST_STEPS = 256, 3  # the batch for the graph+walk share of a step
KNN_K, KNN_T = 20, 0.07
LABEL_FREE_CENTROIDS = 32
SEED = 0
WALK_WARMUP_SHARE = 0.2  # w reaches its preset value after a fifth of the run
METHODS = ("vicreg", "sag_vicreg")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]
    classes: list[str]


def load_split(split: str, count: int) -> Split:
    """The first ``count`` images of a Fashion-MNIST split (digits if the package is absent)."""
    source = open_source(ShardsConfig(source="fashion-mnist", split=split))
    images, labels = [], []
    for data, label in source.samples:
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("L")))
        labels.append(label)
        if len(images) == count:
            break
    return Split(np.stack(images), np.asarray(labels, np.int64), source.classes)


def method_config(name: str, batch: int, steps: int) -> Config:
    overrides = [
        f"{name}.expander_dims={EXPANDER}",
        f"data.batch_size={batch}",
        "train.epochs=1",
        f"train.steps_per_epoch={steps}",
        f"train.seed={SEED}",
        "optim.warmup_epochs=0",
    ]
    if name == "sag_vicreg":
        overrides.append(f"{name}.walk_warmup_epochs={WALK_WARMUP_SHARE}")
    return load_config(f"{name}_local", overrides)


def pair_batches(train: Split, config: Config, steps: int) -> list[dict[str, torch.Tensor]]:
    """One seeded draw of two-view batches in the crop-major contract, shared by both methods."""
    builder = ViewBuilder(training_views(config))
    rng = np.random.default_rng(SEED)
    batch = config.data.batch_size
    out = []
    for _ in range(steps):
        rows = rng.choice(len(train.images), batch, replace=False)
        crops = np.stack(
            [builder(Image.fromarray(train.images[r]), rng)["global_crops"] for r in rows]
        )
        crop_major = np.ascontiguousarray(crops.transpose(1, 0, 4, 2, 3)).reshape(
            2 * batch, 1, 28, 28
        )
        out.append({"global_crops": torch.from_numpy(crop_major)})
    return out


def train(name: str, batches: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    config = method_config(name, batches[0]["global_crops"].shape[0] // 2, len(batches))
    torch.manual_seed(SEED)
    method = build_method(config, steps_per_epoch=len(batches), total_steps=len(batches)).train()
    optimizer = build_optimizer(method.param_groups(config.optim), config.optim, fused=False)
    schedules = TrainSchedules.from_config(config, len(batches))
    for step, batch in enumerate(batches):
        values = schedules.at(step)
        for group in optimizer.param_groups:
            group["lr"] = values.lr * group["lr_mult"]
            group["weight_decay"] = values.weight_decay * group["wd_mult"]
        optimizer.zero_grad(set_to_none=True)
        method(batch, step)["loss"].backward()
        optimizer.step()
    return method.eval()


@torch.no_grad()
def features(method: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(images), 512):
        x = torch.from_numpy(images[start : start + 512])[:, None]
        out.append(pooled_features(method.backbone(), normalize_images(x)).float())
    return torch.cat(out).numpy()


def evaluate(method: torch.nn.Module, train: Split, test: Split) -> dict[str, float]:
    f_train, f_test = features(method, train.images), features(method, test.images)
    knn = weighted_knn_accuracy(
        torch.from_numpy(f_train),
        torch.from_numpy(train.labels),
        torch.from_numpy(f_test),
        torch.from_numpy(test.labels),
        len(train.classes),
        KNN_K,
        KNN_T,
    )
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    probe = LogisticRegression(max_iter=500).fit((f_train - mean) / std, train.labels)
    linear = probe.score((f_test - mean) / std, test.labels)
    tree = class_tree_structure(f_test, test.labels, test.classes, load_class_tree("fashion_mnist"))
    free = label_free_structure(f_test, num_centroids=LABEL_FREE_CENTROIDS, seed=SEED)
    return {"knn": knn, "linear": float(linear), **tree.as_dict(), **free.as_dict()}


def walk_share_of_step(train: Split) -> tuple[float, float]:
    """(median graph+walk seconds, median whole SAG-VICReg step seconds) at batch 256."""
    config = method_config("sag_vicreg", COST_BATCH, COST_STEPS + 1)
    batches = pair_batches(train, config, COST_STEPS + 1)
    method = build_method(config, steps_per_epoch=1, total_steps=COST_STEPS + 1).train()
    walk_times, step_times = [], []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        method(batch, step)["loss"].backward()
        step_times.append(time.perf_counter() - start)
        with torch.no_grad():
            first, second = normalize_images(batch["global_crops"]).chunk(2)
            h_a, h_b = (pooled_features(method.backbone(), v) for v in (first, second))
        start = time.perf_counter()
        method.partners(h_a, h_b, step)
        walk_times.append(time.perf_counter() - start)
    return statistics.median(walk_times[1:]), statistics.median(step_times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and images (< 1 min)")
    args = parser.parse_args()
    steps, batch, n_train, n_test = SIZES[args.quick]
    torch.set_num_threads(2)
    train_split, test_split = load_split("train", n_train), load_split("test", n_test)
    batches = pair_batches(train_split, method_config("vicreg", batch, steps), steps)
    results = {}
    for name in METHODS:
        start = time.perf_counter()
        model = train(name, batches)
        results[name] = evaluate(model, train_split, test_split)
        seconds = time.perf_counter() - start
        row = ", ".join(f"{k}={v:.4f}" for k, v in results[name].items())
        print(f"{name}: {steps} steps of batch {batch} in {seconds:.0f} s: {row}")
    walk, step = walk_share_of_step(train_split)
    print(
        f"graph+walk at batch {COST_BATCH}: {walk * 1000:.1f} ms of a {step * 1000:.0f} ms "
        f"SAG-VICReg step (forward+backward): {100 * walk / step:.2f}% (target < 5%)"
    )
    ratio = results["sag_vicreg"]["tree_spearman"] / results["vicreg"]["tree_spearman"]
    print(f"sag_vs_vicreg_spearman={ratio:.3f}")


if __name__ == "__main__":
    main()

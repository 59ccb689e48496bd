"""SimCLR with semantic positive pairs against augmentation pairs on Fashion-MNIST
(Alkhalefi et al., arXiv 2510.08722).

Both arms train the same SimCLR method (the ``simclr_semantic_local`` preset's backbone,
projection head and NT-Xent temperature, built through the method registry) from the same initial
weights (seed), on the same paired shard set of the Fashion-MNIST train split (``shards write
--pairs same-class``) streamed by the project's Ray Data pipeline with the same shuffle seed,
batch size, number of steps and optimizer. They differ only in ``views.positives``: ``augment``
(two augmentations of one image; the baseline) or ``semantic`` (the second view cut from another
image of the same class; each view keeps its own augmentation). Each trained backbone is then
scored by weighted kNN (k=20, T=0.07; Wu et al. 2018) with labelled train-split images as the
memory and test-split images as the queries; the untrained backbone's score is printed too.

The optimizer is plain AdamW in one process (no Ray Train / DeepSpeed start-up, measured by
``benchmarks/train_step.py``), the same for both arms. ``--quick`` uses the first
``QUICK_IMAGES`` of each split (written once as idx files under ``--data-dir``) and trains a few
steps, so that it fits in a minute on 2 cores; a few steps say little about the ratio.

Last line: ``semantic_vs_augment_knn=<semantic kNN accuracy / augment kNN accuracy>`` (the paper
reports semantic pairs ahead, SimCLR most: target >= 1.0).
Usage: ``python benchmarks/semantic_pairs.py [--quick] [--data-dir DIR] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import logging
import os
import struct
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from ray_ssl.config import Config, ShardsConfig, StorageConfig, load_config  # noqa: E402
from ray_ssl.data.shards import ensure_shard_set  # noqa: E402
from ray_ssl.data.sources import (  # noqa: E402
    FASHION_MNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    read_idx,
)
from ray_ssl.data.stream import (  # noqa: E402
    WorkerBatchIterator,
    build_train_dataset,
    load_labelled_arrays,
)
from ray_ssl.eval.features import extract_features  # noqa: E402
from ray_ssl.eval.knn import weighted_knn_accuracy  # noqa: E402
from ray_ssl.methods.registry import build_method  # noqa: E402
from ray_ssl.models.vit import normalize_images  # noqa: E402

PRESET = "simclr_semantic_local"
KNN_K, KNN_TEMPERATURE = 20, 0.07  # the weighted kNN protocol (DINO / Wu et al. 2018)
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-6  # AdamW, both arms
FEATURE_BATCH = 512
SAMPLES_PER_SHARD = 5000
QUICK_IMAGES = {"train": 5000, "test": 1000}  # --quick: the first images of each split
CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Budget:
    steps: int
    batch: int
    knn_memory: int  # labelled train-split images
    knn_queries: int  # test-split images


BUDGETS = {
    True: Budget(steps=10, batch=64, knn_memory=2000, knn_queries=1000),
    False: Budget(steps=300, batch=128, knn_memory=10000, knn_queries=10000),
}


def _fashion_subset(source: Path, out: Path) -> Path:
    """The first ``QUICK_IMAGES`` of each split, as idx files."""
    out.mkdir(parents=True, exist_ok=True)
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        count = QUICK_IMAGES[split]
        if (out / image_file).is_file():
            continue
        images = read_idx(source / image_file, IDX_IMAGES_MAGIC)[:count]
        labels = read_idx(source / label_file, IDX_LABELS_MAGIC)[:count]
        header = struct.pack(">IIII", IDX_IMAGES_MAGIC, len(images), *images.shape[1:])
        (out / label_file).write_bytes(
            gzip.compress(struct.pack(">II", IDX_LABELS_MAGIC, len(labels)) + labels.tobytes())
        )
        (out / image_file).write_bytes(gzip.compress(header + images.tobytes()))
    return out


def _shard_sets(data_dir: Path, quick: bool, storage: StorageConfig) -> tuple[str, str]:
    """The paired train split and the plain test split, written once and reused."""
    fashion = ShardsConfig().fashion_mnist_dir
    if quick:
        fashion = str(_fashion_subset(Path(fashion), data_dir / "fashion-quick"))
    name = "quick" if quick else "full"
    train, test = str(data_dir / f"{name}-train-pairs"), str(data_dir / f"{name}-test")
    common = dict(source="fashion-mnist", fashion_mnist_dir=fashion)
    paired = ShardsConfig(
        split="train", pairs="same-class", samples_per_shard=SAMPLES_PER_SHARD, **common
    )
    ensure_shard_set(paired, train, storage)
    ensure_shard_set(ShardsConfig(split="test", samples_per_shard=SAMPLES_PER_SHARD, **common),
                     test, storage)  # fmt: skip
    return train, test


def _config(train_uri: str, budget: Budget, seed: int, positives: str) -> Config:
    return load_config(
        PRESET,
        [
            f"data.uri={train_uri}",
            f"data.batch_size={budget.batch}",
            "data.shuffle_seed=0",
            "simclr.sync_batchnorm=false",
            f"views.positives={positives}",
            f"train.seed={seed}",
        ],
    )


def _train(config: Config, budget: Budget) -> tuple[torch.nn.Module, float, float]:
    """(trained method, last loss, seconds per step) after ``budget.steps`` steps."""
    torch.manual_seed(config.train.seed)
    method = build_method(config, steps_per_epoch=budget.steps, total_steps=budget.steps)
    optimizer = torch.optim.AdamW(method.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    views = method.view_spec
    dataset = build_train_dataset(config.data, views, config.storage)
    batches = WorkerBatchIterator(
        dataset.iterator(), budget.batch, views, CPU, config.data.max_corrupt_fraction
    )
    method.train()
    start, loss = time.perf_counter(), float("nan")
    for step in range(budget.steps):
        out = method(next(batches), step)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        loss = out["loss"].item()
    seconds = (time.perf_counter() - start) / budget.steps
    # The unfinished stream holds a reference cycle: collect it now, while Ray is up (its
    # finaliser cancels Ray Data tasks; run after ray.shutdown() it would hang).
    del batches, dataset
    gc.collect()
    return method, loss, seconds


def _knn(backbone: torch.nn.Module, memory: tuple, queries: tuple, classes: int) -> float:
    """Weighted kNN top-1 accuracy of ``backbone``'s features."""
    train_x = extract_features(backbone, memory[0], FEATURE_BATCH, CPU, normalize_images).cls
    test_x = extract_features(backbone, queries[0], FEATURE_BATCH, CPU, normalize_images).cls
    return weighted_knn_accuracy(
        train_x, torch.from_numpy(memory[1]), test_x, torch.from_numpy(queries[1]), classes,
        k=KNN_K, temperature=KNN_TEMPERATURE,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, small kNN sets")
    parser.add_argument("--data-dir", default="data/bench/semantic_pairs", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads and Ray CPUs")
    args = parser.parse_args()
    budget = BUDGETS[args.quick]
    torch.set_num_threads(args.threads)
    storage = StorageConfig()
    began = time.perf_counter()
    train_uri, test_uri = _shard_sets(args.data_dir, args.quick, storage)
    memory = load_labelled_arrays(train_uri, storage, limit=budget.knn_memory)
    queries = load_labelled_arrays(test_uri, storage, limit=budget.knn_queries)
    classes = int(max(memory[1].max(), queries[1].max())) + 1
    print(f"SimCLR ({PRESET}), {budget.steps} steps of batch {budget.batch}, seed {args.seed}; "
          f"kNN k={KNN_K} T={KNN_TEMPERATURE}: {len(memory[0])} train images as memory, "
          f"{len(queries[0])} test queries")  # fmt: skip
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    accuracy = {}
    try:
        for positives in ("augment", "semantic"):
            config = _config(train_uri, budget, args.seed, positives)
            method, loss, step_s = _train(config, budget)
            accuracy[positives] = _knn(method.backbone(), memory, queries, classes)
            print(f"{positives:>9} pairs: kNN top-1 {accuracy[positives]:.4f}, last loss "
                  f"{loss:.3f}, {step_s:.2f} s/step")  # fmt: skip
        torch.manual_seed(args.seed)
        untrained = build_method(_config(train_uri, budget, args.seed, "augment"), 1, 1)
        baseline = _knn(untrained.backbone(), memory, queries, classes)
        print(f"untrained backbone: kNN top-1 {baseline:.4f}")
    finally:
        ray.shutdown()
    print(f"total {time.perf_counter() - began:.0f} s")
    print(f"semantic_vs_augment_knn={accuracy['semantic'] / accuracy['augment']:.4f}")


if __name__ == "__main__":
    main()

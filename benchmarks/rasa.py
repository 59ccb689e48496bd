"""RASA on a small trained Franca export: position left in the patch tokens, and kNN, before/after.

The data are rolled images: each image shifted with wrap-around on both axes by a seeded uniform
random offset (``write_rolled_idx``), so that content carries no absolute position and the only
position left in the patch tokens is the code the network adds, which is what RASA removes (on
un-rolled, centred Fashion-MNIST the edge of an object tells where a patch is: 0.879 of chance
after RASA, see ``ROLL_SEED``'s comment). Unless ``--export`` is given, trains a tiny Franca ViT of
the local preset on them: full, a 100-step training run on rolled Fashion-MNIST (28x28 in 4x4
patches, 7x7 grid); ``--quick``, 2 steps in this process on rolled scikit-learn digits (8x8 in
2x2 patches, 4x4 grid; see ``train_quick_export``). Then
runs ``run_rasa`` (the ``ray-ssl rasa`` job: one Ray Train worker, single views streamed through
the data plane, the reference recipe of 9 rounds at lr ``TINY_EXPORT_LR``) and reads its report.
The baseline is the same backbone's raw patch tokens; ours are the tokens with Q removed.
Position, on held-out images, against chance (g+1)/(12(g-1)): the reference's score (round 1's
regressor before; after, the regressor of a round T+1 trained the same way on the debiased
tokens), and a closed-form affine fit (stricter than the paper's probe). kNN: weighted kNN
(k=20, T=0.07) of the test split (full: 5000 queries against 10000 training images; quick: the
360 digits test images) on the mean patch token, the feature RASA changes (it removes Q from
every patch token, so from their mean); the CLS token, which ``ray-ssl eval``'s kNN uses, RASA
leaves untouched (printed for reference). ``--workdir`` keeps the shards and the export.

Last two lines: ``knn_change_points=<after - before, points>`` (target within +-0.5), then
``position_mse_after_vs_chance=<after / chance>`` (target >= 0.95).
Usage: ``python benchmarks/rasa.py [--quick] [--export PATH --data URI --eval-data URI]``.
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from typing import TYPE_CHECKING  # noqa: E402

from ray_ssl.config import ShardsConfig, StorageConfig, ViewConfig, load_config  # noqa: E402

if TYPE_CHECKING:
    from ray_ssl.train.batches import Batch

RAY_CPUS = 4  # logical CPUs: the Train worker and the Ray Data tasks mostly wait on each other
# Data: quick, scikit-learn digits (8x8 in 2x2 patches, 4x4 grid); full, Fashion-MNIST (28x28 in
# 4x4 patches, 7x7 grid), each image rolled with wrap-around on both axes by a uniform random
# offset (ROLL_SEED), so every content appears at every position equally often. RASA removes the
# absolute position the network adds through its positional embedding; on centred objects a
# patch's content also tells where it is (the object's edge vs the empty border), which no
# removal of that code can take away: un-rolled Fashion-MNIST left 0.879 of chance after 9 rounds
# and 0.907 after 24 (the round losses flat at 0.100 of 0.111), 7x7-pixel patches 0.73. In rolled
# images content carries no absolute position, so what a regressor finds is the network's own
# code, as in natural photos (the reference's VOC), where content is far less tied to position.
ROLL_SEED = 12
# The export: quick, QUICK_EXPORT_STEPS in-process steps (train_quick_export); full, a 100-step
# run of the local preset (28x28 in 4x4 patches, 7x7 grid). Said plainly: a few steps leave the
# exported EMA teacher at its initialisation to the precision RASA sees (8 in-process steps and
# the 8-step Ray Train run gave the same round losses and scores to 4 decimals), so quick is a
# smoke test of the job at near-random weights; full mode is the measurement.
QUICK_EXPORT_STEPS = 2  # each ~1.4 CPU-s on 2 cores (the heads and losses dominate at this size)
TRAIN_OVERRIDES = {
    True: [
        "model.img_size=8", "model.patch_size=2", "model.depth=2", "views.patch_size=2",
        "views.global_size=8", "views.local_size=4", "data.batch_size=32", "train.epochs=1",
    ],
    False: ["train.steps_per_epoch=100", "train.checkpoint_every=100"],
}  # fmt: skip
# RASA: the reference recipe (9 rounds, batch 128, AdamW cosine to 0, wd 0) except the lr; each
# round takes epochs x steps_per_epoch steps over one cached streamed pass of steps_per_epoch
# batches. The reference's round is 5 epochs of VOC trainaug, 82 x 5 = 410 steps; quick takes
# 200 steps over one cached pass of 10 batches (1280 views), full 400 over 80 batches.
# One intra-op thread: a step is a few 2k x 192 products, where a second thread on a shared
# 2-core machine only adds synchronisation (40 vs 12 CPU-ms a step measured, 300 vs 71 ms wall).
RASA_OVERRIDES = {
    True: [
        "train.torch_threads=1",
        "rasa.steps_per_epoch=10", "rasa.epochs=20", "rasa.probe_images=300",
        "eval.knn_max_train=1437", "eval.knn_max_test=360",
    ],
    False: [
        "train.torch_threads=1",
        "rasa.steps_per_epoch=80", "rasa.probe_images=1000",
        "eval.knn_max_train=10000", "eval.knn_max_test=5000",
    ],
}  # fmt: skip
# The reference's lr 2e-4 (its `train_rasa.py --lr_heads` option) suits ViT-B/L tokens, where
# position is a large component. In these few-step exports it sits at the scale of the positional
# embedding's init (std 0.02 against unit-variance final-norm tokens): at 2e-4 a round's regressor
# stays near its random init and scores ~0.98 of chance before RASA (a vacuous "after"). At 2e-2,
# round 1 finds position (0.6-0.8 of chance) and the after score means something.
TINY_EXPORT_LR = 2e-2
POINTS = 100
VARIANCE_SHARE = 0.9  # of the positional embedding, for the count of components that hold it


def position_code_components(weights: str, grid: int) -> int:
    """How many principal components of the export's positional embedding (its ``grid``^2 patch
    rows, centred) hold ``VARIANCE_SHARE`` of its variance: the rank of the position code."""
    import torch
    from safetensors.torch import load_file

    rows = load_file(weights)["pos_embed"][0, -grid * grid :].double()
    energy = torch.linalg.svdvals(rows - rows.mean(0)) ** 2
    return int((energy.cumsum(0) / energy.sum() < VARIANCE_SHARE).sum()) + 1


def write_rolled_idx(directory: Path, quick: bool) -> None:
    """The benchmark's source images, each rolled with wrap-around (both axes) by a seeded uniform
    random offset, written as idx files under Fashion-MNIST's file names in ``directory``: the
    project's idx reader and shard writer then read them in the source's own (class-mixed) order."""
    import gzip

    import numpy as np

    from ray_ssl.data.sources import (
        FASHION_MNIST_FILES,
        IDX_IMAGES_MAGIC,
        IDX_LABELS_MAGIC,
        SPLITS,
        digits_split,
        read_idx,
    )

    directory.mkdir(parents=True, exist_ok=True)
    fashion = Path(ShardsConfig().fashion_mnist_dir)
    for split in SPLITS:
        image_file, label_file = FASHION_MNIST_FILES[split]
        if quick:
            images, labels = digits_split(split)
        else:
            images = read_idx(fashion / image_file, IDX_IMAGES_MAGIC)
            labels = read_idx(fashion / label_file, IDX_LABELS_MAGIC)
        rng = np.random.default_rng([ROLL_SEED, SPLITS.index(split)])
        shifts = rng.integers(0, images.shape[1:3], size=(len(images), 2))
        pairs = zip(images, shifts, strict=True)
        rolled = np.stack([np.roll(i, (int(dy), int(dx)), axis=(0, 1)) for i, (dy, dx) in pairs])
        for name, magic, array in (
            (image_file, IDX_IMAGES_MAGIC, rolled),
            (label_file, IDX_LABELS_MAGIC, np.asarray(labels, dtype=np.uint8)),
        ):
            header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
            partial = directory / f"{name}.partial"
            with gzip.open(partial, "wb") as fh:
                fh.write(header + array.tobytes())
            partial.rename(directory / name)


def write_shards(workdir: Path, quick: bool) -> tuple[str, str]:
    """Train and test shard sets of the benchmark's rolled source under ``workdir``."""
    from ray_ssl.data.shards import write_shard_set

    name = "quick" if quick else "full"
    rolled = workdir / "rolled" / name
    uris = []
    for split in ("train", "test"):
        uri = str(workdir / "shards" / f"{name}-rolled" / split)
        if not (Path(uri) / "manifest.json").is_file():
            if not (rolled / "t10k-labels-idx1-ubyte.gz").is_file():
                write_rolled_idx(rolled, quick)
            cfg = ShardsConfig(
                source="fashion-mnist",
                fashion_mnist_dir=str(rolled),
                split=split,
                samples_per_shard=5000,
            )
            write_shard_set(cfg, uri, StorageConfig())
        uris.append(uri)
    return uris[0], uris[1]


def view_batches(views: ViewConfig, uri: str, count: int, size: int, seed: int) -> list[Batch]:
    """``count`` training batches of ``size`` real images of ``uri`` in the batch contract, built
    in this process by the data plane's own view builder and batch-level mask generator."""
    import numpy as np
    import torch
    from PIL import Image

    from ray_ssl.data.stream import load_labelled_arrays, to_batch_contract
    from ray_ssl.data.views import ViewBuilder, mask_generator

    images = load_labelled_arrays(uri, StorageConfig(), count * size)[0]
    builder, masks = ViewBuilder(views), mask_generator(views)
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, count * size, size):
        chunk = images[start : start + size]
        rows = [
            builder(Image.fromarray(i.squeeze(-1) if i.shape[-1] == 1 else i), rng) for i in chunk
        ]
        columns = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
        batch = to_batch_contract(columns, torch.device("cpu"))
        if masks is not None:
            batch["masks"] = torch.from_numpy(
                masks.for_batch(len(batch["global_crops"]), columns["mask_seed"])
            )
        batches.append(batch)
    return batches


def train_quick_export(directory: Path, data: str) -> str:
    """Quick: a Franca ViT of the local preset at the quick geometry, trained in this process for
    ``QUICK_EXPORT_STEPS`` steps on real views of ``data`` by ``train_step.PlainLoop`` (the same
    method, AdamW groups, schedules, clipping and EMA as a training run's step, measured against
    it by ``benchmarks/train_step.py``) without the start-up of a Ray Train + DeepSpeed job."""
    from train_step import PlainLoop

    from ray_ssl.train.checkpoint import export_backbone

    config = load_config("local", [f"data.uri={data}", *TRAIN_OVERRIDES[True]])
    loop = PlainLoop(config, QUICK_EXPORT_STEPS, "cpu")
    loop.batches = view_batches(
        loop.method.view_spec, data, QUICK_EXPORT_STEPS, config.data.batch_size, config.train.seed
    )
    loop.run(QUICK_EXPORT_STEPS)
    extra = {"step": QUICK_EXPORT_STEPS, "run": "benchmarks/rasa.py --quick"}
    return export_backbone(loop.method.backbone(), str(directory), StorageConfig(), 0, extra)


def train_export(workdir: Path, data: str, quick: bool) -> str:
    """A small trained Franca export; returns its weights file. Full: a run of the local preset
    (``run_training``: Ray Train + DeepSpeed). An export already under ``workdir`` (an earlier
    run with the same ``--workdir``) is reused."""
    from ray_ssl.train.trainer import run_training

    name = f"franca-{'quick' if quick else 'full'}"
    existing = workdir / "runs" / name / "export" / "teacher_backbone.safetensors"
    if existing.is_file():
        return str(existing)
    if quick:
        return train_quick_export(existing.parent, data)
    overrides = [
        f"data.uri={data}",
        "data.eval_uri=null",
        f"train.storage_path={workdir / 'runs'}",
        f"train.run_name={name}",
        "train.epochs=1",
        "eval.knn_every=0",
        *TRAIN_OVERRIDES[False],
    ]
    return run_training(load_config("local", overrides)).export_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--export", help="an existing export (with --data and --eval-data)")
    parser.add_argument("--data")
    parser.add_argument("--eval-data")
    parser.add_argument("--workdir", help="shards and runs go here (default: a temporary dir)")
    parser.add_argument("--no-cache", action="store_true", help="rasa.cache_tokens=false")
    parser.add_argument("--lr", type=float, default=TINY_EXPORT_LR, help="rasa.lr (paper: 2e-4)")
    args = parser.parse_args()
    if args.export and not (args.data and args.eval_data):
        parser.error("--export needs --data and --eval-data")
    import ray

    from ray_ssl.train.rasa_job import run_rasa

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ray-ssl-bench-rasa-"))
    launched = time.perf_counter()
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    if args.export:
        export, data, eval_data = args.export, args.data, args.eval_data
    else:
        data, eval_data = write_shards(workdir, args.quick)
        export = train_export(workdir, data, args.quick)
    trained = time.perf_counter()
    overrides = [
        f"data.uri={data}",
        f"data.eval_uri={eval_data}",
        f"train.storage_path={workdir / 'runs'}",
        f"rasa.cache_tokens={'false' if args.no_cache else 'true'}",
        *RASA_OVERRIDES[args.quick],
        f"rasa.lr={args.lr}",
    ]
    report = run_rasa(export, load_config("local", overrides)).report
    finished = time.perf_counter()
    ray.shutdown()

    mse, knn, cosine = report["position_mse"], report["knn"], report["pos_embed_cosine"]
    print(f"export {report['export']}; grid {report['grid']}x{report['grid']}, D={report['dim']}")
    print(
        f"time: Ray start {started - launched:.1f} s, data + Franca export {trained - started:.1f}"
        f" s, RASA job {finished - trained:.1f} s"
        f" (fit {report['fit_seconds']:.1f} s, {report['config']['rasa']['rounds']} rounds x "
        f"{report['steps_per_round']} steps)"
    )
    print(f"round losses: {', '.join(f'{x:.4f}' for x in report['round_losses'])}")
    grid = report["grid"]
    print(
        f"positional embedding: {position_code_components(report['export'], grid)} of its "
        f"{grid * grid - 1} components hold {VARIANCE_SHARE:.0%} of its variance; "
        f"Q removes {report['basis_rank']} directions"
    )
    print(f"position MSE chance            {mse['chance']:.5f}")
    print(
        f"position MSE round 1 -> T+1    {mse['before']:.5f} -> {mse['after']:.5f} "
        f"(before/chance {mse['before_vs_chance']:.3f}; lr {report['config']['rasa']['lr']})"
    )
    print(
        f"position MSE least squares     {mse['least_squares_before']:.5f} -> "
        f"{mse['least_squares_after']:.5f} (after/chance "
        f"{mse['least_squares_after'] / mse['chance']:.3f})"
    )
    print(f"cosine to pos-embed: removed {cosine['removed']:.4f}, kept {cosine['kept']:.4f}")
    print(
        f"kNN top-1 (k={knn['k']}, {report['test_images']} queries, {report['train_images']} "
        f"train) mean patch token {POINTS * knn['before']:.2f} -> {POINTS * knn['after']:.2f}; "
        f"CLS (ray-ssl eval's kNN feature, untouched by RASA) {POINTS * knn['cls_unchanged']:.2f}"
    )
    print(f"knn_change_points={POINTS * (knn['after'] - knn['before']):.2f}")
    print(f"position_mse_after_vs_chance={mse['after_vs_chance']:.3f}")


if __name__ == "__main__":
    main()

"""RASA on a small trained Franca export: position left in the patch tokens, and kNN, before/after.

Unless ``--export`` is given, trains a tiny Franca ViT with the local preset for a few steps
(Fashion-MNIST 28x28 in 4x4 patches; scikit-learn digits 8x8 in 2x2 patches with ``--quick``),
then runs ``run_rasa`` (the ``ray-ssl rasa`` job: one Ray Train worker, single views streamed
through the data plane, the reference recipe of 9 rounds x 5 epochs at AdamW lr 2e-4) and reads
its report. The baseline is the same backbone's raw patch tokens; ours are the tokens with Q
removed. Position: test MSE of a fresh sigmoid regressor (the paper's probe, trained as one
round) and of a closed-form affine fit, against chance (g+1)/(12(g-1)). kNN: weighted kNN
(k=20, T=0.07) on the mean patch token, held-out test split.

Last two lines: ``knn_change_points=<after - before, points>`` (target within +-0.5), then
``position_mse_after_vs_chance=<after / chance>`` (target >= 0.95).
Usage: ``python benchmarks/rasa.py [--quick] [--export PATH --data URI --eval-data URI]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ray_ssl.config import ShardsConfig, StorageConfig, load_config  # noqa: E402

RAY_CPUS = 4  # logical CPUs: the Train worker and the Ray Data tasks mostly wait on each other
SOURCE = {True: "digits", False: "fashion-mnist"}
# Franca pretraining of the export: a few steps of the local preset (quick: digits at 8x8).
TRAIN_OVERRIDES = {
    True: [
        "model.img_size=8", "model.patch_size=2", "model.depth=2", "views.patch_size=2",
        "views.global_size=8", "views.local_size=4", "data.batch_size=32",
        "train.steps_per_epoch=8", "train.checkpoint_every=8",
    ],
    False: ["train.steps_per_epoch=100", "train.checkpoint_every=100"],
}  # fmt: skip
# RASA: the reference recipe; each round sees steps_per_epoch x 5 batches of one cached pass.
RASA_OVERRIDES = {
    True: [
        "rasa.steps_per_epoch=8", "rasa.batch_size=64", "rasa.probe_images=300",
        "eval.knn_max_train=1000", "eval.knn_max_test=300",
    ],
    False: [
        "rasa.steps_per_epoch=80", "rasa.probe_images=1000",
        "eval.knn_max_train=5000", "eval.knn_max_test=1000",
    ],
}  # fmt: skip
POINTS = 100


def write_shards(workdir: Path, quick: bool) -> tuple[str, str]:
    """Train and test shard sets of the benchmark's source under ``workdir``."""
    from ray_ssl.data.shards import write_shard_set

    uris = []
    for split in ("train", "test"):
        uri = str(workdir / "shards" / split)
        if not (Path(uri) / "manifest.json").is_file():
            cfg = ShardsConfig(source=SOURCE[quick], split=split, samples_per_shard=5000)
            write_shard_set(cfg, uri, StorageConfig())
        uris.append(uri)
    return uris[0], uris[1]


def train_export(workdir: Path, data: str, quick: bool) -> str:
    """A Franca export of the local preset after a few steps; returns its directory."""
    from ray_ssl.train.trainer import run_training

    overrides = [
        f"data.uri={data}",
        "data.eval_uri=null",
        f"train.storage_path={workdir / 'runs'}",
        f"train.run_name=franca-{'quick' if quick else 'full'}",
        "train.epochs=1",
        "eval.knn_every=0",
        *TRAIN_OVERRIDES[quick],
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
    parser.add_argument("--lr", type=float, help="rasa.lr (default: the paper's 2e-4)")
    args = parser.parse_args()
    if args.export and not (args.data and args.eval_data):
        parser.error("--export needs --data and --eval-data")
    import ray

    from ray_ssl.train.rasa_job import run_rasa

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ray-ssl-bench-rasa-"))
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
        *([f"rasa.lr={args.lr}"] if args.lr else []),
    ]
    report = run_rasa(export, load_config("local", overrides)).report
    finished = time.perf_counter()
    ray.shutdown()

    mse, knn, cosine = report["position_mse"], report["knn"], report["pos_embed_cosine"]
    print(f"export {report['export']}; grid {report['grid']}x{report['grid']}, D={report['dim']}")
    print(
        f"time: data + Franca export {trained - started:.1f} s, RASA job {finished - trained:.1f} s"
        f" (fit {report['fit_seconds']:.1f} s, {report['config']['rasa']['rounds']} rounds x "
        f"{report['steps_per_round']} steps)"
    )
    print(f"round losses: {', '.join(f'{x:.4f}' for x in report['round_losses'])}")
    print(f"position MSE chance            {mse['chance']:.5f}")
    print(
        f"position MSE sigmoid probe     {mse['before']:.5f} -> {mse['after']:.5f} "
        f"(before/chance {mse['before_vs_chance']:.3f}; lr {report['config']['rasa']['lr']})"
    )
    print(
        f"position MSE least squares     {mse['least_squares_before']:.5f} -> "
        f"{mse['least_squares_after']:.5f} (after/chance "
        f"{mse['least_squares_after'] / mse['chance']:.3f})"
    )
    print(f"cosine to pos-embed: removed {cosine['removed']:.4f}, kept {cosine['kept']:.4f}")
    print(
        f"kNN top-1 (mean patch token) {POINTS * knn['before']:.2f} -> "
        f"{POINTS * knn['after']:.2f}; CLS (untouched) {POINTS * knn['cls_unchanged']:.2f}"
    )
    print(f"knn_change_points={POINTS * (knn['after'] - knn['before']):.2f}")
    print(f"position_mse_after_vs_chance={mse['after_vs_chance']:.3f}")


if __name__ == "__main__":
    main()

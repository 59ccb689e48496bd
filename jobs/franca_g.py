"""Pretrain Franca with Ray Train + DeepSpeed: ViT-G/14 on GPUs, or a tiny ViT on a laptop CPU.

    ray job submit --working-dir . -- python jobs/franca_g.py                  # ViT-G/14 preset
    ray job submit --working-dir . -- python jobs/franca_g.py --preset local   # CPU, minutes
    python jobs/franca_g.py --preset local train.epochs=2                      # no job server

With a built-in shard source (fashion-mnist, digits, synthetic) the job first writes the train
and held-out shard sets if they are missing. It then trains (resuming ``train.run_name`` if it
has checkpoints), evaluates kNN of the teacher against raw pixels and writes the report, the
curves and the exported teacher backbone into ``<train.storage_path>/<train.run_name>``.
Input errors are one line on stderr and exit code 2, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from ray_ssl.cli import job_main  # noqa: E402
from ray_ssl.config import Config, load_config  # noqa: E402

log = logging.getLogger("ray_ssl.jobs.franca_g")

DEFAULT_PRESET = "franca_vitg14"
BUILTIN_SOURCES = ("fashion-mnist", "digits", "synthetic")


def ensure_builtin_shards(config: Config) -> None:
    """Write the train (and held-out test) shard sets from a built-in source if missing."""
    from ray_ssl.data.shards import ensure_shard_set

    if config.shards.source not in BUILTIN_SOURCES:
        return
    splits = [("train", config.data.uri)]
    if config.data.eval_uri is not None:
        splits.append(("test", config.data.eval_uri))
    for split, uri in splits:
        manifest = ensure_shard_set(
            dataclasses.replace(config.shards, split=split), uri, config.storage
        )
        log.info("%s shards: %d samples of %s at %s", split, manifest.count, manifest.source, uri)


def train(preset: str, overrides: Sequence[str]) -> None:
    from ray_ssl.train.trainer import run_training

    config = load_config(preset, list(overrides))
    if not config.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ensure_builtin_shards(config)
    outcome = run_training(config)
    print(f"run directory: {outcome.run_uri}")
    print(f"teacher backbone: {outcome.export_uri}")
    if outcome.report_uri:
        print(f"report: {outcome.report_uri}")


def main(argv: Sequence[str] | None = None) -> None:
    job_main(__doc__, DEFAULT_PRESET, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

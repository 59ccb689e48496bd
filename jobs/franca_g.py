"""Pretrain Franca with Ray Train + DeepSpeed: ViT-G/14 on GPUs, or a tiny ViT on a laptop CPU.

    ray job submit --working-dir . -- python jobs/franca_g.py                  # ViT-G/14 preset
    ray job submit --working-dir . -- python jobs/franca_g.py --preset local   # CPU, minutes
    python jobs/franca_g.py --preset local train.epochs=2                      # no job server

With a built-in shard source (fashion-mnist, digits, synthetic) the job first writes the train
and held-out shard sets if they are missing. It then trains (resuming ``train.run_name`` if it
has checkpoints), evaluates kNN of the teacher against raw pixels and writes the report, the
curves and the exported teacher backbone into ``<train.storage_path>/<train.run_name>``.
Input errors are one line on stderr and exit code 2, before torch, DeepSpeed or Ray is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from ray_ssl.cli import job_main  # noqa: E402
from ray_ssl.train.pretrain import pretrain  # noqa: E402

DEFAULT_PRESET = "franca_vitg14"


def train(preset: str, overrides: Sequence[str]) -> None:
    print("\n".join(pretrain(preset, overrides).summary_lines()))


def main(argv: Sequence[str] | None = None) -> None:
    job_main(__doc__, DEFAULT_PRESET, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Pretrain InstDisc (Wu et al., arXiv 1805.01978) with its memory bank held by Ray actors.

    ray job submit --working-dir . -- python jobs/instdisc.py --preset imagenet   # ResNet-50
    python jobs/instdisc.py --preset local                                       # CPU, minutes
    python jobs/instdisc.py --preset local train.epochs=3 instdisc.bank_shards=4

``--preset local`` is ``instdisc_local`` (Fashion-MNIST, timm ResNet-10t, written to local shards
if missing) and ``--preset imagenet`` is ``instdisc_imagenet``; any preset name or YAML path works.
The method's driver pins N to the shard set, creates the sharded bank (so it outlives the Train
workers; they attach to it by name and it is snapshotted with every checkpoint), and after
training reports weighted kNN (k=200, sigma=0.07, sec. 3.4) on the held-out split two ways: with
the bank itself as the training features (``knn_bank_top1``, the paper's protocol) and with
recomputed features (``knn_recomputed_top1``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from ray_ssl.cli import job_main  # noqa: E402
from ray_ssl.train.pretrain import pretrain  # noqa: E402

PRESET_ALIASES = {"local": "instdisc_local", "imagenet": "instdisc_imagenet"}


def train(preset: str, overrides: Sequence[str]) -> None:
    print("\n".join(pretrain(PRESET_ALIASES.get(preset, preset), overrides).summary_lines()))


def main(argv: Sequence[str] | None = None) -> None:
    job_main(
        __doc__,
        "imagenet",
        train,
        argv,
        preset_help="local | imagenet | a preset name or YAML path",
    )


if __name__ == "__main__":
    main(sys.argv[1:])

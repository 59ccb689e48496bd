"""The GPU check is ready to run where a GPU is: its script parses and its preset resolves."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ray_ssl.config import load_config, training_views

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_preset_resolves_for_a_one_gpu_bf16_franca_run() -> None:
    config = load_config("franca_fmnist_gpu")
    training_views(config)
    assert config.train.use_gpu and config.train.precision == "bf16"
    assert config.eval.knn_max_train == 60000 and config.eval.knn_max_test == 10000

"""The GPU check is ready to run where a GPU is: its script parses, its preset resolves, and its
report reader fails in one line on what it cannot read (it reads a real run's report in
``test_franca_job.py``; the preset itself needs a GPU: its heads took ~10 s a step at batch 32
on a CPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ray_ssl.config import load_config, training_views

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
REPORT_SCRIPT = REPO / "benchmarks" / "gpu_check_report.py"
JOB_SECONDS = 120


def read_report(report: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``gpu_check_report.py`` on ``report`` for a job of ``JOB_SECONDS``, run from the report's
    directory (not the repository root) as a user may run it."""
    return subprocess.run(
        [sys.executable, str(REPORT_SCRIPT), str(report), str(JOB_SECONDS), *args],
        capture_output=True,
        text=True,
        cwd=report.parent,
    )


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_preset_resolves_for_a_one_gpu_bf16_franca_run() -> None:
    config = load_config("franca_fmnist_gpu")
    training_views(config)
    assert config.train.use_gpu and config.train.precision == "bf16"
    assert config.eval.knn_max_train == 60000 and config.eval.knn_max_test == 10000


@pytest.mark.parametrize(
    ("contents", "message"),
    [(None, "no report at"), ('{"history": [{"step": 1, "loss": 2.0}]}', "no kNN evaluation")],
)
def test_report_reader_fails_in_one_line(
    tmp_path: Path, contents: str | None, message: str
) -> None:
    report = tmp_path / "report.json"
    if contents is not None:
        report.write_text(contents)
    result = read_report(report)
    assert result.returncode != 0 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1

"""Kill a training job after a checkpoint, launch it again: it resumes exactly there.

The job runs as a subprocess (``jobs/franca_g.py``, the real Franca method, ZeRO-2, digits
shards) connected to the test's Ray instance. After the first checkpoint is registered and the
run has moved on, the driver process is killed (its Ray Train controller and workers die with
it). The relaunch with the same run name must start at the latest registered checkpoint's step,
then report every later step exactly once; steps computed by both launches must give the same
loss (same data order, augmentation seeds, RNG and optimizer state).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY, BATCH = 12, 4, 32
STEP_LINE = re.compile(r"step (\d+)/(\d+) .*?\bloss=([-+0-9.e]+)")
RESUME_LINE = re.compile(r"resumed from \S+ at step (\d+)")
LOSS_RTOL = 1e-4  # the same computation after a restore; only logging rounds (6 digits)
POLL_S = 0.5


def _job_command(tmp: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "jobs" / "franca_g.py"),
        "--preset",
        "local",
        "shards.source=digits",
        f"data.uri={tmp}/digits/train",
        "data.eval_uri=null",
        f"data.batch_size={BATCH}",
        "views.global_size=8",
        "views.local_size=4",
        "views.local_crops=2",
        "model.img_size=8",
        "model.depth=2",
        "train.epochs=1",
        f"train.steps_per_epoch={STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.log_every=1",
        f"train.storage_path={tmp}/runs",
        "train.run_name=resume",
        "optim.warmup_epochs=0",
    ]


def _steps(log: str) -> dict[int, float]:
    """Step -> loss as logged by rank 0; a step logged twice by one launch is an error."""
    seen: dict[int, float] = {}
    for step, _, loss in STEP_LINE.findall(log):
        assert int(step) not in seen, f"step {step} reported twice in one launch"
        seen[int(step)] = float(loss)
    return seen


def _registered_step(run_dir: Path) -> int | None:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (ValueError, KeyError, TypeError):
        return None  # being rewritten
    return int(latest["metrics"]["step"]) if latest else None


def test_killed_job_resumes_from_its_last_checkpoint(ray_local: None, tmp_path: Path) -> None:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    run_dir = tmp_path / "runs" / "resume"
    first_log = tmp_path / "first.log"
    with first_log.open("w") as out:
        first = subprocess.Popen(
            _job_command(tmp_path), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        # Kill once a checkpoint is registered and two more steps have been taken after it.
        while first.poll() is None:
            registered = _registered_step(run_dir)
            taken = max(_steps(first_log.read_text()), default=0)
            if registered and taken >= registered + 2:
                break
            time.sleep(POLL_S)
        assert first.poll() is None, "the first launch finished before it could be killed"
        first.kill()
        first.wait()
    killed_at = _registered_step(run_dir)
    first_steps = _steps(first_log.read_text())
    assert killed_at is not None and killed_at % CHECKPOINT_EVERY == 0
    assert killed_at < STEPS
    assert sorted(first_steps) == list(range(1, max(first_steps) + 1))

    second = subprocess.run(
        _job_command(tmp_path), capture_output=True, text=True, env=env, cwd=REPO
    )
    second_log = second.stdout + second.stderr
    assert second.returncode == 0, second_log[-3000:]
    resumed = [int(s) for s in RESUME_LINE.findall(second_log)]
    assert resumed and set(resumed) == {killed_at}
    second_steps = _steps(second_log)
    assert sorted(second_steps) == list(range(killed_at + 1, STEPS + 1))
    overlap = sorted(set(first_steps) & set(second_steps))
    assert overlap, "no step was computed by both launches"
    for step in overlap:
        assert second_steps[step] == pytest.approx(first_steps[step], rel=LOSS_RTOL), step

    final = json.loads((run_dir / f"step_{STEPS:08d}" / "train_state.json").read_text())
    assert [int(h["step"]) for h in final["history"]] == list(range(1, STEPS + 1))
    assert final["samples_seen"] == STEPS * BATCH  # skipped (re-read) batches are not counted

"""Consolidated checkpoints: saved under one ZeRO stage, resumed under another, the whole state
(weights, float32 master copies, Adam moments, step count) carries over exactly.

One process, one gloo rank, the deterministic toy method of test_engine. Across stages the check
is the state itself: restored under stage B and saved again at once, every tensor equals the one
saved under stage A. The losses cannot be the check there: two stages already differ in the
float32 rounding of a step (ZeRO-2 and ZeRO-3 from the same start part at the 4th digit after
one step on this toy, no checkpoint involved). Under one stage a resume continues bit for bit.
Changing the world size is tested end to end in test_elastic_resume.py.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from ray_ssl.data.position import ConsumedFilter, PassProgress, from_intervals, to_intervals

STAGE_PAIRS = [(2, 3), (3, 0), (0, 1), (3, 3)]
STEPS_BEFORE, STEPS_AFTER = 2, 3


def _losses(engine: Any, steps: range) -> list[float]:
    from test_engine import global_batch

    return [float(engine.train_step(global_batch(s), s)["loss"]) for s in steps]


def _stage_round_trips(queue: Any, directory: str) -> None:
    import traceback

    try:
        queue.put(_round_trips(directory))
    except Exception:  # the parent must not wait forever on a crashed child
        queue.put({"error": traceback.format_exc()})


def _different_tensors(first: Path, second: Path) -> list[str]:
    import torch

    from ray_ssl.train.checkpoint import MODEL_PREFIX, OPTIMIZER_PREFIX, TensorFiles

    different = []
    for prefix in (MODEL_PREFIX, OPTIMIZER_PREFIX):
        a, b = TensorFiles(first, prefix), TensorFiles(second, prefix)
        assert sorted(a.keys()) == sorted(b.keys()), prefix
        different += [k for k in a.keys() if not torch.equal(a.get(k), b.get(k))]
    return different


def _round_trips(directory: str) -> dict[str, Any]:
    import json

    import torch
    from test_engine import ToyMethod, toy_config

    from ray_ssl.train.checkpoint import (
        OPTIMIZER_META,
        TrainState,
        restore_checkpoint,
        save_checkpoint,
    )
    from ray_ssl.train.engine import build_engine
    from ray_ssl.train.schedules import TrainSchedules

    def engine_at(stage: int) -> Any:
        config = toy_config(stage, 1)
        torch.manual_seed(0)
        schedules = TrainSchedules.from_config(config, steps_per_epoch=3)
        return build_engine(ToyMethod(config), config, schedules), config

    after = range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)
    results = {}
    for save_stage, load_stage in STAGE_PAIRS:
        engine, config = engine_at(save_stage)
        _losses(engine, range(STEPS_BEFORE))
        saved, again = (Path(directory, f"zero{save_stage}-to-{load_stage}-{n}") for n in "ab")
        saved.mkdir()
        again.mkdir()
        save_checkpoint(str(saved), engine, TrainState(step=STEPS_BEFORE), config, 0)
        reference = _losses(engine, after)
        resumed, resumed_config = engine_at(load_stage)
        restored = restore_checkpoint(str(saved), resumed, 0, 1, seed=0)
        save_checkpoint(str(again), resumed, TrainState(step=STEPS_BEFORE), resumed_config, 0)
        results[f"{save_stage}->{load_stage}"] = {
            "step": restored.step,
            "reference": reference,
            "resumed": _losses(resumed, after),
            "different": _different_tensors(saved, again),
            "adam_step": [
                json.loads((d / OPTIMIZER_META).read_text())["step"] for d in (saved, again)
            ],
            "files": sorted(p.name for p in saved.iterdir()),
        }
    return results


def test_checkpoint_resumes_under_another_zero_stage(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_stage_round_trips, args=(queue, str(tmp_path)))
    worker.start()
    results = queue.get()
    worker.join()
    assert "error" not in results, results.get("error")
    assert sorted(results) == sorted(f"{a}->{b}" for a, b in STAGE_PAIRS)
    for pair, got in results.items():
        assert got["step"] == STEPS_BEFORE, pair
        assert got["different"] == [], pair  # every weight, master copy and moment, exactly
        assert got["adam_step"] == [STEPS_BEFORE, STEPS_BEFORE], pair
        # The first loss after the restore depends on the weights alone: equal under any stage.
        assert got["resumed"][0] == got["reference"][0], pair
        assert "model-00000.safetensors" in got["files"] and not any(
            name.endswith(".pt") for name in got["files"]
        ), pair
    same_stage = results["3->3"]
    assert same_stage["resumed"] == same_stage["reference"]  # bit for bit


def test_pass_progress_intervals_and_filter() -> None:
    idx = [7, 3, 4, 5, 9, 10, 3]
    assert to_intervals(idx) == [[3, 6], [7, 8], [9, 11]]
    assert sorted(from_intervals(to_intervals(idx))) == [3, 4, 5, 7, 9, 10]
    progress = PassProgress(2, [[3, 6]], ["s.tar:k (undecodable)"])
    merged = progress.merged([from_intervals([[6, 8]])], ["s.tar:j (truncated)"])
    assert merged.intervals == [[3, 8]] and merged.consumed == 7 and merged.pass_index == 2
    keep = ConsumedFilter.of(merged)
    assert keep.good_consumed([0, 2, 3, 7, 8, 100]).tolist() == [0, 0, 1, 1, 0, 0]
    assert keep.corrupt_consumed(["s.tar:j (truncated)", "s.tar:x (y)"]).tolist() == [1, 0]

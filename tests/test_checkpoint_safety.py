"""A checkpoint is data, never code: planted pickles are refused before anything in them runs.

Each planted file holds an object whose ``__reduce__`` writes a marker file when unpickled; the
test first proves the payload works (a plain ``pickle`` load writes the marker), then that every
way ray-ssl reads a checkpoint refuses it with a one-line ``CheckpointError`` naming the file and
the marker never appears. Real DeepSpeed ZeRO-2/ZeRO-3 checkpoints (toy method, one gloo worker)
must still restore under ``weights_only=True``, RNG states included, exactly.
"""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ray_ssl.config import StorageConfig
from ray_ssl.train.checkpoint import (
    DEEPSPEED_MODEL_STATES,
    DEEPSPEED_TAG,
    load_module_state,
    load_rng_state,
    save_rng_state,
)
from ray_ssl.train.safe_load import CheckpointError

MARKER_TEXT = "code from a checkpoint ran"


class Payload:
    """Unpickling this writes ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, MARKER_TEXT))


def plant(path: Path, marker: Path) -> Path:
    """A torch-format checkpoint file at ``path`` that runs the payload when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"w": torch.zeros(2)}, "evil": Payload(marker)}, path)
    return path


def assert_refused(err: pytest.ExceptionInfo, planted: Path, marker: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint file {planted} refers to the Python object "), message
    assert not marker.exists()


def test_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The planted file is really hostile: a plain load runs it (so the refusals below count)."""
    marker = tmp_path / "marker"
    planted = plant(tmp_path / "evil.pt", marker)
    torch.load(planted, weights_only=False)
    assert marker.read_text() == MARKER_TEXT


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_module_state_refuses_planted_pickle(tmp_path: Path, zero_stage: int) -> None:
    marker = tmp_path / "marker"
    ds = tmp_path / "ckpt" / DEEPSPEED_TAG
    name = DEEPSPEED_MODEL_STATES if zero_stage < 3 else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    planted = plant(ds / name, marker)
    with pytest.raises(CheckpointError) as err:
        load_module_state(str(tmp_path / "ckpt"), StorageConfig(), zero_stage)
    assert_refused(err, planted, marker)


def test_rng_file_holding_a_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    planted = plant(tmp_path / "rank_0.safetensors", marker)
    with pytest.raises(CheckpointError, match="rank_0.safetensors"):
        load_rng_state(planted)
    assert not marker.exists()


def _draws() -> tuple[list[float], list[float], list[float]]:
    """Draws from each RNG, with the cached Gaussians (numpy's and Python's) in play."""
    return (
        torch.rand(4).tolist(),
        [float(np.random.standard_normal()), *np.random.rand(3).tolist()],
        [random.gauss(0.0, 1.0), random.random(), random.getrandbits(64)],
    )


def test_rng_state_round_trips_exactly(tmp_path: Path) -> None:
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0.0, 1.0)  # ... and in Python's
    path = tmp_path / "rank_0.safetensors"
    save_rng_state(path)
    expected = _draws()
    _draws()  # move every generator on
    load_rng_state(path)
    assert _draws() == expected


def _engine_round_trips(queue: Any, directory: str) -> None:
    """In a fresh process: save and restore real ZeRO-2 and ZeRO-3 checkpoints, then plant."""
    from test_engine import ToyMethod, global_batch, toy_config

    from ray_ssl.train.checkpoint import (
        TrainState,
        gathered_state_dict,
        restore_checkpoint,
        save_checkpoint,
    )
    from ray_ssl.train.engine import build_engine
    from ray_ssl.train.schedules import TrainSchedules

    results: dict[str, Any] = {}
    for stage in (2, 3):
        config = toy_config(stage, 1)
        torch.manual_seed(0)
        engine = build_engine(
            ToyMethod(config), config, TrainSchedules.from_config(config, steps_per_epoch=3)
        )
        engine.train_step(global_batch(0), 0)
        ckpt = Path(directory, f"zero{stage}")
        ckpt.mkdir()
        save_checkpoint(str(ckpt), engine, TrainState(step=1, zero_stage=stage), config, 0)
        saved = gathered_state_dict(engine.module, engine.module.state_dict, 0)
        draws = _draws()
        engine.train_step(global_batch(1), 1)  # moves weights, optimizer and RNGs on
        state = restore_checkpoint(str(ckpt), engine, 0, 1)
        restored = gathered_state_dict(engine.module, engine.module.state_dict, 0)
        merged = load_module_state(str(ckpt), StorageConfig(), stage)
        marker = Path(directory, f"marker{stage}")
        planted = next((ckpt / DEEPSPEED_TAG).glob("*model_states.pt"))
        torch.save({"evil": Payload(marker)}, planted)
        try:
            restore_checkpoint(str(ckpt), engine, 0, 1)
            refusal = None
        except CheckpointError as err:
            refusal = str(err)
        results[stage] = {
            "step": state.step,
            "weights_equal": all(torch.equal(saved[k], restored[k]) for k in saved),
            "merged_equal": all(torch.equal(merged[k].float(), saved[k]) for k in merged),
            "merged_keys": sorted(merged) == sorted(saved),
            "rng_equal": _draws() == draws,
            "refusal": refusal,
            "planted": planted.name,
            "marker": marker.exists(),
        }
    queue.put(results)


def test_deepspeed_checkpoints_restore_weights_only_and_refuse_planted(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_engine_round_trips, args=(queue, str(tmp_path)))
    worker.start()
    results = queue.get()
    worker.join()
    for stage, got in results.items():
        assert got["step"] == 1, stage
        assert got["weights_equal"] and got["merged_equal"] and got["merged_keys"], (stage, got)
        assert got["rng_equal"], stage
        assert not got["marker"], stage
        assert got["refusal"] is not None and got["planted"] in got["refusal"], (stage, got)
        assert "\n" not in got["refusal"]

"""A checkpoint is data, never code: planted pickles are refused before anything in them runs.

Each planted file holds an object whose ``__reduce__`` writes a marker file when unpickled; the
test first proves the payload works (a plain ``pickle`` load writes the marker), then that every
way ray-ssl reads a checkpoint (consolidated model and optimizer tensors, RNG states) refuses it
with a one-line ``CheckpointError`` naming the file, and the marker never appears. Restoring real
DeepSpeed checkpoints under every ZeRO stage is tested in test_elastic_checkpoint.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ray_ssl.config import StorageConfig
from ray_ssl.train.checkpoint import (
    MODEL_PREFIX,
    OPTIMIZER_PREFIX,
    TensorFiles,
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


def test_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The planted file is really hostile: a plain load runs it (so the refusals below count)."""
    marker = tmp_path / "marker"
    planted = plant(tmp_path / "evil.pt", marker)
    torch.load(planted, weights_only=False)
    assert marker.read_text() == MARKER_TEXT


@pytest.mark.parametrize("prefix", [MODEL_PREFIX, OPTIMIZER_PREFIX])
def test_tensor_file_holding_a_pickle_is_refused(tmp_path: Path, prefix: str) -> None:
    marker = tmp_path / "marker"
    planted = plant(tmp_path / "ckpt" / f"{prefix}-00000.safetensors", marker)
    with pytest.raises(CheckpointError) as err:
        if prefix == MODEL_PREFIX:
            load_module_state(str(tmp_path / "ckpt"), StorageConfig())
        else:
            TensorFiles(tmp_path / "ckpt", prefix)
    message = str(err.value)
    assert "\n" not in message and planted.name in message, message
    assert not marker.exists()


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

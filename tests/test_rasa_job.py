"""`ray-ssl rasa` end to end: a tiny export and digits shards, run from another directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ray_ssl.cli import main
from ray_ssl.config import ModelConfig, ShardsConfig, StorageConfig
from ray_ssl.data.shards import write_shard_set
from ray_ssl.eval.rasa import chance_position_mse, load_rasa_basis
from ray_ssl.models.vit import build_vit
from ray_ssl.train.checkpoint import export_backbone

ROUNDS, EMBED_DIM, GRID = 2, 192, 4  # ViT-Ti width; 8x8 digits in 2x2 patches
TINY_VIT = ModelConfig(arch="tiny", depth=1, patch_size=2, img_size=8, in_chans=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data/digits`` shards and ``export/`` of a randomly initialised tiny ViT."""
    root = tmp_path_factory.mktemp("rasa")
    write_shard_set(
        ShardsConfig(source="digits", samples_per_shard=400), str(root / "data" / "digits"),
        StorageConfig(),
    )  # fmt: skip
    torch.manual_seed(0)
    export_backbone(build_vit(TINY_VIT), str(root / "export"), StorageConfig(), 0, {"step": 0})
    return root


def _run(args: list[str]) -> None:
    main(["rasa", *args])


def test_rasa_command_writes_the_basis_and_the_report(
    workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ray_local: None,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = Path(os.path.relpath(workspace, elsewhere))  # paths relative to the new cwd
    assert (relative / "export").is_dir()
    _run(
        [
            str(relative / "export"),
            "--data",
            str(relative / "data" / "digits"),
            f"rasa.rounds={ROUNDS}",
            "rasa.epochs=2",
            "rasa.steps_per_epoch=3",
            "rasa.batch_size=16",
            "rasa.probe_images=40",
            "eval.knn_max_train=200",
            "eval.knn_max_test=100",
            f"train.storage_path={tmp_path / 'runs'}",
        ]
    )
    out = capsys.readouterr().out
    assert "position MSE" in out and "kNN top-1" in out
    basis = load_rasa_basis(str(workspace / "export" / "teacher_backbone.rasa.safetensors"))
    assert basis.shape == (2 * ROUNDS, EMBED_DIM)
    assert torch.allclose(basis @ basis.T, torch.eye(2 * ROUNDS), atol=1e-5)
    report = json.loads((workspace / "export" / "teacher_backbone.rasa.json").read_text())
    mse = report["position_mse"]
    assert mse["chance"] == pytest.approx(chance_position_mse(GRID))
    assert mse["least_squares_before"] < 0.1 * mse["chance"]  # a fresh ViT encodes position
    assert mse["before"] > 0 and mse["least_squares_after"] > 0
    assert mse["probe"].startswith("round-1 regressor")
    assert mse["after_vs_chance"] == pytest.approx(mse["after"] / mse["chance"])
    assert report["grid"] == GRID and len(report["round_losses"]) == ROUNDS
    assert report["samples_seen"] == (ROUNDS + 1) * 2 * 3 * 16  # T rounds and the probe round
    assert 0 <= report["knn"]["before"] <= 1 and 0 <= report["knn"]["after"] <= 1
    assert -1 <= report["pos_embed_cosine"]["removed"] <= 1
    assert report["basis"] == str(workspace / "export" / "teacher_backbone.rasa.safetensors")
    assert sorted(p.name for p in (workspace / "export").iterdir()) == [
        "teacher_backbone.json",
        "teacher_backbone.rasa.json",
        "teacher_backbone.rasa.safetensors",
        "teacher_backbone.safetensors",
    ]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["missing-export", "--data", "DATA"], "no sidecar"),
        (["EXPORT", "--data", "DATA", "rasa.rounds=0"], "rasa.rounds=0 must be >= 1"),
        (["EXPORT", "--data", "DATA", "rasa.batch_size=5000"], "larger than the"),
        (["EXPORT", "--data", "nowhere"], "no shard set at"),
    ],
)
def test_bad_input_is_one_line(
    workspace: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    paths = {"EXPORT": str(workspace / "export"), "DATA": str(workspace / "data" / "digits")}
    with pytest.raises(SystemExit) as exit_info:
        _run([paths.get(a, a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err

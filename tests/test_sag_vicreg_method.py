"""The SAG-VICReg plug-in: VICReg's loss at w = 0, walk pairs mixed in as w warms up, and its
local preset trains end to end under Ray Train + DeepSpeed through ``jobs/pretrain.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.pretrain import main as pretrain_main
from ray_ssl.config import ConfigError, load_config
from ray_ssl.losses.sag_vicreg import sag_vicreg_loss
from ray_ssl.losses.vicreg import vicreg_loss
from ray_ssl.methods.registry import build_method
from ray_ssl.models.vit import normalize_images
from tests.test_franca_job import fashion_dir  # noqa: F401 - the shared Fashion-MNIST fixture

BATCH = 12
TINY = ["sag_vicreg.expander_dims=[32,32,16]", "sag_vicreg.neighbors=4"]
TINY += ["sag_vicreg.scale_neighbor=2", "data.batch_size=12"]


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"global_crops": torch.randint(0, 256, (2 * BATCH, 1, 28, 28), generator=g).byte()}


def _method(*extra: str):  # noqa: ANN202
    config = load_config("sag_vicreg_local", [*TINY, *extra])
    torch.manual_seed(0)
    return build_method(config, steps_per_epoch=10, total_steps=20).train()


def test_with_no_walk_weight_the_method_is_vicreg() -> None:
    method = _method("sag_vicreg.walk_weight=0.0")
    batch = _batch()
    out = method(batch, 5)
    first, second = batch["global_crops"][:BATCH], batch["global_crops"][BATCH:]
    embed = (method.head(method.encoder(normalize_images(v))).float() for v in (first, second))
    torch.testing.assert_close(out["loss"], vicreg_loss(*embed))


def test_walk_weight_warms_up_and_pairs_come_from_the_backbone_graph() -> None:
    method = _method("sag_vicreg.walk_weight=0.6", "sag_vicreg.walk_warmup_epochs=1")
    assert method.walk_weight(0) == 0.0
    assert method.walk_weight(5) == pytest.approx(0.3)
    assert method.walk_weight(50) == pytest.approx(0.6)
    batch = _batch(1)
    out = method(batch, 5)
    first, second = batch["global_crops"][:BATCH], batch["global_crops"][BATCH:]
    with torch.no_grad():
        h = [method.encoder(normalize_images(v)) for v in (first, second)]
    partners = method.partners(h[0], h[1], 5)
    z = [method.head(x).float() for x in h]
    expected, _, _ = sag_vicreg_loss(z[0], z[1], partners, 0.3)
    torch.testing.assert_close(out["loss"], expected)
    assert out["walk_weight"].item() == pytest.approx(0.3)
    out["loss"].backward()
    assert method.head.layers[0].weight.grad.abs().sum() > 0


def test_too_many_neighbours_for_the_batch_is_a_one_line_error() -> None:
    config = load_config("sag_vicreg_local", [*TINY, "sag_vicreg.neighbors=30"])
    with pytest.raises(ConfigError, match="sag_vicreg.neighbors=30"):
        build_method(config, steps_per_epoch=1, total_steps=1)
    with pytest.raises(ConfigError, match="scale_neighbor"):
        load_config("sag_vicreg_local", ["sag_vicreg.scale_neighbor=20"])


def test_local_preset_trains_end_to_end(
    fashion_dir: Path,  # noqa: F811
    tmp_path: Path,
    ray_local: None,
) -> None:
    runs = tmp_path / "runs"
    pretrain_main(
        [
            "--preset",
            "sag_vicreg_local",
            f"shards.fashion_mnist_dir={fashion_dir}",
            f"data.uri={tmp_path}/shards/train",
            f"data.eval_uri={tmp_path}/shards/test",
            "data.batch_size=32",
            "sag_vicreg.expander_dims=[64,64,64]",
            "train.epochs=1",
            "train.steps_per_epoch=4",
            "train.checkpoint_every=4",
            "train.log_every=2",
            f"train.storage_path={runs}",
            "train.run_name=sag",
            "eval.knn_max_train=500",
            "eval.knn_max_test=200",
        ]
    )
    report = json.loads((runs / "sag" / "report.json").read_text())
    assert report["final_metrics"]["step"] == 4.0
    assert report["config"]["train"]["method"] == "sag_vicreg"
    assert "walk_invariance_loss" in report["final_metrics"]

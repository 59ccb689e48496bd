"""VICReg and SimCLR methods on a tiny batch: the loss is the paper's loss of the right views,
gradients reach backbone and head, and SimCLR/VICReg's optimizer rules hold."""

from __future__ import annotations

import pytest
import torch

from ray_ssl.config import Config, load_config
from ray_ssl.losses.ntxent import nt_xent_loss
from ray_ssl.losses.vicreg import vicreg_loss
from ray_ssl.methods.registry import build_method
from ray_ssl.models.vit import normalize_images
from ray_ssl.train.engine import build_optimizer

BATCH = 6
TINY = {
    "vicreg": ["vicreg.expander_dims=[32,32,16]"],
    "simclr": ["simclr.projection_hidden_dim=32", "simclr.projection_dim=16"],
}


def _config(method: str, *extra: str) -> Config:
    return load_config(f"{method}_local", [*TINY[method], *extra])


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"global_crops": torch.randint(0, 256, (2 * BATCH, 1, 28, 28), generator=g).byte()}


def _embed(method: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    return method.head(method.encoder(normalize_images(crops))).float()


def test_vicreg_loss_of_the_two_views_each_through_its_own_batchnorm_pass() -> None:
    config = _config("vicreg")
    method = build_method(config, steps_per_epoch=1, total_steps=1).train()
    batch = _batch()
    out = method(batch, 0)
    first, second = batch["global_crops"][:BATCH], batch["global_crops"][BATCH:]
    expected = vicreg_loss(_embed(method, first), _embed(method, second), 25.0, 25.0, 1.0)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert method.encoder.net.conv1[0].weight.grad.abs().sum() > 0
    assert method.head.layers[0].weight.grad.abs().sum() > 0


def test_simclr_loss_over_one_joint_pass_with_its_temperature() -> None:
    config = _config("simclr", "simclr.temperature=0.3")
    method = build_method(config, steps_per_epoch=1, total_steps=1).train()
    batch = _batch(1)
    out = method(batch, 0)
    z_a, z_b = _embed(method, batch["global_crops"]).chunk(2)
    torch.testing.assert_close(out["loss"], nt_xent_loss(z_a, z_b, 0.3))
    out["loss"].backward()
    assert method.encoder.net.conv1[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vicreg", "simclr"])
def test_biases_and_norms_take_no_decay_and_lars_steps(name: str) -> None:
    config = _config(name)
    method = build_method(config, steps_per_epoch=1, total_steps=1)
    groups = method.param_groups(config.optim)
    decay = {n: g["wd_mult"] for g in groups for n in g["names"]}
    params = dict(method.named_parameters())
    assert decay and all(decay[n] == (0.0 if params[n].ndim == 1 else 1.0) for n in decay)
    assert decay["head.layers.1.weight"] == 0.0  # BatchNorm of the head
    optimizer = build_optimizer(groups, config.optim, fused=False)
    assert type(optimizer).__name__ == "Lars"
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.1, 1e-6 * group["wd_mult"]
    before = method.head.layers[0].weight.detach().clone()
    method(_batch(2), 0)["loss"].backward()
    optimizer.step()
    assert not torch.equal(method.head.layers[0].weight, before)


def test_odd_crop_count_is_an_error() -> None:
    method = build_method(_config("vicreg"), steps_per_epoch=1, total_steps=1)
    batch = {"global_crops": _batch()["global_crops"][:-1]}
    with pytest.raises(ValueError, match="2 per sample"):
        method(batch, 0)

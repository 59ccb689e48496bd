"""FrancaMethod on a tiny batch: losses, gradient routing, frozen last layer, EMA, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from ray_ssl.config import Config, ConfigError, load_config
from ray_ssl.methods.franca import FrancaMethod, teacher_momentum, teacher_temperature
from ray_ssl.models.heads import is_last_layer_param

BATCH = 4
STEPS_PER_EPOCH = 5  # freeze_last_layer_epochs=1 -> steps 0..4 frozen
TINY = [
    "model.depth=1",
    "model.drop_path=0.1",
    "franca.prototypes=64",
    "franca.ibot_prototypes=32",
    "franca.head_hidden_dim=32",
    "franca.head_bottleneck_dim=16",
    "franca.ibot_head_bottleneck_dim=8",
    "views.local_crops=2",
]


def _config(*extra: str) -> Config:
    return load_config("local", [*TINY, *extra])


def _batch(config: Config, mask_p: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    v = config.views
    g = torch.Generator().manual_seed(seed)
    grid = (v.global_size // v.patch_size) ** 2

    def crops(n: int, size: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, v.channels, size, size), dtype=torch.uint8, generator=g)

    return {
        "global_crops": crops(v.global_crops * BATCH, v.global_size),
        "local_crops": crops(v.local_crops * BATCH, v.local_size),
        "masks": torch.rand(v.global_crops * BATCH, grid, generator=g) < mask_p,
        "idx": torch.arange(BATCH),
        "label": torch.full((BATCH,), -1),
    }


@pytest.fixture(scope="module")
def method() -> FrancaMethod:
    torch.manual_seed(0)
    return FrancaMethod(_config(), STEPS_PER_EPOCH, total_steps=50).train()


def _student_grads(method: FrancaMethod) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in method.student.named_parameters()}


def test_forward_backward_student_only_and_frozen_last_layer(method: FrancaMethod) -> None:
    config = method.config
    method.zero_grad(set_to_none=True)
    out = method(_batch(config), step=0)
    assert set(out) == {"loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_temp", "momentum"}
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    for name, grad in _student_grads(method).items():
        if is_last_layer_param(name):
            assert grad is None, f"{name} is frozen at step 0 but got a gradient"
        else:
            assert grad is not None and torch.isfinite(grad).all(), name
    assert method.student["backbone"].mask_token.grad.abs().sum() > 0

    method.zero_grad(set_to_none=True)
    method(_batch(config), step=STEPS_PER_EPOCH)["loss"].backward()  # first unfrozen step
    grads = _student_grads(method)
    assert all(grads[n] is not None for n in grads if is_last_layer_param(n))


def test_loss_is_the_weighted_sum_of_named_terms() -> None:
    torch.manual_seed(1)
    config = _config("franca.dino_weight=0.5", "franca.ibot_weight=2.0", "franca.koleo_weight=0.3")
    method = FrancaMethod(config, STEPS_PER_EPOCH, total_steps=50)
    with torch.no_grad():
        out = method(_batch(config), step=3)
    expected = 0.5 * out["dino_loss"] + 2.0 * out["ibot_loss"] + 0.3 * out["koleo_loss"]
    torch.testing.assert_close(out["loss"], expected)
    assert out["dino_loss"] > 0 and out["ibot_loss"] > 0
    assert out["teacher_temp"].item() == pytest.approx(teacher_temperature(3, 5, 0.04, 0.07))


def test_no_masked_patch_means_no_ibot_loss(method: FrancaMethod) -> None:
    method.zero_grad(set_to_none=True)
    out = method(_batch(method.config, mask_p=0.0), step=0)
    assert out["ibot_loss"].item() == 0.0
    out["loss"].backward()
    ibot_grads = [p.grad for p in method.student["ibot_head"].parameters()]
    assert all(g is None or g.abs().sum() == 0 for g in ibot_grads)


def test_teacher_starts_as_student_and_follows_by_ema() -> None:
    torch.manual_seed(2)
    method = FrancaMethod(_config(), STEPS_PER_EPOCH, total_steps=50).train()
    assert method.backbone() is method.teacher["backbone"]
    assert not method.teacher.training and method.student.training
    teacher_blocks = method.teacher["backbone"].blocks
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in teacher_blocks)
    pairs = list(zip(method.teacher.parameters(), method.student.parameters(), strict=True))
    assert all(torch.equal(t, s) for t, s in pairs)
    before = [t.detach().clone() for t, _ in pairs]
    with torch.no_grad():
        for _, s in pairs:
            s.add_(torch.randn_like(s))
    step = 20
    method.after_step(step)
    m = teacher_momentum(step, 50, 0.994, 1.0)
    for (t, s), t0 in zip(pairs, before, strict=True):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)


def test_schedules() -> None:
    assert teacher_momentum(0, 100, 0.994, 1.0) == pytest.approx(0.994)
    assert teacher_momentum(50, 100, 0.994, 1.0) == pytest.approx(0.997)
    assert teacher_momentum(100, 100, 0.994, 1.0) == 1.0
    assert teacher_temperature(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(29, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(1000, 30, 0.04, 0.07) == 0.07
    # Warm-up longer than the run is capped to the run: the last step reaches 0.07.
    method = FrancaMethod(_config("franca.teacher_temp_warmup_epochs=30"), 10, total_steps=20)
    assert method.teacher_temp(19) == pytest.approx(0.07)
    assert method.teacher_temp(10) == pytest.approx(0.04 + 0.03 * 10 / 19)
    assert math.isclose(method.momentum(0), 0.994)


@pytest.mark.parametrize("mask", ["block", "inverse_block", "cyclic"])
def test_view_spec_honours_the_mask_kind(mask: str) -> None:
    method = FrancaMethod(_config(f"views.mask={mask}"), STEPS_PER_EPOCH, total_steps=50)
    spec = method.view_spec
    assert (spec.kind, spec.mask) == ("multicrop", mask)  # a block-vs-cyclic ablation differs
    assert (spec.global_crops, spec.local_crops) == (2, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["views.global_crops=1"], "at least 2 global crops"),
        (["views.channels=3"], "in_chans"),
        (["views.mask=none"], "views.mask=none: Franca's iBOT loss predicts masked patches"),
        (["views.kind=pair"], "views.kind=pair: Franca trains on multi-crop views"),
    ],
)
def test_bad_config_is_a_one_line_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        FrancaMethod(_config(*overrides), STEPS_PER_EPOCH, total_steps=50)
    assert "\n" not in str(err.value)


def test_bad_batch_layout_is_an_error(method: FrancaMethod) -> None:
    batch = _batch(method.config)
    batch["masks"] = batch["masks"][:BATCH]
    with pytest.raises(ValueError, match="crop-major"):
        method(batch, step=0)


def test_vitg14_preset_builds_on_meta_device() -> None:
    config = load_config("franca_vitg14")
    with torch.device("meta"):
        method = FrancaMethod(config, steps_per_epoch=1000, total_steps=100_000)
    backbone = method.backbone()
    assert (backbone.embed_dim, len(backbone.blocks)) == (1536, 40)
    for head in ("dino_head", "ibot_head"):
        heads = method.student[head]
        assert heads.dims == [96, 192, 384, 768, 1536]
        assert heads.prototype_counts == [8192, 16384, 32768, 65536, 131072]
    assert method.view_spec.local_size == 98 and method.view_spec.mask == "cyclic"


def test_ema_math_and_low_precision_warning() -> None:
    from ray_ssl.models.ema import ema_update_

    torch.manual_seed(3)
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [
        0.9 * t.detach() + 0.1 * s.detach()
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True)
    ]
    ema_update_(teacher, student, 0.9)
    for got, want in zip(teacher.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want)
    with pytest.warns(RuntimeWarning, match="below the torch.bfloat16 resolution"):
        ema_update_(teacher.bfloat16(), student.bfloat16(), 0.994)

"""RASA math (ray_ssl.eval.rasa) on synthetic tokens with a planted position and class code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_ssl.config import RasaConfig
from ray_ssl.eval.rasa import (
    RasaError,
    apply_rasa,
    chance_position_mse,
    fit_rasa,
    grid_positions,
    held_out_position_mse,
    least_squares_position_mse,
    load_rasa_basis,
    orthonormalize,
    remove_subspace,
    save_rasa_basis,
    train_next_round_probe,
)

GRID, DIM, CLASSES = 6, 64, 4
# The synthetic tasks converge in ~100 steps at this rate (the paper's 2e-4 is tuned for millions
# of ViT tokens).
FAST = RasaConfig(rounds=3, epochs=8, batch_size=16, lr=0.05, probe_images=256)
STEPS_PER_ROUND = 120


class PlantedTokens:
    """Patch tokens = class code of the image + a linear code of the patch's (row, col) + noise.

    The codes are orthogonal: a regressor without bias must be blind to the class offsets, so a
    class code that overlapped the position code would leave that overlap behind as position.
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        codes = orthonormalize(torch.randn(CLASSES + 2, DIM, generator=self.generator))
        self.class_codes, self.position_code = 4.0 * codes[:CLASSES], 8.0 * codes[CLASSES:]

    def sample(self, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, CLASSES, (images,), generator=self.generator)
        position = (grid_positions(GRID) - 0.5) @ self.position_code  # [N, D]
        noise = 0.3 * torch.randn(images, GRID * GRID, DIM, generator=self.generator)
        return self.class_codes[labels][:, None] + position + noise, labels


def _class_accuracy(train: torch.Tensor, y_train, test: torch.Tensor, y_test) -> float:
    from sklearn.linear_model import LogisticRegression

    pooled = [t.mean(1).numpy() for t in (train, test)]
    classifier = LogisticRegression(max_iter=1000).fit(pooled[0], y_train.numpy())
    return float(classifier.score(pooled[1], y_test.numpy()))


@pytest.fixture(scope="module")
def planted_fit():
    tokens = PlantedTokens()
    fit = fit_rasa(lambda: tokens.sample(FAST.batch_size)[0], DIM, STEPS_PER_ROUND, FAST)
    return tokens, fit


def test_chance_is_the_variance_of_a_grid_coordinate() -> None:
    for grid in (2, 7, 16):
        coordinates = grid_positions(grid).numpy()
        assert np.allclose(coordinates.var(axis=0), chance_position_mse(grid))
        assert coordinates[1] == pytest.approx([0.0, 1 / (grid - 1)])  # row-major: (row 0, col 1)


def test_rasa_removes_a_planted_position_code_and_keeps_the_class_code(planted_fit) -> None:
    tokens, fit = planted_fit
    basis = fit.basis
    train, y_train = tokens.sample(FAST.probe_images)
    test, y_test = tokens.sample(FAST.probe_images)
    chance = chance_position_mse(GRID)
    # The reference's scores: round 1's regressor, and one more round's on the debiased tokens,
    # both on held-out tokens.
    before = held_out_position_mse(fit.first_regressor, test)
    probe = train_next_round_probe(
        lambda: tokens.sample(FAST.batch_size)[0], basis, STEPS_PER_ROUND, FAST
    )
    after = held_out_position_mse(probe, test, basis)
    assert before < 0.1 * chance  # the code is there and the probe finds it
    assert after >= 0.95 * chance
    linear_after = least_squares_position_mse(
        remove_subspace(train, basis), remove_subspace(test, basis)
    )
    assert linear_after >= 0.95 * chance  # no affine map finds it either
    assert _class_accuracy(train, y_train, test, y_test) > 0.95
    debiased = [remove_subspace(t, basis) for t in (train, test)]
    assert _class_accuracy(debiased[0], y_train, debiased[1], y_test) > 0.95
    assert fit.round_losses[0] < 0.1 * chance < 0.5 * chance < fit.round_losses[-1]


def test_the_basis_stays_orthonormal(planted_fit) -> None:
    _, fit = planted_fit
    assert fit.basis.shape == (2 * FAST.rounds, DIM)
    gram = fit.basis.double() @ fit.basis.double().T
    assert torch.allclose(gram, torch.eye(2 * FAST.rounds, dtype=torch.float64), atol=1e-5)


def test_orthonormalize_keeps_the_earlier_span_and_matches_the_reference_plane() -> None:
    generator = torch.Generator().manual_seed(1)
    earlier = orthonormalize(torch.randn(4, DIM, generator=generator))
    plane = torch.randn(2, DIM, generator=generator)
    grown = orthonormalize(torch.cat((earlier, plane)))
    assert torch.allclose(grown[:4].abs(), earlier.abs(), atol=1e-5)
    # One plane: valeoai/Franca decompose_pos_2D (normalise the row vector, Gram-Schmidt the
    # column vector against it, subtract both projections), written out independently.
    z = torch.randn(5, 9, DIM, generator=generator, dtype=torch.float64)
    u_r = plane[0].double() / plane[0].double().norm()
    u_c = plane[1].double() - (plane[1].double() @ u_r) * u_r
    u_c = u_c / u_c.norm()
    reference = z - (z @ u_r)[..., None] * u_r - (z @ u_c)[..., None] * u_c
    ours = remove_subspace(z, orthonormalize(plane.double()))
    assert torch.allclose(ours, reference, atol=1e-10)


def test_apply_leaves_prefix_tokens_untouched() -> None:
    generator = torch.Generator().manual_seed(2)
    basis = orthonormalize(torch.randn(4, DIM, generator=generator))
    tokens = torch.randn(3, 2 + GRID * GRID, DIM, generator=generator)  # CLS + 1 register
    out = apply_rasa(tokens, basis, num_prefix_tokens=2)
    assert torch.equal(out[:, :2], tokens[:, :2])
    assert torch.allclose(out[:, 2:] @ basis.T, torch.zeros(3, GRID * GRID, 4), atol=1e-5)
    projector = torch.eye(DIM) - basis.T @ basis
    assert torch.allclose(out[:, 2:], tokens[:, 2:] @ projector, atol=1e-5)


def test_least_squares_probe_matches_sklearn() -> None:
    from sklearn.linear_model import LinearRegression

    tokens = PlantedTokens(seed=3)
    train, _ = tokens.sample(40)
    test, _ = tokens.sample(20)
    ours = least_squares_position_mse(train, test)
    target = grid_positions(GRID).numpy()
    model = LinearRegression().fit(train.reshape(-1, DIM).numpy(), np.tile(target, (len(train), 1)))
    prediction = model.predict(test.reshape(-1, DIM).numpy())
    expected = float(((prediction - np.tile(target, (len(test), 1))) ** 2).mean())
    assert ours == pytest.approx(expected, rel=1e-4)


def test_basis_round_trip_and_bad_files(tmp_path: Path) -> None:
    basis = orthonormalize(torch.randn(6, DIM))
    path = str(tmp_path / "b.rasa.safetensors")
    save_rasa_basis(path, basis, {"rounds": 3, "grid": GRID})
    assert torch.equal(load_rasa_basis(path), basis)
    assert [p.name for p in tmp_path.iterdir()] == ["b.rasa.safetensors"]  # no temp left over
    with pytest.raises(RasaError, match="no RASA basis"):
        load_rasa_basis(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(RasaError, match="not a safetensors file"):
        load_rasa_basis(str(tmp_path / "junk.safetensors"))


def test_config_defaults_follow_the_reference_recipe() -> None:
    defaults = dataclasses.asdict(RasaConfig())
    expected = {"rounds": 9, "epochs": 5, "batch_size": 128, "lr": 2e-4, "min_lr": 0.0}
    assert {k: defaults[k] for k in expected} == expected
    assert defaults["weight_decay"] == 0.0

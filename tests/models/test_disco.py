"""Distance correlation and the DisCo loss term: its values, its gradient, its use in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

import models.particlenet_training as training
from models.anomaly import distance_correlation
from models.jet_inputs import jet_inputs
from models.particlenet import ParticleNetConfig
from models.particlenet_training import LabelledJets, TrainConfig, disco_penalty, train_tagger

torch.set_num_threads(1)


def _normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_independent_samples_give_almost_zero() -> None:
    assert float(distance_correlation(_normal(2000, 0), _normal(2000, 1))) < 0.01


@pytest.mark.parametrize("slope", [3.0, -0.5])
def test_a_linear_relation_gives_one(slope: float) -> None:
    x = _normal(300, 2)
    assert float(distance_correlation(x, slope * x + 7.0)) == pytest.approx(1.0, abs=1e-9)


def test_a_dependence_pearson_misses_is_seen() -> None:
    x = _normal(2000, 3)
    y = x**2
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.1
    assert float(distance_correlation(x, y)) > 0.15


def test_a_constant_sample_gives_zero_and_bad_shapes_are_refused() -> None:
    assert float(distance_correlation(torch.ones(10), torch.arange(10.0))) == 0.0
    with pytest.raises(ValueError, match="1-D"):
        distance_correlation(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="length"):
        distance_correlation(torch.ones(1), torch.ones(1))


def test_gradient_descent_on_dcor_removes_the_mass_dependence() -> None:
    mass, other = _normal(200, 4), _normal(200, 5)
    weights = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.SGD([weights], lr=0.5)
    for _ in range(60):
        optimiser.zero_grad()
        distance_correlation(weights[0] * mass + weights[1] * other, mass).backward()
        optimiser.step()
    score = weights[0] * mass + weights[1] * other
    assert float(distance_correlation(score.detach(), mass)) < 0.02


def test_penalty_uses_background_jets_only() -> None:
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    mass = torch.tensor([10.0, 20.0, 30.0, 40.0])
    background = torch.tensor([True, True, True, False])
    # −max softmax rises with mass on the three background jets: a monotone relation.
    assert float(disco_penalty(logits, mass, background, "max_softmax")) > 0.9
    assert float(disco_penalty(logits, mass, torch.tensor([True, False] * 2), "entropy")) == 1.0
    # the anti-QCD log-odds (0 - logit_0) falls linearly with mass on the background jets
    assert float(disco_penalty(logits, mass, background, "anti_qcd")) > 0.99
    one = torch.tensor([True, False, False, False])
    assert float(disco_penalty(logits, mass, one, "entropy")) == 0.0


def test_config_refuses_a_negative_weight_and_a_mahalanobis_target() -> None:
    with pytest.raises(pydantic.ValidationError):
        TrainConfig(disco_lambda=-0.1)
    with pytest.raises(pydantic.ValidationError):
        TrainConfig(disco_lambda=1.0, disco_score="mahalanobis")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="DisCo needs random batches"):
        TrainConfig(disco_lambda=1.0, batch_order="multiplicity")


def _toy_jets(n_per_class: int = 24) -> LabelledJets:
    rng = np.random.default_rng(0)
    n, p = 2 * n_per_class, 12
    pt = rng.exponential(50.0, (n, p)) + 1.0
    eta, phi = rng.normal(0, 0.3, (n, p)), rng.normal(0, 0.3, (n, p))
    constituents = np.stack([pt, eta, phi, pt * np.cosh(eta)], axis=-1).astype(np.float32)
    labels = np.repeat(np.arange(2), n_per_class)
    return LabelledJets(jet_inputs(constituents, n_particles=p), labels, ("qcd", "sig"))


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_training_adds_the_term_only_when_weighted(
    monkeypatch: pytest.MonkeyPatch, weight: float
) -> None:
    seen: list[float] = []

    def spy(
        logits: torch.Tensor, mass: torch.Tensor, background: torch.Tensor, score: str
    ) -> torch.Tensor:
        value = disco_penalty(logits, mass, background, score)
        seen.append(float(value.detach()))
        assert value.requires_grad  # the term reaches the weights through the loss
        return value

    monkeypatch.setattr(training, "disco_penalty", spy)
    architecture = ParticleNetConfig(
        name="toy", k=3, conv_channels=((8, 8, 8),), fc_channels=8, n_particles=12
    )
    config = TrainConfig(
        epochs=1, batch_size=40, val_fraction=0.0, test_fraction=0.0, disco_lambda=weight
    )
    train_tagger(_toy_jets(), architecture, config)
    assert bool(seen) == (weight > 0)  # one call per batch when on, none when off
    assert all(0.0 <= v <= 1.0 for v in seen)


def test_cli_takes_the_weight_and_refuses_a_negative_one(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deploy.cli import main

    data = tmp_path / "x.npz"
    data.write_bytes(b"")
    args = ["hlt", "train", "--data", str(data), "--out", str(tmp_path / "m")]
    result = CliRunner().invoke(main, [*args, "--disco", "-1"])
    assert result.exit_code == 2 and "--disco" in result.output
    result = CliRunner().invoke(main, [*args, "--disco-score", "mahalanobis"])
    assert result.exit_code == 2 and "--disco-score" in result.output

"""ParticleNet: shapes, masking, invariances, inputs, anomaly scores, checkpoints, training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.anomaly import (
    Mahalanobis,
    anomaly_score,
    entropy_score,
    mass_decorrelated_indices,
    max_softmax_score,
)
from models.checkpoint import load_checkpoint, save_checkpoint
from models.jet_inputs import constituents_from_eta_phi_pt, jet_inputs
from models.particlenet import (
    PARTICLENET,
    PARTICLENET_LITE,
    EdgeConv,
    ParticleNet,
    ParticleNetConfig,
    _Affine,
    knn,
)
from models.particlenet_training import TrainConfig, load_labelled_jets, train_tagger
from tests.conftest import shared_data

torch.set_num_threads(1)

VARIANTS = [PARTICLENET_LITE, PARTICLENET]


def random_jets(
    n_real: list[int], width: int, seed: int = 0, garbage: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel-last random inputs; padded slots hold garbage unless told otherwise."""
    gen = torch.Generator().manual_seed(seed)
    n = len(n_real)
    points = torch.randn(n, width, 2, generator=gen)
    features = torch.randn(n, width, 7, generator=gen)
    mask = torch.arange(width).expand(n, width) < torch.tensor(n_real).view(-1, 1)
    if not garbage:
        points = points * mask.unsqueeze(-1)
        features = features * mask.unsqueeze(-1)
    return points, features, mask


def trained_like(config: ParticleNetConfig, seed: int = 0) -> ParticleNet:
    """A model in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = ParticleNet(config)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(*random_jets([12, 30, 5, 2], 30, seed=seed + 1))
    return model.eval()


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: c.name)
def test_shapes_and_gradients(config: ParticleNetConfig) -> None:
    model = ParticleNet(config.with_classes(3))
    points, features, mask = random_jets([1, 7, 20, 33], 40)
    logits, embedding = model.forward_with_embedding(points, features, mask)
    assert logits.shape == (4, 3) and embedding.shape == (4, config.fc_channels)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_padding_is_never_a_neighbour() -> None:
    points, _, mask = random_jets([3, 10, 1, 40], 40, seed=3)
    for k in (7, 16):
        index, valid = knn(points, mask, k)
        owner = torch.arange(40).view(1, 40, 1).expand_as(index)
        neighbour_real = torch.gather(mask, 1, index.reshape(4, -1)).view_as(index)
        assert neighbour_real[valid].all()
        assert (index[valid] != owner[valid]).all()
        real_counts = mask.sum(1)
        for jet in range(4):
            n = int(real_counts[jet])
            per_real = valid[jet, :n].sum(-1)
            assert (per_real == min(k, n - 1)).all()


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: c.name)
def test_output_does_not_depend_on_padding(config: ParticleNetConfig) -> None:
    model = trained_like(config)
    n_real = [1, 2, 5, 9, 17, 25]
    short = random_jets(n_real, 25, seed=5)
    long = random_jets(n_real, 90, seed=5)
    # The same real particles, different padding width and different garbage in it.
    long[0][:, :25], long[1][:, :25] = short[0], short[1]
    with torch.no_grad():
        a, b = model(*short), model(*long)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: c.name)
def test_permutation_invariance(config: ParticleNetConfig) -> None:
    model = trained_like(config, seed=2)
    points, features, mask = random_jets([4, 30, 11], 30, seed=9)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(points, features, mask)
        b = model(points[:, perm], features[:, perm], mask[:, perm])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_jet_inputs_match_hand_computation() -> None:
    # Two massless particles symmetric in phi around 0 at eta = 0: the axis is (0, 0).
    pt, phi = np.array([30.0, 10.0]), np.array([0.1, -0.3])
    constituents = np.zeros((1, 3, 4), np.float32)
    constituents[0, :2, 0], constituents[0, :2, 2], constituents[0, :2, 3] = pt, phi, pt
    inputs = jet_inputs(constituents, np.array([2]), n_particles=5)
    assert inputs.features.shape == (1, 5, 7) and inputs.mask.tolist() == [[1, 1, 0, 0, 0]]
    px, py = (pt * np.cos(phi)).sum(), (pt * np.sin(phi)).sum()
    jet_pt, jet_phi = np.hypot(px, py), np.arctan2(py, px)
    f = inputs.features[0, 0]
    np.testing.assert_allclose(f[0], np.log(30.0), rtol=1e-6)
    np.testing.assert_allclose(f[2], np.log(30.0 / jet_pt), rtol=1e-5)
    np.testing.assert_allclose(f[3], np.log(30.0 / 40.0), rtol=1e-5)
    np.testing.assert_allclose(f[6], 0.1 - jet_phi, atol=1e-6)
    np.testing.assert_allclose(f[4], abs(0.1 - jet_phi), atol=1e-6)
    assert (inputs.features[0, 2:] == 0).all() and (inputs.points[0, 2:] == 0).all()
    np.testing.assert_allclose(inputs.jet[0, 0], jet_pt, rtol=1e-5)
    # n_constituents masks a particle even when its pT is positive.
    assert jet_inputs(constituents, np.array([1])).mask[0].sum() == 1


def test_phi_wraps_and_tau_layout_is_massless() -> None:
    eta_phi_pt = np.array([[[0.5, 3.1, 20.0], [0.4, -3.1, 10.0], [0, 0, 0]]], np.float32)
    constituents = constituents_from_eta_phi_pt(eta_phi_pt)
    np.testing.assert_allclose(constituents[0, 0, 3], 20.0 * np.cosh(0.5), rtol=1e-6)
    inputs = jet_inputs(constituents)
    assert np.abs(inputs.features[0, :2, 6]).max() < 0.2  # across the ±π seam
    d_phi = 2 * np.pi - 6.2
    mass = np.sqrt(2 * 20.0 * 10.0 * (np.cosh(0.1) - np.cos(d_phi)))  # two massless particles
    np.testing.assert_allclose(inputs.jet[0, 3], mass, rtol=1e-3)
    with pytest.raises(ValueError, match="eta, phi, pT"):
        constituents_from_eta_phi_pt(np.zeros((2, 3)))


def test_softmax_scores() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    confident, flat = max_softmax_score(logits).tolist()
    assert confident < -0.99 and flat == pytest.approx(-1 / 3)
    entropy = entropy_score(logits)
    assert entropy[0] < 0.01 and entropy[1] == pytest.approx(np.log(3))
    # confidently QCD (class 0): very negative; confidently another class: very positive
    odds = anomaly_score("anti_qcd", torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]), logits)
    assert odds[0] == pytest.approx(np.log(2) - 10, abs=1e-4) and odds[1] > 9.9
    with pytest.raises(ValueError, match="unknown anomaly score"):
        anomaly_score("nope", logits, logits)


def test_mahalanobis_flags_points_far_from_every_class() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    labels = torch.arange(2).repeat_interleave(500)
    x = centres[labels] + torch.randn(1000, 3, generator=gen) * torch.tensor([1.0, 0.1, 0.1])
    scorer = Mahalanobis(2, 3)
    with pytest.raises(RuntimeError, match="not been fitted"):
        scorer.score(x)
    scorer.fit(x, labels)
    torch.testing.assert_close(scorer.means, centres, atol=0.15, rtol=0)
    inliers = scorer.score(centres + torch.tensor([0.5, 0.0, 0.0]))
    # 1 unit off-axis is 10 sigma in a narrow direction: far more anomalous than 0.5 along x.
    outliers = scorer.score(centres + torch.tensor([0.0, 1.0, 0.0]))
    assert (outliers > 20 * inliers).all()


def test_mass_resampling_gives_every_class_the_same_histogram() -> None:
    rng = np.random.default_rng(0)
    mass = np.r_[rng.normal(80, 20, 4000), rng.normal(170, 30, 3000)]
    labels = np.r_[np.zeros(4000, int), np.ones(3000, int)]
    rows = mass_decorrelated_indices(mass, labels, bins=np.linspace(0, 300, 16), seed=1)
    assert np.bincount(labels[rows]).tolist() == [4000, 3000]
    edges = np.linspace(0, 300, 16)
    h0 = np.histogram(mass[rows][labels[rows] == 0], edges)[0] / 4000
    h1 = np.histogram(mass[rows][labels[rows] == 1], edges)[0] / 3000
    before = np.abs(
        np.histogram(mass[:4000], edges)[0] / 4000 - np.histogram(mass[4000:], edges)[0] / 3000
    ).sum()
    assert np.abs(h0 - h1).sum() < 0.15 < before


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = trained_like(PARTICLENET_LITE.with_classes(3), seed=4)
    scorer = Mahalanobis(3, model.config.fc_channels)
    scorer.fit(torch.randn(60, model.config.fc_channels), torch.arange(3).repeat(20))
    save_checkpoint(tmp_path, model, scorer, ("qcd", "w", "top"), {"note": "test"})
    loaded = load_checkpoint(tmp_path)
    assert loaded.classes == ("qcd", "w", "top") and loaded.card["note"] == "test"
    points, features, mask = random_jets([3, 12], 12)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(points, features, mask), model(points, features, mask)
        )
    torch.testing.assert_close(loaded.mahalanobis.precision, scorer.precision)
    assert not loaded.model.training


class _Payload:
    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (print, ("this must never run",))


def test_loading_refuses_pickled_code(tmp_path: Path) -> None:
    model = ParticleNet(PARTICLENET_LITE)
    save_checkpoint(tmp_path, model, Mahalanobis(2, 128), ("a", "b"), {})
    torch.save({"model": _Payload(), "mahalanobis": {}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt holds objects other than tensors") as info:
        load_checkpoint(tmp_path)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"lacks model\.json"):
        load_checkpoint(tmp_path / "missing")


def test_a_truncated_or_garbled_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, ParticleNet(PARTICLENET_LITE), Mahalanobis(2, 128), ("a", "b"), {})
    weights = tmp_path / "model.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.pt is not a readable torch file") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.json is not a readable model card"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("n_classes", 1, "n_classes"),
        ("n_features", 0, "n_features"),
        ("n_coordinates", 0, "n_coordinates"),
        ("n_particles", 0, "n_particles"),
        ("k", 0, "k"),
        ("fc_channels", 0, "fc_channels"),
        ("dropout", 1.0, "dropout"),
        ("dropout", -0.1, "dropout"),
        ("conv_channels", (), "conv_channels"),
        ("conv_channels", ((8, 8), ()), "conv_channels.1"),
        ("conv_channels", ((8, 0),), "conv_channels.0.1"),
    ],
)
def test_bad_configs_name_the_field(key: str, value: Any, where: str) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{where}$"):
        ParticleNetConfig(**{key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("batch_size", 1),
        ("val_fraction", 1.0),
        ("val_fraction", -0.1),
        ("test_fraction", 1.0),
    ],
)
def test_bad_train_configs_name_the_field(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{key}$"):
        TrainConfig(**{key: value})


def test_a_train_config_leaves_jets_to_train_on() -> None:
    with pytest.raises(ValueError, match="must leave >= 10% for training"):
        TrainConfig(val_fraction=0.5, test_fraction=0.4)


def test_a_model_card_rebuilds_its_config() -> None:
    card = json.loads(json.dumps(PARTICLENET_LITE.to_dict()))  # lists, as in model.json
    assert ParticleNetConfig(**card) == PARTICLENET_LITE


@pytest.mark.slow
def test_short_training_on_tau_vs_qcd_separates_taus() -> None:
    path = shared_data("tau-vs-qcd", "tau_vs_qcd_constituents.npz")
    data = load_labelled_jets([path], ("qcd", "tau"), max_per_class=2000, seed=3)
    assert data.counts() == {"qcd": 2000, "tau": 2000}
    result = train_tagger(
        data, PARTICLENET_LITE, TrainConfig(epochs=2, batch_size=128, seed=3, mahalanobis_jets=2000)
    )
    assert result.test["per_class"]["tau"]["auc"] > 0.9
    assert len(result.history) == 2 and result.tagger.mahalanobis.fitted


def _bn(norm: torch.nn.BatchNorm1d, y: torch.Tensor) -> torch.Tensor:
    assert norm.running_mean is not None and norm.running_var is not None, "tracks its stats"
    return (y - norm.running_mean) / torch.sqrt(
        norm.running_var + norm.eps
    ) * norm.weight + norm.bias


def test_edgeconv_matches_a_per_jet_reference() -> None:
    """The packed, folded block equals EdgeConv written out jet by jet from the paper."""
    model = trained_like(PARTICLENET_LITE, seed=6)
    block = model.blocks[0]
    assert isinstance(block, EdgeConv)
    points, features, mask = random_jets([1, 4, 9, 15], 15, seed=8)
    with torch.no_grad():
        out = block(points, features, mask)
        for jet in range(4):
            n = int(mask[jet].sum())
            pts, x = points[jet, :n], features[jet, :n]
            w_a = block.center.weight + block.neighbour.weight  # acts on x_i
            w_b = block.neighbour.weight  # acts on x_j - x_i
            for i in range(n):
                d = ((pts - pts[i]) ** 2).sum(1)
                d[i] = float("inf")
                nbrs = torch.argsort(d)[: min(block.k, n - 1)]
                pooled = torch.zeros(block.shortcut.linear.out_features)
                if len(nbrs):
                    h = x[i] @ w_a.T + (x[nbrs] - x[i]) @ w_b.T
                    h = torch.relu(_bn(block.first_norm, h))
                    for layer in block.layers:
                        assert isinstance(layer, _Affine)
                        h = torch.relu(_bn(layer.norm, h @ layer.linear.weight.T))
                    pooled = h.mean(0)
                short = _bn(block.shortcut.norm, x[i] @ block.shortcut.linear.weight.T)
                torch.testing.assert_close(
                    out[jet, i], torch.relu(pooled + short), atol=1e-4, rtol=1e-4
                )
            assert (out[jet, n:] == 0).all()

"""The conditional flow and the mixture: physical-unit densities that integrate to one,
sampling that matches the density, and parameters that round-trip."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.flows import ConditionalFlow, FlowConfig, FlowMixture, Preprocessing

torch.set_num_threads(1)


def small_flow(
    seed: int, lower=(10.0, -2.0), upper=(50.0, 3.0), n_members: int = 1
) -> ConditionalFlow:
    torch.manual_seed(seed)
    config = FlowConfig(
        n_features=2, n_transforms=2, hidden_features=16, n_bins=6, n_members=n_members
    )
    flow = ConditionalFlow(config, Preprocessing.from_bounds(lower, upper))
    with torch.no_grad():  # move away from the near-identity initialisation
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


def grid_integral(log_density, lower, upper, mjj: float, n: int = 1200) -> float:
    xs = [
        np.linspace(lo, hi, n + 1)[:-1] + (hi - lo) / n / 2
        for lo, hi in zip(lower, upper, strict=True)
    ]
    mesh = np.stack(np.meshgrid(*xs, indexing="ij"), axis=-1).reshape(-1, 2)
    cell = np.prod([(hi - lo) / n for lo, hi in zip(lower, upper, strict=True)])
    return float(np.exp(log_density(mesh, np.full(len(mesh), mjj))).sum() * cell)


@pytest.mark.slow
@pytest.mark.parametrize("mjj", [2500.0, 3500.0])
def test_flow_density_is_normalised_in_physical_units(mjj: float) -> None:
    flow = small_flow(0)
    assert grid_integral(flow.log_prob, (10.0, -2.0), (50.0, 3.0), mjj) == pytest.approx(
        1, abs=0.02
    )


def test_an_ensemble_density_is_the_average_of_its_members() -> None:
    ensemble = small_flow(7, n_members=3)
    x, m = np.array([[20.0, 0.1], [40.0, -1.5]]), np.full(2, 3400.0)
    z, log_jac = ensemble.preprocessing.forward(torch.tensor(x, dtype=torch.float32))
    context = ensemble.preprocessing.context(m)
    with torch.no_grad():
        members = np.stack(
            [
                (maf.log_prob(z, context=context) + log_jac).numpy()
                for maf in ensemble.nflows_members()
            ]
        )
    assert np.ptp(members, axis=0).min() > 1e-3  # the members differ
    expected = np.log(np.exp(members.astype(np.float64)).mean(axis=0))
    np.testing.assert_allclose(ensemble.log_prob(x, m), expected, rtol=1e-5)


def test_density_is_zero_outside_the_bounds() -> None:
    flow = small_flow(0)
    out = flow.log_prob(np.array([[5.0, 0.0], [20.0, 4.0], [20.0, 0.0]]), np.full(3, 3500.0))
    assert np.isneginf(out[:2]).all() and np.isfinite(out[2])


@pytest.mark.slow
def test_mixture_is_normalised_and_weighted_by_events() -> None:
    a, b = small_flow(1), small_flow(2, lower=(0.0, -3.0), upper=(40.0, 2.0))
    mixture = FlowMixture([a, b], weights=[3000, 1000])
    assert mixture.weights == pytest.approx([0.75, 0.25])
    total = grid_integral(mixture.log_prob, (0.0, -3.0), (50.0, 3.0), 3000.0)
    assert total == pytest.approx(1, abs=0.02)
    x = np.array([[20.0, 0.5]])
    m = np.array([3000.0])
    expected = np.log(0.75 * np.exp(a.log_prob(x, m)) + 0.25 * np.exp(b.log_prob(x, m)))
    assert mixture.log_prob(x, m) == pytest.approx(expected, rel=1e-9)


def test_mixture_density_is_zero_where_every_flow_is_zero() -> None:
    a, b = small_flow(1), small_flow(2, lower=(0.0, -3.0), upper=(40.0, 2.0))
    mixture = FlowMixture([a, b], weights=[1, 0])  # b carries no weight
    x = np.array([[60.0, 0.0], [35.0, -2.5], [20.0, 0.5]])  # outside both; inside b only; both
    out = mixture.log_prob(x, np.full(3, 3000.0))
    assert np.isneginf(out[:2]).all()
    assert out[2] == pytest.approx(a.log_prob(x[2:], np.array([3000.0]))[0], rel=1e-12)


def test_seeded_sampling_leaves_the_global_generator_alone() -> None:
    flow = small_flow(4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    flow.sample(np.full(10, 3500.0), seed=7)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(123)
    flow.sample(np.full(10, 3500.0))  # unseeded: draws from the global generator
    assert not torch.equal(torch.rand(3), expected)


def test_mixture_sampling_matches_its_density() -> None:
    """Importance check: E_q[p/q] = 1 with q = samples' own histogram is weak; instead the
    histogram of samples must match the density integrated over each bin."""
    mixture = FlowMixture([small_flow(1), small_flow(3)], weights=[1, 2])
    n = 20_000
    samples = mixture.sample(np.full(n, 3200.0), seed=5)
    edges = np.linspace(10, 50, 9)
    counts, _ = np.histogram(samples[:, 0], edges)
    # Density marginal over x1 per bin, on a fine grid.
    grid = np.linspace(10, 50, 161)[:-1] + 0.125
    y = np.linspace(-2, 3, 201)[:-1] + 0.0125
    mesh = np.stack(np.meshgrid(grid, y, indexing="ij"), -1).reshape(-1, 2)
    p = np.exp(mixture.log_prob(mesh, np.full(len(mesh), 3200.0))).reshape(160, 200)
    marginal = p.sum(axis=1) * 0.025 * 0.25
    expected = marginal.reshape(8, 20).sum(axis=1) * n
    # The densities can peak steeply at the lower bound, where a grid is unreliable: the
    # first bin takes what the others leave (normalisation is tested on its own above).
    expected[0] = n - expected[1:].sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30, (counts, expected.round())  # 8 bins: chi2 ~ 8 +- 4 when right


def test_an_ensemble_samples_each_member_in_equal_shares() -> None:
    ensemble = small_flow(8, n_members=2)
    n = 20_000
    drawn = ensemble.sample(np.full(n, 3300.0), seed=2)
    pooled = []
    for member in range(2):
        alone = ConditionalFlow(replace(ensemble.config, n_members=1), ensemble.preprocessing)
        prefix = f"{member}."
        alone.load_parameter_arrays(
            {
                "0." + name.removeprefix(prefix): value
                for name, value in ensemble.parameter_arrays().items()
                if name.startswith(prefix)
            }
        )
        pooled.append(alone.sample(np.full(n // 2, 3300.0), seed=10 + member))
    edges = np.quantile(np.concatenate(pooled)[:, 0], np.linspace(0, 1, 9))
    edges[0], edges[-1] = -np.inf, np.inf
    a = np.histogram(drawn[:, 0], edges)[0]
    b = np.histogram(np.concatenate(pooled)[:, 0], edges)[0]
    chi2 = ((a - b) ** 2 / (a + b)).sum()
    assert chi2 < 30, (a, b)  # two samples, 8 bins: chi2 ~ 8 +- 4 when they agree


def test_samples_lie_inside_the_bounds_and_are_reproducible() -> None:
    flow = small_flow(4)
    first = flow.sample(np.full(500, 3500.0), seed=3)
    again = flow.sample(np.full(500, 3500.0), seed=3)
    np.testing.assert_array_equal(first, again)
    assert flow.preprocessing.inside(first).all()


def test_calibrated_preprocessing_jacobian_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    pre = Preprocessing.calibrate(rng.normal(size=(1000, 2)) * [10, 1] + [100, 0])
    x = torch.tensor([[100.0, 0.2], [95.0, -1.0]], dtype=torch.float64)
    _, log_jac = pre.forward(x)
    eps = 1e-6
    for row in range(2):
        det = 1.0
        for j in range(2):
            shifted = x.clone()
            shifted[row, j] += eps
            det *= float((pre.forward(shifted)[0][row, j] - pre.forward(x)[0][row, j]) / eps)
        assert float(log_jac[row]) == pytest.approx(np.log(det), abs=1e-4)


def test_parameters_round_trip_exactly() -> None:
    flow, other = small_flow(5, n_members=2), small_flow(6, n_members=2)
    other.load_parameter_arrays(flow.parameter_arrays())
    x, m = np.array([[20.0, 0.1]]), np.array([3500.0])
    assert other.log_prob(x, m) == flow.log_prob(x, m)
    with pytest.raises(ValueError, match="names differ"):
        other.load_parameter_arrays({"nope": np.zeros(1, "f4")})


def calibrated_flow(seed: int) -> ConditionalFlow:
    """A 4-feature ensemble with calibrated (not float32-representable) preprocessing."""
    rng = np.random.default_rng(seed)
    sample = rng.normal(size=(500, 4)) * [50, 30, 0.2, 0.2] + [300, 100, 0.5, 0.5]
    torch.manual_seed(seed)
    config = FlowConfig(n_transforms=2, hidden_features=16, n_members=2)
    flow = ConditionalFlow(config, Preprocessing.calibrate(sample, mjj_shift_gev=3333.3))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


def test_the_state_dict_holds_the_preprocessing_and_round_trips_the_density() -> None:
    """Through torch.save, a flow built (and used) with other bounds takes the preprocessing,
    the densities and the samples of the saved one, bit for bit."""
    flow = calibrated_flow(7)
    state = flow.state_dict()
    pre = {k: v for k, v in state.items() if k.startswith("pre.")}
    assert {k: v.dtype for k, v in pre.items()} == {
        f"pre.{name}": torch.float64 for name in ("lower", "upper", "mean", "std", "mjj")
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 4)) * [50, 30, 0.2, 0.2] + [300, 100, 0.5, 0.5]
    m = rng.uniform(2000, 6000, 300)
    fresh = ConditionalFlow(flow.config, Preprocessing.from_bounds([0] * 4, [1] * 4))
    fresh.sample(m, seed=2)
    assert not np.isfinite(fresh.log_prob(x, m)).any()  # outside its bounds
    fresh.load_state_dict(torch.load(buffer))
    for name, array in flow.preprocessing.arrays().items():
        assert fresh.preprocessing.arrays()[name].tobytes() == array.tobytes(), name
    np.testing.assert_array_equal(fresh.log_prob(x, m), flow.log_prob(x, m))
    np.testing.assert_array_equal(fresh.sample(m, seed=2), flow.sample(m, seed=2))


def _cast_per_call(
    pre: Preprocessing, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preprocessing as computed before it was buffers: each float64 array (the width
    taken in float64) cast to x's dtype per call. z, log|dz/dx| and x from z again."""

    def cast(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array)).to(x.dtype)

    lower, width, mean, std = map(cast, (pre.lower, pre.upper - pre.lower, pre.mean, pre.std))
    u = ((x - lower) / width).clamp(1e-6, 1 - 1e-6)
    z = (torch.log(u) - torch.log1p(-u) - mean) / std
    log_jac = -(torch.log(width) + torch.log(u) + torch.log1p(-u) + torch.log(std))
    return z, log_jac.sum(dim=1), lower + width * torch.sigmoid(z * std + mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_buffers_compute_exactly_as_the_arrays_did(dtype: torch.dtype) -> None:
    """Same bits as the per-call cast of the float64 arrays, in float32 (training) and
    float64 (sampling); and the test tells apart float32 storage, whose width differs."""
    flow = calibrated_flow(9)
    pre = flow.preprocessing
    rng = np.random.default_rng(10)
    physical = rng.normal(size=(400, 4)) * [50, 30, 0.2, 0.2] + [300, 100, 0.5, 0.5]
    x = torch.from_numpy(physical).to(dtype)
    z, log_jac, back = _cast_per_call(pre, x)
    ours_z, ours_log_jac = flow.pre.forward(x)
    assert ours_z.dtype == ours_log_jac.dtype == dtype
    assert torch.equal(ours_z, z) and torch.equal(ours_log_jac, log_jac)
    assert torch.equal(flow.pre.inverse(z), back)
    m = rng.uniform(2000, 6000, 400)
    context = flow.pre.context(m)
    expected = torch.from_numpy(((m.astype(np.float32) - np.float32(3333.3)) / 1000)[:, None])
    assert torch.equal(context, expected)
    if dtype == torch.float32:
        with torch.no_grad():
            members = flow.maf.log_prob(z, context)
        log_p = (torch.logsumexp(members, 0) - np.log(len(members)) + log_jac).double().numpy()
        log_p[~pre.inside(x.double().numpy())] = -np.inf
        np.testing.assert_allclose(flow.log_prob(x.double().numpy(), m), log_p, rtol=1e-6)
        lower32, upper32 = pre.lower.astype(np.float32), pre.upper.astype(np.float32)
        stored32 = Preprocessing(lower32, upper32, pre.mean, pre.std)
        assert not torch.equal(_cast_per_call(stored32, x)[0], z)


@pytest.mark.parametrize(
    "key", ["n_features", "n_transforms", "hidden_features", "n_blocks", "n_bins", "n_members"]
)
def test_a_flow_config_needs_positive_sizes(key: str) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{key}$"):
        FlowConfig(**{key: 0})
    with pytest.raises(ValueError, match=r"(?m)^tail_bound$"):
        FlowConfig(tail_bound=0.0)
    assert FlowConfig.from_json(FlowConfig(n_bins=3).to_json()) == FlowConfig(n_bins=3)

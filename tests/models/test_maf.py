"""The batched MAF ensemble against nflows, the reference: the same parameters give the same
per-event density (on LHCO events and at the spline's edges), the same gradients, and the
same sampling distribution; snapshots written with the nflows modules still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from models import spline_kernel
from models.flows import FEATURE_INDICES, MJJ_INDEX, ConditionalFlow, FlowConfig, Preprocessing
from models.maf import rq_spline
from models.online import OnlineConfig, OnlineFlow
from models.snapshot import FlowSnapshot

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1] / "data"
LHCO = Path(__file__).resolve().parents[3] / "shared" / "data" / "lhco-rnd-100k"
CONFIG = FlowConfig(n_transforms=3, hidden_features=16, n_members=3)


def reference_log_prob(flow: ConditionalFlow, x: np.ndarray, mjj: np.ndarray) -> np.ndarray:
    """log p(x|mjj) from the nflows members (log-mean-exp), in physical units."""
    z, log_jac = flow.preprocessing.forward(torch.from_numpy(x.astype(np.float32)))
    context = flow.preprocessing.context(mjj)
    with torch.no_grad():
        terms = torch.stack([maf.log_prob(z, context=context) for maf in flow.nflows_members()])
    return (torch.logsumexp(terms.double(), 0) - np.log(len(terms)) + log_jac.double()).numpy()


def lhco_features(n: int) -> np.ndarray:
    if not LHCO.is_dir():
        pytest.skip("shared LHCO data not present")
    from simulator.lhco_features import read_lhco_features

    batch = next(read_lhco_features([LHCO / "scalars_bkg02.h5"], chunk_size=n))
    return batch["features"].astype(np.float64)


@pytest.fixture(scope="module")
def trained() -> ConditionalFlow:
    """A flow trained briefly on LHCO events, so its splines are far from the identity."""
    features = lhco_features(6000)
    online = OnlineFlow(
        OnlineConfig(
            n_transforms=CONFIG.n_transforms,
            hidden_features=CONFIG.hidden_features,
            n_members=CONFIG.n_members,
            batch_size=64,
            buffer_size=256,
            calibration_events=2000,
            learning_rate=5e-3,
        )
    )
    online.learn(features[:5000])
    online.finish()
    return online.trainers["all"].estimate


def test_density_matches_nflows_on_lhco_events(trained: ConditionalFlow) -> None:
    rows = lhco_features(6000)[5000:]
    x, mjj = rows[:, FEATURE_INDICES], rows[:, MJJ_INDEX]
    ours = trained.log_prob(x, mjj)
    inside = np.isfinite(ours)
    assert inside.mean() > 0.95
    np.testing.assert_allclose(ours[inside], reference_log_prob(trained, x, mjj)[inside], atol=1e-4)


def test_density_matches_nflows_at_the_edges() -> None:
    """Tails (identity outside ±tail_bound), exactly on the bound, knots and far tails."""
    torch.manual_seed(3)
    flow = ConditionalFlow(CONFIG, Preprocessing.from_bounds([0] * 4, [1] * 4))
    with torch.no_grad():
        for p in flow.maf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    bound = CONFIG.tail_bound
    z = torch.tensor(
        [[bound] * 4, [-bound] * 4, [bound * 1.5, -bound * 3, 0.0, 0.1], [0.0] * 4]
        + [[v, -v, v / 2, 0.3] for v in np.linspace(-bound * 1.2, bound * 1.2, 97)],
        dtype=torch.float32,
    )
    context = torch.linspace(-3, 3, len(z))[:, None]
    with torch.no_grad():
        ours = flow.maf.log_prob(z, context)
        theirs = torch.stack([m.log_prob(z, context=context) for m in flow.nflows_members()])
    # float32 resolves ~1e-5 relative: the far-tail rows reach log p ≈ -130
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-4, rtol=1e-5)


def test_gradients_match_nflows(trained: ConditionalFlow) -> None:
    """The hand-written spline backward gives nflows' autograd gradients."""
    rows = lhco_features(6000)[5000:5512]
    x, mjj = rows[:, FEATURE_INDICES], rows[:, MJJ_INDEX]
    z, _ = trained.preprocessing.forward(torch.from_numpy(x.astype(np.float32)))
    z[:8] = torch.tensor([CONFIG.tail_bound * 1.1, -CONFIG.tail_bound, 0.0, 5.0])  # tails
    context = trained.preprocessing.context(mjj)
    trained.maf.zero_grad()
    (-trained.maf.log_prob(z, context).mean(1).sum()).backward()
    ours = {n: p.grad.clone() for n, p in trained.maf.named_parameters() if p.grad is not None}
    ours_arrays = _as_nflows(trained, ours)
    members = trained.nflows_members()
    loss = -torch.stack([m.log_prob(z, context=context).mean() for m in members]).sum()
    loss.backward()
    params = torch.nn.ModuleList(members).named_parameters()
    for name, param in params:
        assert param.grad is not None
        expected = param.grad.numpy()
        scale = max(float(np.abs(expected).max()), 1e-3)
        np.testing.assert_allclose(ours_arrays[name], expected, atol=2e-4 * scale, err_msg=name)


def _as_nflows(flow: ConditionalFlow, grads: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Gradients in nflows' names and layout (through a scratch copy of the module)."""
    scratch = ConditionalFlow(flow.config, flow.preprocessing)
    with torch.no_grad():
        for name, param in scratch.maf.named_parameters():
            param.copy_(grads[name])
    return scratch.parameter_arrays()


def test_sampling_matches_nflows_and_the_test_can_fail(trained: ConditionalFlow) -> None:
    n = 20_000
    mjj = np.full(n, 3500.0)
    ours = trained.sample(mjj, seed=1)
    context = trained.preprocessing.context(mjj)
    torch.manual_seed(2)
    which = torch.randint(CONFIG.n_members, (n,))
    theirs = np.empty_like(ours)
    with torch.no_grad():
        for member, maf in enumerate(trained.nflows_members()):
            rows = (which == member).numpy()
            z = maf.sample(1, context=context[rows]).reshape(int(rows.sum()), -1)
            theirs[rows] = trained.preprocessing.inverse(z.double()).numpy()
    for feature in range(ours.shape[1]):
        assert ks_2samp(ours[:, feature], theirs[:, feature]).pvalue > 1e-3
    # The same test tells a slightly different flow apart.
    other = ConditionalFlow(trained.config, trained.preprocessing)
    other.load_parameter_arrays(
        {k: v * np.float32(1.3) for k, v in trained.parameter_arrays().items()}
    )
    shifted = other.sample(mjj, seed=1)
    worst = min(ks_2samp(shifted[:, f], theirs[:, f]).pvalue for f in range(ours.shape[1]))
    assert worst < 1e-3


def test_a_snapshot_written_with_nflows_modules_loads_with_the_same_density() -> None:
    """tests/data holds a snapshot written by trigfarm 0.1.0 (nflows modules) and the
    densities that code computed from it."""
    recorded = json.loads((DATA / "flow_snapshot_nflows_v0.1.json").read_text())
    snapshot = FlowSnapshot.from_bytes((DATA / "flow_snapshot_nflows_v0.1.tfsnap").read_bytes())
    assert snapshot.content_hash == recorded["content_hash"]
    flow = snapshot.flow()
    got = flow.log_prob(np.array(recorded["x"]), np.array(recorded["mjj_gev"]))
    np.testing.assert_allclose(got, recorded["log_prob"], atol=1e-4)


# -- the fused C++ spline (models/spline_kernel.cpp) against the torch path -----------------


def _spline_and_grads(
    x: torch.Tensor, params: torch.Tensor, n_bins: int, bound: float, *, kernel: bool
) -> list[torch.Tensor]:
    """y, log|dy/dx| and the gradients of x and params of a fixed random linear loss."""
    x, params = x.clone().requires_grad_(), params.clone().requires_grad_()
    if kernel:
        y, log_det = rq_spline(x, params, n_bins, bound)
    else:
        with spline_kernel.disabled():
            y, log_det = rq_spline(x, params, n_bins, bound)
    weights = torch.Generator().manual_seed(7)
    grad_y = torch.randn(y.shape, generator=weights, dtype=torch.float64).to(y.dtype)
    grad_log_det = torch.randn(y.shape, generator=weights, dtype=torch.float64).to(y.dtype)
    ((y * grad_y).sum() + (log_det * grad_log_det).sum()).backward()
    assert x.grad is not None and params.grad is not None
    return [y.detach(), log_det.detach(), x.grad, params.grad]


def _spline_inputs(
    n_bins: int, bound: float, dtype: torch.dtype, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(members, rows, features) inputs over and beyond the bound, with exact edge values
    (±bound, just inside and outside, 0) and knots; params spread by ``scale``."""
    generator = torch.Generator().manual_seed(11)
    m, n, f = 3, 200, 4
    x = 1.5 * bound * (2 * torch.rand(m, n, f, generator=generator, dtype=torch.float64) - 1)
    edges = torch.tensor([bound, -bound, bound * (1 - 1e-6), -bound * (1 + 1e-6), 0.0, 50.0])
    x[:, : len(edges)] = edges[:, None].to(torch.float64)
    params = scale * torch.randn(m, n, f * (3 * n_bins - 1), generator=generator)
    return x.to(dtype), params.to(dtype)


@pytest.fixture
def kernel() -> spline_kernel.SplineKernel:
    compiled = spline_kernel.kernel()
    if compiled is None:
        pytest.skip("the spline kernel could not be built here (no g++?)")
    return compiled


@pytest.mark.parametrize(
    ("n_bins", "bound", "scale"), [(8, 4.0, 1.0), (8, 4.0, 4.0), (3, 1.5, 2.0)]
)
def test_spline_kernel_matches_the_torch_path(
    kernel: spline_kernel.SplineKernel, n_bins: int, bound: float, scale: float
) -> None:
    """In float64 both compute the same function: values and gradients agree to 1e-5
    (relative to 1 + |value|), inside, outside and exactly on the spline's bound."""
    x, params = _spline_inputs(n_bins, bound, torch.float64, scale)
    assert kernel.supports(x, params, n_bins)
    ours = _spline_and_grads(x, params, n_bins, bound, kernel=True)
    reference = _spline_and_grads(x, params, n_bins, bound, kernel=False)
    for name, got, expected in zip(
        ("y", "log_det", "grad x", "grad params"), ours, reference, strict=True
    ):
        np.testing.assert_allclose(
            got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5, err_msg=name
        )
    outside = x.abs() > bound
    assert torch.equal(ours[0][outside], x[outside])  # identity tails, exactly
    assert torch.all(ours[1][outside] == 0)


def test_spline_kernel_in_float32_is_as_close_to_float64_as_the_torch_path(
    kernel: spline_kernel.SplineKernel,
) -> None:
    x, params = _spline_inputs(8, 4.0, torch.float64, 1.0)
    truth = _spline_and_grads(x, params, 8, 4.0, kernel=False)
    ours = _spline_and_grads(x.float(), params.float(), 8, 4.0, kernel=True)
    torch_path = _spline_and_grads(x.float(), params.float(), 8, 4.0, kernel=False)
    for got, reference, exact in zip(ours, torch_path, truth, strict=True):
        ours_error = float(((got.double() - exact).abs() / (1 + exact.abs())).max())
        torch_error = float(((reference.double() - exact).abs() / (1 + exact.abs())).max())
        assert ours_error <= max(2 * torch_error, 1e-5)


def test_spline_kernel_refuses_what_it_does_not_take(kernel: spline_kernel.SplineKernel) -> None:
    x, params = _spline_inputs(8, 4.0, torch.float32, 1.0)
    assert not kernel.supports(x, params.double(), 8)
    assert not kernel.supports(x, params[..., :-1], 8)
    assert not kernel.supports(x.half(), params.half(), 8)
    with pytest.raises(ValueError, match="spline kernel takes"):
        kernel.forward(x, params, 7, 4.0)


def test_without_a_compiler_the_torch_path_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(spline_kernel, "COMMAND", ["no-such-compiler-trigfarm", "-O3"])
    with pytest.raises(RuntimeError, match="not on PATH"):
        spline_kernel.build(tmp_path)
    monkeypatch.setattr(spline_kernel, "default_cache_dir", lambda: tmp_path)
    spline_kernel._load.cache_clear()
    try:
        assert spline_kernel.kernel() is None
        assert "using the torch path" in caplog.text
        x, params = _spline_inputs(8, 4.0, torch.float64, 1.0)
        y, _ = rq_spline(x, params, 8, 4.0)  # still computed, by torch
        assert y.shape == x.shape
    finally:
        spline_kernel._load.cache_clear()


@pytest.mark.slow
def test_the_kernel_is_built_once_per_cache_folder(tmp_path: Path) -> None:
    if shutil.which(spline_kernel.COMMAND[0]) is None:
        pytest.skip("no C++ compiler")
    library = spline_kernel.build(tmp_path)
    stamp = library.stat().st_mtime_ns
    assert spline_kernel.build(tmp_path) == library
    assert library.stat().st_mtime_ns == stamp
    assert spline_kernel.SplineKernel(library).max_bins >= 8

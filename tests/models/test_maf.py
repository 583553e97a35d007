"""The batched MAF ensemble against nflows, the reference: the same parameters give the same
per-event density (on LHCO events and at the spline's edges), the same gradients, and the
same sampling distribution; snapshots written with the nflows modules still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from models.flows import FEATURE_INDICES, MJJ_INDEX, ConditionalFlow, FlowConfig, Preprocessing
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

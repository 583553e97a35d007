"""The fused flow kernel (models/flow_kernel.cpp) against the torch path it replaces in
training: the same log-density and the same gradient of every parameter, clipped per
member the same way, in float64 to 1e-5; in float32 as close to float64 as torch is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import flow_kernel, spline_kernel
from models.maf import MAFEnsemble
from models.online import OnlineConfig, OnlineFlow

torch.set_num_threads(1)

SHIPPED = {"n_members": 5, "n_features": 4, "n_transforms": 4, "hidden": 16, "n_blocks": 2,
           "n_bins": 8, "tail_bound": 4.0}  # fmt: skip
ODD = {"n_members": 2, "n_features": 3, "n_transforms": 2, "hidden": 7, "n_blocks": 1,
       "n_bins": 3, "tail_bound": 1.5, "n_context": 2}  # fmt: skip


@pytest.fixture
def kernel() -> flow_kernel.FlowKernel:
    compiled = flow_kernel.kernel()
    if compiled is None:
        pytest.skip("the kernels could not be built here (no g++?)")
    return compiled


def _ensemble(
    shape: dict[str, float], dtype: torch.dtype, seed: int = 0, spread: float = 0.3
) -> MAFEnsemble:
    """An ensemble with its weights spread, so that splines and masks all matter."""
    torch.manual_seed(seed)
    maf = MAFEnsemble(**shape).to(torch.float64)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in maf.parameters():
            p.add_(spread * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return maf.to(dtype)


def _inputs(maf: MAFEnsemble, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows over and beyond the bound, with ±bound exactly, just inside and outside, 0."""
    generator = torch.Generator().manual_seed(5)
    bound = maf.tail_bound
    z = 0.8 * bound * torch.randn(n, maf.n_features, generator=generator, dtype=torch.float64)
    edges = [bound, -bound, bound * (1 - 1e-6), -bound * (1 + 1e-6), 0.0, 3 * bound]
    for row, value in enumerate(edges[: min(n, len(edges))]):
        z[row, row % maf.n_features] = value
    context = torch.randn(n, maf.n_context, generator=generator, dtype=torch.float64)
    return z.to(dtype), context.to(dtype)


def _step(
    maf: MAFEnsemble, z: torch.Tensor, context: torch.Tensor, max_norm: float, *, torch_path: bool
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """[log p, the loss, the norms] and every gradient from ``nll_backward``."""
    if torch_path:
        with spline_kernel.disabled():
            assert flow_kernel.kernel() is None
            loss, norms = maf.nll_backward(z, context, max_norm=max_norm)
            log_prob = maf.log_prob(z, context).detach()
    else:
        loss, norms = maf.nll_backward(z, context, max_norm=max_norm)
        kernel = flow_kernel.kernel()
        assert kernel is not None
        log_prob = kernel.run(maf, z, context)[0]
    grads = {name: p.grad.clone() for name, p in maf.named_parameters() if p.grad is not None}
    assert len(grads) == len(flow_kernel.PARAMETERS)
    maf.zero_grad(set_to_none=True)
    return [log_prob, loss.detach(), norms], grads


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(
    ("shape", "n", "max_norm"),
    [(SHIPPED, 256, math.inf), (SHIPPED, 301, 5.0), (ODD, 5, math.inf), (ODD, 70, 0.5)],
)
def test_flow_kernel_matches_the_torch_path_in_float64(
    shape: dict[str, float], n: int, max_norm: float
) -> None:
    """log p, the loss, the members' norms and every parameter's gradient, clipped or not,
    agree to 1e-5 (relative to 1 + |value|): masks, context, tails and the spline's bound."""
    maf = _ensemble(shape, torch.float64)
    z, context = _inputs(maf, n, torch.float64)
    ours = _step(maf, z, context, max_norm, torch_path=False)
    reference = _step(maf, z, context, max_norm, torch_path=True)
    if math.isfinite(max_norm):
        assert float(reference[0][2].min()) > max_norm  # the clip is exercised
    for name, got, expected in zip(("log p", "loss", "norms"), ours[0], reference[0], strict=True):
        np.testing.assert_allclose(
            got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5, err_msg=name
        )
    for name, expected in reference[1].items():
        got = ours[1][name]
        scale = 1 + float(expected.abs().max())
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5 * scale, err_msg=name)
        masked = expected == 0
        assert torch.all(got[masked] == 0), name  # weights the MADE masks get exactly 0


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("seed", [0, 1])
def test_flow_kernel_in_float32_is_as_close_to_float64_as_the_torch_path(seed: int) -> None:
    """Rounding, not a lost digit: on average within twice torch's float32 error of the
    float64 truth (polynomial exp and log; ours is 1.3-1.8x torch's, ~1e-6 relative), and
    at worst within a few times torch's worst (four transforms amplify the
    rounding of a few ill-conditioned rows, differently in each path)."""
    maf64 = _ensemble(SHIPPED, torch.float64, seed, spread=0.1)
    z, context = _inputs(maf64, 256, torch.float64)
    truth = _step(maf64, z, context, math.inf, torch_path=True)
    maf32 = _ensemble(SHIPPED, torch.float32, seed, spread=0.1)
    z32, context32 = z.float(), context.float()
    ours = _step(maf32, z32, context32, math.inf, torch_path=False)
    torch32 = _step(maf32, z32, context32, math.inf, torch_path=True)
    pairs = [(ours[0][i], torch32[0][i], truth[0][i], 1.0) for i in range(3)]
    for name, exact in truth[1].items():
        pairs.append((ours[1][name], torch32[1][name], exact, 1 + float(exact.abs().max())))
    for got, reference, exact, scale in pairs:
        ours_error = (got.double() - exact).abs() / (scale + exact.abs())
        torch_error = (reference.double() - exact).abs() / (scale + exact.abs())
        if exact.numel() >= 100:  # a mean of a few (the loss, the norms) says little
            assert float(ours_error.mean()) <= max(2 * float(torch_error.mean()), 1e-7)
        assert float(ours_error.max()) <= max(4 * float(torch_error.max()), 1e-5)


def test_a_rows_density_does_not_depend_on_the_rows_beside_it(
    kernel: flow_kernel.FlowKernel,
) -> None:
    """Every event runs through the same vector code, wherever it falls in a chunk."""
    maf = _ensemble(SHIPPED, torch.float32)
    z, context = _inputs(maf, 100, torch.float32)
    batch = kernel.run(maf, z, context)[0]
    for row in (0, 7, 63, 64, 99):
        alone = kernel.run(maf, z[row : row + 1], context[row : row + 1])[0]
        assert torch.equal(alone[:, 0], batch[:, row])


def test_flow_kernel_refuses_what_it_does_not_take(kernel: flow_kernel.FlowKernel) -> None:
    maf = _ensemble(ODD, torch.float32)
    z, context = _inputs(maf, 10, torch.float32)
    assert kernel.supports(maf, z, context)
    assert not kernel.supports(maf, z.double(), context.double())  # params are float32
    assert not kernel.supports(maf, z, context[:, :1])
    assert not kernel.supports(maf, z[:, :2], context)
    with pytest.raises(ValueError, match="flow kernel takes"):
        kernel.run(maf, z.half(), context.half())


@pytest.mark.usefixtures("kernel")
def test_a_trainer_learns_the_same_flow_with_the_kernel_and_with_torch() -> None:
    """A few optimizer steps of the OnlineFlow either way: the same weights (float32, Adam's
    normalised steps keep rounding differences at the level of float32)."""
    config = OnlineConfig(buffer_size=256, batch_size=128, calibration_events=256, seed=3)
    rng = np.random.default_rng(4)
    x = rng.uniform(0.1, 0.9, (1024, 8)).astype("f4")
    x[:, 0] = rng.uniform(2500, 4500, len(x))
    flows = {}
    for variant in ("kernel", "torch"):
        online = OnlineFlow(config)
        if variant == "torch":
            with spline_kernel.disabled():
                online.learn(x)
        else:
            online.learn(x)
        assert online.trainers["all"].stats.steps == 8
        flows[variant] = online.trainers["all"].flow.maf
    for (name, ours), theirs in zip(
        flows["kernel"].named_parameters(), flows["torch"].parameters(), strict=True
    ):
        np.testing.assert_allclose(
            ours.detach().numpy(), theirs.detach().numpy(), atol=2e-4, err_msg=name
        )

"""A batched ensemble of masked autoregressive flows of rational-quadratic splines.

``MAFEnsemble`` computes what nflows computes for a MAF of
``MaskedPiecewiseRationalQuadraticAutoregressiveTransform`` layers (residual MADE,
context in every block, linear tails) with reverse permutations in between, for
``n_members`` independent MAFs at once. The weights of every member and transform are
stacked into a few tensors, so a training step is one batched matrix product per layer
and one vectorised spline, whatever the ensemble size; the density direction (the one
training needs) is a single pass. nflows does the same arithmetic member by member and
layer by layer, which at the OnlineFlow's sizes costs more in Python and autograd
bookkeeping than in arithmetic. The spline, forward and backward, runs in a fused C++
kernel when g++ can build it (``models.spline_kernel``; 1.6x per training step), else as
whole-tensor torch operations with a hand-derived backward: the same function. A training
step (``nll_backward``: the loss, every gradient, the per-member clip) runs whole in a
second kernel, ``models.flow_kernel`` (a third of the CPU time of autograd with the spline
kernel), else by autograd on ``log_prob``.

Parameters convert both ways, exactly, to nflows' names and layout (``nflows_arrays`` and
``load_nflows_arrays``): nflows stays the reference, and snapshots keep its format.

References: Durkan et al., "Neural Spline Flows" (arXiv:1906.04032); Germain et al.,
"MADE" (arXiv:1502.03509); Papamakarios et al., "Masked Autoregressive Flow"
(arXiv:1705.07057).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import flow_kernel, spline_kernel

MIN_BIN_WIDTH = 1e-3  # nflows' defaults, part of the function the parameters define
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
_LOG_2PI = math.log(2 * math.pi)


def _hidden_degrees(n_hidden: int, n_features: int) -> torch.Tensor:
    """MADE's deterministic hidden degrees (as nflows assigns them)."""
    return torch.arange(n_hidden) % max(1, n_features - 1) + min(1, n_features - 1)


def spline_columns(n_features: int, n_bins: int) -> torch.Tensor:
    """Our output column for each of nflows' MADE output columns.

    nflows orders the MADE outputs feature-major (f·P + j, with j running over K widths, K
    heights and K-1 derivatives); we group them by kind (all widths, then all heights,
    then all derivatives, each feature-major), so that each kind is a contiguous (F, K)
    block and the spline's softmax and softplus run on contiguous memory.
    """
    k = n_bins
    f = torch.arange(n_features)[:, None]
    j = torch.arange(3 * k - 1)[None, :]
    ours = torch.where(
        j < k,
        f * k + j,
        torch.where(
            j < 2 * k,
            n_features * k + f * k + (j - k),
            2 * n_features * k + f * (k - 1) + (j - 2 * k),
        ),
    )
    return ours.reshape(-1)


def made_masks(
    n_features: int, n_hidden: int, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input (F, H), hidden (H, H) and output (H, F·P) masks in ``x @ W`` layout, the
    output columns ordered as ``spline_columns`` says."""
    inputs = torch.arange(1, n_features + 1)
    hidden = _hidden_degrees(n_hidden, n_features)
    outputs = torch.empty(n_features * (3 * n_bins - 1), dtype=torch.long)
    outputs[spline_columns(n_features, n_bins)] = inputs.repeat_interleave(3 * n_bins - 1)
    return (
        (hidden[None, :] >= inputs[:, None]).float(),
        (hidden[None, :] >= hidden[:, None]).float(),
        (outputs[None, :] > hidden[:, None]).float(),
    )


@dataclass(frozen=True, slots=True)
class _Layer:
    """One transform's weights for one forward pass (masked, context folded in)."""

    in_w: torch.Tensor
    first: torch.Tensor
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    out_w: torch.Tensor
    out_b: torch.Tensor


class MAFEnsemble(nn.Module):
    """``n_members`` conditional MAF-RQS flows evaluated as one batched computation.

    ``log_prob(z, context)`` gives each member's log density, (M, N), of the same rows;
    ``sample_members(member, context)`` inverts the flows row by row for the given
    members. The base distribution is a standard normal.

    Example:
        >>> ensemble = MAFEnsemble(n_members=3, n_features=2, n_transforms=2, hidden=8,
        ...                        n_blocks=1, n_bins=4, tail_bound=3.0)
        >>> ensemble.log_prob(torch.zeros(5, 2), torch.zeros(5, 1)).shape
        torch.Size([3, 5])
    """

    in_mask: torch.Tensor
    hidden_mask: torch.Tensor
    out_mask: torch.Tensor
    columns: torch.Tensor
    hidden_order: torch.Tensor

    def __init__(
        self,
        *,
        n_members: int,
        n_features: int,
        n_transforms: int,
        hidden: int,
        n_blocks: int,
        n_bins: int,
        tail_bound: float,
        n_context: int = 1,
    ) -> None:
        super().__init__()
        self.n_members, self.n_features, self.n_transforms = n_members, n_features, n_transforms
        self.hidden, self.n_blocks, self.n_bins = hidden, n_blocks, n_bins
        self.tail_bound, self.n_context = float(tail_bound), n_context
        self.n_params = 3 * n_bins - 1  # widths, heights, interior derivatives
        t, m, f, h, b, c = n_transforms, n_members, n_features, hidden, n_blocks, n_context
        fp = f * self.n_params

        def uniform(*shape: int, bound: float) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

        # nn.Linear's default initialisation (bound 1/√fan_in); residual blocks end near 0.
        self.in_weight = uniform(t, m, f, h, bound=1 / math.sqrt(f))
        self.in_bias = uniform(t, m, 1, h, bound=1 / math.sqrt(f))
        self.context_weight = uniform(t, m, c, h, bound=1 / math.sqrt(c))
        self.context_bias = uniform(t, m, 1, h, bound=1 / math.sqrt(c))
        self.block_weight = nn.Parameter(torch.empty(t, b, 2, m, h, h))
        self.block_bias = nn.Parameter(torch.empty(t, b, 2, m, 1, h))
        with torch.no_grad():
            self.block_weight[:, :, 0].uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h))
            self.block_bias[:, :, 0].uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h))
            self.block_weight[:, :, 1].uniform_(-1e-3, 1e-3)
            self.block_bias[:, :, 1].uniform_(-1e-3, 1e-3)
        self.block_context_weight = uniform(t, b, m, c, h, bound=1 / math.sqrt(c))
        self.block_context_bias = uniform(t, b, m, 1, h, bound=1 / math.sqrt(c))
        self.out_weight = uniform(t, m, h, fp, bound=1 / math.sqrt(h))
        self.out_bias = uniform(t, m, 1, fp, bound=1 / math.sqrt(h))
        in_mask, hidden_mask, out_mask = made_masks(f, h, n_bins)
        self.register_buffer("in_mask", in_mask, persistent=False)
        self.register_buffer("hidden_mask", hidden_mask, persistent=False)
        self.register_buffer("out_mask", out_mask, persistent=False)
        self.register_buffer("columns", spline_columns(f, n_bins), persistent=False)
        # hidden units by degree: the flow kernel's masked columns become prefixes
        order = torch.argsort(_hidden_degrees(h, f), stable=True).to(torch.int32)
        self.register_buffer("hidden_order", order, persistent=False)

    # -- the flow --------------------------------------------------------------------------

    def _layers(self, context: torch.Tensor, members: slice) -> list[_Layer]:
        """Each transform's masked weights, with the context's share of the first layer
        (nflows' MADE passes it through a ReLU) and of every block folded into the biases;
        context is (N, C). Unbinding once keeps autograd from zero-filling a full gradient
        for every indexed slice."""
        t, nb = self.n_transforms, self.n_blocks
        in_w = (self.in_weight[:, members] * self.in_mask).unbind(0)
        block_w = (self.block_weight[:, :, :, members] * self.hidden_mask).flatten(0, 2)
        out_w = (self.out_weight[:, members] * self.out_mask).unbind(0)
        first = self.in_bias[:, members] + F.relu(
            torch.matmul(context, self.context_weight[:, members]) + self.context_bias[:, members]
        )
        block_first = (
            torch.matmul(context, self.block_context_weight[:, :, members])
            + self.block_context_bias[:, :, members]
            + self.block_bias[:, :, 0, members]
        ).flatten(0, 1)
        block_second = self.block_bias[:, :, 1, members].flatten(0, 1)
        block_w_list, first_list = block_w.unbind(0), first.unbind(0)
        block_first_list, block_second_list = block_first.unbind(0), block_second.unbind(0)
        out_b = self.out_bias[:, members].unbind(0)
        return [
            _Layer(
                in_w[i],
                first_list[i],
                [
                    (
                        block_w_list[(i * nb + b) * 2],
                        block_first_list[i * nb + b],
                        block_w_list[(i * nb + b) * 2 + 1],
                        block_second_list[i * nb + b],
                    )
                    for b in range(nb)
                ],
                out_w[i],
                out_b[i],
            )
            for i in range(t)
        ]

    def _spline_params(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        """One transform's spline parameters (M, N, F·(3K-1)) for inputs x (M, N, F)."""
        hidden = torch.baddbmm(layer.first, x, layer.in_w)
        for w0, b0, w1, b1 in layer.blocks:
            inner = torch.baddbmm(b0, F.relu(hidden), w0)
            hidden = hidden + torch.baddbmm(b1, F.relu(inner), w1)
        return torch.baddbmm(layer.out_b, hidden, layer.out_w)

    def log_prob(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log density of every member at every row: z (N, F), context (N, C) -> (M, N)."""
        x = z.expand(self.n_members, *z.shape).contiguous()
        log_det = z.new_zeros(self.n_members, z.shape[0])
        for layer in self._layers(context, slice(None)):
            x, step_log_det = rq_spline(
                x, self._spline_params(layer, x), self.n_bins, self.tail_bound
            )
            log_det = log_det + step_log_det.sum(-1)
            x = x.flip(-1)
        base = -0.5 * (x * x).sum(-1) - 0.5 * self.n_features * _LOG_2PI
        return base + log_det

    def nll_backward(
        self, z: torch.Tensor, context: torch.Tensor, *, max_norm: float = math.inf
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training step's gradients: sets every parameter's ``.grad`` to that of the loss
        -Σ_members mean_rows log p(z | context), each member's scaled to norm ≤ ``max_norm``
        (as ``clip_grad_norm_per_member_``); returns the loss (detached) and the members'
        gradient norms before scaling. One call of the fused kernel (``models.flow_kernel``)
        when it is available, else autograd on ``log_prob``: the same numbers."""
        kernel = flow_kernel.kernel()
        if kernel is not None and kernel.supports(self, z, context):
            weight = torch.full((1, z.shape[0]), -1.0 / z.shape[0], dtype=z.dtype)
            clip = max_norm if math.isfinite(max_norm) else 0.0
            log_prob, grads, norms = kernel.run(self, z, context, weight, max_norm=clip)
            assert grads is not None and norms is not None
            for name, grad in zip(flow_kernel.PARAMETERS, grads, strict=True):
                getattr(self, name).grad = grad
            return -log_prob.mean(1).sum(), norms.to(z.dtype)
        self.zero_grad(set_to_none=True)
        loss = -self.log_prob(z, context).mean(1).sum()
        loss.backward()
        return loss.detach(), self.clip_grad_norm_per_member_(max_norm)

    @torch.no_grad()
    def sample_member(
        self, member: int, noise: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """Invert member ``member`` on base-space noise (N, F) at context (N, C)."""
        y = noise[None]
        for layer in reversed(self._layers(context, slice(member, member + 1))):
            y = y.flip(-1)
            x = torch.zeros_like(y)
            for _ in range(self.n_features):  # feature i is exact after pass i
                x = rq_spline_inverse(
                    y, self._spline_params(layer, x), self.n_bins, self.tail_bound
                )
            y = x
        return y[0]

    # -- per-member gradient clipping --------------------------------------------------------

    MEMBER_AXIS: ClassVar[dict[str, int]] = {  # which axis of each parameter is the member
        "in_weight": 1,
        "in_bias": 1,
        "context_weight": 1,
        "context_bias": 1,
        "block_weight": 3,
        "block_bias": 3,
        "block_context_weight": 2,
        "block_context_bias": 2,
        "out_weight": 1,
        "out_bias": 1,
    }

    @torch.no_grad()
    def clip_grad_norm_per_member_(self, max_norm: float) -> torch.Tensor:
        """Scale each member's gradient to norm ≤ ``max_norm`` (members are independent
        flows, as if each had its own clip); returns the norms before clipping."""
        squares = torch.zeros(self.n_members)
        for name, param in self.named_parameters():
            if param.grad is not None:
                axis = self.MEMBER_AXIS[name]
                other = [d for d in range(param.dim()) if d != axis]
                squares += param.grad.pow(2).sum(dim=other)
        norms = squares.sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, param in self.named_parameters():
            if param.grad is not None:
                shape = [1] * param.dim()
                shape[self.MEMBER_AXIS[name]] = self.n_members
                param.grad.mul_(scale.view(shape))
        return norms

    # -- nflows layout -------------------------------------------------------------------------

    def _nflows_names(self) -> list[tuple[str, int, int, str]]:
        """(nflows name, member, transform, which) for every nflows parameter."""
        out = []
        for m in range(self.n_members):
            for t in range(self.n_transforms):
                prefix = f"{m}._transform._transforms.{2 * t}.autoregressive_net."
                which = ["initial_layer.weight", "initial_layer.bias"]
                which += ["context_layer.weight", "context_layer.bias"]
                for b in range(self.n_blocks):
                    which += [f"blocks.{b}.context_layer.weight", f"blocks.{b}.context_layer.bias"]
                    for k in range(2):
                        which += [
                            f"blocks.{b}.linear_layers.{k}.weight",
                            f"blocks.{b}.linear_layers.{k}.bias",
                        ]
                which += ["final_layer.weight", "final_layer.bias"]
                out += [(prefix + w, m, t, w) for w in which]
        return out

    def _view(self, m: int, t: int, which: str) -> tuple[torch.Tensor, bool]:
        """Our tensor for one nflows parameter, and whether it is transposed (weights)."""
        parts = which.split(".")
        layer, kind = parts[0], parts[-1]
        if layer == "initial_layer":
            own = self.in_weight[t, m] if kind == "weight" else self.in_bias[t, m, 0]
        elif layer == "context_layer":
            own = self.context_weight[t, m] if kind == "weight" else self.context_bias[t, m, 0]
        elif layer == "final_layer":
            own = self.out_weight[t, m] if kind == "weight" else self.out_bias[t, m, 0]
        elif parts[2] == "context_layer":
            b = int(parts[1])
            own = (
                self.block_context_weight[t, b, m]
                if kind == "weight"
                else self.block_context_bias[t, b, m, 0]
            )
        else:
            b, k = int(parts[1]), int(parts[3])
            own = (
                self.block_weight[t, b, k, m]
                if kind == "weight"
                else self.block_bias[t, b, k, m, 0]
            )
        return own, kind == "weight"

    def nflows_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter under its nflows name and layout, as float32 copies."""
        out = {}
        for name, m, t, which in self._nflows_names():
            own, transposed = self._view(m, t, which)
            value = own.detach()
            if which.startswith("final_layer"):
                value = value[..., self.columns]
            value = value.T if transposed else value
            out[name] = value.cpu().numpy().astype("<f4", copy=True)
        return out

    @torch.no_grad()
    def load_nflows_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Set every parameter from nflows-named arrays (names and shapes must match)."""
        names = self._nflows_names()
        expected = {name for name, *_ in names}
        if set(arrays) != expected:
            missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
            msg = f"parameter names differ: missing {missing[:3]}, unexpected {extra[:3]}"
            raise ValueError(msg)
        for name, m, t, which in names:
            own, transposed = self._view(m, t, which)
            value = torch.from_numpy(np.array(arrays[name], dtype=np.float32))
            value = value.T if transposed else value
            if tuple(value.shape) != tuple(own.shape):
                shape = tuple(np.shape(arrays[name]))
                expected_shape = tuple(own.shape)[::-1] if transposed else tuple(own.shape)
                msg = f"parameter {name} has shape {shape}, expected {expected_shape}"
                raise ValueError(msg)
            if which.startswith("final_layer"):
                own[..., self.columns] = value
            else:
                own.copy_(value)


@dataclass(frozen=True, slots=True)
class _Bins:
    """One spline per row: knots in units of the interval (x = -B + 2B·u), K+1 each with
    0 and 1 exact at the ends, derivatives at the K+1 knots (1 at the ends, for linear
    tails), and what the backward pass reuses."""

    x_knots: torch.Tensor
    y_knots: torch.Tensor
    derivatives: torch.Tensor
    width_probs: torch.Tensor
    height_probs: torch.Tensor
    derivative_slopes: torch.Tensor  # sigmoid of the unnormalised interior derivatives


def _softmax(unnormalized: torch.Tensor) -> torch.Tensor:
    # by hand: torch's kernel is ~6x slower over a last axis of a few bins
    exp = (unnormalized - unnormalized.amax(-1, keepdim=True)).exp()
    return exp / exp.sum(-1, keepdim=True)


def _knots(probs: torch.Tensor, minimum: float) -> torch.Tensor:
    n_bins = probs.shape[-1]
    inner = torch.cumsum(minimum + (1 - minimum * n_bins) * probs[..., :-1], dim=-1)
    return F.pad(F.pad(inner, (1, 0), value=0.0), (0, 1), value=1.0)


def _bins(params: torch.Tensor, n_features: int, n_bins: int) -> _Bins:
    """Unpack MADE outputs (..., F·(3K-1)), grouped by kind (``spline_columns``)."""
    shape = (*params.shape[:-1], n_features)
    fk = n_features * n_bins
    # Contiguous copies: torch's kernels are up to 10x slower on the strided slices.
    width_probs = _softmax(params[..., :fk].contiguous().view(*shape, n_bins))
    height_probs = _softmax(params[..., fk : 2 * fk].contiguous().view(*shape, n_bins))
    derivatives_u = params[..., 2 * fk :].contiguous().view(*shape, n_bins - 1)
    derivatives = F.pad(MIN_DERIVATIVE + F.softplus(derivatives_u), (1, 1), value=1.0)
    return _Bins(
        _knots(width_probs, MIN_BIN_WIDTH),
        _knots(height_probs, MIN_BIN_HEIGHT),
        derivatives,
        width_probs,
        height_probs,
        torch.sigmoid(derivatives_u),
    )


def _at(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return table.gather(-1, idx).squeeze(-1)


def _locate(
    values: torch.Tensor, bins: _Bins, knots: torch.Tensor, bound: float
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Where ``values`` fall: inside [-bound, bound] or not, their position in interval
    units (clamped), and their bin in ``knots`` (x for the spline, y for its inverse) with
    that bin's index, left x knot, width, left y knot, height and end derivatives."""
    inside = (values >= -bound) & (values <= bound)
    position = (values.clamp(-bound, bound) + bound) / (2 * bound)
    idx = (position[..., None] >= knots[..., 1:-1]).sum(-1, keepdim=True)
    after = idx + 1
    x0, x1 = _at(bins.x_knots, idx), _at(bins.x_knots, after)
    y0, y1 = _at(bins.y_knots, idx), _at(bins.y_knots, after)
    d0, d1 = _at(bins.derivatives, idx), _at(bins.derivatives, after)
    return inside, position, (idx, x0, x1 - x0, y0, y1 - y0, d0, d1)


class _RQSpline(torch.autograd.Function):
    """``rq_spline`` with a hand-derived backward pass: a few whole-tensor operations
    per transform instead of autograd's graph of ~150 small ones (it halves the step)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, params: torch.Tensor, n_bins: int, bound: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bins = _bins(params, x.shape[-1], n_bins)
        inside, u, (idx, x0, w, y0, h, d0, d1) = _locate(x, bins, bins.x_knots, bound)
        s = h / w  # in interval units the scale cancels in s and θ
        theta = (u - x0) / w
        t1 = theta * (1 - theta)
        c = d0 + d1 - 2 * s
        denominator = s + c * t1
        numerator_a = s * theta * theta + d0 * t1
        shape_m = d1 * theta * theta + 2 * s * t1 + d0 * (1 - theta) * (1 - theta)
        y_unit = y0 + h * numerator_a / denominator
        log_det = torch.log(s * s * shape_m) - 2 * torch.log(denominator)
        y = torch.where(inside, 2 * bound * y_unit - bound, x)
        log_det = torch.where(inside, log_det, torch.zeros_like(log_det))
        ctx.save_for_backward(
            inside, idx, theta, t1, s, h, w, d0, d1, c, denominator, numerator_a, shape_m
        )
        ctx.bins = bins
        ctx.n_bins, ctx.bound = n_bins, bound
        return y, log_det

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: torch.Tensor, grad_log_det: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        inside, idx, theta, t1, s, h, w, d0, d1, c, denominator, a, m = ctx.saved_tensors
        bins: _Bins = ctx.bins
        n_bins: int = ctx.n_bins
        bound: float = ctx.bound
        # y = 2B·y_unit - B and u = (x + B) / 2B: gradients in interval units
        gy_unit = 2 * bound * torch.where(inside, grad_y, torch.zeros_like(grad_y))
        gl = torch.where(inside, grad_log_det, torch.zeros_like(grad_log_det))
        g_denominator = -gy_unit * h * a / (denominator * denominator) - 2 * gl / denominator
        g_a = gy_unit * h / denominator
        one_minus_2theta = 1 - 2 * theta
        g_theta = (
            g_a * (2 * s * theta + d0 * one_minus_2theta)
            + g_denominator * c * one_minus_2theta
            + gl * 2 * (d1 * theta + s * one_minus_2theta - d0 * (1 - theta)) / m
        )
        g_s = g_a * theta * theta + g_denominator * (1 - 2 * t1) + gl * (2 / s + 2 * t1 / m)
        g_d0 = (g_a + g_denominator) * t1 + gl * (1 - theta) * (1 - theta) / m
        g_d1 = g_denominator * t1 + gl * theta * theta / m
        g_h = gy_unit * a / denominator + g_s / w
        g_w = -g_s * h / (w * w) - g_theta * theta / w
        g_x = torch.where(inside, g_theta / (w * 2 * bound), grad_y)  # identity outside
        g_x0 = -g_theta / w - g_w
        g_x1 = g_w
        g_y0 = gy_unit - g_h
        g_y1 = g_h
        bins_axis = torch.arange(n_bins, device=idx.device)
        dtype = g_x0.dtype
        left_of_bin = (bins_axis < idx).to(dtype)  # sizes left of knot idx (and of idx+1)
        at_bin = (bins_axis == idx).to(dtype)  # the size left of knot idx+1 only
        last = idx.squeeze(-1) == n_bins - 1  # knot K is fixed at 1
        g_x1 = torch.where(last, torch.zeros_like(g_x1), g_x1)
        g_y1 = torch.where(last, torch.zeros_like(g_y1), g_y1)
        g_widths = _softmax_backward(
            _by_bin(left_of_bin, g_x0 + g_x1, at_bin, g_x1),
            bins.width_probs,
            1 - MIN_BIN_WIDTH * n_bins,
        )
        g_heights = _softmax_backward(
            _by_bin(left_of_bin, g_y0 + g_y1, at_bin, g_y1),
            bins.height_probs,
            1 - MIN_BIN_HEIGHT * n_bins,
        )
        # interior derivative j (knot j+1) is d0 when j + 1 == idx and d1 when j == idx
        inner_axis = bins_axis[:-1]
        g_derivatives = bins.derivative_slopes * _by_bin(
            (inner_axis + 1 == idx).to(dtype), g_d0, (inner_axis == idx).to(dtype), g_d1
        )
        g_params = torch.cat(
            [g_widths.flatten(-2), g_heights.flatten(-2), g_derivatives.flatten(-2)], dim=-1
        )
        return g_x, g_params, None, None


def _by_bin(
    first: torch.Tensor, first_value: torch.Tensor, second: torch.Tensor, second_value: torch.Tensor
) -> torch.Tensor:
    """(..., K) from 0/1 masks: first_value where ``first``, second_value where ``second``."""
    return first * first_value[..., None] + second * second_value[..., None]


def _softmax_backward(g_sizes: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of the unnormalised sizes, given that of sizes = min + scale·softmax."""
    g = scale * g_sizes
    return probs * (g - (probs * g).sum(-1, keepdim=True))


class _RQSplineKernel(torch.autograd.Function):
    """``rq_spline`` by the fused C++ kernel (``models.spline_kernel``): one call forward,
    one backward (from the softmax and derivatives the forward left in a workspace)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        params: torch.Tensor,
        n_bins: int,
        bound: float,
        kernel: spline_kernel.SplineKernel,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_det, workspace = kernel.forward(x, params, n_bins, bound)
        ctx.save_for_backward(x, workspace)
        ctx.n_bins, ctx.bound, ctx.kernel = n_bins, bound, kernel
        return y, log_det

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: torch.Tensor, grad_log_det: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        x, workspace = ctx.saved_tensors
        kernel: spline_kernel.SplineKernel = ctx.kernel
        grad_x, grad_params = kernel.backward(
            x, workspace, grad_y, grad_log_det, ctx.n_bins, ctx.bound
        )
        return grad_x, grad_params, None, None, None


def rq_spline(
    x: torch.Tensor, params: torch.Tensor, n_bins: int, bound: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The monotone rational-quadratic spline on [-bound, bound], identity outside; returns
    y and log|dy/dx| elementwise. x (..., F); params (..., F·(3K-1)), the MADE's outputs
    grouped by kind (``spline_columns``). Runs the fused C++ kernel when it is available
    (``models.spline_kernel``), else whole-tensor torch operations: the same function."""
    kernel = spline_kernel.kernel()
    if kernel is not None and kernel.supports(x, params, n_bins):
        return _RQSplineKernel.apply(x, params, n_bins, bound, kernel)  # type: ignore[no-any-return]
    return _RQSpline.apply(x, params, n_bins, bound)  # type: ignore[no-any-return]


def rq_spline_inverse(
    y: torch.Tensor, params: torch.Tensor, n_bins: int, bound: float
) -> torch.Tensor:
    """The inverse of ``rq_spline`` (for sampling)."""
    bins = _bins(params, y.shape[-1], n_bins)
    inside, v, (_, x0, w, y0, h, d0, d1) = _locate(y, bins, bins.y_knots, bound)
    s = h / w
    dy = v - y0
    c = d0 + d1 - 2 * s
    qa = dy * c + h * (s - d0)
    qb = h * d0 - dy * c
    qc = -s * dy
    root = (2 * qc) / (-qb - torch.sqrt((qb * qb - 4 * qa * qc).clamp(min=0)))
    return torch.where(inside, 2 * bound * (root * w + x0) - bound, y)

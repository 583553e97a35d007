"""The whole MAF ensemble's training step in C++ (``flow_kernel.cpp``): log-density and every
parameter's gradient in one call.

``models.maf.MAFEnsemble.nll_backward`` runs here when the kernel is available. Per
member, chunks of 64 events go forward through every transform (the masked MADE with its
context, then the rational-quadratic spline) and straight back, accumulating the weight
gradients; each member's gradient is then clipped to its norm bound, as
``clip_grad_norm_per_member_`` does. torch does the same in ~2,000 small operations per
step, most of whose cost is dispatch; here it is arithmetic, vectorised over events, with
the weights the MADE masks to zero skipped. It computes the same function as the torch path
(float32 tensors in float, float64 in double), and ``tests/models/test_flow_kernel.py``
holds the two to each other.

It is compiled with the spline kernel into one library (``models.spline_kernel.build``,
the same cache, the same fallback): when that cannot be built, or inside
``spline_kernel.disabled()``, ``kernel()`` is None and the torch path is used.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch

from models import spline_kernel


class FlowShape(Protocol):
    """What the kernel reads of a ``models.maf.MAFEnsemble`` (named here, not imported:
    maf imports this module), besides the parameters named in ``PARAMETERS``."""

    n_members: int
    n_features: int
    n_transforms: int
    hidden: int
    n_blocks: int
    n_bins: int
    n_context: int
    tail_bound: float
    in_mask: torch.Tensor
    hidden_mask: torch.Tensor
    out_mask: torch.Tensor
    hidden_order: torch.Tensor


PARAMETERS = (  # MAFEnsemble's parameters in the order the kernel takes them
    "in_weight",
    "in_bias",
    "context_weight",
    "context_bias",
    "block_weight",
    "block_bias",
    "block_context_weight",
    "block_context_bias",
    "out_weight",
    "out_bias",
)
_Pointers = ctypes.c_void_p * len(PARAMETERS)
_Dims = ctypes.c_int64 * 8


class FlowKernel:
    """The compiled flow: ``run`` on CPU float32/float64 ``MAFEnsemble`` parameters."""

    def __init__(self, library: Path) -> None:
        self.library = library
        lib = ctypes.CDLL(str(library))
        pointer = ctypes.c_void_p
        self._run = {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
            fn = getattr(lib, f"trigfarm_flow_{suffix}")
            fn.argtypes = [pointer, ctypes.c_double] + [pointer] * 10 + [ctypes.c_double, pointer]
            fn.restype = ctypes.c_int
            self._run[dtype] = fn

    def supports(self, maf: FlowShape, z: torch.Tensor, context: torch.Tensor) -> bool:
        """Whether the kernel takes this ensemble and these inputs (CPU, one float dtype)."""
        dtype = z.dtype
        return (
            dtype in self._run
            and z.device.type == "cpu"
            and context.dtype == dtype
            and context.device.type == "cpu"
            and z.dim() == 2
            and z.shape[1] == maf.n_features
            and context.shape == (z.shape[0], maf.n_context)
            and all(
                p.dtype == dtype and p.device.type == "cpu" and p.is_contiguous()
                for p in _parameters(maf)
            )
        )

    def run(
        self,
        maf: FlowShape,
        z: torch.Tensor,
        context: torch.Tensor,
        grad_log_prob: torch.Tensor | None = None,
        *,
        max_norm: float = 0.0,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]:
        """log p of every member at every row (M, N); given ``grad_log_prob`` (M, N), also
        the gradient of sum(grad_log_prob · log p) for each parameter (in ``PARAMETERS``
        order), each member's scaled to norm ≤ ``max_norm`` if > 0, and the members' norms
        before scaling."""
        if not self.supports(maf, z, context):
            msg = (
                f"the flow kernel takes CPU float32/64 tensors of one dtype; got z "
                f"{tuple(z.shape)} {z.dtype}, context {tuple(context.shape)} {context.dtype}"
            )
            raise ValueError(msg)
        dtype = z.dtype
        z, context = z.contiguous(), context.contiguous()
        m, n = maf.n_members, z.shape[0]
        dims = _Dims(
            m, n, maf.n_features, maf.n_transforms, maf.hidden, maf.n_blocks, maf.n_bins,
            maf.n_context,
        )  # fmt: skip
        params = _parameters(maf)
        masks = [m.to(dtype).contiguous() for m in (maf.in_mask, maf.hidden_mask, maf.out_mask)]
        log_prob = z.new_empty(m, n)
        grads: list[torch.Tensor] | None = None
        norms: torch.Tensor | None = None
        grad_pointer, grads_pointer, norms_pointer = None, None, None
        if grad_log_prob is not None:
            grad_log_prob = grad_log_prob.to(dtype).expand(m, n).contiguous()
            grads = [torch.zeros_like(p) for p in params]  # the kernel skips masked weights
            norms = torch.empty(m, dtype=torch.float64)
            grad_pointer = grad_log_prob.data_ptr()
            grads_pointer = _Pointers(*(g.data_ptr() for g in grads))
            norms_pointer = norms.data_ptr()
        done = self._run[dtype](
            dims, maf.tail_bound, _Pointers(*(p.data_ptr() for p in params)),
            masks[0].data_ptr(), masks[1].data_ptr(), masks[2].data_ptr(),
            maf.hidden_order.data_ptr(), z.data_ptr(), context.data_ptr(), grad_pointer,
            log_prob.data_ptr(), grads_pointer, max_norm, norms_pointer,
        )  # fmt: skip
        if done != 0:
            msg = f"the flow kernel refused sizes {list(dims)}"
            raise ValueError(msg)
        return log_prob, grads, norms


def _parameters(maf: FlowShape) -> list[torch.Tensor]:
    return [getattr(maf, name) for name in PARAMETERS]


@functools.cache
def _load(library: Path) -> FlowKernel | None:
    try:
        return FlowKernel(library)
    except (OSError, AttributeError) as exc:  # a library built before the flow kernel
        spline_kernel.log.warning("flow kernel unavailable, using the torch path: %s", exc)
        return None


_state = {"enabled": True}


def kernel() -> FlowKernel | None:
    """The compiled flow kernel (built with the spline kernel), or None: unavailable or
    disabled (``disabled()`` here, or ``spline_kernel.disabled()``)."""
    spline = spline_kernel.kernel()
    return None if spline is None or not _state["enabled"] else _load(spline.library)


@contextmanager
def disabled() -> Iterator[None]:
    """Train by autograd inside the block (with the spline kernel, unless that is disabled
    too): benchmarks and tests compare the paths."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before

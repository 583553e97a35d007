"""The fused C++ rational-quadratic spline (``spline_kernel.cpp``), compiled on first use.

``models.maf``'s spline runs here when the kernel is available: one loop over every
(member, event, feature) element for the forward pass and one for the backward pass,
instead of ~100 whole-tensor torch operations per transform. It computes the same function
(in double precision inside, whatever the tensor dtype), and ``tests/models/test_maf.py``
holds the two paths to each other.

The source is plain C++ (no torch headers), so g++ builds it in about a second; it is
called through ctypes on the tensors' memory. The library is cached under
``~/.cache/trigfarm/spline-kernel/<key>/``, the key hashing the source and the compiler
command; a build goes to a temporary folder first and is renamed into place, so nodes
starting together on one host never load a half-written library. If it cannot be built
or loaded (no g++, a read-only home), ``kernel()`` logs why once and returns None, and the
torch path is used: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().with_name("spline_kernel.cpp")
# One library: the spline, and the whole flow's training step (models.flow_kernel), each
# source with its own flags. The spline's loops over rows are vectorised with a scalar
# remainder: without fused multiply-adds (-ffp-contract=off) both round alike, so a row's
# density does not depend on the rows beside it. The flow kernel runs every event through
# the same vector code, so it keeps them (13% of its time).
SOURCES = (
    (SOURCE, ("-ffp-contract=off",)),
    (SOURCE.with_name("flow_kernel.cpp"), ()),
)
LIBRARY_NAME = "libtrigfarm_spline.so"
# -march=native: the flow kernel's vectors use the host's widest instructions (AVX2 and FMA
# here; an SSE2 build is 7x slower). A cache folder may be shared by hosts, so the cache key
# names the host's CPU (``host_cpu``) and each kind of CPU gets its own build.
COMMAND = [
    "g++", "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
    "-fno-trapping-math", "-Wno-psabi",
]  # fmt: skip
_state = {"enabled": True}


def host_cpu() -> str:
    """What -march=native depends on: the machine, and on Linux the CPU's model and flags."""
    identity = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return identity
    for prefix in ("vendor_id", "model name", "flags"):
        identity += next((" | " + line for line in info if line.startswith(prefix)), "")
    return identity


def default_cache_dir() -> Path:
    """``~/.cache/trigfarm/spline-kernel``: where the compiled kernel lives."""
    return Path.home() / ".cache" / "trigfarm" / "spline-kernel"


class SplineKernel:
    """The compiled spline: ``forward`` and ``backward`` on CPU float32/float64 tensors.

    Shapes as ``models.maf.rq_spline``: x (..., F), params (..., F·(3K-1)) grouped by kind.
    ``forward`` also returns a workspace (the softmax and derivatives it computed) that
    ``backward`` takes instead of params.
    """

    def __init__(self, library: Path) -> None:
        self.library = library
        self._lib = ctypes.CDLL(str(library))
        self.max_bins = int(self._lib.trigfarm_spline_max_bins())
        width = self._lib.trigfarm_spline_workspace_width
        width.argtypes, width.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int64
        self._workspace_width = width
        pointer, rows, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._forward, self._backward = {}, {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
            fwd = getattr(self._lib, f"trigfarm_spline_forward_{suffix}")
            fwd.argtypes = [pointer] * 5 + [rows, integer, integer, ctypes.c_double]
            fwd.restype = integer
            bwd = getattr(self._lib, f"trigfarm_spline_backward_{suffix}")
            bwd.argtypes = [pointer] * 6 + [rows, integer, integer, ctypes.c_double]
            bwd.restype = integer
            self._forward[dtype], self._backward[dtype] = fwd, bwd

    def supports(self, x: torch.Tensor, params: torch.Tensor, n_bins: int) -> bool:
        """Whether the kernel takes these inputs (CPU, float32/64, one dtype, ≤ 64 bins)."""
        return (
            x.device.type == "cpu"
            and params.device.type == "cpu"
            and x.dtype in self._forward
            and params.dtype == x.dtype
            and 2 <= n_bins <= self.max_bins
            and params.shape == (*x.shape[:-1], x.shape[-1] * (3 * n_bins - 1))
        )

    def forward(
        self, x: torch.Tensor, params: torch.Tensor, n_bins: int, bound: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """y and log|dy/dx|, each shaped like x, and the workspace for ``backward``."""
        self._check(x, params, n_bins)
        x, params = x.contiguous(), params.contiguous()
        n_features = x.shape[-1]
        rows = x.numel() // n_features
        y, log_det = torch.empty_like(x), torch.empty_like(x)
        workspace = x.new_empty(
            rows, int(self._workspace_width(n_features, n_bins)), dtype=torch.float64
        )
        self._forward[x.dtype](
            x.data_ptr(), params.data_ptr(), y.data_ptr(), log_det.data_ptr(),
            workspace.data_ptr(), rows, n_features, n_bins, bound,
        )  # fmt: skip
        return y, log_det, workspace

    def backward(
        self,
        x: torch.Tensor,
        workspace: torch.Tensor,
        grad_y: torch.Tensor,
        grad_log_det: torch.Tensor,
        n_bins: int,
        bound: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of x and params, given those of y and log|dy/dx|."""
        x = x.contiguous()
        grad_y = grad_y.to(x.dtype).expand_as(x).contiguous()
        grad_log_det = grad_log_det.to(x.dtype).expand_as(x).contiguous()
        n_features = x.shape[-1]
        grad_x = torch.empty_like(x)
        grad_params = x.new_zeros(*x.shape[:-1], n_features * (3 * n_bins - 1))
        self._backward[x.dtype](
            x.data_ptr(), workspace.data_ptr(), grad_y.data_ptr(), grad_log_det.data_ptr(),
            grad_x.data_ptr(), grad_params.data_ptr(),
            x.numel() // n_features, n_features, n_bins, bound,
        )  # fmt: skip
        return grad_x, grad_params

    def _check(self, x: torch.Tensor, params: torch.Tensor, n_bins: int) -> None:
        if not self.supports(x, params, n_bins):
            msg = (
                f"the spline kernel takes CPU float32/64 tensors of one dtype and 2-"
                f"{self.max_bins} bins; got x {tuple(x.shape)} {x.dtype}, params "
                f"{tuple(params.shape)} {params.dtype}, {n_bins} bins"
            )
            raise ValueError(msg)


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernel (or find it in the cache); returns the library's path.

    Raises:
        RuntimeError: g++ is missing or fails.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    text = b"".join(source.read_bytes() + " ".join(flags).encode() for source, flags in SOURCES)
    text += " ".join(COMMAND).encode() + host_cpu().encode()
    key = hashlib.sha256(text).hexdigest()[:16]
    library = cache_dir / key / LIBRARY_NAME
    if library.exists():
        return library
    if shutil.which(COMMAND[0]) is None:
        msg = f"{COMMAND[0]} is not on PATH: it is needed to compile the spline kernel"
        raise RuntimeError(msg)
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / LIBRARY_NAME
        objects = [Path(scratch) / f"{source.stem}.o" for source, _ in SOURCES]
        commands = [
            [*COMMAND, *flags, "-c", "-o", str(obj), str(source)]
            for (source, flags), obj in zip(SOURCES, objects, strict=True)
        ]
        commands.append([*COMMAND, "-o", str(built), *map(str, objects)])
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                msg = f"g++ failed to compile the kernels:\n{done.stderr[-4000:]}"
                raise RuntimeError(msg)
        os.replace(built, library)  # atomic: a concurrent build just replaces it
    return library


@functools.cache
def _load() -> SplineKernel | None:
    t0 = time.perf_counter()
    try:
        loaded = SplineKernel(build())
    # no kernel is never an error: the torch path computes the same function
    except (OSError, RuntimeError, AttributeError) as exc:
        log.warning("spline kernel unavailable, using the torch path: %s", exc)
        return None
    log.info("spline kernel %s ready in %.2f s", loaded.library, time.perf_counter() - t0)
    return loaded


def kernel() -> SplineKernel | None:
    """The compiled kernel (built on the first call), or None: unavailable or disabled."""
    return _load() if _state["enabled"] else None


@contextmanager
def disabled() -> Iterator[None]:
    """Use the torch path inside the block (benchmarks and tests compare the two)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before

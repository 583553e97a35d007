"""Conditional normalizing flows p(x | mjj) for the ephemeral-learning chain.

A ``ConditionalFlow`` is a masked autoregressive flow (MAF) of rational-quadratic spline
transforms (nflows) with reverse permutations in between, conditioned on the dijet mass.
x is four LHCO features taken from the ``features`` column (``FLOW_FEATURES``: mJ1, ΔmJ,
τ21 J1, τ21 J2); the context is mjj, scaled affinely.

``Preprocessing`` is fixed before training and stored with the parameters: each feature
is mapped to (0, 1) with bounds from a calibration sample or the configuration, sent
through a logit and standardised. Its log-Jacobian is added in ``log_prob``, so densities
are in physical units (per GeV for masses) and flows with different preprocessing can be
mixed. Outside the bounds the density is zero (log density -inf). A flow holds its
preprocessing as float64 buffers (``PreprocessingBuffers``), so its ``state_dict`` is
self-contained.

A flow may be an ensemble of ``n_members`` MAFs trained on the same events from different
initial weights: its density is their average (exact, by log-sum-exp), which cancels
much of the seed-to-seed noise that a single pass over a stream leaves in one MAF. The
members are evaluated together by ``models.maf.MAFEnsemble``, which computes nflows' MAF
function in one batched pass; parameters are stored under nflows' names, and
``build_maf`` builds the nflows reference from them.

``FlowMixture`` combines flows trained on different shares of the stream, each weighted
by the events it saw: p(x|m) = Σ w_i p_i(x|m), evaluated exactly with log-sum-exp.

References:
    Durkan et al., "Neural Spline Flows" (arXiv:1906.04032); Papamakarios et al.,
    "Masked Autoregressive Flow" (arXiv:1705.07057); Butter et al., "Ephemeral Learning"
    (arXiv:2202.09375).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, NamedTuple

import numpy as np
import pydantic
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import CompositeTransform, ReversePermutation
from nflows.transforms.autoregressive import (
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
)
from pydantic import ConfigDict, Field
from scipy.special import logsumexp

from models.maf import MAFEnsemble
from stream.schema import FEATURE_NAMES

FLOW_FEATURES = ("mj1", "delta_mj", "tau21_j1", "tau21_j2")
FEATURE_INDICES = tuple(FEATURE_NAMES.index(name) for name in FLOW_FEATURES)
MJJ_INDEX = FEATURE_NAMES.index("mjj")
_EPS = 1e-6
_CHUNK = 50_000  # rows evaluated at once (bounds memory for large samples)

#: The architecture's counts and sizes (``OnlineConfig``'s copies of its fields use them too).
Count = Annotated[int, Field(ge=1)]
Positive = Annotated[float, Field(gt=0)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class FlowConfig:
    """Architecture of one conditional flow."""

    n_features: Count = len(FLOW_FEATURES)
    n_transforms: Count = 4
    hidden_features: Count = 32
    n_blocks: Count = 2
    n_bins: Count = 8
    tail_bound: Positive = 4.0
    n_members: Count = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> FlowConfig:
        return FlowConfig(**json.loads(text))


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """x -> standardised logit of (x - lower) / (upper - lower); mjj -> (mjj - shift) / scale.

    Arrays are float64 with one entry per feature; fixed before the run and stored with
    the flow's parameters (a flow holds them as ``PreprocessingBuffers``, which computes
    ``forward``, ``inverse`` and ``context`` here too).
    """

    lower: np.ndarray
    upper: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    mjj_shift_gev: float = 3500.0
    mjj_scale_gev: float = 1000.0

    def __post_init__(self) -> None:
        for key in ("lower", "upper", "mean", "std"):
            value = np.asarray(getattr(self, key), dtype=np.float64).copy()
            value.setflags(write=False)
            object.__setattr__(self, key, value)
        shapes = {self.lower.shape, self.upper.shape, self.mean.shape, self.std.shape}
        if len(shapes) != 1 or self.lower.ndim != 1:
            msg = f"preprocessing arrays must be 1-d of one length, got shapes {shapes}"
            raise ValueError(msg)
        if not (np.all(self.upper > self.lower) and np.all(self.std > 0)):
            msg = f"need upper > lower and std > 0, got {self.lower}, {self.upper}, {self.std}"
            raise ValueError(msg)
        if self.mjj_scale_gev <= 0:
            msg = f"mjj_scale_gev must be > 0, got {self.mjj_scale_gev}"
            raise ValueError(msg)

    @staticmethod
    def from_bounds(
        lower: Sequence[float],
        upper: Sequence[float],
        *,
        mjj_shift_gev: float = 3500.0,
        mjj_scale_gev: float = 1000.0,
    ) -> Preprocessing:
        """Bounds from configuration; the logit is standardised by its value for a uniform x
        (mean 0, std π/√3)."""
        n = len(lower)
        return Preprocessing(
            np.asarray(lower),
            np.asarray(upper),
            np.zeros(n),
            np.full(n, math.pi / math.sqrt(3)),
            mjj_shift_gev,
            mjj_scale_gev,
        )

    @staticmethod
    def calibrate(
        x: np.ndarray,
        *,
        margin: float = 0.05,
        mjj_shift_gev: float = 3500.0,
        mjj_scale_gev: float = 1000.0,
    ) -> Preprocessing:
        """Bounds from a calibration sample x (N, F), widened by ``margin`` of the range on
        each side; the logit is standardised with the sample's mean and std."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
            msg = f"calibration needs a finite (N >= 2, F) sample, got shape {x.shape}"
            raise ValueError(msg)
        lo, hi = x.min(axis=0), x.max(axis=0)
        width = np.maximum(hi - lo, 1e-3)
        lower, upper = lo - margin * width, hi + margin * width
        u = np.clip((x - lower) / (upper - lower), _EPS, 1 - _EPS)
        z = np.log(u) - np.log1p(-u)
        return Preprocessing(
            lower,
            upper,
            z.mean(axis=0),
            np.maximum(z.std(axis=0), 1e-3),
            mjj_shift_gev,
            mjj_scale_gev,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything as named float64 arrays (for a snapshot)."""
        return {
            "lower": self.lower,
            "upper": self.upper,
            "mean": self.mean,
            "std": self.std,
            "mjj": np.array([self.mjj_shift_gev, self.mjj_scale_gev]),
        }

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> Preprocessing:
        mjj = arrays["mjj"]
        return Preprocessing(
            arrays["lower"],
            arrays["upper"],
            arrays["mean"],
            arrays["std"],
            float(mjj[0]),
            float(mjj[1]),
        )

    def inside(self, x: np.ndarray) -> np.ndarray:
        """Rows of x strictly inside the bounds (where the density can be non-zero)."""
        return np.all((x > self.lower) & (x < self.upper), axis=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and log|dz/dx| per row; x is clamped into the bounds (see ``inside``)."""
        return PreprocessingBuffers(self).forward(x)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Physical x for standardised logit z."""
        return PreprocessingBuffers(self).inverse(z)

    def context(self, mjj_gev: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The flow's (N, 1) context for dijet masses in GeV."""
        return PreprocessingBuffers(self).context(mjj_gev)


class PreprocessingBuffers(torch.nn.Module):
    """A ``Preprocessing`` as float64 buffers named as in ``Preprocessing.arrays``, so that
    it is in its owner's ``state_dict``. Forward and inverse compute in the input's dtype
    (float32 in training) from the values cast as ``Preprocessing`` always cast them; the
    casts are made once per dtype and device (not per call), and again after
    ``load_state_dict``, the one way to change the buffers."""

    lower: torch.Tensor
    upper: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    mjj: torch.Tensor  # (shift, scale) in GeV

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        for name, array in preprocessing.arrays().items():
            self.register_buffer(name, torch.tensor(array, dtype=torch.float64))
        self._casts: dict[tuple[torch.dtype, torch.device], _Cast] = {}
        self.register_load_state_dict_post_hook(_forget_casts)

    def value(self) -> Preprocessing:
        """The buffers' values as a ``Preprocessing`` (copies)."""
        return Preprocessing.from_arrays({k: v.cpu().numpy() for k, v in self.named_buffers()})

    def _cast(self, dtype: torch.dtype) -> _Cast:
        """The values in ``dtype``; the width is taken in float64 first, as it always was."""
        key = (dtype, self.lower.device)
        if key not in self._casts:
            width = self.upper - self.lower
            values = (self.lower, width, self.mean, self.std, self.mjj[0], self.mjj[1])
            self._casts[key] = _Cast(*(v.to(dtype) for v in values))
        return self._casts[key]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and log|dz/dx| per row; x is clamped into the bounds (``Preprocessing.inside``)."""
        c = self._cast(x.dtype)
        u = ((x - c.lower) / c.width).clamp(_EPS, 1 - _EPS)
        z = (torch.log(u) - torch.log1p(-u) - c.mean) / c.std
        log_jac = -(torch.log(c.width) + torch.log(u) + torch.log1p(-u) + torch.log(c.std))
        return z, log_jac.sum(dim=1)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Physical x for standardised logit z."""
        c = self._cast(z.dtype)
        return c.lower + c.width * torch.sigmoid(z * c.std + c.mean)

    def context(self, mjj_gev: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The flow's (N, 1) float32 context for dijet masses in GeV."""
        mjj = torch.from_numpy(np.array(mjj_gev, dtype=np.float32)).reshape(-1, 1)
        c = self._cast(mjj.dtype)
        return (mjj - c.mjj_shift) / c.mjj_scale


class _Cast(NamedTuple):
    """``PreprocessingBuffers``' values in one dtype (the shift and scale 0-d)."""

    lower: torch.Tensor
    width: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    mjj_shift: torch.Tensor
    mjj_scale: torch.Tensor


def _forget_casts(module: torch.nn.Module, _: object) -> None:
    """After ``load_state_dict``: the casts are of the old values."""
    assert isinstance(module, PreprocessingBuffers)
    module._casts.clear()


def build_maf(config: FlowConfig) -> Flow:
    """One member as an nflows MAF of rational-quadratic splines (the reference that
    ``MAFEnsemble`` reproduces); deterministic structure (no random masks or
    permutations), so parameters alone rebuild it."""
    transforms = []
    for _ in range(config.n_transforms):
        transforms.append(
            MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                features=config.n_features,
                hidden_features=config.hidden_features,
                context_features=1,
                num_bins=config.n_bins,
                tails="linear",
                tail_bound=config.tail_bound,
                num_blocks=config.n_blocks,
            )
        )
        transforms.append(ReversePermutation(config.n_features))
    return Flow(CompositeTransform(transforms), StandardNormal([config.n_features]))


class ConditionalFlow(torch.nn.Module):
    """p(x | mjj) in physical units: a MAF (or the average of ``n_members`` MAFs) on
    preprocessed features. The preprocessing is the buffers of ``pre`` (``pre.lower``, ...
    in the ``state_dict``); ``preprocessing`` reads it back as a ``Preprocessing``.

    Example:
        >>> import numpy as np
        >>> pre = Preprocessing.from_bounds([0, 0], [1, 1])
        >>> flow = ConditionalFlow(FlowConfig(n_features=2, n_transforms=1), pre)
        >>> flow.log_prob(np.full((3, 2), 0.5), np.full(3, 3500.0)).shape
        (3,)
    """

    def __init__(self, config: FlowConfig, preprocessing: Preprocessing) -> None:
        super().__init__()
        if preprocessing.lower.size != config.n_features:
            msg = (
                f"preprocessing has {preprocessing.lower.size} features, "
                f"the flow {config.n_features}"
            )
            raise ValueError(msg)
        self.config = config
        self.pre = PreprocessingBuffers(preprocessing)
        self.maf = MAFEnsemble(
            n_members=config.n_members,
            n_features=config.n_features,
            n_transforms=config.n_transforms,
            hidden=config.hidden_features,
            n_blocks=config.n_blocks,
            n_bins=config.n_bins,
            tail_bound=config.tail_bound,
        )

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing held in ``pre``, as a value (a copy)."""
        return self.pre.value()

    def nflows_members(self) -> list[Flow]:
        """The members as nflows MAFs with the same parameters (the reference)."""
        mafs = torch.nn.ModuleList(build_maf(self.config) for _ in range(self.config.n_members))
        own = dict(mafs.named_parameters())
        with torch.no_grad():
            for name, value in self.parameter_arrays().items():
                own[name].copy_(torch.from_numpy(value))
        return [maf for maf in mafs if isinstance(maf, Flow)]

    def loss(self, x: np.ndarray, mjj_gev: np.ndarray) -> torch.Tensor:
        """Mean negative log-likelihood in preprocessed space, summed over the members: each
        member's gradient is that of its own likelihood (the training objective)."""
        z, _ = self.pre.forward(torch.from_numpy(np.array(x, dtype=np.float32)))
        context = self.pre.context(mjj_gev)
        return -self.maf.log_prob(z, context).mean(dim=1).sum()

    def _log_prob_z(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log of the members' average density in preprocessed space."""
        terms = self.maf.log_prob(z, context)
        return torch.logsumexp(terms, dim=0) - math.log(self.config.n_members)

    @torch.no_grad()
    def log_prob(self, x: np.ndarray, mjj_gev: np.ndarray) -> np.ndarray:
        """log p(x | mjj) per row in physical units; -inf outside the preprocessing bounds."""
        x = np.asarray(x, dtype=np.float64)
        z, log_jac = self.pre.forward(torch.from_numpy(np.array(x, dtype=np.float32)))
        context = self.pre.context(mjj_gev)
        out = np.empty(len(x))
        for start in range(0, len(x), _CHUNK):
            rows = slice(start, start + _CHUNK)
            out[rows] = (self._log_prob_z(z[rows], context[rows]) + log_jac[rows]).double().numpy()
        out[~self.preprocessing.inside(x)] = -np.inf
        return out

    @torch.no_grad()
    def sample(self, mjj_gev: np.ndarray, *, seed: int | None = None) -> np.ndarray:
        """One sample of x per given mjj value, in physical units, as float64 (N, F); for an
        ensemble each row comes from a member drawn uniformly."""
        mjj = np.asarray(mjj_gev, dtype=np.float64).reshape(-1)
        out = np.zeros((mjj.size, self.config.n_features))
        # A seeded draw leaves the global generator as it found it (CPU only: devices=[]).
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            which = torch.randint(self.config.n_members, (mjj.size,)).numpy()
            for member in range(self.config.n_members):
                rows = np.flatnonzero(which == member)
                for start in range(0, rows.size, _CHUNK):
                    chunk = rows[start : start + _CHUNK]
                    context = self.pre.context(mjj[chunk])
                    noise = torch.randn(len(chunk), self.config.n_features)
                    z = self.maf.sample_member(member, noise, context)
                    out[chunk] = self.pre.inverse(z.double()).numpy()
        return out

    def parameter_arrays(self) -> dict[str, np.ndarray]:
        """The trainable parameters as float32 numpy arrays (copies), by nflows name."""
        return self.maf.nflows_arrays()

    def load_parameter_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Set every trainable parameter from ``arrays`` (names and shapes must match)."""
        self.maf.load_nflows_arrays(arrays)


class FlowMixture:
    """Σ_i w_i p_i(x|m) with w_i ∝ events seen by flow i; exact density and sampling.

    Why a mixture and not parameter averaging: each node's flow is a valid density for its
    share of the stream, and a weighted mixture of densities is again a density, exactly,
    whatever the flows learned. Averaging the parameters of independently trained flows
    does not average their densities (the map from parameters to density is non-linear and
    the flows need not be aligned), so it is only safe for flows that start from the same
    weights and stay close (federated-averaging style). With shares of one stream drawn
    at random, the mixture is also the maximum-likelihood combination when each flow is
    good; its cost is evaluation time linear in the number of nodes.
    """

    def __init__(self, flows: Sequence[ConditionalFlow], weights: Sequence[float]) -> None:
        if not flows or len(flows) != len(weights):
            msg = f"need one weight per flow and at least one flow, got {len(flows)}/{len(weights)}"
            raise ValueError(msg)
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            msg = f"weights must be >= 0 with a positive sum, got {list(weights)}"
            raise ValueError(msg)
        self.flows = list(flows)
        self.weights = w / w.sum()

    def log_prob(self, x: np.ndarray, mjj_gev: np.ndarray) -> np.ndarray:
        """log Σ w_i p_i(x|m), per row, by log-sum-exp (-inf where every p_i is 0)."""
        terms = np.stack([f.log_prob(x, mjj_gev) for f in self.flows])
        out: np.ndarray = logsumexp(terms, axis=0, b=self.weights[:, None])
        return out

    def sample(self, mjj_gev: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """One sample per mjj: the component is drawn with probability w_i, then x from it."""
        mjj = np.asarray(mjj_gev, dtype=np.float64).reshape(-1)
        rng = np.random.default_rng(seed)
        which = rng.choice(len(self.flows), size=mjj.size, p=self.weights)
        out = np.zeros((mjj.size, self.flows[0].config.n_features))
        for i, flow in enumerate(self.flows):
            rows = np.flatnonzero(which == i)
            if rows.size:
                out[rows] = flow.sample(mjj[rows], seed=seed * 1000 + i)
        return out

"""The anomaly searches: CWoLa, CATHODE and ANODE from archived flows, and two baselines.

Every method returns an anomaly score for events (features (N, 8)); higher is more
signal-like. The classifier methods train on samples or stored events only, never on the
labelled test events that score them.

- ``cwola_flows``: all-data flow samples at signal-region mjj (label 1) against samples at
  sideband mjj (label 0), mjj drawn from the spectrum the flows saw (CWoLa, arXiv:1708.02949).
- ``cathode``: sideband flow interpolated into the signal region (label 0) against
  data-flow samples there, or against the stored signal-region events where the
  archive kept them (the hybrid) (CATHODE, arXiv:2109.00546).
- ``anode``: log p_data(x|m) - log p_sideband(x|m), the likelihood ratio evaluated
  directly (ANODE, arXiv:2001.04990).
- ``anode_interpolated``: the same ratio from the all-data flow alone, its background
  density interpolated across the window from the two sidebands (any window).

The data flows are the K signal-region flows where the archive has them (they learned
only signal-region events, several steps each, each all folds of ``models.online.fold``
but one), else the all-data flow. ANODE scores each event with the flow that never trained
on it, so that a cut on stored events does not favour a flow's own training events.
- ``cwola_stored``: CWoLa on stored events, the conventional path that keeps everything.
- ``idealised``: stored signal-region events against independent true background there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from analysis.classifier import ClassifierConfig, Ensemble, train_ensemble
from analysis.data import Events
from models.flows import FEATURE_INDICES, MJJ_INDEX, FlowMixture
from models.online import FOLD_ROLE_PREFIX, fold, fold_roles, scoring_flow
from models.snapshot import FlowSnapshot

METHODS = ("cwola", "cathode", "anode", "anode_interpolated", "cwola_stored", "idealised")


@dataclass(frozen=True, slots=True)
class SearchConfig:
    """Windows, sample sizes and the classifier of the searches."""

    signal_region_gev: tuple[float, float] = (3300.0, 3700.0)
    sideband_width_gev: float = 300.0
    n_samples: int = 40_000
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    seed: int = 0

    @property
    def sidebands_gev(self) -> tuple[tuple[float, float], tuple[float, float]]:
        low, high = self.signal_region_gev
        w = self.sideband_width_gev
        return (low - w, low), (high, high + w)


@dataclass(frozen=True)
class FlowModels:
    """The archived flows combined over nodes, and the mjj spectrum they saw."""

    all_data: FlowMixture
    sideband: FlowMixture
    mjj_hist: np.ndarray
    mjj_edges: np.ndarray
    events_seen: int
    nodes: tuple[str, ...]
    signal_region: tuple[FlowMixture, ...] | None = None

    def data_log_prob(self, features: np.ndarray, mjj_gev: np.ndarray) -> np.ndarray:
        """log p_data(x | m) of events (features (N, 8)) at masses ``mjj_gev``: from the
        signal-region flow that did not train on each event, else the all-data flow."""
        x = _x(features)
        if self.signal_region is None:
            return self.all_data.log_prob(x, mjj_gev)
        n_folds = len(self.signal_region)
        flows = scoring_flow(fold(features, n_folds), n_folds)
        out = np.empty(len(x))
        for k, flow in enumerate(self.signal_region):
            rows = flows == k
            out[rows] = flow.log_prob(x[rows], mjj_gev[rows])
        return out

    def sample_data(self, mjj_gev: np.ndarray, *, seed: int) -> np.ndarray:
        """Samples of the data density at ``mjj_gev`` (an equal share from each
        signal-region flow)."""
        if self.signal_region is None:
            return self.all_data.sample(mjj_gev, seed=seed)
        shares = np.array_split(mjj_gev, len(self.signal_region))
        return np.concatenate(
            [flow.sample(m, seed=seed) for flow, m in zip(self.signal_region, shares, strict=True)]
        )

    @staticmethod
    def from_snapshots(snapshots: Sequence[FlowSnapshot]) -> FlowModels:
        """Mixtures weighted by events seen; needs the all-data and sideband roles from at
        least one node, and every signal-region flow (0 to K - 1) or none."""
        by_role: dict[str, list[FlowSnapshot]] = {"all": [], "sideband": []}
        for snap in snapshots:
            by_role.setdefault(snap.role, []).append(snap)
        if not by_role["all"] or not by_role["sideband"]:
            msg = f"need all-data and sideband snapshots, got roles {sorted(by_role)}"
            raise ValueError(msg)
        mixtures = {
            role: FlowMixture([s.flow() for s in snaps], [s.events_seen for s in snaps])
            for role, snaps in by_role.items()
            if snaps
        }
        folds = sorted(role for role in mixtures if role.startswith(FOLD_ROLE_PREFIX))
        if folds and (len(folds) < 2 or set(folds) != set(fold_roles(len(folds)))):
            msg = f"need signal-region flows 0 to K - 1 (K >= 2) or none, got {folds}"
            raise ValueError(msg)
        first = by_role["all"][0]
        return FlowModels(
            mixtures["all"],
            mixtures["sideband"],
            np.sum([s.arrays["mjj_hist"] for s in by_role["all"]], axis=0),
            np.asarray(first.arrays["mjj_edges"]),
            sum(s.events_seen for s in by_role["all"]),
            tuple(sorted({s.node_id for s in by_role["all"]})),
            tuple(mixtures[role] for role in fold_roles(len(folds))) if folds else None,
        )

    def sample_mjj(
        self, windows: Sequence[tuple[float, float]], n: int, rng: np.random.Generator
    ) -> np.ndarray:
        """mjj values drawn from the seen spectrum restricted to the windows."""
        lo, hi = self.mjj_edges[:-1], self.mjj_edges[1:]
        inside = np.zeros(lo.size, bool)
        for a, b in windows:
            inside |= (lo >= a) & (hi <= b)
        weights = np.where(inside, self.mjj_hist, 0.0)
        if weights.sum() <= 0:
            msg = f"the flows saw no events in {list(windows)}"
            raise ValueError(msg)
        bins = rng.choice(lo.size, size=n, p=weights / weights.sum())
        return rng.uniform(lo[bins], hi[bins])


def _x(features: np.ndarray) -> np.ndarray:
    return np.asarray(features)[:, FEATURE_INDICES]


def _classify(x1: np.ndarray, x0: np.ndarray, config: SearchConfig) -> Ensemble:
    x = np.concatenate([x1, x0])
    y = np.r_[np.ones(len(x1)), np.zeros(len(x0))]
    return train_ensemble(x, y, config.classifier)


def cwola_flows(models: FlowModels, config: SearchConfig) -> Ensemble:
    rng = np.random.default_rng([config.seed, 1])
    n = config.n_samples
    m_sr = models.sample_mjj([config.signal_region_gev], n, rng)
    m_sb = models.sample_mjj(config.sidebands_gev, n, rng)
    x_sr = models.all_data.sample(m_sr, seed=config.seed * 10 + 1)
    x_sb = models.all_data.sample(m_sb, seed=config.seed * 10 + 2)
    return _classify(x_sr, x_sb, config)


def cathode(models: FlowModels, config: SearchConfig, *, stored: Events | None = None) -> Ensemble:
    """With ``stored`` events, the data side is the stored signal-region events (hybrid)."""
    rng = np.random.default_rng([config.seed, 2])
    n = config.n_samples
    background = models.sideband.sample(
        models.sample_mjj([config.signal_region_gev], n, rng), seed=config.seed * 10 + 3
    )
    if stored is None:
        m_data = models.sample_mjj([config.signal_region_gev], n, rng)
        data = models.sample_data(m_data, seed=config.seed * 10 + 4)
    else:
        data = _x(stored.select(stored.in_window(config.signal_region_gev)).features)
    return _classify(data, background, config)


def anode_scores(models: FlowModels, features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    x, mjj = _x(features), features[:, MJJ_INDEX]
    with np.errstate(invalid="ignore"):
        ratio = models.data_log_prob(features, mjj) - models.sideband.log_prob(x, mjj)
    # Outside both flows' support (-inf - -inf) an event is not evidence of anything.
    return np.where(np.isnan(ratio), -np.inf, ratio)


class ConditionalDensity(Protocol):
    """log p(x | mjj) of jet features x (N, d) at masses ``mjj_gev`` (N,): a flow, a
    mixture of flows, or an analytic density in tests."""

    def log_prob(self, x: np.ndarray, mjj_gev: np.ndarray) -> np.ndarray: ...


def anode_interpolated(
    all_data: ConditionalDensity,
    features: np.ndarray,
    config: SearchConfig,
    *,
    cache: dict[float, np.ndarray] | None = None,
) -> np.ndarray:
    """ANODE in any window from the all-data flow alone: log p(x | m_c) at the window's
    centre minus the mean of log p(x | m) at the centres of its two sidebands.

    The mean of the two logs stands for the background's log density at m_c: exactly (up
    to a constant, which no cut sees) where log p(x | m) is linear in m, or quadratic with
    the same curvature for every x. A signal confined to the window raises only the first
    term. No flow has to exclude the window, so one archive serves every window. The
    all-data flow learned the events it scores, and the interpolation is worst where the
    spectrum turns on; the spurious-signal fraction measured on controls carries both
    (``analysis.spurious``). ``cache`` (mass -> log densities of these ``features``) lets
    a scan of sliding windows, which share masses, evaluate the flow once per mass.
    """
    x = _x(np.asarray(features))
    (low_band, _), (_, high_band) = config.sidebands_gev
    low, high = config.signal_region_gev

    def at(mass: float) -> np.ndarray:
        if cache is not None and mass in cache:
            return cache[mass]
        out = all_data.log_prob(x, np.full(len(x), mass))
        if cache is not None:
            cache[mass] = out
        return out

    with np.errstate(invalid="ignore"):
        ratio = at(0.5 * (low + high)) - 0.5 * (
            at(0.5 * (low_band + low)) + at(0.5 * (high + high_band))
        )
    return np.where(np.isnan(ratio), -np.inf, ratio)


def cwola_stored(stored: Events, config: SearchConfig) -> Ensemble:
    side = stored.in_window(config.sidebands_gev[0]) | stored.in_window(config.sidebands_gev[1])
    signal_region = stored.in_window(config.signal_region_gev)
    return _classify(_x(stored.features[signal_region]), _x(stored.features[side]), config)


def idealised(stored: Events, true_background: Events, config: SearchConfig) -> Ensemble:
    sr = config.signal_region_gev
    data = _x(stored.features[stored.in_window(sr)])
    background = _x(true_background.features[true_background.in_window(sr)])
    return _classify(data, background, config)


def scores(model: Ensemble, features: np.ndarray) -> np.ndarray:
    """An ensemble's score for events."""
    return model.predict(_x(features))

"""The scan: a bump hunt in every signal-region window, and the look-elsewhere effect.

For each window of ``ScanConfig.windows_gev`` (by default 400 GeV wide, every 200 GeV from
2.9 to 6 TeV, fitted from 2.8 TeV: above the selection's turn-on) a method gives a score
for the events (its own classifier or likelihood ratio for that window, see
``window_scorer``); for each working point the events with the highest scores are kept,
the dijet function is fitted outside the window and the count inside it is tested
(``analysis.bumphunt``): one local p-value per (window, working point). After a cut, σ_b
also carries the method's spurious-signal fraction (``ScanConfig.spurious_fraction``,
measured on no-signal controls, see ``analysis.spurious``).

The global p-value is stated with its method:

- ``trials`` (default): Bonferroni, p_global = min(1, N p_min) with N the number of
  (window, working point) tests that had a valid fit. It never understates the global
  p-value; overlapping windows and nested cuts are correlated, so it overstates it.
- ``toys``: background-only pseudo-experiments. For each working point, Poisson toys of the
  dijet fit to the whole spectrum (no window masked) are scanned like the data; a toy's
  statistic is its smallest local p over windows and working points (the working points'
  toys are drawn independently, which again errs on the conservative side), and
  p_global = (1 + #{toys with min p <= observed}) / (1 + n_toys). Costs n_toys scans.

Why the default windows start at 2.9 TeV: the LHCO R&D (and trigfarm's) events need a
1.2 TeV jet, so mjj turns on below ~2.6 TeV, where no falling dijet function applies; the
fit range starts above the peak (2.8 TeV) and a window needs a sideband bin below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pydantic
from matplotlib.figure import Figure
from pydantic import AfterValidator, ConfigDict, Field, model_validator
from scipy import stats

from analysis.bumphunt import FIT_RANGE_GEV, BumpResult, bump_at, fit_background, keep_top

Window = tuple[float, float]
GLOBAL_METHODS = ("trials", "toys")
#: The default scan: START, STOP, WIDTH, STEP of the sliding windows (GeV), inside the
#: fitted range with one bin to spare at each end.
SLIDING_WINDOWS_GEV = (2900.0, 6000.0, 400.0, 200.0)


def sliding_windows(
    start_gev: float = SLIDING_WINDOWS_GEV[0],
    stop_gev: float = SLIDING_WINDOWS_GEV[1],
    width_gev: float = SLIDING_WINDOWS_GEV[2],
    step_gev: float = SLIDING_WINDOWS_GEV[3],
) -> tuple[Window, ...]:
    """Windows ``width_gev`` wide every ``step_gev`` from ``start_gev``; the last one ends
    at ``stop_gev``.

    Example:
        >>> sliding_windows(2700, 3600, 400, 200)
        ((2700.0, 3100.0), (2900.0, 3300.0), (3100.0, 3500.0), (3200.0, 3600.0))
    """
    if width_gev <= 0 or step_gev <= 0 or stop_gev - start_gev < width_gev:
        msg = f"need 0 < width <= stop - start and step > 0, got {start_gev=} {stop_gev=}"
        raise ValueError(msg)
    lows = np.arange(start_gev, stop_gev - width_gev + 1e-6, step_gev)
    windows = [(float(lo), float(lo + width_gev)) for lo in lows]
    if windows[-1][1] < stop_gev - 1e-6:
        windows.append((float(stop_gev - width_gev), float(stop_gev)))
    return tuple(windows)


def _global_method(method: str) -> str:
    """``method`` if it is one of ``GLOBAL_METHODS``."""
    if method not in GLOBAL_METHODS:
        msg = f"must be one of {GLOBAL_METHODS}, got {method!r}"
        raise ValueError(msg)
    return method


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class ScanConfig:
    """Windows, working points, binning and how the global p-value is computed."""

    windows_gev: Annotated[tuple[Window, ...], Field(min_length=1)] = field(
        default_factory=sliding_windows
    )
    efficiencies: Annotated[
        tuple[Annotated[float, Field(gt=0, le=1)], ...], Field(min_length=1)
    ] = (1.0, 0.2, 0.05, 0.01)
    fit_range_gev: tuple[float, float] = FIT_RANGE_GEV
    bin_gev: Annotated[float, Field(gt=0)] = 100.0
    global_method: Annotated[str, AfterValidator(_global_method)] = "trials"
    n_toys: Annotated[int, Field(ge=1)] = 200
    seed: int = 0
    #: The method's sculpting, as a fraction of the window's background after a cut
    #: (ε < 1), added to σ_b (``analysis.spurious``; ``trigfarm analyze`` sets the
    #: method's measured value). 0 trusts the selection not to sculpt.
    spurious_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _windows_inside_fit_range(self) -> ScanConfig:
        lo, hi = self.fit_range_gev
        if not lo < hi:
            msg = f"need fit_range low < high, got {self.fit_range_gev}"
            raise ValueError(msg)
        for a, b in self.windows_gev:
            if not (lo + self.bin_gev <= a < b <= hi - self.bin_gev):
                msg = f"window ({a}, {b}) needs a sideband bin inside fit range {lo}..{hi}"
                raise ValueError(msg)
        return self

    @property
    def edges(self) -> np.ndarray:
        lo, hi = self.fit_range_gev
        return np.arange(lo, hi + self.bin_gev / 2, self.bin_gev)


@dataclass(frozen=True)
class ScanResult:
    """Every (window, working point) bump hunt, and the global p-value with its method."""

    config: ScanConfig
    bumps: tuple[BumpResult, ...]
    global_pvalue: float
    global_method: str
    n_trials: int
    events: int

    @property
    def global_significance(self) -> float:
        return z_of(self.global_pvalue)

    def best(self) -> BumpResult | None:
        """The test with the smallest local p-value (None if no fit was valid)."""
        valid = [b for b in self.bumps if math.isfinite(b.pvalue)]
        return min(valid, key=lambda b: b.pvalue) if valid else None

    def table(self, efficiency: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window centres, local Z and local p for one working point."""
        rows = [b for b in self.bumps if b.efficiency == efficiency]
        centres = np.array([0.5 * sum(b.window_gev) for b in rows])
        return centres, np.array([b.significance for b in rows]), np.array([b.pvalue for b in rows])

    def method_text(self) -> str:
        if self.global_method == "trials":
            return f"trials factor {self.n_trials} (Bonferroni over windows x working points)"
        return f"{self.config.n_toys} background-only toys (min local p over the scan)"

    def summary(self) -> dict[str, Any]:
        best = self.best()
        return {
            "windows_gev": [list(w) for w in self.config.windows_gev],
            "efficiencies": list(self.config.efficiencies),
            "events": self.events,
            "n_trials": self.n_trials,
            "min_local_pvalue": best.pvalue if best else float("nan"),
            "max_local_significance": best.significance if best else float("nan"),
            "best_window_gev": list(best.window_gev) if best else None,
            "best_efficiency": best.efficiency if best else None,
            "global_pvalue": self.global_pvalue,
            "global_significance": self.global_significance,
            "global_method": self.global_method,
            "global_method_text": self.method_text(),
            "spurious_fraction": self.config.spurious_fraction,
            "tests": [b.summary() for b in self.bumps],
        }


def z_of(pvalue: float) -> float:
    """One-sided Z of a p-value: Φ⁻¹(1 - p)."""
    return float(stats.norm.isf(pvalue)) if math.isfinite(pvalue) else float("nan")


def spectra(
    mjj: np.ndarray, scores: np.ndarray | None, config: ScanConfig
) -> dict[float, np.ndarray]:
    """Counts per bin in the fit range after each working point's cut (the quantile is
    taken over the events in the fit range)."""
    edges = config.edges
    mjj = np.asarray(mjj, np.float64)
    inside = (mjj >= edges[0]) & (mjj < edges[-1])
    out = {}
    for eff in config.efficiencies:
        if scores is None and eff < 1:
            continue
        keep = keep_top(np.asarray(scores)[inside], eff) if scores is not None else slice(None)
        out[eff] = np.histogram(mjj[inside][keep], edges)[0].astype(np.float64)
    return out


def _scan_spectra(
    spectra_of: Callable[[Window], dict[float, np.ndarray]], config: ScanConfig
) -> list[BumpResult]:
    bumps = []
    for window in config.windows_gev:
        for eff, counts in spectra_of(window).items():
            bumps.append(
                bump_at(
                    counts, config.edges, window, eff, spurious_fraction=config.spurious_fraction
                )
            )
    return bumps


def scan(
    mjj: np.ndarray,
    scorer: Callable[[Window], np.ndarray | None] | None,
    config: ScanConfig | None = None,
) -> ScanResult:
    """Scan ``config.windows_gev``.

    Arguments:
        mjj: the events' dijet masses [GeV].
        scorer: gives, for a window, each event's score (aligned with ``mjj``) or None if
            the method has none for that window (then only ε = 1 is tested there). None:
            no cuts at all (the plain dijet bump hunt).
        config: the scan; default ``ScanConfig()``.

    Returns:
        Every local test and the global p-value (``config.global_method``).
    """
    config = config or ScanConfig()
    mjj = np.asarray(mjj, np.float64)

    def spectra_of(window: Window) -> dict[float, np.ndarray]:
        return spectra(mjj, scorer(window) if scorer is not None else None, config)

    bumps = _scan_spectra(spectra_of, config)
    return _with_global(bumps, config, mjj, spectra_of)


def _with_global(
    bumps: list[BumpResult],
    config: ScanConfig,
    mjj: np.ndarray,
    spectra_of: Callable[[Window], dict[float, np.ndarray]],
) -> ScanResult:
    pvalues = np.array([b.pvalue for b in bumps])
    valid = np.isfinite(pvalues)
    n_trials = int(valid.sum())
    edges = config.edges
    n_events = int(((mjj >= edges[0]) & (mjj < edges[-1])).sum())
    if n_trials == 0:
        return ScanResult(config, tuple(bumps), float("nan"), config.global_method, 0, n_events)
    p_min = float(pvalues[valid].min())
    if config.global_method == "trials":
        p_global = trials_pvalue(pvalues)
    else:
        # Background-only toys of the spectra the data gave (each working point's spectrum
        # is the same for every window when there is no score; otherwise the first
        # window's serves, as the cut keeps a fixed fraction wherever it is applied).
        first = spectra_of(config.windows_gev[0])
        p_global = toy_global_pvalue(first, p_min, config)
    return ScanResult(config, tuple(bumps), p_global, config.global_method, n_trials, n_events)


def trials_pvalue(pvalues: Sequence[float] | np.ndarray) -> float:
    """Bonferroni: min(1, N p_min) over the N finite local p-values (NaN if none)."""
    p = np.asarray(pvalues, np.float64)
    valid = p[np.isfinite(p)]
    return min(1.0, valid.size * float(valid.min())) if valid.size else float("nan")


def toy_global_pvalue(
    spectra_by_eff: dict[float, np.ndarray], p_min: float, config: ScanConfig
) -> float:
    """Fraction of background-only toys whose smallest local p over the scan is at most
    ``p_min`` (with the +1 of an unbiased Monte Carlo p-value)."""
    rng = np.random.default_rng([config.seed, 7])
    edges = config.edges
    means = {}
    for eff, counts in spectra_by_eff.items():
        fit = fit_background(edges, counts)
        if fit is not None:
            means[eff] = fit.expected
    if not means:
        return float("nan")
    hits = 0
    for _ in range(config.n_toys):
        toy_p = np.inf
        for eff, mean in means.items():
            toy = rng.poisson(mean).astype(np.float64)
            for window in config.windows_gev:
                p = bump_at(
                    toy, edges, window, eff, spurious_fraction=config.spurious_fraction
                ).pvalue
                if math.isfinite(p):
                    toy_p = min(toy_p, p)
        hits += toy_p <= p_min
    return (1 + hits) / (1 + config.n_toys)


# ---- scores per window from the archived flows -------------------------------------------


def window_scorer(
    method: str,
    flow_sets: Any,
    search: Any,
    features: np.ndarray,
    *,
    stored: Any = None,
    true_background: Any = None,
) -> Callable[[Window], np.ndarray | None]:
    """Per-window scores of ``features`` for a method of ``analysis.methods``.

    ``flow_sets`` is ``analysis.scan.FlowSets`` (the archived flows grouped by the window
    their sideband flow never saw). A method that needs a sideband flow (CATHODE, ANODE)
    scores only the windows that a sideband flow excluded; elsewhere it returns None.
    ``anode_interpolated`` needs only the all-data flow and scores every window.

    ANODE here is ``anode_at_window``: the ratio evaluated at the window's centre mass for
    every event, so the cut depends on the jet features alone, as a classifier's does. The
    per-event-mass ratio (``anode_event_mass``) sculpts mjj: the sideband flow only
    interpolates inside the window, the ratio is larger there for background too, and the
    cut makes a bump (see ``benchmarks/RESULTS.md``).
    """
    from analysis import methods

    log_densities: dict[float, np.ndarray] = {}  # the all-data flow's, by mass

    def score(window: Window) -> np.ndarray | None:
        config = replace(search, signal_region_gev=window)
        models = flow_sets.for_window(window)
        if method in ("anode", "anode_event_mass", "cathode", "cathode_hybrid") and models is None:
            return None
        if method == "anode":
            assert models is not None
            return anode_at_window(models, features, window)
        if method == "anode_interpolated":
            all_data = flow_sets.any().all_data
            return methods.anode_interpolated(all_data, features, config, cache=log_densities)
        if method == "anode_event_mass":
            assert models is not None
            return methods.anode_scores(models, features)
        if method == "cwola":
            model = methods.cwola_flows(flow_sets.any(), config)
        elif method == "cathode":
            model = methods.cathode(models, config)
        elif method == "cathode_hybrid":
            model = methods.cathode(models, config, stored=stored)
        elif method == "cwola_stored":
            model = methods.cwola_stored(stored, config)
        elif method == "idealised":
            model = methods.idealised(stored, true_background, config)
        else:
            msg = f"unknown method {method!r}"
            raise ValueError(msg)
        return methods.scores(model, features)

    return score


def anode_at_window(models: Any, features: np.ndarray, window: Window) -> np.ndarray:
    """log p_data(x | m_c) - log p_sideband(x | m_c) at the window's centre m_c (the data
    density: the window's signal-region flows, out of fold, where archived; else the
    all-data flow)."""
    from models.flows import FEATURE_INDICES

    features = np.asarray(features)
    x = features[:, FEATURE_INDICES]
    centre = np.full(len(x), 0.5 * (window[0] + window[1]))
    with np.errstate(invalid="ignore"):
        ratio = models.data_log_prob(features, centre) - models.sideband.log_prob(x, centre)
    return np.where(np.isnan(ratio), -np.inf, ratio)


class FlowSets:
    """Archived flows grouped by the window their sideband flow never saw.

    The all-data flow is conditioned on mjj and serves every window. A sideband flow serves
    only the window it excluded during training (``signal_region_gev`` in its snapshot):
    one conditional sideband flow cannot serve a window whose events it learned; the
    signal-region flows trained beside it (if any) serve that window too. An archive
    holds one such pair per node and signal region, so CATHODE and ANODE scan only those
    windows; CWoLa from flows and the interpolated ANODE scan them all.
    """

    def __init__(self, snapshots: Sequence[Any]) -> None:
        from analysis.methods import FlowModels
        from models.online import FOLD_ROLE_PREFIX

        everything = [s for s in snapshots if s.role == "all"]
        regions = sorted({tuple(s.signal_region_gev) for s in snapshots if s.role == "sideband"})
        self.by_window: dict[Window, Any] = {}
        for region in regions:
            side = [
                s
                for s in snapshots
                if (s.role == "sideband" or s.role.startswith(FOLD_ROLE_PREFIX))
                and tuple(s.signal_region_gev) == region
            ]
            self.by_window[(float(region[0]), float(region[1]))] = FlowModels.from_snapshots(
                everything + side
            )
        if not self.by_window:
            raise ValueError("need all-data and sideband snapshots")

    def for_window(self, window: Window) -> Any:
        """The flows whose sideband flow excluded ``window`` (within 1 GeV), else None."""
        for region, models in self.by_window.items():
            if abs(region[0] - window[0]) < 1 and abs(region[1] - window[1]) < 1:
                return models
        return None

    def any(self) -> Any:
        return next(iter(self.by_window.values()))

    @property
    def events_seen(self) -> int:
        return int(self.any().events_seen)


# ---- plots --------------------------------------------------------------------------------


def plot_pvalues(result: ScanResult, path: Path, title: str = "") -> None:
    """Local p-value against window centre, one line per working point."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for eff in result.config.efficiencies:
        centres, _, p = result.table(eff)
        if centres.size and np.isfinite(p).any():
            ax.plot(centres, p, marker="o", ms=3, label=f"ε = {eff:g}")
    for z in (1, 2, 3, 4, 5):
        ax.axhline(stats.norm.sf(z), color="grey", lw=0.5, ls=":")
        ax.text(result.config.windows_gev[-1][1], stats.norm.sf(z), f" {z}σ", fontsize=7)
    ax.set(
        xlabel="window centre m_jj [GeV]",
        ylabel="local p-value",
        yscale="log",
        title=title
        or f"global p = {result.global_pvalue:.3g} (Z = {result.global_significance:.2f}), "
        f"{result.method_text()}",
    )
    ax.title.set_fontsize(8)
    ax.set_ylim(top=1.0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_spectra(result: ScanResult, path: Path, window: Window | None = None) -> None:
    """mjj after each cut with the background fit and pulls, in ``window`` (default: the
    window of the smallest local p-value)."""
    best = result.best()
    window = window or (best.window_gev if best else result.config.windows_gev[0])
    rows = [b for b in result.bumps if b.window_gev == tuple(map(float, window))]
    fig = Figure(figsize=(7, 6))
    ax, ax_pull = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for bump in rows:
        centres = 0.5 * (bump.edges[1:] + bump.edges[:-1])
        line = ax.errorbar(
            centres, bump.counts, yerr=np.sqrt(bump.counts), fmt="o", ms=2,
            label=f"ε={bump.efficiency:g}: {bump.observed_sr} obs, "
            f"{bump.expected_sr:.1f}±{bump.expected_sr_error:.1f} fit"
            + (f" ±{bump.spurious_fraction:.1%} spurious" if bump.spurious_fraction else "")
            + f", Z={bump.significance:.2f}",
        )  # fmt: skip
        colour = line[0].get_color()
        ax.plot(centres, bump.fit, color=colour, lw=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            pulls = (bump.counts - bump.fit) / np.sqrt(bump.fit)
        ax_pull.plot(centres, pulls, drawstyle="steps-mid", color=colour, lw=1)
    for a in (ax, ax_pull):
        a.axvspan(*window, color="grey", alpha=0.15)
        a.grid(alpha=0.3)
    ax.set(ylabel="events / bin", yscale="log", title=f"m_jj after cuts; window {window} GeV")
    ax.legend(fontsize=7)
    ax_pull.set(xlabel="m_jj [GeV]", ylabel="(n - fit)/√fit")
    ax_pull.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)

"""The bump hunt: binned Poisson likelihood fits of a smooth background to the mjj
sidebands, and a local significance that carries the fit's uncertainty.

Background model: the dijet function

    f(m) = exp(a) (1 - x)^p1 / x^(p2 + p3 ln x + p4 ln² x) / f_ref,   x = m / √s,

(per GeV; ``f_ref`` makes ``a`` the log density at the middle of the fit range, which keeps
the fit well conditioned). Each bin's expected count is the integral of f over the bin
(Gauss-Legendre, exact for this smooth function to ~1e-9). The fit is iminuit's binned
extended Poisson likelihood (``iminuit.cost.ExtendedBinnedNLL``) with the signal-region
bins masked out; Minuit's MIGRAD minimises it and HESSE gives the covariance.

How many parameters: the most flexible function that converges to a spectrum that falls
across the whole fit range, five (p1..p4), then four, then three; if none falls, the most
flexible one that converges. On a sparse spectrum after a tight cut, five free parameters
can bend the function up again between the events, which no dijet spectrum does; refusing
every such fit outright lost 15% of CWoLa's tests on the controls, hence the fallback.

The F-test sequence of dijet searches (add a parameter only if it lowers -2 ln L by more
than 3.84) was the default until the no-signal controls on 24 disjoint blocks of 41k
lhco-like events showed its cost: near the low end of the fit range the sidebands of one
window cannot tell the three- and five-parameter shapes apart, the test keeps three, and
the extrapolation into the window is biased (mean local Z +1.0 in the 2.9-3.3 and 3.1-3.5
TeV windows, |Z| >= 2 in 25%). With five the mean is within ±0.4 of 0 in every window and
the fit covariance carries the extra freedom into σ_b.

Significance: the signal-region prediction b̂ and its uncertainty σ_b (the fit covariance
propagated linearly, ``iminuit.util.propagate``) enter a profile likelihood for the count
n in the signal region,

    L(s, b) = Pois(n | s + b) · Gauss(b̂ | b, σ_b),

with the background normalisation b constrained by the fit. The test statistic
q0 = -2 ln [L(0, b̿) / L(ŝ, b̂)] (b̿ maximises L at s = 0, in closed form) gives the local
Z = sign(n - b̂) √q0 and the one-sided local p-value Φ(-Z) (asymptotic; on toys it is
uniform, see ``tests/analysis/test_bumphunt.py``). σ_b = 0 gives back the plain Poisson
Z = √(2 (n ln(n/b) - (n - b))). A selection can also sculpt the spectrum (a score that
depends on mjj makes a bump where there is none); its size, measured on no-signal controls
as a fraction f of the background in the window (``analysis.spurious``), adds f·b̂ to σ_b
in quadrature, as the spurious-signal uncertainty of ATLAS resonance searches.

References:
    CMS, "Search for narrow and broad dijet resonances", arXiv:1806.00843 (the dijet
    function and the F-test); Cowan, Cranmer, Gross, Vitells, "Asymptotic formulae for
    likelihood-based tests of new physics", arXiv:1007.1727.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from iminuit import Minuit
from iminuit.cost import ExtendedBinnedNLL
from scipy import stats

SQRT_S_GEV = 13_000.0
#: The fitted mjj range. A falling dijet function only describes the spectrum above the
#: 1.2 TeV fat-jet selection's turn-on, whose peak lies at 2.5-2.7 TeV (LHCO and the
#: lhco-like dataset alike); from 2.6 TeV the first window failed its no-signal controls.
FIT_RANGE_GEV = (2800.0, 7000.0)
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(6)
PARAMS = ("a", "c1", "c2", "c3", "c4")


def dijet(
    mjj: np.ndarray, p0: float, p1: float, p2: float, p3: float = 0.0, p4: float = 0.0
) -> np.ndarray:
    """The dijet function p0 (1 - x)^p1 / x^(p2 + p3 ln x + p4 ln² x), x = mjj / √s."""
    x = np.asarray(mjj, np.float64) / SQRT_S_GEV
    log_x = np.log(x)
    return np.asarray(p0 * (1 - x) ** p1 / x ** (p2 + (p3 + p4 * log_x) * log_x))


class DijetModel:
    """Expected counts per bin of the dijet density, in well-conditioned parameters.

    ln f = a + p1 ln(1 - x) - p2 ln x - p3 ln² x - p4 ln³ x is linear in its parameters,
    but its terms are almost collinear over a fit range (Minuit's numerical Hessian then
    gives covariances that vary tenfold from toy to toy). The fit therefore uses the same
    family in an orthonormal basis: the terms, centred and Gram-Schmidt orthonormalised
    (in order, so that the 3-, 4- and 5-parameter functions stay nested) over the fitted
    bins' centres, each scaled to unit RMS. ``a`` is then the mean log density (per GeV)
    over the fitted bins and c1..c4 are shape coefficients of comparable size;
    ``dijet_params`` maps them back to p1..p4.

    Callable as iminuit's ``scaled_cdf(edges, a, c1, c2, c3, c4)``: the cumulative
    expected count at each edge (each bin integrated by 6-point Gauss-Legendre).
    """

    def __init__(self, points_gev: np.ndarray) -> None:
        raw = self._terms(np.asarray(points_gev, np.float64))
        self.centre = raw.mean(axis=0)
        _, r = np.linalg.qr(raw - self.centre)
        signs = np.sign(np.diag(r))
        # q = (raw - centre) @ inv(r); unit RMS: scale by √n
        self.transform = np.linalg.inv(r) * signs[None, :] * math.sqrt(len(raw))

    @staticmethod
    def _terms(mjj: np.ndarray) -> np.ndarray:
        log_x = np.log(mjj / SQRT_S_GEV)
        return np.stack([np.log1p(-mjj / SQRT_S_GEV), -log_x, -(log_x**2), -(log_x**3)], -1)

    def log_density(self, mjj: np.ndarray, params: Sequence[float] | np.ndarray) -> np.ndarray:
        basis = (self._terms(np.asarray(mjj, np.float64)) - self.centre) @ self.transform
        return np.asarray(params[0] + basis @ np.asarray(params[1:], np.float64))

    def dijet_params(self, params: Sequence[float] | np.ndarray) -> np.ndarray:
        """p1..p4 of the dijet function for fit parameters (a, c1..c4)."""
        return np.asarray(self.transform @ np.asarray(params[1:], np.float64))

    def _basis(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Basis at each bin's quadrature nodes (bins, nodes, 4) and the bins' half widths;
        cached for the last edges (a fit evaluates the same edges hundreds of times)."""
        edges = np.asarray(edges, np.float64)
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0].shape == edges.shape and np.all(cached[0] == edges):
            return cached[1], cached[2]
        half = 0.5 * np.diff(edges)
        points = 0.5 * (edges[1:] + edges[:-1])[:, None] + half[:, None] * _NODES[None, :]
        basis = (self._terms(points) - self.centre) @ self.transform
        self._cache = (edges.copy(), basis, half)
        return basis, half

    def _weighted_density(
        self, edges: np.ndarray, params: Sequence[float] | np.ndarray
    ) -> np.ndarray:
        basis, half = self._basis(edges)
        with np.errstate(over="ignore", invalid="ignore"):
            density = np.exp(params[0] + basis @ np.asarray(params[1:], np.float64))
        return np.asarray(density * _WEIGHTS * half[:, None])

    def bin_counts(self, edges: np.ndarray, params: Sequence[float] | np.ndarray) -> np.ndarray:
        return np.asarray(self._weighted_density(edges, params).sum(axis=1))

    def __call__(
        self, edges: np.ndarray, a: float, c1: float, c2: float, c3: float, c4: float
    ) -> np.ndarray:
        counts = self.bin_counts(edges, (a, c1, c2, c3, c4))
        return np.concatenate([[0.0], np.cumsum(counts)])

    def gradient(
        self, edges: np.ndarray, a: float, c1: float, c2: float, c3: float, c4: float
    ) -> np.ndarray:
        """d(cumulative count)/d(a, c1..c4) at each edge, shape (5, len(edges))."""
        weighted = self._weighted_density(edges, (a, c1, c2, c3, c4))
        basis, _ = self._basis(edges)
        per_bin = np.concatenate(
            [weighted.sum(axis=1)[None], np.einsum("bn,bnk->kb", weighted, basis)]
        )
        return np.concatenate([np.zeros((5, 1)), np.cumsum(per_bin, axis=1)], axis=1)


@dataclass(frozen=True)
class BackgroundFit:
    """A dijet fit to the unmasked bins of a histogram.

    ``expected`` is the fitted count in every bin (masked ones included); ``deviance`` is
    the Poisson deviance (Baker-Cousins χ²) of the fitted bins, ``ndf`` their number less
    the free parameters. ``valid`` is Minuit's verdict (converged, covariance accurate).
    """

    edges: np.ndarray
    counts: np.ndarray
    fitted_bins: np.ndarray
    params: np.ndarray
    covariance: np.ndarray
    n_params: int
    expected: np.ndarray
    deviance: float
    ndf: int
    valid: bool
    model: DijetModel

    @property
    def gof_pvalue(self) -> float:
        """χ² probability of the deviance (how well the sidebands are described)."""
        return float(stats.chi2.sf(self.deviance, max(self.ndf, 1)))

    def predict(self, bins: np.ndarray) -> tuple[float, float]:
        """The fitted count summed over ``bins`` (a boolean mask) and its uncertainty from
        the fit covariance."""
        edges = self.edges

        def total(params: np.ndarray) -> float:
            return float(self.model.bin_counts(edges, params)[bins].sum())

        # Linear propagation with a central-difference Jacobian (steps of 1e-3 σ).
        free = np.sqrt(np.clip(np.diag(self.covariance), 0.0, None))
        gradient = np.zeros(self.params.size)
        for i in np.flatnonzero(free > 0):
            step = np.zeros(self.params.size)
            step[i] = 1e-3 * free[i]
            gradient[i] = (total(self.params + step) - total(self.params - step)) / (2 * step[i])
        variance = float(gradient @ self.covariance @ gradient)
        return total(self.params), math.sqrt(max(variance, 0.0))

    def pulls(self) -> np.ndarray:
        """(n - μ) / √μ per bin."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.counts - self.expected) / np.sqrt(self.expected)


def _start(
    edges: np.ndarray, counts: np.ndarray, mask: np.ndarray, model: DijetModel
) -> tuple[float, ...]:
    """Starting values: a least-squares line through the log densities (linear algebra
    only; MIGRAD does the fit)."""
    centre = 0.5 * (edges[1:] + edges[:-1])[mask]
    log_density = np.log(np.maximum(counts[mask], 0.5) / np.diff(edges)[mask])
    basis = (model._terms(centre) - model.centre) @ model.transform
    design = np.column_stack([np.ones(centre.size), basis])
    coefficients = np.linalg.lstsq(design, log_density, rcond=None)[0]
    return tuple(float(c) for c in coefficients)


def _migrad(cost: ExtendedBinnedNLL, start: Sequence[float], n_params: int) -> Minuit | None:
    minuit = Minuit(cost, *start, name=PARAMS)
    minuit.print_level = 0
    minuit.strategy = 1
    for name in PARAMS[n_params:]:
        minuit.values[name] = 0.0
        minuit.fixed[name] = True
    with np.errstate(divide="ignore", invalid="ignore"):  # empty bins at trial points
        minuit.migrad(ncall=20_000)
    if not minuit.valid:
        return None
    minuit.hesse()
    return minuit if minuit.valid and minuit.covariance is not None else None


def fit_background(
    edges: np.ndarray,
    counts: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    n_params: int | None = None,
) -> BackgroundFit | None:
    """Fit the dijet function to ``counts`` in the bins where ``mask`` is true.

    Arguments:
        edges: bin edges in GeV (len(counts) + 1).
        counts: events per bin.
        mask: bins that enter the fit (default: all); the others are predicted only.
        n_params: 3, 4 or 5 to force one function (falling or not); by default the most
            flexible one that converges to a falling spectrum, else the most flexible one
            that converges.

    Returns:
        The fit, or None if no fit converged with an accurate covariance or fewer than
        ``n_params + 2`` bins hold events.
    """
    edges = np.asarray(edges, np.float64)
    counts = np.asarray(counts, np.float64)
    mask = np.ones(counts.size, bool) if mask is None else np.asarray(mask, bool)
    model = DijetModel(0.5 * (edges[1:] + edges[:-1])[mask])
    cost = ExtendedBinnedNLL(counts, edges, model, grad=model.gradient)
    cost.mask = mask
    start = _start(edges, counts, mask, model)
    filled_bins = np.count_nonzero(counts[mask] > 0)
    fine = np.linspace(edges[0], edges[-1], 4 * edges.size)
    best: Minuit | None = None
    fallback: Minuit | None = None
    for k in (5, 4, 3) if n_params is None else (n_params,):
        fit = _migrad(cost, start[:k] + (0.0,) * (5 - k), k) if filled_bins >= k + 2 else None
        if fit is None:
            continue
        if np.all(np.diff(model.log_density(fine, fit.values)) < 0):
            best = fit
            break
        if fallback is None:
            fallback = fit
    best = best if best is not None else fallback
    if best is None:
        return None
    params = np.asarray(best.values, np.float64)
    covariance = np.asarray(best.covariance, np.float64)
    k = int(np.count_nonzero(~np.asarray(best.fixed)))
    expected = model.bin_counts(edges, params)
    n, mu = counts[mask], expected[mask]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_term = np.where(n > 0, n * np.log(n / mu), 0.0)
    deviance = float(2 * np.sum(mu - n + log_term))
    return BackgroundFit(
        edges,
        counts,
        mask,
        params,
        covariance,
        k,
        expected,
        deviance,
        int(mask.sum()) - k,
        bool(best.valid),
        model,
    )


def profile_significance(n: float, b: float, sigma_b: float = 0.0) -> float:
    """Signed Z of n observed against b ± σ_b (profile likelihood, Gaussian constraint).

    Example:
        >>> round(profile_significance(150, 100.0), 3)
        4.652
        >>> round(profile_significance(150, 100.0, 10.0), 3)
        3.289
    """
    if not (b > 0 and math.isfinite(b)) or sigma_b < 0:
        return float("nan")
    var = sigma_b**2
    if var == 0:
        b_hat = b
    else:
        # d/db [n ln b - b - (b - b̂)²/2σ²] = 0:  b² + (σ² - b̂) b - n σ² = 0
        c = var - b
        b_hat = 0.5 * (-c + math.sqrt(c * c + 4 * n * var))
    if b_hat <= 0:
        return float("nan")
    log_term = n * math.log(n / b_hat) if n > 0 else 0.0
    q0 = 2 * (log_term - (n - b_hat)) + ((b_hat - b) ** 2 / var if var > 0 else 0.0)
    return math.copysign(math.sqrt(max(q0, 0.0)), n - b)


def local_significance(
    observed: float, expected: float, fit_error: float, spurious_fraction: float = 0.0
) -> float:
    """Signed Z of the count in a window against the fit's b̂ ± σ_fit, with the
    spurious-signal fraction f adding f·b̂ to σ_b in quadrature."""
    sigma_b = math.hypot(fit_error, spurious_fraction * expected)
    return profile_significance(observed, expected, sigma_b)


def poisson_significance(n: float, b: float) -> float:
    """Signed Z of n against an exactly known b: √(2 (n ln(n/b) - (n - b)))."""
    return profile_significance(n, b, 0.0)


def local_pvalue(z: float) -> float:
    """One-sided p-value of an excess: Φ(-Z)."""
    return float(stats.norm.sf(z)) if math.isfinite(z) else float("nan")


@dataclass(frozen=True, slots=True)
class BumpResult:
    """One selection in one window: its spectrum, the background fit, the significance."""

    efficiency: float
    window_gev: tuple[float, float]
    edges: np.ndarray
    counts: np.ndarray
    fit: np.ndarray
    observed_sr: int
    expected_sr: float
    expected_sr_error: float
    spurious_fraction: float
    significance: float
    gof_pvalue: float
    n_params: int

    @property
    def pvalue(self) -> float:
        return local_pvalue(self.significance)

    def summary(self) -> dict[str, float | list[float]]:
        return {
            "efficiency": self.efficiency,
            "window_gev": list(self.window_gev),
            "observed_sr": self.observed_sr,
            "expected_sr": self.expected_sr,
            "expected_sr_error": self.expected_sr_error,
            "spurious_fraction": self.spurious_fraction,
            "local_significance": self.significance,
            "local_pvalue": self.pvalue,
            "fit_gof_pvalue": self.gof_pvalue,
            "fit_parameters": self.n_params,
        }


def bump_at(
    counts: np.ndarray,
    edges: np.ndarray,
    window_gev: tuple[float, float],
    efficiency: float = 1.0,
    *,
    n_params: int | None = None,
    spurious_fraction: float = 0.0,
) -> BumpResult:
    """Fit outside ``window_gev`` (bins wholly inside it are masked) and test inside it.

    ``expected_sr_error`` is the fit's σ_b; after a cut (``efficiency`` < 1) the method's
    ``spurious_fraction`` f adds f·b̂ to it in quadrature for the significance (without a
    cut nothing was selected that could sculpt). A failed fit gives a NaN significance,
    never a number.
    """
    spurious_fraction = spurious_fraction if efficiency < 1 else 0.0
    counts = np.asarray(counts, np.float64)
    low, high = window_gev
    in_window = (edges[:-1] >= low - 1e-9) & (edges[1:] <= high + 1e-9)
    if not in_window.any():
        msg = f"window {window_gev} holds no whole bin of {edges[0]}..{edges[-1]}"
        raise ValueError(msg)
    fit = fit_background(edges, counts, ~in_window, n_params=n_params)
    observed = int(counts[in_window].sum())
    if fit is None:
        nan = float("nan")
        return BumpResult(
            efficiency, window_gev, edges, counts, np.full(counts.size, nan),
            observed, nan, nan, spurious_fraction, nan, nan, 0,
        )  # fmt: skip
    expected, error = fit.predict(in_window)
    return BumpResult(
        efficiency,
        (float(low), float(high)),
        edges,
        counts,
        fit.expected,
        observed,
        expected,
        error,
        spurious_fraction,
        local_significance(observed, expected, error, spurious_fraction),
        fit.gof_pvalue,
        fit.n_params,
    )


def keep_top(scores: np.ndarray, efficiency: float) -> np.ndarray:
    """Rows whose score is among the top ``efficiency`` fraction (all for 1)."""
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf, posinf=np.inf)
    if efficiency >= 1:
        return np.ones(scores.size, bool)
    return np.asarray(scores >= np.quantile(scores, 1 - efficiency, method="higher"))


def bump_hunt(
    mjj: np.ndarray,
    scores: np.ndarray,
    *,
    signal_region_gev: tuple[float, float],
    efficiencies: tuple[float, ...] = (1.0, 0.2, 0.05, 0.01),
    fit_range_gev: tuple[float, float] = FIT_RANGE_GEV,
    bin_gev: float = 100.0,
    spurious_fraction: float = 0.0,
) -> list[BumpResult]:
    """One window: spectra after keeping the top fraction ``efficiency`` of events by score
    (the quantile is taken over the events in the fit range); ``spurious_fraction`` enters
    σ_b after a cut (ε < 1), as in the scan."""
    mjj = np.asarray(mjj, np.float64)
    edges = np.arange(fit_range_gev[0], fit_range_gev[1] + bin_gev / 2, bin_gev)
    inside = (mjj >= edges[0]) & (mjj < edges[-1])
    mjj, scores = mjj[inside], np.asarray(scores)[inside]
    results = []
    for eff in efficiencies:
        counts = np.histogram(mjj[keep_top(scores, eff)], edges)[0]
        results.append(
            bump_at(counts, edges, signal_region_gev, eff, spurious_fraction=spurious_fraction)
        )
    return results

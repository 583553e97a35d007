"""The bump hunt: mjj after classifier cuts, a fitted smooth background, local significance.

For each selection efficiency the events with the highest scores are kept, the mjj
spectrum is fitted outside the signal region with the four-parameter dijet function
f(x) = p0 (1 - x)^p1 / x^(p2 + p3 ln x), x = mjj / √s (three parameters, p3 = 0,
if that fit fails), and the fit is integrated over the
signal region. The local significance of the observed count n against the prediction b
is the Poisson (Asimov) Z = sign(n - b) √(2 (n ln(n/b) - (n - b))); the fit uncertainty
is not included, so Z is an optimistic local figure.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

SQRT_S_GEV = 13_000.0
MAX_CHI2_PER_NDF = 4.0


@dataclass(frozen=True, slots=True)
class BumpResult:
    """One selection: its spectrum, the fitted background and the significance."""

    efficiency: float
    edges: np.ndarray
    counts: np.ndarray
    fit: np.ndarray
    observed_sr: int
    expected_sr: float
    significance: float

    def summary(self) -> dict[str, float]:
        return {
            "efficiency": self.efficiency,
            "observed_sr": self.observed_sr,
            "expected_sr": self.expected_sr,
            "local_significance": self.significance,
        }


def dijet(mjj: np.ndarray, p0: float, p1: float, p2: float, p3: float) -> np.ndarray:
    x = np.asarray(mjj) / SQRT_S_GEV
    return p0 * (1 - x) ** p1 / x ** (p2 + p3 * np.log(x))


def poisson_significance(n: float, b: float) -> float:
    if b <= 0:
        return float("nan")
    if n <= 0:
        return -float(np.sqrt(2 * b))
    z2 = 2 * (n * np.log(n / b) - (n - b))
    return float(np.sign(n - b) * np.sqrt(max(z2, 0.0)))


def bump_hunt(
    mjj: np.ndarray,
    scores: np.ndarray,
    *,
    signal_region_gev: tuple[float, float],
    efficiencies: tuple[float, ...] = (1.0, 0.2, 0.05, 0.01),
    fit_range_gev: tuple[float, float] = (2700.0, 5500.0),
    bin_gev: float = 100.0,
) -> list[BumpResult]:
    """Spectra after keeping the top fraction ``efficiency`` of events by score."""
    mjj = np.asarray(mjj, np.float64)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf, posinf=np.inf)
    edges = np.arange(fit_range_gev[0], fit_range_gev[1] + bin_gev / 2, bin_gev)
    centres = 0.5 * (edges[1:] + edges[:-1])
    low, high = signal_region_gev
    in_sr = (edges[:-1] >= low) & (edges[1:] <= high)
    results = []
    for eff in efficiencies:
        keep = (
            scores >= np.quantile(scores, 1 - eff, method="higher")
            if eff < 1
            else np.ones(mjj.size, bool)
        )
        counts = np.histogram(mjj[keep], edges)[0].astype(np.float64)
        fit = _fit(centres[~in_sr], counts[~in_sr], centres)
        observed = int(counts[in_sr].sum())
        expected = float(fit[in_sr].sum())
        results.append(
            BumpResult(
                eff,
                edges,
                counts,
                fit,
                observed,
                expected,
                poisson_significance(observed, expected),
            )
        )
    return results


def _fit(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The better (by χ²) of the four- and three-parameter fits; NaN if neither describes
    the sidebands (χ²/ndf > ``MAX_CHI2_PER_NDF``), so a failed fit never yields a Z."""
    if y.sum() < 5:
        return np.full(at.size, np.nan)
    sigma = np.sqrt(np.maximum(y, 1.0))
    start = [y.max() / dijet(x[np.argmax(y)], 1.0, 10.0, 5.0, 0.0), 10.0, 5.0, 0.0]
    best, best_chi2 = np.full(at.size, np.nan), np.inf
    for n_params in (4, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # a flat covariance is fine here
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow while exploring
            try:
                params, _ = curve_fit(
                    lambda m, *p, k=n_params: dijet(m, *p, *([0.0] * (4 - k))),
                    x,
                    y,
                    p0=start[:n_params],
                    sigma=sigma,
                    maxfev=20_000,
                )
            except RuntimeError:
                continue
            full = [*params, *([0.0] * (4 - n_params))]
            fit, at_points = dijet(at, *full), dijet(x, *full)
        if not (np.all(np.isfinite(fit)) and np.all(fit > 0)):
            continue
        chi2 = float((((y - at_points) / sigma) ** 2).sum()) / max(y.size - n_params, 1)
        if chi2 < best_chi2:
            best, best_chi2 = fit, chi2
    return best if best_chi2 <= MAX_CHI2_PER_NDF else np.full(at.size, np.nan)

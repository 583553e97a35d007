"""Threshold calibration: the score cut that gives a target trigger rate on background.

The anomaly trigger fires on ``score > threshold``. For a target rate R out of an input
rate R0 (1 kHz of 40 MHz: FPR = 2.5e-5), the threshold is the background score exceeded
by a fraction FPR of events.

- Empirical (when at least ``min_events_above`` background events are expected above the
  cut): the order statistic, with a distribution-free 68% interval from the binomial
  spread of the number of events above the true quantile.
- Extrapolated (too few events): an exponential fit to the top ``tail_fraction`` of the
  scores (peaks over threshold, mean-excess estimate), extrapolated to the target FPR,
  with a bootstrap 68% interval. This depends on the tail shape and is flagged
  ``reliable: false`` with the extrapolation factor in the note.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.6827


@dataclass(frozen=True, slots=True)
class Calibration:
    """A calibrated threshold with its statistical uncertainty (68% interval)."""

    threshold: float
    threshold_low: float
    threshold_high: float
    target_fpr: float
    rate_hz: float
    input_rate_hz: float
    n_background: int
    n_above: int
    achieved_fpr: float
    achieved_fpr_err: float
    method: str
    reliable: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One human-readable line."""
        flag = "" if self.reliable else "  [NOT RELIABLE: " + self.note + "]"
        return (
            f"threshold {self.threshold:.6g} (68% interval {self.threshold_low:.6g} .. "
            f"{self.threshold_high:.6g}) for {self.rate_hz:g} Hz of {self.input_rate_hz:g} Hz "
            f"(FPR {self.target_fpr:.3g}); {self.n_above} of {self.n_background} background "
            f"events above, FPR {self.achieved_fpr:.3g} +- {self.achieved_fpr_err:.2g}; "
            f"method {self.method}{flag}"
        )


def calibrate(
    scores: np.ndarray,
    *,
    rate_hz: float,
    input_rate_hz: float = 4e7,
    min_events_above: int = 10,
    tail_fraction: float = 0.01,
    min_tail_events: int = 50,
    n_bootstrap: int = 300,
    seed: int = 0,
) -> Calibration:
    """Threshold on background ``scores`` for ``rate_hz`` out of ``input_rate_hz``.

    NaN scores are ignored. Raises ``ValueError`` for a rate outside (0, input rate) or
    when fewer than ``2 x min_tail_events`` usable scores remain.
    """
    if not 0 < rate_hz < input_rate_hz:
        msg = f"need 0 < rate_hz < input_rate_hz, got {rate_hz} and {input_rate_hz}"
        raise ValueError(msg)
    values = np.asarray(scores, np.float64).ravel()
    values = values[~np.isnan(values)]
    n = values.size
    if n < 2 * min_tail_events:
        msg = f"only {n} background scores; need at least {2 * min_tail_events}"
        raise ValueError(msg)
    fpr = rate_hz / input_rate_hz
    desc = np.sort(values)[::-1]
    expected = fpr * n
    if expected >= min_events_above:
        return _empirical(desc, fpr, rate_hz, input_rate_hz)
    return _extrapolated(
        desc, fpr, rate_hz, input_rate_hz, tail_fraction, min_tail_events, n_bootstrap, seed
    )


def _fpr_of(desc: np.ndarray, threshold: float) -> tuple[int, float, float]:
    n = desc.size
    above = int((desc > threshold).sum())
    p = above / n
    # Binomial error, with the rule of three's 1/n floor for zero events.
    err = math.sqrt(max(p * (1 - p), 1.0 / n) / n) if above else 1.15 / n
    return above, p, err


def _empirical(desc: np.ndarray, fpr: float, rate_hz: float, input_rate_hz: float) -> Calibration:
    n = desc.size
    k = max(1, round(fpr * n))
    threshold = float(desc[k])
    alpha = (1 - CONFIDENCE) / 2
    k_lo = int(stats.binom.ppf(alpha, n, fpr))
    k_hi = int(stats.binom.ppf(1 - alpha, n, fpr))
    low = float(desc[min(k_hi, n - 1)])
    high = float(desc[max(k_lo, 0)])
    above, achieved, err = _fpr_of(desc, threshold)
    return Calibration(
        threshold,
        low,
        high,
        fpr,
        rate_hz,
        input_rate_hz,
        n,
        above,
        achieved,
        err,
        "empirical-quantile",
        True,
        f"{fpr * n:.1f} background events expected above the cut",
    )


def _tail_threshold(desc: np.ndarray, fpr: float, n_tail: int) -> float:
    u = desc[n_tail]
    excess = desc[:n_tail] - u
    theta = float(excess.mean())
    p_u = n_tail / desc.size
    return float(u + theta * math.log(p_u / fpr))


def _extrapolated(
    desc: np.ndarray,
    fpr: float,
    rate_hz: float,
    input_rate_hz: float,
    tail_fraction: float,
    min_tail_events: int,
    n_bootstrap: int,
    seed: int,
) -> Calibration:
    n = desc.size
    n_tail = max(min_tail_events, int(tail_fraction * n))
    if not np.isfinite(desc[:n_tail]).all():
        msg = "infinite scores in the background tail; cannot fit the tail"
        raise ValueError(msg)
    threshold = _tail_threshold(desc, fpr, n_tail)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_bootstrap)
    for i in range(n_bootstrap):
        sample = np.sort(rng.choice(desc, n))[::-1]
        boot[i] = _tail_threshold(sample, fpr, n_tail)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    above, achieved, err = _fpr_of(desc, threshold)
    factor = (n_tail / n) / fpr
    note = (
        f"only {fpr * n:.2g} background events expected above the cut in {n}; threshold "
        f"extrapolated by a factor {factor:.3g} in FPR from an exponential fit to the top "
        f"{n_tail} scores; about {math.ceil(10 / fpr):,} events are needed to measure it"
    )
    return Calibration(
        threshold,
        float(low),
        float(high),
        fpr,
        rate_hz,
        input_rate_hz,
        n,
        above,
        achieved,
        err,
        "exponential-tail-extrapolation",
        False,
        note,
    )

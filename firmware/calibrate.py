"""Threshold calibration: the score cut that gives a target trigger rate on background.

A path fires on ``value > threshold``. On a sample of N events with weights w (bunch
crossings, each standing for ``input_rate_hz / N`` times its weight; unweighted events
have w = 1), the rate above t is ``input_rate_hz * sum(w of values > t) / N``; the
threshold is where it reaches the target. One machinery serves the L1 menu
(``nodes.l1``, ``benchmarks/trigger_rates.py``) and ``trigfarm firmware calibrate``:

- Measured (``calibrate_threshold``), when the target lies within the sample's reach:
  the threshold between the events where the cumulative rate crosses the target, with
  the range of thresholds whose rates are the target plus and minus its statistical
  error ``input_rate_hz * sqrt(sum w^2) / N``.
- Extrapolated, for an *unweighted* sample with fewer than ``min_events_above`` events
  expected above the cut only: an exponential fit to the top ``tail_fraction`` of the
  scores (peaks over threshold, mean-excess estimate), extrapolated to the target, with
  a bootstrap 68% interval. This depends on the tail shape and is flagged
  ``reliable: false`` with the extrapolation factor in the note. A weighted sample is
  never extrapolated: bias it towards the tail instead (that is what weights are for).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

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


@dataclass(frozen=True, slots=True)
class RateCalibration:
    """A threshold that gives a path its target rate on a weighted sample.

    ``threshold`` is where the sample's rate above it reaches ``target_hz`` (``rate_hz``,
    with its statistical error ``error_hz``); ``low`` and ``high`` are the thresholds whose
    rates are ``target_hz`` plus and minus that error, the threshold's statistical range.
    ``n_above`` events of the sample lie above the threshold, and ``n_effective`` is their
    effective number, ``(sum w)^2 / sum w^2`` (what the error rests on).
    """

    target_hz: float
    threshold: float
    rate_hz: float
    error_hz: float
    low: float
    high: float
    n_above: int
    n_effective: float


def calibrate_threshold(
    values: np.ndarray, weights: np.ndarray, *, hz_per_event: float, target_hz: float
) -> RateCalibration:
    """The threshold at which ``hz_per_event * sum(w of values > t)`` reaches
    ``target_hz``, measured on the sample itself (no extrapolation: the target must lie
    within the sample's reach, else ``ValueError``). ``hz_per_event`` is the source's
    ``hz_per_weight / N`` for a sample of N events. Non-finite values never fire.

    Raises:
        ValueError: the target is below the rate of the sample's single highest event,
            above its total rate, or not positive.
    """
    if not target_hz > 0:
        msg = f"target_hz must be > 0, got {target_hz}"
        raise ValueError(msg)
    values = np.asarray(values, np.float64)
    weights = np.asarray(weights, np.float64)
    ok = np.isfinite(values) & np.isfinite(weights)
    order = np.argsort(-values[ok], kind="stable")
    v, w = values[ok][order], weights[ok][order]
    rate = hz_per_event * np.cumsum(w)  # rate[i]: events 0..i fire (threshold just below v[i])
    error = hz_per_event * np.sqrt(np.cumsum(np.square(w)))
    if v.size == 0 or rate[-1] < target_hz:
        total = float(rate[-1]) if v.size else 0.0
        msg = f"the sample's whole rate {total:.4g} Hz is below the target {target_hz:.4g} Hz"
        raise ValueError(msg)
    if rate[0] > target_hz:
        msg = (
            f"the target {target_hz:.4g} Hz is below the rate one event of the sample "
            f"stands for ({rate[0]:.4g} Hz): a larger or more biased sample is needed"
        )
        raise ValueError(msg)

    def at(target: float) -> float:
        # The threshold between the last event that keeps the rate <= target and the next.
        i = int(np.searchsorted(rate, target, side="right"))
        if i >= v.size:
            return float(v[-1])
        return float(0.5 * (v[i - 1] + v[i])) if i > 0 else float(v[0])

    i = int(np.searchsorted(rate, target_hz, side="right")) - 1
    i = max(i, 0)
    n_eff = float(np.sum(w[: i + 1]) ** 2 / max(np.sum(np.square(w[: i + 1])), 1e-300))
    return RateCalibration(
        target_hz=target_hz,
        threshold=at(target_hz),
        rate_hz=float(rate[i]),
        error_hz=float(error[i]),
        low=at(target_hz + float(error[i])),
        high=at(max(target_hz - float(error[i]), float(rate[0]))),
        n_above=i + 1,
        n_effective=n_eff,
    )


def calibrate(
    scores: np.ndarray,
    *,
    rate_hz: float,
    input_rate_hz: float = 4e7,
    weights: np.ndarray | None = None,
    min_events_above: int = 10,
    tail_fraction: float = 0.01,
    min_tail_events: int = 50,
    n_bootstrap: int = 300,
    seed: int = 0,
) -> Calibration:
    """Threshold on background ``scores`` (with event ``weights``, default 1) for
    ``rate_hz`` out of ``input_rate_hz``.

    NaN scores are ignored. Raises ``ValueError`` for a rate outside (0, input rate), when
    fewer than ``2 x min_tail_events`` usable scores remain, or when a weighted sample
    cannot reach the target.
    """
    if not 0 < rate_hz < input_rate_hz:
        msg = f"need 0 < rate_hz < input_rate_hz, got {rate_hz} and {input_rate_hz}"
        raise ValueError(msg)
    values = np.asarray(scores, np.float64).ravel()
    weighted = weights is not None
    w = np.ones_like(values) if weights is None else np.asarray(weights, np.float64).ravel()
    if w.shape != values.shape:
        msg = f"{w.size} weights for {values.size} scores"
        raise ValueError(msg)
    usable = ~np.isnan(values)
    values, w = values[usable], w[usable]
    n = values.size
    if n < 2 * min_tail_events:
        msg = f"only {n} background scores; need at least {2 * min_tail_events}"
        raise ValueError(msg)
    fpr = rate_hz / input_rate_hz
    if weighted or fpr * n >= min_events_above:
        measured = calibrate_threshold(values, w, hz_per_event=input_rate_hz / n, target_hz=rate_hz)
        return _measured(measured, input_rate_hz, n, weighted, min_events_above)
    desc = np.sort(values)[::-1]
    return _extrapolated(
        desc, fpr, rate_hz, input_rate_hz, tail_fraction, min_tail_events, n_bootstrap, seed
    )


def _measured(
    cal: RateCalibration, input_rate_hz: float, n: int, weighted: bool, min_events_above: int
) -> Calibration:
    reliable = cal.n_effective >= min_events_above
    note = (
        f"{cal.n_above} events above the cut ({cal.n_effective:.1f} effective)"
        if weighted
        else f"{cal.target_hz / input_rate_hz * n:.1f} background events expected above the cut"
    )
    if not reliable:
        note += f"; fewer than {min_events_above} effective events: a larger sample is needed"
    return Calibration(
        cal.threshold,
        cal.low,
        cal.high,
        cal.target_hz / input_rate_hz,
        cal.target_hz,
        input_rate_hz,
        n,
        cal.n_above,
        cal.rate_hz / input_rate_hz,
        cal.error_hz / input_rate_hz,
        "weighted-quantile" if weighted else "empirical-quantile",
        reliable,
        note,
    )


def _fpr_of(desc: np.ndarray, threshold: float) -> tuple[int, float, float]:
    n = desc.size
    above = int((desc > threshold).sum())
    p = above / n
    # Binomial error, with the rule of three's 1/n floor for zero events.
    err = math.sqrt(max(p * (1 - p), 1.0 / n) / n) if above else 1.15 / n
    return above, p, err


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

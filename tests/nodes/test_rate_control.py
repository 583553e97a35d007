"""The rate controller holds a synthetic path at its target on a pileup ramp, where a fixed
threshold drifts far off."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import optimize, stats

from nodes.rate_control import THRESHOLD_RECORD_KIND, RateControlConfig

CROSSING_HZ = 40e6
PER_BLOCK = 50_000
TARGET_HZ = 800e3  # 2% of crossings: 1000 events per block, a 3% statistical error
SETTLE_BLOCKS = 8


def _crossings(mu: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """A scalar-sum observable per crossing: the sum over Poisson(mu) interactions of an
    exponential per-interaction deposit (mean 10), so its tail moves up with mu."""
    counts = rng.poisson(mu, n)
    deposits = rng.exponential(10.0, int(counts.sum()))
    owner = np.repeat(np.arange(n), counts)
    return np.bincount(owner, deposits, minlength=n)


def _true_rate(threshold: float, mu: float) -> float:
    """The exact rate of the compound Poisson observable above ``threshold``: a sum of k
    exponentials is Gamma(k) distributed."""
    k = np.arange(1, int(mu + 12 * np.sqrt(mu)))
    above = stats.poisson.pmf(k, mu) * stats.gamma.sf(threshold, k, scale=10.0)
    return CROSSING_HZ * float(above.sum())


@pytest.mark.slow
def test_controller_holds_target_on_a_mu_ramp_while_a_fixed_threshold_drifts() -> None:
    rng = np.random.default_rng(11)
    # mu rises from 40 to 80 over 200 lumi blocks (a fill's worth of 23 s blocks is
    # ~1500): a PI controller lags a ramp by e = r / ki in ln(rate), r the ramp's growth
    # of ln(rate) per block at a fixed threshold (here ~0.03).
    mus = np.linspace(40, 80, 200)
    start = float(optimize.brentq(lambda t: _true_rate(t, 40.0) - TARGET_HZ, 100, 3000))
    controller = RateControlConfig(path="ett", target_hz=TARGET_HZ, initial_threshold=start).build(
        node="test"
    )
    fixed, held = [], []
    for lumi, mu in enumerate(mus, start=1):
        held.append(_true_rate(controller.threshold, mu))
        fixed.append(_true_rate(start, mu))
        values = _crossings(mu, PER_BLOCK, rng)
        change = controller.update(
            lumi, values, np.ones(PER_BLOCK), hz_per_event=CROSSING_HZ / PER_BLOCK
        )
        assert change.lumi == lumi and change.old_threshold > 0
    held_ratio = np.array(held[SETTLE_BLOCKS:]) / TARGET_HZ
    worst = float(np.abs(held_ratio - 1).max())
    assert worst < 0.10, (worst, held_ratio.round(3))
    assert abs(float(np.mean(held_ratio)) - 1) < 0.05
    # The fixed threshold starts on target and ends far above it.
    assert fixed[0] == pytest.approx(TARGET_HZ, rel=0.05)
    assert fixed[-1] > 20 * TARGET_HZ
    # Every block made one change, recorded with its lumi block.
    assert [c.lumi for c in controller.history] == list(range(1, len(mus) + 1))
    record = controller.history[-1].as_record()
    assert record.kind == THRESHOLD_RECORD_KIND and record.meta["lumi"] == len(mus)
    assert controller.threshold > start


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("path", ""),
        ("target_hz", 0.0),
        ("min_threshold", 0.0),
        ("kp", -0.1),
        ("ki", -0.1),
        ("kf", -0.1),
        ("max_step", 0.0),
        ("max_error", 0.0),
        ("delta", 0.0),
        ("min_slope", 0.0),
        ("drift_smoothing", 0.0),
        ("drift_smoothing", 1.5),
    ],
)
def test_controller_config_names_a_bad_field(key: str, value: Any) -> None:
    good: dict[str, Any] = {"path": "p", "target_hz": 1.0, "initial_threshold": 1.0}
    with pytest.raises(ValueError, match=rf"(?m)^{key}$"):
        RateControlConfig(**{**good, key: value})


def test_controller_config_checks_fields_together() -> None:
    with pytest.raises(ValueError, match="min_threshold <= initial_threshold"):
        RateControlConfig(path="p", target_hz=1.0, initial_threshold=1e-9)
    with pytest.raises(ValueError, match="initial_threshold <= max_threshold"):
        RateControlConfig(path="p", target_hz=1.0, initial_threshold=1e10)
    with pytest.raises(ValueError, match=r"max_slope \(0.1\) must be >= min_slope"):
        RateControlConfig(path="p", target_hz=1.0, initial_threshold=1.0, max_slope=0.1)


def test_a_block_without_events_firing_lowers_the_threshold() -> None:
    controller = RateControlConfig(path="p", target_hz=10.0, initial_threshold=100.0).build()
    change = controller.update(1, np.ones(100), np.ones(100), hz_per_event=1.0)
    assert change.rate_hz == 0 and change.new_threshold < 100.0

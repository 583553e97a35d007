"""Physics sanity with real Pythia events and small samples (300 events per process)."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from simulator import generate
from stream.batch import EventBatch
from stream.schema import FEATURE_NAMES

# Every test here generates Pythia events.
pytestmark = pytest.mark.slow

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
N = 300


@cache
def sample(name: str) -> EventBatch:
    return EventBatch.concat(generate(name, N, seed=21, batch_size=150))


def peak(values: np.ndarray, lo: float, hi: float, width: float) -> float:
    """Centre of the most populated bin in [lo, hi)."""
    counts, edges = np.histogram(values, np.arange(lo, hi + width, width))
    i = int(np.argmax(counts))
    return float(0.5 * (edges[i] + edges[i + 1]))


def test_wprime_mjj_peaks_near_3p5_tev() -> None:
    mjj = sample("wprime")["features"][:, COL["mjj"]]
    assert 3200 <= peak(mjj, 1000, 6000, 100) <= 3700
    assert 3000 < np.median(mjj) < 3700


def test_wprime_jet_masses_peak_at_x_and_y() -> None:
    features = sample("wprime")["features"]
    heavy = features[:, COL["mj1"]]
    light = heavy + features[:, COL["delta_mj"]]
    assert 450 <= peak(heavy, 0, 1000, 25) <= 550
    assert 80 <= peak(light, 0, 1000, 10) <= 120


def test_top_jet_mass_peaks_near_173_gev() -> None:
    mj1 = sample("ttbar")["features"][:, COL["mj1"]]
    assert 155 <= peak(mj1, 0, 500, 10) <= 195


def test_qcd_tau21_is_higher_than_signal() -> None:
    # LHCO R&D (scalars_*01): median 0.51 vs 0.18, and 36% vs 7% of jets above 0.6.
    qcd = sample("qcd")["features"][:, COL["tau21_j1"]]
    sig = sample("wprime")["features"][:, COL["tau21_j1"]]
    assert np.median(qcd) > np.median(sig) + 0.1
    assert np.mean(qcd > 0.6) > 2 * np.mean(sig > 0.6)


def test_three_prong_signal_has_lower_tau32() -> None:
    two = sample("wprime")["features"][:, COL["tau32_j1"]]
    three = EventBatch.concat(generate("wprime3p", 150, seed=21, batch_size=150))
    assert np.median(three["features"][:, COL["tau32_j1"]]) < np.median(two) - 0.03

"""SIC, ROC and the bump hunt on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.bumphunt import bump_hunt, poisson_significance
from analysis.metrics import roc


def test_roc_of_a_perfect_and_a_random_score() -> None:
    labels = np.r_[np.ones(100), np.zeros(10_000)].astype(bool)
    perfect = roc(labels.astype(float), labels)
    assert perfect.auc == pytest.approx(1.0)
    # The first threshold reaching 20% of the signal passes no background: SIC is undefined.
    assert perfect.fpr[np.searchsorted(perfect.tpr, 0.2)] == 0
    assert np.isnan(perfect.sic_at(0.2))
    rng = np.random.default_rng(0)
    random = roc(rng.random(labels.size), labels)
    assert random.auc == pytest.approx(0.5, abs=0.06)
    assert random.sic_at(0.5) == pytest.approx(np.sqrt(0.5), rel=0.3)


def test_max_sic_counts_only_thresholds_with_enough_background() -> None:
    scores = np.r_[np.full(50, 2.0), 1.5, np.zeros(999)]
    labels = np.r_[np.ones(50), 0, np.zeros(999)].astype(bool)
    result = roc(scores, labels)
    # One background event passing would give SIC 1/sqrt(1/1000) ~ 31.6: not counted.
    assert result.max_sic(min_background=25) == pytest.approx(1 / np.sqrt(1000 / 1000))


def test_poisson_significance() -> None:
    assert poisson_significance(100, 100) == 0
    assert poisson_significance(150, 100) == pytest.approx(4.65, abs=0.05)
    assert poisson_significance(50, 100) < 0


def test_bump_hunt_finds_a_planted_bump_and_not_a_fake_one() -> None:
    rng = np.random.default_rng(3)
    background = 2600 + rng.exponential(500, 200_000)
    signal = rng.normal(3500, 60, 600)
    mjj = np.r_[background, signal]
    scores = np.r_[rng.random(background.size), 0.9 + 0.1 * rng.random(signal.size)]
    results = bump_hunt(mjj, scores, signal_region_gev=(3300, 3700), efficiencies=(1.0, 0.02))
    # The fit's uncertainty (σ_b ≈ 17 on b ≈ 240 here) costs significance against the
    # plain Poisson Z of the same counts.
    tight = results[1]
    assert tight.significance > 4
    assert tight.significance < poisson_significance(tight.observed_sr, tight.expected_sr)
    fake = bump_hunt(background, rng.random(background.size), signal_region_gev=(3300, 3700))
    assert all(abs(r.significance) < 3.5 for r in fake), [r.significance for r in fake]
    # A spurious-signal fraction widens σ_b after the cut only.
    spurious = bump_hunt(
        mjj, scores, signal_region_gev=(3300, 3700), efficiencies=(1.0, 0.02), spurious_fraction=0.1
    )
    assert spurious[0].significance == results[0].significance
    assert spurious[1].spurious_fraction == 0.1
    assert 0 < spurious[1].significance < tight.significance - 1


def test_background_events_behind_sic_at() -> None:
    scores = np.r_[np.linspace(1, 2, 100), np.linspace(0, 1.5, 1000)]
    labels = np.r_[np.ones(100), np.zeros(1000)].astype(bool)
    result = roc(scores, labels)
    # eps_S = 0.2 keeps signal scores >= 1.8; background above 1.8: none.
    assert result.background_at(0.2) == 0
    assert result.background_at(1.0) == (np.linspace(0, 1.5, 1000) >= 1.0).sum()


def test_roc_matches_a_count_by_hand_with_ties_and_infinities() -> None:
    scores = np.array([np.inf, 3.0, 3.0, 2.0, 1.0, -np.inf, np.nan])
    labels = np.array([True, True, False, True, False, True, False])
    result = roc(scores, labels)
    # Thresholds: inf, 3 (a tie of one signal and one background), 2, 1, then -inf and NaN
    # (tied, last).
    np.testing.assert_allclose(result.tpr, [0, 1 / 4, 2 / 4, 3 / 4, 3 / 4, 1])
    np.testing.assert_allclose(result.fpr, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert (result.n_signal, result.n_background) == (4, 3)
    assert result.auc == pytest.approx(np.trapz(result.tpr, result.fpr))
    assert result.auc == pytest.approx(0.125 + 0.25 + 0.875 / 3)  # the trapezoids by hand
    with pytest.raises(ValueError, match="both classes"):
        roc(np.ones(3), np.ones(3, bool))

"""Premixed pileup and the inclusive sample's weights, on real Pythia events."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulator.generator import (
    UNTILTED_SHARE,
    EventGenerator,
    PileupLibrary,
    _poisson_at_least_one,
    crossing_weights,
    pileup_library,
)
from simulator.particles import Particles
from simulator.recipes import make_recipe


def _numbered_library(n_events: int) -> PileupLibrary:
    """Event i has i + 1 particles, each with px = i (so a draw can be traced)."""
    counts = np.arange(1, n_events + 1)
    px = np.repeat(np.arange(n_events, dtype=float), counts)
    one = np.ones(px.size)
    particles = Particles(counts, px, one, one, 3 * one, np.full(px.size, 211), one)
    return PileupLibrary(particles, np.zeros(n_events), seed=0)


def test_overlay_takes_whole_events_and_reproduces_poisson_mu() -> None:
    library = _numbered_library(40)
    rng = np.random.default_rng(3)
    mu = 37.5
    n_pileup = rng.poisson(mu, 4000)
    draws = library.draw(n_pileup, rng)
    particles = library.overlay(n_pileup, draws)
    # Every drawn event arrives whole: its particles carry its number, as many as it has.
    assert particles.n_events == 4000
    owner = np.repeat(np.arange(4000), n_pileup)
    np.testing.assert_array_equal(particles.counts, np.bincount(owner, draws + 1, minlength=4000))
    np.testing.assert_array_equal(np.sort(particles.px), np.sort(np.repeat(draws, draws + 1)))
    # Draws are uniform over the library and the crossings hold Poisson(mu) events.
    assert abs(n_pileup.mean() - mu) < 4 * np.sqrt(mu / 4000)
    assert abs(n_pileup.var() / mu - 1) < 0.1
    assert abs(draws.mean() - 19.5) < 4 * 11.5 / np.sqrt(draws.size)


def test_tilted_draws_weighted_back_give_the_untilted_rates() -> None:
    """Crossings whose pileup is drawn with a tilt towards busy events, weighted by
    ``crossing_weights``, give the same rate of busy crossings as uniform draws, from many
    more crossings. The primary interaction is itself a uniform library draw, so the
    weights are those of nature's crossings whatever the tilt."""
    library = _numbered_library(40)  # event i: i + 1 particles of pT hypot(i, 1)
    activity = library.activity_gev
    mu, n = 6.0, 40_000
    rng = np.random.default_rng(11)

    def sample(tilt: float) -> tuple[np.ndarray, np.ndarray]:
        n_pileup = _poisson_at_least_one(rng, mu, n) - 1
        primary = rng.integers(0, library.n_events, n)
        draws = library.draw(n_pileup, rng, tilt_per_gev=tilt)
        owner = np.repeat(np.arange(n), n_pileup)
        busy = activity[primary] + np.bincount(owner, activity[draws], minlength=n)
        biases = {}
        if tilt:
            biases = {
                "log_bias_primary": library.log_bias(activity[primary], tilt),
                "log_bias_pileup": library.log_bias(activity[draws], tilt),
            }
        ones = np.ones(n), np.ones(draws.size)
        return busy, crossing_weights(mu, n_pileup, *ones, **biases)

    busy, w = sample(0.0)
    np.testing.assert_allclose(w, -np.expm1(-mu))  # nature's own mix: one weight for all
    cut = np.quantile(busy, 0.995)
    tail = busy > cut
    expected, error = w[tail].sum() / n, np.sqrt(np.square(w[tail]).sum()) / n
    tilted_busy, tilted_w = sample(0.0008)
    tilted_tail = tilted_busy > cut
    rate = tilted_w[tilted_tail].sum() / n
    tilted_error = np.sqrt(np.square(tilted_w[tilted_tail]).sum()) / n
    assert abs(rate - expected) < 3 * np.hypot(error, tilted_error)
    assert tilted_w.sum() / n == pytest.approx(w.sum() / n, rel=0.03)
    assert tilted_w.max() <= w.max() / UNTILTED_SHARE
    # The busy tail holds many more crossings, so its rate is known far better.
    assert tilted_tail.sum() > 3 * tail.sum()
    assert tilted_error < 0.8 * error


def test_at_least_one_interaction_per_crossing() -> None:
    rng = np.random.default_rng(1)
    n = _poisson_at_least_one(rng, 0.7, 100_000)
    assert n.min() == 1
    expected = 0.7 / (1 - np.exp(-0.7))  # mean of Poisson given >= 1
    assert abs(n.mean() - expected) < 0.01


@pytest.fixture(scope="module")
def library() -> PileupLibrary:
    return pileup_library(60, seed=4)


@pytest.mark.slow
def test_library_is_generated_once_and_holds_minimum_bias(library: PileupLibrary) -> None:
    assert pileup_library(60, seed=4) is library
    assert library.n_events == 60 and library.pthat_gev.shape == (60,)
    assert (np.abs(library.particles.eta) < 5).all()
    assert 50 < library.particles.counts.mean() < 600


@pytest.mark.slow
def test_premixed_pileup_adds_mu_events_of_particles(library: PileupLibrary) -> None:
    recipe = make_recipe("minbias")
    plain = EventGenerator(recipe, seed=2, pileup_library=library)
    alone = plain.block(0, 32)
    mixed = plain.block(0, 32, mu=20.0)
    # The same hard events (same block) with about 20 library events on top: the L1 HT of
    # jets grows and the crossings differ from the bare events.
    assert mixed["l1_objects"][:, 9:, 0].sum() > 2 * alone["l1_objects"][:, 9:, 0].sum()
    with pytest.raises(ValueError, match="pileup library"):
        EventGenerator(recipe, seed=2).block(0, 4, mu=5.0)
    with pytest.raises(ValueError, match="mu"):
        plain.block(0, 4, mu=-1.0)


@pytest.mark.slow
def test_inclusive_crossing_weights(library: PileupLibrary) -> None:
    generator = EventGenerator("inclusive", seed=3, pileup_library=library)
    mu = 8.0
    batch = generator.block(0, 48, mu=mu)
    w = batch.truth["weight"].astype(np.float64)
    ids = batch.truth["process_id"]
    assert np.isfinite(w).all() and (w > 0).all()
    assert set(np.unique(ids)) <= {10, 16}
    # Interactions without pileup: weights are cross sections (mb) whose mean is the
    # stitched total, within the sample's spread.
    bare = generator.block(1, 200, cross_section_weights=True).truth["weight"]
    soft_mb, hard_mb = generator.slice_cross_sections_mb()
    assert 40 < soft_mb < 80 and 0.2 < hard_mb < 2
    assert bare.mean() == pytest.approx(soft_mb + hard_mb, rel=0.3)
    # A crossing of soft interactions only weighs (1 - e^-mu) * sigma_soft / share / sigma:
    # no interaction in it is rarer than in the plain minimum-bias mix.
    all_soft = dataclasses.replace(library, pthat_gev=np.zeros(library.n_events))
    soft_only = EventGenerator("inclusive", seed=3, pileup_library=all_soft)
    batch = soft_only.block(0, 48, mu=mu)
    soft = batch.truth["process_id"] == 10
    recipe = soft_only.recipe
    soft_mb, hard_mb = soft_only.slice_cross_sections_mb()
    expected = -np.expm1(-mu) * soft_mb / (1 - recipe.hard_share) / (soft_mb + hard_mb)  # type: ignore[attr-defined]
    np.testing.assert_allclose(batch.truth["weight"][soft], expected, rtol=1e-5)
    # A hard crossing weighs less, the more so the harder its scatter.
    hard = ~soft
    assert (batch.truth["weight"][hard] < expected).all()


@pytest.mark.slow
def test_a_pileup_tilt_makes_busy_crossings_common_and_weighs_them_back(
    library: PileupLibrary,
) -> None:
    """The same crossings' jets (L1 HT) with and without a tilt: busier as sampled, the
    same once weighted, within the statistical error."""

    def crossings(tilt: float) -> tuple[np.ndarray, np.ndarray]:
        recipe = make_recipe("inclusive", pileup_tilt_per_gev=tilt)
        generator = EventGenerator(recipe, seed=5, pileup_library=library)
        batches = [generator.block(i, 96, mu=20.0) for i in range(2)]
        ht = np.concatenate([b["l1_objects"][:, 9:, 0].sum(axis=1) for b in batches])
        w = np.concatenate([b.truth["weight"] for b in batches]).astype(np.float64)
        return ht.astype(np.float64), w

    def weighted_mean(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
        mean = float((w * x).sum() / w.sum())
        return mean, float(np.sqrt((w**2 * (x - mean) ** 2).sum()) / w.sum())

    ht, w = crossings(0.0)
    tilted_ht, tilted_w = crossings(0.01)
    assert tilted_ht.mean() > 1.2 * ht.mean()
    (mean, error), (tilted_mean, tilted_error) = (
        weighted_mean(ht, w),
        weighted_mean(tilted_ht, tilted_w),
    )
    assert abs(tilted_mean - mean) < 3 * np.hypot(error, tilted_error)

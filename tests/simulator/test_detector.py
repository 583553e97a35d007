"""The detector model's tuned pieces: cell positions, tracking efficiency, particle flow."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from simulator import CellGrid, DetectorModel, Particles


def neutral_hadrons(n_events: int, seed: int) -> Particles:
    """Events of 30 K_L (pid 130, neutral, HCAL only) in a central patch."""
    rng = np.random.default_rng(seed)
    n = 30 * n_events
    eta = rng.uniform(-1.0, 1.0, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    pt = rng.uniform(5.0, 50.0, n)
    p = Particles.from_pt_eta_phi(np.full(n_events, 30), pt, eta, phi, np.full(n, 0.4976))
    return dataclasses.replace(p, pid=np.full(n, 130, np.int32), charge=np.zeros(n))


def charged_pions(n_events: int, seed: int) -> Particles:
    rng = np.random.default_rng(seed)
    n = 30 * n_events
    eta = rng.uniform(-1.0, 1.0, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    pt = rng.uniform(5.0, 50.0, n)
    p = Particles.from_pt_eta_phi(np.full(n_events, 30), pt, eta, phi, np.full(n, 0.1396))
    return dataclasses.replace(p, pid=np.full(n, 211, np.int32), charge=np.ones(n))


def test_uniform_cells_lie_inside_their_cell_and_centroid_cells_on_the_deposit() -> None:
    particles = neutral_hadrons(20, seed=1)
    hcal = DetectorModel().hcal
    for position in ("uniform", "centroid"):
        grid = dataclasses.replace(hcal, position=position, stochastic=0.0, constant=0.0)
        detector = DetectorModel(hcal=grid)
        cells = detector.simulate(particles, np.random.default_rng(2), objects=False).candidates
        eta, phi = cells.eta, cells.phi
        # Every cell is within its own (deta x dphi) box around the deposits' cell.
        cell_eta = np.floor((eta + grid.eta_max) / grid.deta)
        cell_phi = np.floor((phi + np.pi) / (2 * np.pi) * grid.nphi)
        source_eta = np.floor((particles.eta + grid.eta_max) / grid.deta)
        source_phi = np.floor((particles.phi + np.pi) / (2 * np.pi) * grid.nphi)
        source = set(zip(source_eta.tolist(), source_phi.tolist(), strict=True))
        assert set(zip(cell_eta.tolist(), cell_phi.tolist(), strict=True)) <= source
        # A cell made by one particle sits on it with "centroid", anywhere with "uniform".
        on_particle = np.isin(np.round(eta, 9), np.round(particles.eta, 9)).mean()
        if position == "centroid":
            assert on_particle > 0.9
        else:
            assert on_particle < 0.05


def test_tracking_efficiency_sends_lost_tracks_to_the_hcal() -> None:
    particles = charged_pions(50, seed=3)
    ideal = DetectorModel(track_efficiency=1.0).simulate(particles, np.random.default_rng(4))
    real = DetectorModel(track_efficiency=0.8).simulate(particles, np.random.default_rng(4))
    ideal_pid, real_pid = ideal.candidates.pid, real.candidates.pid
    assert ideal_pid is not None and real_pid is not None, "candidates carry a PDG id"
    assert (ideal_pid == 211).sum() == particles.counts.sum()
    tracks = (real_pid == 211).sum() / particles.counts.sum()
    assert 0.75 < tracks < 0.85
    assert (real_pid == 130).sum() > 0, "lost tracks show up as HCAL cells"


def test_particle_flow_keeps_only_the_excess_over_tracks() -> None:
    particles = charged_pions(50, seed=5)
    exact = dataclasses.replace(DetectorModel().hcal, stochastic=0.0, constant=0.0)
    detector = DetectorModel(track_efficiency=1.0, particle_flow=True, hcal=exact)
    reco = detector.simulate(particles, np.random.default_rng(6))
    # A perfect calorimeter measures what the tracks measured (up to track smearing).
    neutral = reco.candidates.e[reco.candidates.pid == 130]
    assert neutral.size < 0.2 * particles.counts.sum()
    noisy = DetectorModel(track_efficiency=1.0, particle_flow=True)
    fakes = noisy.simulate(particles, np.random.default_rng(6)).candidates
    assert fakes.pid is not None, "candidates carry a PDG id"
    assert (fakes.pid == 130).sum() > neutral.size, "HCAL fluctuations make neutral fakes"


def test_objects_false_gives_the_same_candidates() -> None:
    particles = charged_pions(10, seed=7)
    full = DetectorModel().simulate(particles, np.random.default_rng(8))
    lean = DetectorModel().simulate(particles, np.random.default_rng(8), objects=False)
    np.testing.assert_array_equal(full.candidates.px, lean.candidates.px)
    np.testing.assert_array_equal(full.candidates.e, lean.candidates.e)
    assert lean.egamma.pt.size == 0 and (lean.met_x == 0).all()


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("track_efficiency", 1.5, "track_efficiency"),
        ("muon_efficiency", -0.1, "muon_efficiency"),
        ("electron_efficiency", (0.9, 1.1), "electron_efficiency.1"),
        ("photon_efficiency", (-0.1, 0.8), "photon_efficiency.0"),
    ],
)
def test_bad_detector_settings_name_the_field(key: str, value: Any, where: str) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{where}$"):
        DetectorModel(**{key: value})


@pytest.mark.parametrize(("key", "value"), [("position", "centre"), ("deta", 0.0), ("nphi", 0)])
def test_bad_cell_grids_name_the_field(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{key}$"):
        dataclasses.replace(DetectorModel().ecal, **{key: value})


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"bad cell grid: eta 1\.0-1\.0"):
        CellGrid(
            eta_min=1, eta_max=1, deta=0.1, nphi=1, stochastic=0, constant=0, noise_gev=0,
            threshold_gev=0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="tracker_eta_max must not exceed the ECAL acceptance"):
        DetectorModel(tracker_eta_max=3.5)

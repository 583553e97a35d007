"""Simulator rows against FastJet called directly, event by event and jet by jet."""

from __future__ import annotations

from typing import Any

import awkward as ak
import fastjet
import numpy as np
import pytest

from simulator import EventGenerator, JetConfig, Particles, fatjet_content, generate, nsubjettiness
from simulator.lhco_raw import read_lhco_raw
from simulator.replay import replay
from stream.batch import EventBatch
from stream.schema import FEATURE_NAMES
from tests.conftest import shared_data

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def detector_candidates(n_events: int, seed: int) -> Particles:
    """Real Pythia QCD dijets through the detector model (the generator's inputs to FastJet)."""
    generator = EventGenerator("qcd", seed=seed)
    raw = generator._pythia.nextBatch(n_events, "skip")
    particles = generator._final_state(raw)
    return generator.detector.simulate(particles, np.random.default_rng(seed)).candidates


def reference_fatjets(particles: Particles, radius: float, pt_min: float) -> list[list[Any]]:
    """The two leading anti-kT jets of each event, clustering one event at a time."""
    out = []
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, radius)
    for i in range(particles.n_events):
        lo, hi = particles.offsets[i], particles.offsets[i + 1]
        inputs = [
            fastjet.PseudoJet(float(a), float(b), float(c), float(d))
            for a, b, c, d in zip(
                particles.px[lo:hi],
                particles.py[lo:hi],
                particles.pz[lo:hi],
                particles.e[lo:hi],
                strict=True,
            )
        ]
        sequence = fastjet.ClusterSequence(inputs, definition)
        jets = sorted(sequence.inclusive_jets(pt_min), key=lambda j: -j.pt())[:2]
        out.append([(j.px(), j.py(), j.pz(), j.E(), len(j.constituents())) for j in jets])
        del sequence
    return out


def fastjet_contrib_taus(px, py, pz, e, counts) -> np.ndarray:
    """FastJet contrib Nsubjettiness (KT_Axes, NormalizedMeasure beta=1, R0=1) per jet."""
    record = ak.zip({"px": px, "py": py, "pz": pz, "E": e}, with_name="Momentum4D")
    sequence = fastjet.ClusterSequence(
        ak.unflatten(record, counts), fastjet.JetDefinition(fastjet.kt_algorithm, 1.0)
    )
    taus = sequence.njettiness(
        measure_definition="NormalizedMeasure",
        axes_definition="KT_Axes",
        njets=[1, 2, 3],
        beta=1.0,
        R0=1.0,
    )
    return ak.to_numpy(taus).reshape(-1, 3)


def test_fat_jets_match_fastjet_event_by_event() -> None:
    candidates = detector_candidates(30, seed=4)
    cfg = JetConfig()
    content = fatjet_content(candidates, cfg)
    reference = reference_fatjets(candidates, cfg.fatjet_radius, cfg.fatjet_pt_min_gev)
    for i, jets in enumerate(reference):
        assert len(jets) == 2, "every QCD dijet event has two fat jets"
        mass = [np.sqrt(max(j[3] ** 2 - j[0] ** 2 - j[1] ** 2 - j[2] ** 2, 0.0)) for j in jets]
        heavy, light = (0, 1) if mass[0] >= mass[1] else (1, 0)
        for slot, k in ((0, heavy), (1, light)):
            pt = np.hypot(jets[k][0], jets[k][1])
            np.testing.assert_allclose(content.fatjets[i, slot, 0], pt, rtol=1e-6)
            np.testing.assert_allclose(content.fatjets[i, slot, 3], mass[k], rtol=1e-5, atol=1e-3)
            assert content.n_constituents[i, slot] == min(jets[k][4], cfg.max_constituents)
        total = np.add(jets[0][:4], jets[1][:4])
        mjj = np.sqrt(total[3] ** 2 - total[0] ** 2 - total[1] ** 2 - total[2] ** 2)
        np.testing.assert_allclose(content.features[i, COL["mjj"]], mjj, rtol=1e-6)
        np.testing.assert_allclose(
            content.features[i, COL["delta_mj"]], mass[light] - mass[heavy], rtol=1e-5, atol=1e-3
        )


def test_nsubjettiness_matches_fastjet_contrib() -> None:
    candidates = detector_candidates(20, seed=6)
    rng = np.random.default_rng(0)
    # Jets as random subsets of the events: 1 to 200 particles, including tiny jets.
    sizes = np.minimum(rng.integers(1, 200, candidates.n_events), candidates.counts)
    take = np.concatenate(
        [candidates.offsets[i] + np.arange(k) for i, k in enumerate(sizes)]
    ).astype(np.int64)
    args = (candidates.px[take], candidates.py[take], candidates.pz[take], candidates.e[take])
    ours = nsubjettiness(*args, sizes)
    theirs = fastjet_contrib_taus(*args, sizes)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    assert (ours[sizes == 1] == 0).all()


@pytest.mark.slow
def test_generator_rows_match_their_constituents() -> None:
    """Each stored fat jet is the sum of its stored constituents (all kept when <= 128)."""
    batch = next(generate("qcd", 16, seed=9, batch_size=16))
    c = batch["constituents"].astype(np.float64)
    pt, eta, phi, e = np.moveaxis(c, -1, 0)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    sums = np.stack([px.sum(-1), py.sum(-1), pz.sum(-1), e.sum(-1)], -1)
    jet_pt = np.hypot(sums[..., 0], sums[..., 1])
    mass = np.sqrt(np.maximum(sums[..., 3] ** 2 - (sums[..., :3] ** 2).sum(-1), 0))
    complete = batch["n_constituents"] < c.shape[2]
    assert complete.sum() > 20
    np.testing.assert_allclose(batch["fatjets"][..., 0][complete], jet_pt[complete], rtol=1e-4)
    np.testing.assert_allclose(
        batch["fatjets"][..., 3][complete], mass[complete], rtol=2e-3, atol=0.5
    )


@pytest.mark.slow
def test_features_layout_gives_the_full_layouts_features() -> None:
    full = EventBatch.concat(list(generate("wprime", 24, seed=3, batch_size=12)))
    lean = EventBatch.concat(list(generate("wprime", 24, seed=3, batch_size=12, layout="features")))
    assert "constituents" not in lean.columns and "l1_objects" not in lean.columns
    np.testing.assert_array_equal(lean["features"], full["features"])
    np.testing.assert_array_equal(lean["fatjets"], full["fatjets"])


def test_lhco_features_convention_reproduces_the_lhco_file() -> None:
    """Clustering the raw LHCO events with the features files' tau convention gives their
    tau21 event by event (the default FastJet convention does not, near phi = +-pi)."""
    raw = sorted(shared_data("lhco-rnd-raw-1k").glob("*.h5"))
    bkg01 = shared_data("lhco-rnd-100k", "scalars_bkg01.h5")
    lhco = JetConfig(tau_convention="lhco-features")
    ours = EventBatch.concat(list(read_lhco_raw(raw, jets=lhco)))
    ours = ours.select(ours.truth["is_signal"] == 0)
    theirs = next(replay("lhco-features", [bkg01], chunk_size=len(ours)))
    for name in ("tau21_j1", "tau21_j2", "tau32_j1", "mj1", "mjj"):
        np.testing.assert_allclose(
            ours["features"][:, COL[name]], theirs["features"][:, COL[name]], rtol=1e-3, atol=1e-3
        )
    default = EventBatch.concat(list(read_lhco_raw(raw)))
    default = default.select(default.truth["is_signal"] == 0)
    differ = np.abs(
        default["features"][:, COL["tau21_j1"]] - theirs["features"][:, COL["tau21_j1"]]
    )
    assert np.mean(differ > 0.05) > 0.05


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tau_convention", "wta"),
        ("jet_radius", 0.0),
        ("fatjet_radius", -1.0),
        ("max_constituents", 0),
    ],
)
def test_bad_jet_settings_name_the_field(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{key}$"):
        JetConfig(**{key: value})

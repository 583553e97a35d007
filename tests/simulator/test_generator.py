"""Real Pythia 8 + FastJet events: schema, reproducibility, and each process's contract."""

from __future__ import annotations

import dataclasses
from typing import Any

import awkward as ak
import numpy as np
import pytest

from simulator import PROCESSES, EventGenerator, generate, make_pythia, make_recipe
from stream.schema import COLUMNS, N_CONSTITUENTS, TRUTH_COLUMNS


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_process_fills_the_schema(name: str) -> None:
    recipe = PROCESSES[name]
    batch = next(generate(name, 12, seed=5, batch_size=12))
    assert len(batch) == 12
    batch.check_finite()
    for column in ("l1_objects", "fatjets", "constituents", "n_constituents", "features"):
        assert batch[column].dtype.str == COLUMNS[column].dtype
    assert batch["constituents"].shape == (12, 2, N_CONSTITUENTS, 4)
    assert set(batch.truth) == set(TRUTH_COLUMNS)
    soft = getattr(recipe, "soft_process_id", recipe.process_id)  # inclusive: two slices
    assert np.isin(batch.truth["process_id"], [recipe.process_id, soft]).all()
    assert (batch.truth["is_signal"] == recipe.is_signal).all()
    np.testing.assert_array_equal(batch["event"], np.arange(12))
    # pT-ordered, zero-padded L1 groups; MET first.
    l1 = batch["l1_objects"]
    for group in (slice(1, 5), slice(5, 9), slice(9, 19)):
        pts = l1[:, group, 0]
        assert (np.diff(pts, axis=1) <= 0).all()
    n = batch["n_constituents"].astype(int)
    pt = batch["constituents"][..., 0]
    for i in range(12):
        for j in range(2):
            k = min(n[i, j], N_CONSTITUENTS)
            assert (pt[i, j, :k] > 0).all() and (pt[i, j, k:] == 0).all()
            assert (np.diff(pt[i, j, :k]) <= 0).all()
    fat = batch["fatjets"]
    assert (fat[:, 0, 3] >= fat[:, 1, 3]).all(), "fat jets are stored heavier first"


@pytest.mark.slow
def test_blocks_are_reproducible_and_seeds_differ() -> None:
    first = EventGenerator("qcd", seed=11).block(3, 8)
    again = EventGenerator("qcd", seed=11).block(3, 8)
    other = EventGenerator("qcd", seed=12).block(3, 8)
    for column in ("l1_objects", "constituents", "features"):
        np.testing.assert_array_equal(first[column], again[column])
    assert not np.array_equal(first["features"], other["features"])
    # A block does not depend on what the generator made before it.
    generator = EventGenerator("qcd", seed=11)
    generator.block(0, 5)
    np.testing.assert_array_equal(generator.block(3, 8)["features"], first["features"])


@pytest.mark.slow
def test_both_wprime_charges_generate_without_errors() -> None:
    pythia = make_pythia(PROCESSES["wprime"], seed=3)
    events = pythia.nextBatch(150, "skip")
    assert len(events) == 150, "no event may be aborted"
    ids = events.prt.id
    plus = int(ak.sum(ak.any(ids == 34, axis=1)))
    minus = int(ak.sum(ak.any(ids == -34, axis=1)))
    assert plus > 0 and minus > 0 and plus + minus == 150
    assert int(ak.sum(ak.any(ids == -37, axis=1))) == minus, "W'- decays to H0 H-"
    assert pythia.logger.errorTotalNumber() == 0


@pytest.mark.slow
def test_filter_keeps_only_passing_events() -> None:
    recipe = make_recipe("minbias", event_filter=PROCESSES["l1bkg"].event_filter)
    generator = EventGenerator(make_recipe("l1bkg"), seed=2)
    batch = generator.block(0, 10)
    l1 = batch["l1_objects"]
    lepton = np.maximum(l1[:, 1, 0], l1[:, 5, 0]) > 10
    assert (lepton | (l1[:, 9, 0] > 30)).all()
    assert generator.stats.filtered > 0
    assert recipe.event_filter.active


@pytest.mark.slow
def test_pileup_adds_soft_activity() -> None:
    quiet = EventGenerator(make_recipe("zll"), seed=4).block(0, 10)
    busy = EventGenerator(make_recipe("zll", pileup_mean=20.0), seed=4).block(0, 10)
    n_jets = [(b["l1_objects"][:, 9:, 0] > 0).sum() for b in (quiet, busy)]
    assert n_jets[1] > n_jets[0]


@pytest.mark.parametrize(
    ("process", "changes", "where"),
    [
        ("qcd", {"seed": -1}, "seed"),
        ("qcd", {"seed": 900_000_001}, "seed"),
        ("qcd", {"ecm_gev": 0.0}, "ecm_gev"),
        ("qcd", {"pileup_mean": -1.0}, "pileup_mean"),
        ("qcd", {"event_filter": {"jet_pt_gev": -1.0}}, "event_filter.jet_pt_gev"),
        ("qcd", {"event_filter": {"lepton_pt_gev": -1.0}}, "event_filter.lepton_pt_gev"),
        ("qcd", {"event_filter": {"fatjet_pt_gev": -1.0}}, "event_filter.fatjet_pt_gev"),
        ("wprime", {"m_x_gev": 0.0}, "m_x_gev"),
        ("wprime", {"m_y_gev": -1.0}, "m_y_gev"),
        ("wprime", {"width_fraction": 0.5}, "width_fraction"),
        ("wprime", {"x_prongs": 4}, "x_prongs"),
        ("wprime", {"y_prongs": 1}, "y_prongs"),
        ("wjet", {"boson": "H"}, "boson"),
        ("inclusive", {"pthat_split_gev": 0.0}, "pthat_split_gev"),
        ("inclusive", {"bias_power": -1.0}, "bias_power"),
        ("inclusive", {"hard_share": 1.0}, "hard_share"),
        ("inclusive", {"pileup_tilt_per_gev": -0.01}, "pileup_tilt_per_gev"),
    ],
)
def test_bad_recipe_fields_are_named(process: str, changes: dict, where: str) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{where}$"):
        make_recipe(process, **changes)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_every_recipe_keeps_the_shared_constraints(process: str) -> None:
    """A subclass that changes a default keeps the constraint only by annotating again."""
    changes: dict[str, Any]
    for changes in ({"name": ""}, {"pthat_min_gev": -1.0}):
        with pytest.raises(ValueError, match=rf"(?m)^{next(iter(changes))}$"):
            dataclasses.replace(PROCESSES[process], **changes)


def test_bad_recipe_values_are_named() -> None:
    with pytest.raises(ValueError, match="m_wprime_gev"):
        make_recipe("wprime", m_wprime_gev=500.0)
    with pytest.raises(ValueError, match=r"pthat_max_gev \(500.0\) must exceed pthat_min_gev"):
        make_recipe("qcd", pthat_max_gev=500.0)
    with pytest.raises(ValueError, match="inclusive QCD sets its pT-hat range"):
        make_recipe("inclusive", pthat_min_gev=5.0)
    with pytest.raises(ValueError, match="no parameter"):
        make_recipe("qcd", m_x_gev=3.0)
    with pytest.raises(KeyError, match="known"):
        make_recipe("nope")
    with pytest.raises(ValueError, match="rejected"):
        next(generate(make_recipe("qcd", extra_settings=("Nonsense:key = 3",)), 1))

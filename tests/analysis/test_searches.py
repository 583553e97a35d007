"""The searches on a small planted problem: each must find the planted signal, scored on
labelled test events that were never used for training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analysis.classifier import ClassifierConfig
from analysis.data import Events
from analysis.methods import FlowModels, SearchConfig
from analysis.report import evaluate, score_method
from deploy.cli import main
from models.archive import Archive
from models.flows import FEATURE_INDICES, MJJ_INDEX
from models.online import ROLES, fold, scoring_flow
from simulator.replay import read_features

pytestmark = pytest.mark.slow  # trains flows and classifiers

FAST = SearchConfig(n_samples=6000, classifier=ClassifierConfig(n_models=2, epochs=8))


@pytest.fixture(scope="module")
def models(planted: dict[str, Path]) -> FlowModels:
    return FlowModels.from_snapshots(Archive(planted["archive"]).snapshots())


def test_mixture_of_two_nodes_is_weighted_by_events(models: FlowModels) -> None:
    assert models.nodes == ("hlt-0", "hlt-1")
    assert models.events_seen == 24_000
    assert models.all_data.weights == pytest.approx([0.5, 0.5])
    assert models.mjj_hist.sum() == 24_000


@pytest.mark.parametrize("method", ["anode", "cathode", "cwola"])
def test_flow_methods_find_the_planted_signal(
    method: str, models: FlowModels, planted: dict[str, Path]
) -> None:
    test = Events(*read_features([str(planted["test"])]))
    score = score_method(method, models, FAST)
    result = evaluate(method, score, test, FAST)
    # Random scoring gives SIC ~ 1 (max SIC over thresholds ~ 1-2 from fluctuations).
    assert result.roc.max_sic() > 3, result.summary()
    assert result.roc.auc > 0.75


def test_idealised_and_stored_baselines(models: FlowModels, planted: dict[str, Path]) -> None:
    stored = Archive(planted["archive"])
    events = Events(*read_features([str(e.path) for e in stored.entries(kind="events")]))
    assert len(events) == 24_000
    truth_bkg = Events(*read_features([str(planted["test"])]))
    assert truth_bkg.is_signal is not None, "the test split is labelled"
    truth_bkg = truth_bkg.select(~truth_bkg.is_signal)
    test = Events(*read_features([str(planted["test"])]))
    for name in ("cwola_stored", "idealised", "cathode_hybrid"):
        score = score_method(name, models, FAST, stored=events, true_background=truth_bkg)
        result = evaluate(name, score, test, FAST)
        assert result.roc.max_sic() > 2, (name, result.summary())


def test_cli_writes_plots_and_summary(planted: dict[str, Path]) -> None:
    out = planted["root"] / "anode"
    events = [str(e.path) for e in Archive(planted["archive"]).entries(kind="events")]
    args = [
        "analyze",
        "anode",
        "--archive",
        str(planted["archive"]),
        "--test",
        str(planted["test"]),
        "--out",
        str(out),
    ]
    for path in events:
        args += ["--events", path]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    figures = summary["methods"]["anode"]
    assert figures["max_sic"] > 3
    assert (out / "roc_sic.png").stat().st_size > 1000
    assert (out / "scan_pvalues.png").stat().st_size > 1000
    assert (out / "scan_spectra.png").stat().st_size > 1000
    # The planted resonance shows as an excess after a tight cut on the stored events, in
    # the window that holds it, and survives the look-elsewhere correction.
    scan = summary["scan"]
    assert scan["global_method"] == "trials" and "global Z" in result.output
    tests = {(tuple(t["window_gev"]), t["efficiency"]): t for t in scan["tests"]}
    tight, loose = tests[((3300.0, 3700.0), 0.05)], tests[((3300.0, 3700.0), 1.0)]
    assert tight["local_significance"] > max(5.0, loose["local_significance"])
    assert scan["best_window_gev"] == [3300.0, 3700.0]
    assert scan["global_significance"] > 3
    # 2 nodes x every flow, at the two lumi-block ends and at the finish.
    assert summary["storage"]["flow_snapshot"]["files"] == 2 * len(ROLES) * 3
    assert np.isfinite(summary["storage"]["flow_bytes_per_event_seen_latest"])


def test_anode_scores_each_event_with_the_fold_that_never_trained_on_it(
    models: FlowModels, planted: dict[str, Path]
) -> None:
    assert models.signal_region is not None, "the learners' default trains K folds"
    events = Events(*read_features([str(planted["test"])])).features
    x, mjj = events[:, FEATURE_INDICES], events[:, MJJ_INDEX]
    # An event of fold j is scored by flow (j - 1) mod K, the one that never learned fold j,
    # with the shipped K and with two of the flows (K = 2: flow k learned fold k alone).
    for flows in (models.signal_region, models.signal_region[:2]):
        n_folds = len(flows)
        own = [flow.log_prob(x, mjj) for flow in flows]
        expected = np.choose(scoring_flow(fold(events, n_folds), n_folds), own)
        np.testing.assert_array_equal(
            dataclasses.replace(models, signal_region=flows).data_log_prob(events, mjj), expected
        )
        assert not np.allclose(own[0], own[1])  # scoring with the wrong flow differs
    folds = fold(events)
    two = dataclasses.replace(models, signal_region=models.signal_region[:2])
    np.testing.assert_array_equal(
        two.data_log_prob(events, mjj), np.where(folds == 0, own[1], own[0])
    )
    without = dataclasses.replace(models, signal_region=None)
    np.testing.assert_array_equal(
        without.data_log_prob(events, mjj), models.all_data.log_prob(x, mjj)
    )

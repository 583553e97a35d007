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
from analysis.methods import FlowModels, SearchConfig, anode_interpolated
from analysis.report import evaluate, score_method
from analysis.scan import FlowSets, ScanConfig, scan, window_scorer
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


@pytest.mark.parametrize("method", ["anode", "anode_interpolated", "cathode", "cwola"])
def test_flow_methods_find_the_planted_signal(
    method: str, models: FlowModels, planted: dict[str, Path]
) -> None:
    test = Events(*read_features([str(planted["test"])]))
    score = score_method(method, models, FAST)
    result = evaluate(method, score, test, FAST)
    # Random scoring gives SIC ~ 1 (max SIC over thresholds ~ 1-2 from fluctuations).
    assert result.roc.max_sic() > 3, result.summary()
    assert result.roc.auc > 0.75


class _ShiftingGaussian:
    """log p(x | m): a unit Gaussian in every jet feature whose mean moves linearly with m,
    plus (with ``signal``) 5% of narrow signal at x = 3 for m in 3.3-3.7 TeV."""

    def __init__(self, signal: bool) -> None:
        self.signal = signal

    def log_prob(self, x: np.ndarray, mjj_gev: np.ndarray) -> np.ndarray:
        shift = (mjj_gev[:, None] - 3500.0) / 1000.0
        background = -0.5 * np.sum((x - shift) ** 2, axis=1)
        if not self.signal:
            return background
        share = np.where((mjj_gev >= 3300) & (mjj_gev < 3700), 0.05, 0.0)
        signal = -0.5 * np.sum(((x - 3.0) / 0.1) ** 2, axis=1) + x.shape[1] * np.log(10.0)
        with np.errstate(divide="ignore"):
            return np.logaddexp(np.log1p(-share) + background, np.log(share) + signal)


def test_anode_interpolated_ranks_nothing_where_the_background_only_shifts() -> None:
    rng = np.random.default_rng(0)
    features = np.zeros((2000, 8))
    features[:, FEATURE_INDICES] = rng.normal(0, 1.5, (2000, len(FEATURE_INDICES)))
    features[:1000, FEATURE_INDICES] = 3.0 + rng.normal(0, 0.1, (1000, len(FEATURE_INDICES)))
    signal_like = np.arange(2000) < 1000
    background = anode_interpolated(_ShiftingGaussian(False), features, SearchConfig())
    # The mean of the sidebands' log densities is the window's, up to a constant.
    assert np.ptp(background) < 1e-9
    window = anode_interpolated(_ShiftingGaussian(True), features, SearchConfig())
    assert window[signal_like].min() > window[~signal_like].max()
    elsewhere = SearchConfig(signal_region_gev=(4300.0, 4700.0))
    assert np.ptp(anode_interpolated(_ShiftingGaussian(True), features, elsewhere)) < 1e-9


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


@pytest.mark.parametrize("command", ["anode", "anode-interpolated"])
def test_cli_writes_plots_and_summary(command: str, planted: dict[str, Path]) -> None:
    out = planted["root"] / command
    events = [str(e.path) for e in Archive(planted["archive"]).entries(kind="events")]
    args = [
        "analyze",
        command,
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
    figures = summary["methods"][command.replace("-", "_")]
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


def test_anode_interpolated_cuts_in_every_window(planted: dict[str, Path]) -> None:
    archive = Archive(planted["archive"])
    flows = FlowSets(archive.snapshots(latest_per_node=True))
    stored = archive.event_features().astype(np.float64)
    scorer = window_scorer("anode_interpolated", flows, FAST, stored)
    result = scan(stored[:, MJJ_INDEX], scorer, ScanConfig())
    cut = [b for b in result.bumps if b.efficiency < 1]
    assert {b.window_gev for b in cut} == set(ScanConfig().windows_gev)
    # The scan's shared per-mass cache gives the scores of a direct evaluation.
    window = (3100.0, 3500.0)
    direct = anode_interpolated(
        flows.any().all_data, stored, dataclasses.replace(FAST, signal_region_gev=window)
    )
    cached = scorer(window)
    assert cached is not None
    np.testing.assert_array_equal(cached, direct)


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

"""Weighted events and rates in Hz: the source's cross-section weights against sigma x L x
efficiency computed by hand, the per-lumi rates of a node, and the report's rates against
counts and weights written by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy.launcher import FarmResult, plan_farm
from deploy.report import build_report, format_report, write_report
from deploy.topology import parse_topology
from nodes.rate_control import LumiRates
from nodes.source import MB_CM2, GeneratorComponent, Source, SourceConfig
from simulator.generator import EventGenerator
from stream.batch import EventBatch, Message
from tests.deploy.conftest import synthetic_table

LUMI = 2e34


def _drain(source: Source) -> EventBatch:
    messages: list[Message] = []
    while (outcome := source.produce()) is not None:
        messages += [e.message for e in outcome.emits]
    batches = [m for m in messages if isinstance(m, EventBatch)]
    assert len(batches) == len(messages), "a source emits only event batches"
    return EventBatch.concat(batches)


def test_filtered_block_weights_average_to_sigma_times_filter_efficiency() -> None:
    generator = EventGenerator("l1bkg", seed=5)
    batch = generator.block(0, 24, cross_section_weights=True)
    stats = generator.stats
    # With the filter on, Pythia makes more events than the block keeps; the block's mean
    # weight is sigma times the fraction kept (all events of this block are used, unless
    # the last round overshot: then kept/passed is taken up to the last event used).
    passed = stats.tried - stats.aborted
    assert stats.kept >= 24 and passed > stats.kept
    mean = float(batch.truth["weight"].astype(np.float64).mean())
    sigma = generator.cross_section_mb
    # Each kept event stands for sigma / (events Pythia made up to the last one used).
    assert sigma * 24 / passed * (1 - 1e-6) <= mean <= sigma * 24 / 24
    if stats.kept == 24:  # no overshoot: every event Pythia made belongs to the block
        assert mean == pytest.approx(sigma * 24 / passed, rel=1e-6)
    assert np.unique(batch.truth["weight"]).size == 1  # unbiased Pythia: one weight


@pytest.mark.slow
def test_source_rates_equal_sigma_times_luminosity_times_efficiency() -> None:
    """Two pT-hat slices mixed 3:1 with a W' signal at 20% of the events: every event's
    weight compensates its slice's share, so L * sum(w) / N over any selection equals
    sum over slices of sigma_slice * L * efficiency, which is computed here by hand from
    each slice's own generator and events."""
    slices = ("qcd?pthat_min_gev=1000&pthat_max_gev=1300", "qcd?pthat_min_gev=1300&process_id=2")
    config = SourceConfig(
        background=slices,
        background_weights=(3.0, 1.0),
        signal=("wprime",),
        signal_fraction=0.2,
        weighting="cross_section",
        luminosity_cm2s=LUMI,
        batch_size=50,
        max_events=400,
        generator_block=50,
        seed=3,
    )
    source = Source(config, name="src")
    stream = _drain(source)
    n = len(stream)
    assert n == 400
    shares = {slices[0]: 0.8 * 0.75, slices[1]: 0.8 * 0.25, "wprime": 0.2}
    components = [c for s in source._streams for c in s.components]
    # Each slice's cross section by its own generator after the run (sigmaGen); per-block
    # estimates drift by a few per cent while it converges.
    sigma_mb = {}
    for component in components:
        assert isinstance(component, GeneratorComponent) and component._generator is not None
        sigma_mb[component.spec.text] = component._generator.cross_section_mb
    weights = stream.truth["weight"].astype(np.float64)
    leading_pt = stream["fatjets"][:, :, 0].max(axis=1)
    process = stream.truth["process_id"]
    hz_per_weight = LUMI * MB_CM2
    assert source.report()["hz_per_weight"] == hz_per_weight
    for cut_gev in (0.0, 1200.0, 1500.0):
        selected = leading_pt > cut_gev
        rate_hz = hz_per_weight * weights[selected].sum() / n
        by_hand = 0.0
        for (text, share), ids in zip(shares.items(), (0, 2, 1), strict=True):
            mine = process == ids
            n_this = int(mine.sum())
            assert n_this == pytest.approx(share * n, abs=1)
            efficiency = (mine & selected).sum() / n_this
            by_hand += sigma_mb[text] * MB_CM2 * LUMI * efficiency
        assert rate_hz == pytest.approx(by_hand, rel=0.03), cut_gev
    # The whole stream's rate is the total cross section times L; the heavy slice is
    # much smaller than the light one, and the signal smaller still.
    assert sigma_mb[slices[0]] > 3 * sigma_mb[slices[1]] > 0
    stream_rate = hz_per_weight * weights.sum() / n
    assert stream_rate == pytest.approx(sum(sigma_mb.values()) * MB_CM2 * LUMI, rel=0.03)


def test_unit_weighting_counts_crossings_and_rejects_nothing_new() -> None:
    with pytest.raises(ValueError, match="needs generator components"):
        SourceConfig(background=("lhco-features:x.h5",), weighting="cross_section")
    table: dict[str, Any] = {"weighting": "pb"}
    with pytest.raises(
        ValueError, match=r"(?m)^weighting\n.*'unit', 'cross_section' or 'crossing'"
    ):
        SourceConfig(**table)
    with pytest.raises(ValueError, match=r"(?m)^luminosity_cm2s$"):
        SourceConfig(luminosity_cm2s=0.0)


def _batch(lumi: list[int], weight: list[float], meta: dict[str, Any]) -> EventBatch:
    return EventBatch(
        {"lumi": np.asarray(lumi, "<u4")},
        {"weight": np.asarray(weight, "<f4")},
        meta,
    )


def test_lumi_rates_close_blocks_in_order() -> None:
    meter = LumiRates("n")
    meta = {"hz_per_weight": 1000.0, "events_per_lumi": 4}
    assert meter.add(_batch([1, 1, 1], [1, 2, 3], meta), {"p": np.array([1, 0, 1], bool)}) == []
    closed = meter.add(_batch([1, 2], [4, 5], meta), {"p": np.array([1, 1], bool)})
    rates = {(r.lumi, r.path): r for r in closed}
    assert set(rates) == {(1, "all"), (1, "p")}
    # Block 1: 4 events of weights 1..4; path p fired on 1, 3 and 4.
    assert rates[1, "all"].rate_hz == pytest.approx(1000 / 4 * 10)
    assert rates[1, "p"].rate_hz == pytest.approx(1000 / 4 * 8)
    assert rates[1, "p"].error_hz == pytest.approx(1000 / 4 * np.sqrt(1 + 9 + 16))
    last = {(r.lumi, r.path): r for r in meter.close_all()}
    assert last[2, "p"].rate_hz == pytest.approx(1000 / 4 * 5)


def test_report_rates_from_weighted_books(tmp_path: Path) -> None:
    """Hand-written final stats of a source -> relay x2 -> sink farm: the report turns the
    weight sums into Hz with the source's hz_per_weight over its N events."""
    plan = plan_farm(parse_topology(synthetic_table()), out_dir=tmp_path)
    n = 1000
    hz_per_weight = LUMI * MB_CM2  # cross-section weights in mb
    source_worker = {
        "weighting": "cross_section",
        "hz_per_weight": hz_per_weight,
        "luminosity_cm2s": LUMI,
        "crossing_rate_hz": 40e6,
    }

    def stats(n_in: int, acc: int, w_in: list[float], w_out: list[float], **extra: Any) -> dict:
        return {
            "events_in": n_in,
            "accepted": acc,
            "rejected": n_in - acc,
            "dropped": {},
            "events_out": {"out": acc},
            "weight_in": w_in,
            "weight_out": {"out": w_out},
            "latency": {},
            **extra,
        }

    # 1000 events carrying 80 mb in all (sum w^2 = 6.4 + ...), each relay keeps some.
    relay_paths = {
        "paths": {"jet": 30},
        "paths_weight": {"jet": [0.03, 0.0004], "muon": [0.0, 0.0]},
        "lumi_rates": [
            {"lumi": 1, "path": "accepted", "rate_hz": 3.0, "error_hz": 0.3, "events": 9},
            {"lumi": 2, "path": "accepted", "rate_hz": 5.0, "error_hz": 0.4, "events": 6},
            {"lumi": "bad", "path": "accepted"},  # a malformed row is skipped
        ],
    }
    result = FarmResult(
        stats={
            "source": stats(
                n, n, [80.0 * n, 6400.0 * n], [80.0 * n, 6400.0 * n], worker=source_worker
            ),
            "relay-0": stats(
                500, 20, [40.0 * n / 2, 3200.0 * n], [0.02, 0.0003], worker=relay_paths
            ),
            "relay-1": stats(
                500, 10, [40.0 * n / 2, 3200.0 * n], [0.01, 0.0001], worker=relay_paths
            ),
            "sink": stats(30, 30, [0.03, 0.0004], [0.0, 0.0]),
        },
        exitcodes={},
        wall_s=1.0,
        interrupted=False,
        started_s=0.0,
    )
    report = build_report(plan, result)
    stages = {s["stage"]: s for s in report["stages"]}
    assert report["rates"]["source_events"] == n
    # 80 mb at 2e34: 1.6 GHz of interactions.
    assert stages["source"]["rate_in"]["rate_hz"] == pytest.approx(80e-27 * LUMI)
    assert stages["source"]["rate_in"]["error_hz"] == pytest.approx(
        hz_per_weight * np.sqrt(6400.0 * n) / n
    )
    relay = stages["relay"]
    assert relay["rate_out"]["rate_hz"] == pytest.approx(hz_per_weight * 0.03 / n)
    assert relay["rate_out"]["error_hz"] == pytest.approx(hz_per_weight * np.sqrt(0.0004) / n)
    assert relay["path_rates"]["jet"]["rate_hz"] == pytest.approx(2 * hz_per_weight * 0.03 / n)
    assert "upper_hz" not in relay["path_rates"]["jet"]
    # A path that fired on nothing: the rate of 1.84 events of the relays' mean weight in.
    muon = relay["path_rates"]["muon"]
    assert muon["rate_hz"] == muon["error_hz"] == 0
    mean_in = 40.0 * n / 1000  # both relays: 40 n mb over their 1000 events
    assert muon["upper_hz"] == pytest.approx(1.841 * hz_per_weight * mean_in / n, rel=1e-3)
    text = format_report(report)
    assert "rates at L = 2e+34" in text and "1.6 GHz" in text and "path jet" in text
    assert "0 Hz (< " in text and "68% CL)" in text
    # The reduction R_in / R_out with the error of a weighted efficiency (out within in).
    w_in, w_out = [40.0 * n, 6400.0 * n], [0.03, 0.0004]  # both relays together
    e = w_out[0] / w_in[0]
    sigma_e = np.sqrt((1 - e) ** 2 * w_out[1] + e**2 * (w_in[1] - w_out[1])) / w_in[0]
    assert relay["reduction"]["reduction"] == pytest.approx(1 / e)
    assert relay["reduction"]["error"] == pytest.approx(sigma_e / e**2)
    assert "reduction" in text
    # Rates per lumi block: the two relays' shares add, their errors in quadrature.
    np.testing.assert_allclose(
        relay["lumi_rates"]["accepted"], [[1, 6.0, 0.3 * 2**0.5], [2, 10.0, 0.4 * 2**0.5]]
    )
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json_path.is_file() and png_path.stat().st_size > 10_000

"""The L1 node: VAE OR seeds, bits and scores, accounting, missing columns, NaN rows, and a
real source -> L1 -> sink chain over ZeroMQ with the emulated firmware and Prometheus."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware.calibrate import calibrate
from firmware.emulate import Emulator, load_emulator
from firmware.model import load_model
from firmware.scores import r_z
from nodes.l1 import SEED_BITS, SEEDS, L1Config, build, seed_decisions
from stream import EventBatch
from stream.testing import ListSource
from tests.conftest import Chain
from tests.firmware.conftest import l1_like_objects

pytestmark = pytest.mark.slow  # builds the hls4ml-emulated L1 model


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Emulator:
    # Same directory as the firmware tests' session cache: a hit when they ran first.
    cache = tmp_path_factory.getbasetemp() / "l1-emulator-cache"
    return load_emulator(load_model(), cache_dir=cache)


def l1_batch(n: int, seed: int, *, first_event: int = 0) -> EventBatch:
    rng = np.random.default_rng(seed)
    return EventBatch(
        {
            "run": np.ones(n, "<u4"),
            "lumi": np.ones(n, "<u4"),
            "event": np.arange(first_event, first_event + n, dtype="<u8"),
            "l1_objects": l1_like_objects(n, seed),
            "fatjets": rng.uniform(100, 900, (n, 2, 4)).astype("<f4"),
        },
        truth={"is_signal": np.zeros(n, "u1")},
    )


def median_threshold(emulator: Emulator, batch: EventBatch) -> float:
    mu, log_var = emulator.encode(load_model().inputs(batch["l1_objects"]))
    return float(np.median(r_z(mu, log_var)))


def test_config_validates_and_comes_from_plain_values() -> None:
    table: dict[str, Any] = {"threshold": 3.0, "seeds": ["met", "ht"], "met_gev": 80.0}
    config = L1Config(**table)
    assert config.seeds == ("met", "ht")
    assert L1Config().seeds == SEEDS


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("seeds", ("single_jet", "single_tau")),
        ("threshold", float("nan")),
        ("threshold", float("inf")),
        ("emulator_threads", 0),
        ("single_jet_pt_gev", -1.0),
        ("ht_gev", -1.0),
        ("ht_jet_pt_gev", -1.0),
        ("ht_jet_abs_eta", -1.0),
        ("single_egamma_pt_gev", -1.0),
        ("single_muon_pt_gev", -1.0),
        ("met_gev", -1.0),
        ("fatjet_pt_gev", -1.0),
        ("rate_targets_hz", {"ht": 0.0}),
    ],
)
def test_bad_config_values_name_the_field(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{key}(\.\w+)?$"):
        L1Config(**{key: value})


def test_config_checks_rate_control_against_the_paths() -> None:
    with pytest.raises(ValueError, match=r"names path\(s\) \['met'\] that are not enabled"):
        L1Config(seeds=("ht",), rate_targets_hz={"met": 1e3})
    with pytest.raises(ValueError, match=r"rate_control has unknown key\(s\) \['gain'\]"):
        L1Config(rate_control={"gain": 1.0})
    assert L1Config(rate_targets_hz={"anomaly": 1e3}).rate_targets_hz == {"anomaly": 1e3}


def test_accepts_on_rz_or_seeds_with_bits_and_scores(emulator: Emulator) -> None:
    batch = l1_batch(500, seed=1)
    threshold = median_threshold(emulator, batch)
    config = L1Config(threshold=threshold, seeds=("single_jet", "met"))
    trigger = build(config, name="l1-test", emulator=emulator)
    outcome = trigger.process(batch)
    mu, log_var = emulator.encode(load_model().inputs(batch["l1_objects"]))
    rz = r_z(mu, log_var)
    seeds = seed_decisions(config, batch)
    want = (rz > threshold) | seeds["single_jet"] | seeds["met"]
    assert outcome.accepted == int(want.sum()) and outcome.rejected == int((~want).sum())
    assert 250 <= outcome.accepted < 500
    (emit,) = outcome.emits
    out = emit.message
    assert emit.port == "out"
    assert isinstance(out, EventBatch)
    np.testing.assert_array_equal(out["event"], batch["event"][want])
    np.testing.assert_array_equal(out["l1_score"], rz[want].astype(np.float32))
    bits = out["l1_bits"]
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits & 1, (rz[want] > threshold).astype(np.uint16))
    np.testing.assert_array_equal(
        (bits >> SEED_BITS["met"]) & 1, seeds["met"][want].astype(np.uint16)
    )
    assert not (bits >> SEED_BITS["ht"] & 1).any()  # disabled seed never fires
    assert trigger.report()["fired"]["anomaly"] == int((rz > threshold).sum())


def test_anomaly_path_accepts_at_the_calibrated_rate(emulator: Emulator) -> None:
    """Calibrate on one background sample; an independent one fires at that rate."""
    model = load_model()
    mu, log_var = emulator.encode(model.inputs(l1_like_objects(20_000, seed=11)))
    calibration = calibrate(r_z(mu, log_var), rate_hz=400e3, input_rate_hz=40e6)  # FPR 1%
    assert calibration.reliable and calibration.method == "empirical-quantile"
    trigger = build(
        L1Config(threshold=calibration.threshold, seeds=()), name="l1-rate", emulator=emulator
    )
    n = 20_000
    outcome = trigger.process(l1_batch(n, seed=12))
    fpr = calibration.target_fpr
    assert abs(outcome.accepted / n - fpr) < 4 * np.sqrt(fpr * (1 - fpr) / n)


def test_seed_definitions() -> None:
    objects = np.zeros((4, 19, 3), np.float32)
    objects[0, 9] = (200.0, 0.0, 0.0)  # one hard jet
    objects[1, 9:13, 0] = 100.0  # four 100 GeV central jets: HT 400
    objects[1, 13] = (100.0, 3.0, 0.0)  # forward jet, not in HT
    objects[2, 1, 0] = 35.0  # e/gamma
    objects[3, 5, 0] = 25.0  # muon
    objects[3, 0, 0] = 150.0  # MET
    batch = EventBatch(
        {"l1_objects": objects, "fatjets": np.zeros((4, 2, 4), np.float32)},
    )
    fired = seed_decisions(L1Config(), batch)
    assert fired["single_jet"].tolist() == [True, False, False, False]
    assert fired["ht"].tolist() == [False, True, False, False]
    assert fired["single_egamma"].tolist() == [False, False, True, False]
    assert fired["single_muon"].tolist() == [False, False, False, True]
    assert fired["met"].tolist() == [False, False, False, True]
    assert not fired["fatjet_pt"].any()


def test_feature_level_batch_skips_the_vae_and_uses_the_fatjet_seed(emulator: Emulator) -> None:
    n = 100
    pts = np.linspace(100, 1000, n, dtype=np.float32)
    fatjets = np.zeros((n, 2, 4), np.float32)
    fatjets[:, 1, 0] = pts  # the lighter jet can be the harder one
    batch = EventBatch({"event": np.arange(n, dtype="<u8"), "fatjets": fatjets})
    trigger = build(L1Config(threshold=1.0, fatjet_pt_gev=500.0), name="l1-lhco", emulator=emulator)
    outcome = trigger.process(batch)
    assert outcome.accepted == int((pts > 500).sum()) and outcome.accounted == n
    out = outcome.emits[0].message
    assert isinstance(out, EventBatch)
    assert np.isnan(out["l1_score"]).all()
    assert (out["l1_bits"] == 1 << SEED_BITS["fatjet_pt"]).all()
    assert trigger.report()["unscored"] == n


def test_nan_rows_are_dropped_and_the_rest_carry_on(emulator: Emulator) -> None:
    batch = l1_batch(50, seed=2)
    objects = batch["l1_objects"].copy()
    objects[[3, 17], 9, 1] = np.nan
    bad = EventBatch({**batch.columns, "l1_objects": objects}, batch.truth)
    trigger = build(L1Config(threshold=0.0), name="l1-nan", emulator=emulator)
    outcome = trigger.process(bad)
    assert outcome.dropped == {"nonfinite": 2}
    assert outcome.accounted == 50 and outcome.accepted + outcome.rejected == 48
    if outcome.emits:
        out = outcome.emits[0].message
        assert isinstance(out, EventBatch)
        assert not np.isin([3, 17], out["event"]).any()


def test_no_threshold_and_no_calibration_is_a_clear_error(
    tmp_path: Path, emulator: Emulator
) -> None:
    import json
    import shutil

    model = load_model()
    shutil.copytree(model.path, tmp_path / "m")
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    card["calibration"] = None
    (tmp_path / "m" / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="calibrate"):
        build(L1Config(model_dir=str(tmp_path / "m")), name="l1", emulator=emulator)


def test_l1_node_over_zeromq_with_prometheus(
    emulator: Emulator, chain: Callable[..., Chain]
) -> None:
    batches = [l1_batch(200, seed=10 + i, first_event=200 * i) for i in range(5)]
    threshold = median_threshold(emulator, batches[0])
    config = L1Config(threshold=threshold, seeds=("met",))
    running = chain(
        ListSource(batches),
        build(config, name="l1-zmq", emulator=emulator),
        names=("src", "l1-zmq", "sink"),
        middle_role="l1",
        middle_options={"metrics_port": 0, "drain_idle_s": 0.3},
    )
    l1_node, sink = running.middle, running.sink
    assert l1_node is not None
    running.wait_for_source()
    running.wait_for_events(l1_node, 1000)
    scraped = running.scrape(l1_node)
    running.stop()
    stats = l1_node.stats
    assert stats.events_in == 1000 and stats.balanced
    everything = EventBatch.concat(batches)
    mu, log_var = emulator.encode(load_model().inputs(everything["l1_objects"]))
    want = (r_z(mu, log_var) > threshold) | seed_decisions(config, everything)["met"]
    assert stats.accepted == int(want.sum()) and stats.rejected == int((~want).sum())
    np.testing.assert_array_equal(np.sort(sink.event_ids()[:, 1]), everything["event"][want])
    anomaly = int((r_z(mu, log_var) > threshold).sum())
    assert f'l1_seed_accepts_total{{node="l1-zmq",seed="anomaly"}} {anomaly:.1f}' in scraped
    assert 'l1_score_rz_count{node="l1-zmq"} 1000.0' in scraped
    assert 'l1_score_rz_bucket{le="+Inf",node="l1-zmq"} 1000.0' in scraped


def test_rate_controlled_seed_moves_its_threshold_per_lumi_block(emulator: Emulator) -> None:
    from nodes.l1 import L1Trigger
    from nodes.rate_control import THRESHOLD_RECORD_KIND

    config = L1Config(threshold=1e9, anomaly=False, seeds=("ht",), rate_targets_hz={"ht": 4e6})
    l1 = L1Trigger(config, name="l1-ctl", emulator=emulator, threshold=1e9)
    per_lumi = 2000
    meta = {"hz_per_weight": 40e6, "events_per_lumi": per_lumi}
    fractions, records = [], []
    for lumi in range(1, 13):
        # One batch per block: the block closes (and the threshold moves) when the next arrives.
        batch = l1_batch(per_lumi, seed=lumi, first_event=lumi * per_lumi)
        batch = batch.with_columns(lumi=np.full(per_lumi, lumi, "<u4")).with_meta(**meta)
        outcome = l1.process(batch)
        for emit in outcome.emits:
            if not isinstance(emit.message, EventBatch):
                records.append(emit.message)
        fractions.append(outcome.accepted / per_lumi)
    # The first block ran at the configured 360 GeV; later blocks at the controlled one.
    changes = l1.report()["threshold_changes"]
    assert [c["lumi"] for c in changes] == list(range(1, 12))
    assert changes[0]["old_threshold"] == config.ht_gev
    assert l1.thresholds["ht"] == changes[-1]["new_threshold"] != config.ht_gev
    assert all(r.kind == THRESHOLD_RECORD_KIND for r in records) and len(records) == 11
    # 4 MHz of 40 MHz: 10% of crossings fire once the controller has settled.
    assert np.mean(fractions[6:]) == pytest.approx(0.10, abs=0.02), fractions

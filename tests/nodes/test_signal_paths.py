"""Per-signal path counts and the report's efficiencies, against counts made by hand."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.report import format_signal_efficiencies, signal_efficiencies
from nodes.signal_paths import SignalPaths
from stream.batch import EventBatch
from stream.testing import synthetic_batch


def _batch(is_signal: list[int], process_id: list[int]) -> EventBatch:
    batch = synthetic_batch(len(is_signal))
    truth = {
        "is_signal": np.array(is_signal, "u1"),
        "process_id": np.array(process_id, "<i2"),
    }
    return EventBatch(batch.columns, truth, batch.meta)


def test_signal_events_are_counted_per_process_and_path() -> None:
    counts = SignalPaths()
    batch = _batch([0, 1, 1, 1, 1, 0], [0, 1, 1, 2, 1, 7])
    fired = {
        "ht": np.array([1, 1, 0, 1, 1, 1], bool),
        "accepted": np.array([1, 1, 0, 1, 1, 1], bool),
        "met": np.array([1, 0, 0, 0, 0, 1], bool),
    }
    counts.add(batch, fired)
    counts.add(_batch([0, 0], [0, 0]), {"ht": np.ones(2, bool)})  # no signal: nothing
    assert counts.report() == {
        "1": {"seen": 3, "ht": 2, "accepted": 2, "met": 0},
        "2": {"seen": 1, "ht": 1, "accepted": 1, "met": 0},
    }


def test_the_report_gives_each_stage_of_seen_and_of_produced() -> None:
    def stage(name: str, pid_counts: dict) -> dict:
        return {"stage": name, "nodes": [{"worker": {"signal_paths": pid_counts}}]}

    stages = [
        {"stage": "source", "nodes": [{"worker": {}}]},
        stage("l1", {"1": {"seen": 200, "accepted": 150, "ht": 150}}),
        stage("hlt", {"1": {"seen": 150, "accepted": 30, "anomaly": 0}}),
    ]
    (signal,) = signal_efficiencies(stages, [{"process_names": {"1": "wprime"}}])
    assert signal["name"] == "wprime"
    l1, hlt = signal["stages"]
    assert l1["of_seen"]["accepted"][0] == pytest.approx(0.75)
    assert hlt["of_seen"]["accepted"][0] == pytest.approx(0.2)
    assert hlt["of_produced"]["accepted"][0] == pytest.approx(0.15)
    e, low, high = hlt["of_seen"]["accepted"]
    # Clopper-Pearson 68%: about +-sqrt(e(1-e)/n) = 3.3% here
    assert 0.03 < e - low < 0.04 and 0.03 < high - e < 0.04
    e, low, high = hlt["of_seen"]["anomaly"]
    assert e == low == 0 and 0.005 < high < 0.02  # none of 150: an upper limit, not 0 +- 0
    text = "\n".join(format_signal_efficiencies({"signal_efficiencies": [signal]}))
    assert "signal wprime (process 1): 200 events" in text
    assert "accepted 20.0%" in text and "(15.0% of all)" in text

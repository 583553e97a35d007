"""The flow learner behind the HLT: snapshots by count and at lumi ends, metrics, accounting."""

from __future__ import annotations

import json
from typing import Any, TypedDict

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from models.online import FOLD_ROLE_PREFIX, ROLES
from models.snapshot import FlowSnapshot
from nodes.learner import FlowLearner, FlowLearnerConfig, build_learner
from stream.batch import EventBatch, Record
from stream.testing import FakeClock

torch.set_num_threads(1)


class Small(TypedDict):
    """A flow small enough to train in a test."""

    n_transforms: int
    hidden_features: int
    n_bins: int
    n_blocks: int


SMALL: Small = {"n_transforms": 1, "hidden_features": 8, "n_bins": 4, "n_blocks": 1}


def batch(n: int, lumi: int, seed: int) -> EventBatch:
    rng = np.random.default_rng(seed)
    features = rng.uniform(0.1, 0.9, (n, 8)).astype("f4")
    features[:, 0] = rng.uniform(2500, 4500, n)
    return EventBatch(
        {
            "run": np.full(n, 5, "<u4"),
            "lumi": np.full(n, lumi, "<u4"),
            "event": np.arange(n, dtype="<u8"),
            "features": features,
        }
    )


def test_snapshots_every_n_events_and_at_lumi_end() -> None:
    config = FlowLearnerConfig(
        **SMALL,
        buffer_size=128,
        batch_size=64,
        calibration_events=128,
        snapshot_every_events=1000,
        snapshot_every_s=0,  # by count only: a slow machine must not add a timed snapshot
    )
    learner = build_learner(config, node_id="hlt-t1")
    records: list[Record] = []
    for i in range(3):
        records += learner.learn(batch(100, 1, i))
    assert records == []
    records += learner.learn(batch(100, 2, 3))
    assert len(records) == len(ROLES)  # lumi 1 ended: one snapshot per flow
    for i in range(4, 12):
        records += learner.learn(batch(100, 2, i))
    assert len(records) == len(ROLES)
    records += learner.learn(batch(100, 2, 12))
    assert len(records) == 2 * len(ROLES)  # 1000 events since the last snapshot
    records += learner.finish()
    snaps = [FlowSnapshot.from_record(r) for r in records]
    assert {s.role for s in snaps} == set(ROLES)
    final = [s for s in snaps if s.sequence == 3]
    all_flow = next(s for s in final if s.role == "all")
    assert all_flow.events_seen == 1300 and (all_flow.lumi_first, all_flow.lumi_last) == (1, 2)
    assert all_flow.run == 5 and 2500 <= all_flow.mjj_min_gev < all_flow.mjj_max_gev <= 4500
    side = next(s for s in final if s.role == "sideband")
    assert side.events_seen < 1300 and side.arrays["mjj_hist"].sum() == side.events_seen
    folds = [s for s in final if s.role.startswith(FOLD_ROLE_PREFIX)]
    # each signal-region event trains every signal-region flow but one
    assert sum(s.events_seen for s in folds) == (len(folds) - 1) * (1300 - side.events_seen)
    assert all(s.events_seen > 0 for s in folds)
    assert {json.loads(s.training)["replay"] for s in folds} == {config.signal_region_replay}
    assert json.loads(all_flow.training)["replay"] == config.replay
    report = learner.report()
    assert report["events_seen"] == 1300 and report["events_learned"] == 1300
    assert report["not_learned_total"] == 0
    value = REGISTRY.get_sample_value(
        "flow_events_learned_total", {"node": "hlt-t1", "flow": "all"}
    )
    assert value == 1300
    assert REGISTRY.get_sample_value("flow_loss", {"node": "hlt-t1", "flow": "all"}) is not None


def test_config_from_a_plain_table() -> None:
    table: dict[str, Any] = {"buffer_size": 256, "signal_region_gev": [3000, 3500]}
    config = FlowLearnerConfig(**table)
    assert config.signal_region_gev == (3000.0, 3500.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("snapshot_every_events", -1),
        ("snapshot_every_s", -1.0),
        ("torch_threads", -1),
        ("average_every_steps", -1),
        ("average_store", "rank0"),
        ("average_address", "tcp://127.0.0.1"),
        ("average_timeout_s", 0.0),
        ("buffer_size", 0),  # OnlineConfig's fields are checked too
    ],
)
def test_config_names_a_bad_field(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{key}$"):
        FlowLearnerConfig(**{key: value})


def test_config_keeps_the_online_configs_checks_of_fields_together() -> None:
    with pytest.raises(ValueError, match="batch_size 32 exceeds buffer_size 16"):
        FlowLearnerConfig(buffer_size=16, batch_size=32)


def test_non_finite_events_are_counted_and_never_trained_on() -> None:
    config = FlowLearnerConfig(**SMALL, buffer_size=64, batch_size=32, calibration_events=64)
    learner = build_learner(config, node_id="hlt-t2")
    good = batch(200, 1, 0)
    features = good["features"].copy()
    features[::10, 2] = np.nan
    learner.learn(good.with_columns(features=features))
    records = learner.finish()
    assert learner.report()["bad_events"] == 20
    snap = FlowSnapshot.from_record(records[0])
    assert snap.events_seen == 180
    assert all(np.isfinite(a).all() for a in snap.arrays.values())


def test_snapshots_also_come_by_time_so_a_crash_loses_at_most_one_interval() -> None:
    clock = FakeClock()
    config = FlowLearnerConfig(
        **SMALL,
        buffer_size=128,
        batch_size=64,
        calibration_events=128,
        snapshot_every_events=0,
        snapshot_at_lumi_end=False,
        snapshot_every_s=30.0,
    )
    learner = FlowLearner(config, node_id="hlt-t3", clock=clock)
    assert learner.learn(batch(200, 1, 0)) == []
    clock.advance(29.0)
    assert learner.learn(batch(100, 1, 1)) == []
    clock.advance(1.5)
    first = [FlowSnapshot.from_record(r) for r in learner.learn(batch(100, 1, 2))]
    assert {s.role for s in first} == set(ROLES)
    assert first[0].events_seen == 400
    clock.advance(10.0)
    assert learner.learn(batch(100, 1, 3)) == []  # the interval restarts at each snapshot
    clock.advance(25.0)
    assert len(learner.learn(batch(100, 1, 4))) == len(ROLES)


def test_snapshots_record_how_the_flow_was_trained() -> None:
    config = FlowLearnerConfig(
        **SMALL, buffer_size=128, batch_size=64, calibration_events=128, replay=3
    )
    learner = build_learner(config, node_id="hlt-t4")
    learner.learn(batch(200, 1, 0))
    snaps = [FlowSnapshot.from_record(r) for r in learner.finish()]
    again = FlowSnapshot.from_bytes(snaps[0].to_bytes())
    training = json.loads(again.training)
    assert training["replay"] == 3 and training["batch_size"] == 64
    assert training["averaged_over_nodes"] == 1

"""Single-pass training: each event trained on at most once, bounded memory, honest
accounting of events the trainer had no time for, and a sideband flow that never sees SR."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from models.online import (
    OnlineConfig,
    OnlineFlow,
    fold,
    fold_roles,
    held_out_fold,
    scoring_flow,
)
from stream.testing import FakeClock
from tests.conftest import SmallFlow

torch.set_num_threads(1)


SMALL: SmallFlow = {
    "n_transforms": 1,
    "hidden_features": 8,
    "n_bins": 4,
    "n_blocks": 1,
    "n_members": 1,
}


def features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.uniform(0.1, 0.9, (n, 8)).astype("f4")
    out[:, 0] = rng.uniform(2500, 4500, n)  # mjj
    out[:, 1] = rng.uniform(50, 500, n)  # mj1
    return out


@pytest.mark.parametrize("n_folds", [2, 3])
def test_every_event_is_trained_exactly_once_and_sideband_never_sees_sr(n_folds: int) -> None:
    config = OnlineConfig(
        **SMALL,
        buffer_size=96,
        batch_size=32,
        calibration_events=100,
        signal_region_folds=n_folds,
    )
    online = OnlineFlow(config)
    seen: dict[str, Counter] = {role: Counter() for role in online.roles}
    online = OnlineFlow(config, on_step=lambda role, idx: seen[role].update(idx.tolist()))
    x = features(1000, 0)
    for start in range(0, 1000, 70):
        assert online.learn(x[start : start + 70]) == 0
    online.finish()
    assert sorted(seen["all"]) == list(range(1000))
    assert max(seen["all"].values()) == 1
    sideband = ~online.in_signal_region(x[:, 0])
    assert len(seen["sideband"]) == sideband.sum() and max(seen["sideband"].values()) == 1
    stats = online.trainers["sideband"].stats
    assert stats.offered == sideband.sum()
    low, high = config.signal_region_gev
    in_sr_hist = stats.mjj_hist[
        (np.linspace(1000, 9000, 161)[:-1] >= low) & (np.linspace(1000, 9000, 161)[1:] <= high)
    ]
    assert in_sr_hist.sum() == 0
    # Signal-region flow k learns the SR events of every fold but held_out_fold(k), each
    # signal_region_replay times (with two folds: fold k alone).
    folds = fold(x[~sideband], n_folds)
    assert set(folds.tolist()) == set(range(n_folds))
    for k, role in enumerate(fold_roles(n_folds)):
        n_fold = int((folds != held_out_fold(k, n_folds)).sum())
        assert n_folds > 2 or held_out_fold(k, n_folds) == 1 - k
        assert sorted(seen[role]) == list(range(n_fold))
        assert set(seen[role].values()) == {config.signal_region_replay}
        sr_stats = online.trainers[role].stats
        assert sr_stats.offered == sr_stats.learned == n_fold
        assert sr_stats.mjj_hist.sum() == n_fold
        assert sr_stats.mjj_min_gev >= low and sr_stats.mjj_max_gev < high


def test_the_fold_is_a_function_of_the_features_alone() -> None:
    x = features(20_000, 4)
    folds = fold(x)
    assert set(folds.tolist()) == {0, 1} and abs(folds.mean() - 0.5) < 0.02
    thirds = fold(x, 3)
    assert np.allclose(np.bincount(thirds) / len(x), 1 / 3, atol=0.02)
    # each event is scored by the one flow that never trained on its fold
    for n_folds, split in ((2, folds), (3, thirds)):
        flows = scoring_flow(split, n_folds)
        assert all(held_out_fold(int(k), n_folds) == j for k, j in zip(flows, split, strict=True))
    # the same split from float64 copies (the archive's reader), in any order
    order = np.random.default_rng(0).permutation(len(x))
    np.testing.assert_array_equal(fold(x.astype(np.float64)[order]), folds[order])
    changed = x.copy()
    changed[:, 3] = np.nextafter(changed[:, 3], np.float32(1))  # one bit of one feature
    assert 0.4 < (fold(changed) != folds).mean() < 0.6


def test_no_signal_region_flow_at_replay_0() -> None:
    online = OnlineFlow(OnlineConfig(**SMALL, calibration_events=100, signal_region_replay=0))
    online.learn(features(300, 3))
    assert sorted(online.trainers) == ["all", "sideband"]


def test_memory_does_not_grow_with_the_number_of_events() -> None:
    config = OnlineConfig(**SMALL, buffer_size=256, batch_size=64, calibration_events=256)
    online = OnlineFlow(config)
    online.learn(features(1000, 1))
    buffers = {r: t.buffer_nbytes for r, t in online.trainers.items()}
    tracemalloc.start()
    online.learn(features(1000, 2))
    before, _ = tracemalloc.get_traced_memory()
    for seed in range(3, 11):
        online.learn(features(1000, seed))
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert {r: t.buffer_nbytes for r, t in online.trainers.items()} == buffers
    assert all(t.buffered <= 256 for t in online.trainers.values())
    assert after - before < 200_000, f"grew by {after - before} bytes over 8k events"


def test_events_arriving_too_fast_are_counted_not_learned_and_subsampled() -> None:
    clock = FakeClock()
    seen: Counter = Counter()

    def on_step(role: str, idx: np.ndarray) -> None:
        if role == "all":
            seen.update(idx.tolist())
        clock.advance(1.0)  # every step takes 1 s

    config = OnlineConfig(
        **SMALL, buffer_size=64, batch_size=32, calibration_events=64, budget_s_per_event=0.01
    )
    online = OnlineFlow(config, clock=clock, on_step=on_step)
    x = features(5000, 3)
    missed = sum(online.learn(x[i : i + 500]) for i in range(0, 5000, 500))
    online.finish()
    stats = online.trainers["all"].stats
    assert missed > 0 and stats.not_learned == missed
    assert stats.learned + stats.not_learned == stats.offered == 5000
    assert max(seen.values()) == 1 and len(seen) == stats.learned
    # The subsample covers each batch, not only its head.
    learned = np.array(sorted(seen))
    assert (learned % 500 > 400).sum() > 0.1 * (learned % 500 < 100).sum()


def test_learning_rate_schedule_warms_up_then_decays() -> None:
    config = OnlineConfig(learning_rate=1e-3, warmup_steps=10, decay_start_steps=100)
    rates = [config.learning_rate_at(s) for s in (0, 9, 50, 100, 400)]
    assert rates[0] == pytest.approx(1e-4) and rates[1] == rates[2] == pytest.approx(1e-3)
    assert rates[4] == pytest.approx(5e-4)


def test_optimizer_state_is_kept_across_calls() -> None:
    config = OnlineConfig(**SMALL, buffer_size=256, batch_size=64, calibration_events=256)
    online = OnlineFlow(config)
    online.learn(features(3000, 4))
    trainer = online.trainers["all"]
    optimizer = trainer.optimizer
    first_steps = trainer.stats.steps
    online.learn(features(3000, 5))
    assert trainer.optimizer is optimizer
    state = optimizer.state[next(iter(trainer.flow.parameters()))]
    assert int(state["step"]) == trainer.stats.steps > first_steps


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_snapshots_publish_the_polyak_average_of_the_iterates(decay: float) -> None:
    config = OnlineConfig(
        **(SMALL | {"n_members": 2}), buffer_size=64, batch_size=32, average_decay=decay
    )
    online = OnlineFlow(config)
    online.learn(features(3000, 6))  # calibrates, then trains
    trainer = online.trainers["all"]
    iterates: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_post_hook(
        lambda *_: iterates.append([p.detach().clone() for p in trainer.flow.parameters()])
    )
    before = [p.detach().clone() for p in trainer.estimate.parameters()]
    n_before = trainer.stats.steps
    online.learn(features(640, 7))
    assert len(iterates) == trainer.stats.steps - n_before == 20
    expected = before
    for n, current in enumerate(iterates, start=n_before):
        d = min(decay, (n + 1) / (n + 10))
        expected = [a + (1 - d) * (c - a) for a, c in zip(expected, current, strict=True)]
    for want, got in zip(expected, trainer.estimate.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    raw = list(trainer.flow.parameters())
    same = all(torch.equal(a, b) for a, b in zip(raw, trainer.estimate.parameters(), strict=True))
    assert same == (decay == 0.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("n_transforms", 0),
        ("hidden_features", 0),
        ("n_blocks", 0),
        ("n_bins", 0),
        ("n_members", 0),
        ("tail_bound", 0.0),
        ("buffer_size", 0),
        ("batch_size", 0),
        ("replay", 0),
        ("calibration_events", 0),
        ("learning_rate", 0.0),
        ("grad_clip", -1.0),
        ("budget_s_per_event", -1.0),
        ("average_decay", 1.0),
        ("average_decay", -0.5),
        ("signal_region_gev", (3300.0,)),
        ("bounds_lower", ("low",)),
    ],
)
def test_config_names_a_bad_field(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{key}(\.\d+)?$"):
        OnlineConfig(**{key: value})


def test_config_checks_fields_together() -> None:
    with pytest.raises(ValueError, match="batch_size 32 exceeds buffer_size 16"):
        OnlineConfig(buffer_size=16, batch_size=32)
    with pytest.raises(ValueError, match="signal_region_gev must be"):
        OnlineConfig(signal_region_gev=(3700.0, 3300.0))
    with pytest.raises(ValueError, match="bounds_lower/upper need 4 values"):
        OnlineConfig(bounds_lower=(0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="unexpected_keyword_argument"):
        OnlineConfig(buffer=16)  # type: ignore[call-arg]


def test_config_takes_lists_for_tuples() -> None:
    table: dict[str, Any] = {"signal_region_gev": [3000, 4000]}  # as TOML or JSON gives it
    config = OnlineConfig(**table)
    assert config.signal_region_gev == (3000.0, 4000.0)
    assert all(isinstance(v, float) for v in config.signal_region_gev)

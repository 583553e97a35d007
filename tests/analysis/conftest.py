"""A small synthetic resonance search: falling QCD-like background in mjj, a narrow
resonance at 3.5 TeV with a distinctive jet mass and low tau21, planted at a known rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nodes.archive import ArchiveConfig, build
from nodes.learner import FlowLearnerConfig, build_learner
from stream.batch import EventBatch
from stream.eventfile import CacheWriter

torch.set_num_threads(1)


def synthetic_events(n_background: int, n_signal: int, seed: int) -> EventBatch:
    rng = np.random.default_rng(seed)
    n = n_background + n_signal
    f = np.zeros((n, 8), "f4")
    b, s = slice(0, n_background), slice(n_background, n)
    f[b, 0] = 2500 + rng.exponential(700, n_background)
    # Background jet features depend a little on mjj (as in QCD), signal ones do not.
    f[b, 1] = rng.gamma(2.0, 60, n_background) + 0.02 * (f[b, 0] - 2500)
    f[b, 2] = rng.gamma(2.0, 40, n_background)
    f[b, 3] = rng.beta(5, 3, n_background)
    f[b, 4] = rng.beta(5, 3, n_background)
    f[s, 0] = rng.normal(3500, 80, n_signal)
    f[s, 1] = rng.normal(500, 30, n_signal)
    f[s, 2] = rng.normal(400, 30, n_signal).clip(1)
    f[s, 3] = rng.beta(3, 7, n_signal)
    f[s, 4] = rng.beta(3, 7, n_signal)
    f[:, 5:] = rng.uniform(0, 1, (n, 3))
    order = rng.permutation(n)
    labels = np.r_[np.zeros(n_background), np.ones(n_signal)].astype("u1")
    return EventBatch(
        {
            "run": np.full(n, 1, "<u4"),
            "lumi": (1 + np.arange(n) // 10_000).astype("<u4"),
            "event": np.arange(n, dtype="<u8"),
            "features": f[order],
        },
        truth={"is_signal": labels[order], "process_id": labels[order].astype("<i2")},
    )


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An archive of flows (two HLT nodes) trained on 24k events with 600 planted signal
    events, the stored events, and a labelled test file."""
    root = tmp_path_factory.mktemp("planted")
    stream = synthetic_events(23_400, 600, seed=1)
    archive = build(ArchiveConfig(out_dir=str(root / "archive")), name="archive")
    config = FlowLearnerConfig(
        n_transforms=2,
        hidden_features=24,
        n_bins=6,
        n_members=2,
        buffer_size=1024,
        batch_size=32,
        learning_rate=3e-3,
        calibration_events=2000,
        snapshot_every_events=0,
    )
    learners = [build_learner(config, node_id=f"hlt-{i}") for i in range(2)]
    for start in range(0, len(stream), 1000):
        part = stream.select(slice(start, start + 1000))
        learner = learners[(start // 1000) % 2]
        for record in learner.learn(part.without_truth()):
            archive.process(record)
        archive.process(part)
    for learner in learners:
        for record in learner.finish():
            archive.process(record)
    archive.finish()
    test = synthetic_events(6000, 1500, seed=2)
    test_path = root / "test.h5"
    with CacheWriter(test_path) as writer:
        writer.append(test)
    return {"archive": root / "archive", "test": test_path, "root": root}

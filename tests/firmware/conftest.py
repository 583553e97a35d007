"""Shared L1 fixtures: L1-like objects, the committed default model and its compiled emulator.

The emulator is compiled once per pytest session into a session cache directory; every
test module that calls ``session_emulator`` after the first gets a cache hit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware.emulate import Emulator, load_emulator
from firmware.model import L1Model, load_model
from stream.schema import L1_SLOTS


def l1_like_objects(n: int, seed: int = 0) -> np.ndarray:
    """(n, 19, 3) L1-like objects: MET, a few e/gamma, muons and jets with falling pT spectra,
    pT-ordered per type and zero-padded; about 1% of events carry a 3-6 TeV jet that
    saturates the firmware input type."""
    rng = np.random.default_rng(seed)
    objects = np.zeros((n, 19, 3), np.float32)
    objects[:, 0, 0] = rng.exponential(20.0, n)
    objects[:, 0, 2] = rng.uniform(-np.pi, np.pi, n)
    for kind, mean_count, pt_min, pt_scale, eta_max in (
        ("egamma", 0.4, 10.0, 15.0, 2.5),
        ("muon", 0.3, 5.0, 15.0, 2.4),
        ("jet", 3.0, 30.0, 40.0, 4.7),
    ):
        slot = L1_SLOTS[kind]
        width = slot.stop - slot.start
        counts = np.minimum(rng.poisson(mean_count, n), width)
        for i, count in enumerate(counts):
            pts = np.sort(pt_min + rng.exponential(pt_scale, count))[::-1]
            objects[i, slot.start : slot.start + count, 0] = pts
            objects[i, slot.start : slot.start + count, 1] = rng.uniform(-eta_max, eta_max, count)
            objects[i, slot.start : slot.start + count, 2] = rng.uniform(-np.pi, np.pi, count)
    huge = rng.random(n) < 0.01
    objects[huge, 9, 0] = rng.uniform(3000.0, 6000.0, int(huge.sum()))
    return objects


@pytest.fixture(scope="session")
def default_model() -> L1Model:
    return load_model()


@pytest.fixture(scope="session")
def emulator_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "l1-emulator-cache"


@pytest.fixture(scope="session")
def session_emulator(default_model: L1Model, emulator_cache: Path) -> Emulator:
    return load_emulator(default_model, cache_dir=emulator_cache)

"""The LHCO features reader on the real lhco-rnd-100k files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from simulator.lhco_features import open_lhco_features, read_lhco_features
from stream.errors import DataFileError
from stream.schema import FEATURE_NAMES
from tests.conftest import shared_data

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def test_features_match_pandas_with_tau21_recomputed() -> None:
    path = shared_data("lhco-rnd-100k", "scalars_bkg01.h5")
    frame = pd.read_hdf(path)
    batches = list(read_lhco_features([path], chunk_size=1000))
    assert [len(b) for b in batches[:-1]] == [1000] * (len(batches) - 1)
    features = np.concatenate([b["features"] for b in batches])
    assert len(features) == len(frame) == open_lhco_features(path).n_events
    assert features[0, COL["mjj"]] == pytest.approx(2580.49, abs=0.01)
    heavier = np.maximum(frame["mass_1"], frame["mass_2"])
    np.testing.assert_allclose(features[:, COL["mj1"]], heavier, rtol=1e-6)
    first_is_heavier = frame["mass_1"] >= frame["mass_2"]
    tau21 = np.where(
        first_is_heavier, frame["tau2_1"] / frame["tau1_1"], frame["tau2_2"] / frame["tau1_2"]
    )
    ok = np.isfinite(tau21)
    np.testing.assert_allclose(features[ok, COL["tau21_j1"]], tau21[ok], rtol=1e-5)
    # The defect: the file's own tau21 column is tau3/tau2, which we must not reproduce.
    assert not np.allclose(
        features[ok, COL["tau21_j1"]],
        np.where(first_is_heavier, frame["tau21_1"], frame["tau21_2"])[ok],
    )
    assert np.all(features[:, COL["delta_mj"]] <= 0)
    assert all(b.truth["is_signal"].sum() == 0 for b in batches)


def test_signal_files_are_labelled_and_events_numbered_across_files() -> None:
    paths = [shared_data("lhco-rnd-100k", f"scalars_sig0{i}.h5") for i in (1, 2)]
    batches = list(read_lhco_features(paths, chunk_size=500, first_event=10))
    events = np.concatenate([b["event"] for b in batches])
    np.testing.assert_array_equal(events, np.arange(10, 10 + len(events)))
    assert all(b.truth["is_signal"].all() for b in batches)
    mjj = np.concatenate([b["features"][:, COL["mjj"]] for b in batches])
    assert 3300 < np.median(mjj) < 3700


def test_a_foreign_file_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(DataFileError, match=r"other\.h5"):
        list(read_lhco_features([path]))


def test_a_truncated_file_is_named_in_the_error(tmp_path: Path) -> None:
    source = shared_data("lhco-rnd-100k", "scalars_bkg01.h5")
    path = tmp_path / "truncated.h5"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(DataFileError, match=r"truncated\.h5"):
        list(read_lhco_features([path]))

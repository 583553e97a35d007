"""Replay readers on real files (LHCO raw, CMS open-data ROOT) and on small files in the
CMS L1 anomaly-detection and top-tagging landscape layouts written here."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import uproot

from nodes.source import SourceConfig, build
from simulator.lhco_features import read_lhco_features
from simulator.replay import READERS, replay
from stream.batch import EventBatch
from stream.errors import DataFileError
from stream.schema import FEATURE_NAMES, N_CONSTITUENTS
from tests.conftest import shared_data

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
RAW = ("lhco-rnd-raw-1k", "events_anomalydetection_tiny.h5")
HZZ = ("cms-open-data", "uproot-HZZ.root")


def concat(batches: list[EventBatch]) -> EventBatch:
    assert batches, "the reader yielded nothing"
    return EventBatch.concat(batches)


def test_every_layout_is_registered() -> None:
    assert {"cache", "lhco-features", "lhco-raw", "cms-l1ad", "top-landscape", "root"} <= set(
        READERS
    )


# -- LHCO raw ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_batches() -> list[EventBatch]:
    return list(replay("lhco-raw", [shared_data(*RAW)], chunk_size=256))


def test_lhco_raw_reproduces_the_feature_files(raw_batches: list[EventBatch]) -> None:
    """The raw file's background events are the first rows of scalars_bkg01 in order, its
    signal events the first rows of scalars_sig01; clustering them here must give the
    same mjj (to 1%) and jet masses."""
    assert [len(b) for b in raw_batches] == [256, 256, 256, 232]
    raw = concat(raw_batches)
    np.testing.assert_array_equal(raw["event"], np.arange(1000))
    is_signal = raw.truth["is_signal"].astype(bool)
    assert (int((~is_signal).sum()), int(is_signal.sum())) == (907, 93)
    assert raw["features"][0, COL["mjj"]] == pytest.approx(2580.49, abs=0.01)
    for key, mask in (("bkg01", ~is_signal), ("sig01", is_signal)):
        path = shared_data("lhco-rnd-100k", f"scalars_{key}.h5")
        reference = concat(list(read_lhco_features([path], chunk_size=int(mask.sum()))))
        ours = raw["features"][mask]
        theirs = reference["features"][: len(ours)]
        np.testing.assert_allclose(ours[:, COL["mjj"]], theirs[:, COL["mjj"]], rtol=0.01)
        np.testing.assert_allclose(ours[:, COL["mj1"]], theirs[:, COL["mj1"]], rtol=0.01)
        # Same beta=1 N-subjettiness; the source's axis finding differs for a few jets.
        tau21 = ours[:, COL["tau21_j1"]] - theirs[:, COL["tau21_j1"]]
        assert abs(np.median(tau21)) < 0.01 and np.mean(np.abs(tau21) < 0.05) > 0.75
        theirs_fat = reference["fatjets"][: len(ours)]
        np.testing.assert_allclose(raw["fatjets"][mask], theirs_fat, rtol=1e-3, atol=1e-3)
    n = raw["n_constituents"].astype(int)
    assert (n[:, 0] > 0).all()
    pt = raw["constituents"][..., 0]
    assert (pt[:, 0, 0] >= pt[:, 0, 1]).all(), "constituents are pT-ordered"
    assert raw["constituents"].shape[2] == N_CONSTITUENTS


def write_raw(path: Path, rows: np.ndarray) -> Path:
    pd.DataFrame(rows).to_hdf(path, key="df", format="fixed", mode="w")
    return path


def test_lhco_raw_bad_row_is_named_or_skipped(tmp_path: Path) -> None:
    source = pd.read_hdf(shared_data(*RAW), start=0, stop=6).to_numpy(copy=True)
    source[4, 7] = np.nan
    path = write_raw(tmp_path / "nan_row.h5", source)
    with pytest.raises(DataFileError, match=r"nan_row\.h5, entry 4"):
        list(replay("lhco-raw", [path]))
    batches = list(replay("lhco-raw", [path], skip_bad_rows=True))
    assert sum(len(b) for b in batches) == 5
    assert sum(int(b.meta["bad_rows"] or 0) for b in batches) == 1


def test_lhco_raw_truncated_and_corrupt_files_are_named(tmp_path: Path) -> None:
    data = bytearray(shared_data(*RAW).read_bytes())
    truncated = tmp_path / "raw_truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"raw_truncated\.h5: .*truncated"):
        list(replay("lhco-raw", [truncated]))
    middle = len(data) // 2
    data[middle : middle + 2000] = b"\xff" * 2000
    corrupt = tmp_path / "raw_corrupt.h5"
    corrupt.write_bytes(data)
    with pytest.raises(DataFileError, match=r"raw_corrupt\.h5, entry \d+") as info:
        list(replay("lhco-raw", [corrupt], chunk_size=100))
    assert 0 < (info.value.entry or 0) < 1000
    width = tmp_path / "wrong_width.h5"
    write_raw(width, np.zeros((3, 11)))
    with pytest.raises(DataFileError, match=r"wrong_width\.h5: 11 columns"):
        list(replay("lhco-raw", [width]))


def test_source_node_replays_lhco_raw_keeping_its_labels() -> None:
    path = shared_data(*RAW)
    config = SourceConfig(background=(f"lhco-raw:{path}",), batch_size=100, max_events=300)
    source = build(config, name="raw")
    outcomes = [source.produce() for _ in range(4)]
    assert outcomes[-1] is None
    messages = [e.message for o in outcomes if o for e in o.emits]
    batches = [m for m in messages if isinstance(m, EventBatch)]
    assert len(batches) == len(messages), "a source emits only event batches"
    batch = EventBatch.concat(batches)
    assert len(batch) == 300
    np.testing.assert_array_equal(np.sort(batch["event"]), np.arange(1, 301))
    # The raw file mixes background and signal; the source keeps the file's labels.
    labels = pd.read_hdf(path, start=0, stop=300).to_numpy()[:, -1]
    assert int(batch.truth["is_signal"].sum()) == int(labels.sum()) > 0


# -- CMS L1 anomaly detection -------------------------------------------------------------


def l1ad_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 19, 4) rows in the challenge layout with a random number of objects per group."""
    rows = np.zeros((n, 19, 4))
    rows[:, 0] = np.stack(
        [rng.exponential(30, n), np.zeros(n), rng.uniform(-3, 3, n), np.ones(n)], 1
    )
    for first, size, cls in ((1, 4, 2), (5, 4, 3), (9, 10, 4)):
        k = rng.integers(0, size + 1, n)
        for i in range(n):
            pt = np.sort(rng.exponential(40, k[i]))[::-1] + 3
            block = np.stack(
                [pt, rng.uniform(-2, 2, k[i]), rng.uniform(-3, 3, k[i]), np.full(k[i], cls)], 1
            )
            rows[i, first : first + k[i]] = block
    return rows


def test_cms_l1ad_streams_l1_objects_with_truth_from_the_name(tmp_path: Path) -> None:
    rows = l1ad_rows(50, np.random.default_rng(1))
    path = tmp_path / "Ato4l_lepFilter_13TeV.h5"
    with h5py.File(path, "w") as handle:
        handle["Particles"] = rows
        handle["Particles_Names"] = np.array([b"Pt", b"Eta", b"Phi", b"Class"])
    batches = list(replay("cms-l1ad", [path], chunk_size=20))
    assert [len(b) for b in batches] == [20, 20, 10]
    batch = concat(batches)
    np.testing.assert_allclose(batch["l1_objects"], rows[..., :3], rtol=1e-6)
    assert (batch.truth["process_id"] == 12).all() and batch.truth["is_signal"].all()
    background = tmp_path / "background_for_training.h5"
    with h5py.File(background, "w") as handle:
        handle["Particles"] = rows[:5]
    batch = concat(list(replay("cms-l1ad", [background])))
    assert (batch.truth["process_id"] == 11).all() and not batch.truth["is_signal"].any()


def test_cms_l1ad_bad_rows_and_files(tmp_path: Path) -> None:
    rows = l1ad_rows(10, np.random.default_rng(2))
    rows[7, 3, 3] = 4  # a jet in an e/gamma slot
    path = tmp_path / "misplaced.h5"
    with h5py.File(path, "w") as handle:
        handle["Particles"] = rows
    with pytest.raises(DataFileError, match=r"misplaced\.h5, entry 7"):
        list(replay("cms-l1ad", [path]))
    batches = list(replay("cms-l1ad", [path], skip_bad_rows=True))
    assert sum(len(b) for b in batches) == 9 and batches[0].meta["bad_rows"] == 1
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as handle:
        handle["Particles"] = np.zeros((3, 19, 3))
    with pytest.raises(DataFileError, match=r"wrong\.h5: expected a dataset 'Particles'"):
        list(replay("cms-l1ad", [wrong]))
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(DataFileError, match=r"cut\.h5"):
        list(replay("cms-l1ad", [truncated]))


# -- top-tagging landscape ----------------------------------------------------------------


def landscape_frame(n_constituents: list[int], labels: list[int], seed: int = 3) -> pd.DataFrame:
    """Jets of massless constituents around eta = 0.5, phi = 1, 200 slots each."""
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {}
    four = np.zeros((len(labels), 200, 4))
    for i, k in enumerate(n_constituents):
        pt = np.sort(rng.exponential(20, k))[::-1] + 1
        eta = 0.5 + rng.normal(0, 0.2, k)
        phi = 1.0 + rng.normal(0, 0.2, k)
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        four[i, :k] = np.stack([np.sqrt(px**2 + py**2 + pz**2), px, py, pz], 1)
    for j in range(200):
        for f, name in enumerate(("E", "PX", "PY", "PZ")):
            data[f"{name}_{j}"] = four[:, j, f]
    data["truthE"] = np.zeros(len(labels))
    data["ttv"] = np.zeros(len(labels), np.int64)
    data["is_signal_new"] = np.array(labels, np.int64)
    return pd.DataFrame(data)


@pytest.mark.parametrize("fmt", ["fixed", "table"])
def test_top_landscape_jets(tmp_path: Path, fmt: str) -> None:
    counts, labels = [5, 40, 150, 200, 1], [1, 0, 1, 0, 0]
    frame = landscape_frame(counts, labels)
    path = tmp_path / f"train_{fmt}.h5"
    frame.to_hdf(path, key="table", format=fmt, mode="w")
    batches = list(replay("top-landscape", [path], chunk_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    batch = concat(batches)
    np.testing.assert_array_equal(batch.truth["is_signal"], labels)
    np.testing.assert_array_equal(batch.truth["process_id"], [3, 0, 3, 0, 0])
    n = batch["n_constituents"]
    np.testing.assert_array_equal(n[:, 0], np.minimum(counts, N_CONSTITUENTS))
    assert (n[:, 1] == 0).all() and (batch["fatjets"][:, 1] == 0).all()
    for i, k in enumerate(counts):
        e, px, py, pz = (
            frame[[f"{f}_{j}" for j in range(k)]].to_numpy()[i] for f in ("E", "PX", "PY", "PZ")
        )
        mass = np.sqrt(max(e.sum() ** 2 - px.sum() ** 2 - py.sum() ** 2 - pz.sum() ** 2, 0))
        jet = batch["fatjets"][i, 0]
        assert jet[0] == pytest.approx(np.hypot(px.sum(), py.sum()), rel=1e-5)
        assert jet[3] == pytest.approx(mass, rel=1e-3, abs=1e-3)
        assert batch["features"][i, COL["mj1"]] == pytest.approx(jet[3])
        assert batch["constituents"][i, 0, 0, 0] == pytest.approx(np.hypot(px[0], py[0]), rel=1e-5)
    tau21 = batch["features"][:, COL["tau21_j1"]]
    assert ((tau21[:4] > 0) & (tau21[:4] <= 1)).all() and tau21[4] == 0  # one constituent
    assert (batch["features"][:, COL["mjj"]] == 0).all()


def test_top_landscape_bad_input(tmp_path: Path) -> None:
    frame = landscape_frame([3, 4, 5], [0, 1, 1])
    frame.loc[1, "is_signal_new"] = 7
    path = tmp_path / "bad_label.h5"
    frame.to_hdf(path, key="table", format="fixed", mode="w")
    with pytest.raises(DataFileError, match=r"bad_label\.h5, entry 1"):
        list(replay("top-landscape", [path]))
    assert sum(len(b) for b in replay("top-landscape", [path], skip_bad_rows=True)) == 2
    missing = tmp_path / "missing.h5"
    frame.drop(columns=["PZ_7"]).to_hdf(missing, key="table", format="fixed", mode="w")
    with pytest.raises(DataFileError, match=r"missing\.h5: missing columns \['PZ_7'\]"):
        list(replay("top-landscape", [missing]))
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(DataFileError, match=r"cut\.h5"):
        list(replay("top-landscape", [truncated]))


# -- ROOT through uproot ------------------------------------------------------------------


def test_root_builds_l1_objects_from_reco_objects() -> None:
    path = shared_data(*HZZ)
    batches = list(replay("root", [path], chunk_size=1000))
    assert [len(b) for b in batches] == [1000, 1000, 421]
    batch = concat(batches)
    l1 = batch["l1_objects"]
    with uproot.open(path) as file:
        tree = file["events"]
        a = tree.arrays(
            [
                "MET_px",
                "MET_py",
                "Muon_Px",
                "Muon_Py",
                "Jet_Px",
                "Jet_Py",
                "Electron_Px",
                "Electron_Py",
                "Photon_Px",
                "Photon_Py",
            ],
            library="np",
        )
    np.testing.assert_allclose(l1[:, 0, 0], np.hypot(a["MET_px"], a["MET_py"]), rtol=1e-5)
    muons = [np.sort(np.hypot(x, y))[::-1] for x, y in zip(a["Muon_Px"], a["Muon_Py"], strict=True)]
    assert sum(len(m) for m in muons) > 1000
    for i in range(0, 2421, 97):
        n_mu = int((l1[i, 5:9, 0] > 0).sum())
        assert n_mu <= min(4, len(muons[i]))
        np.testing.assert_allclose(l1[i, 5 : 5 + n_mu, 0], muons[i][:n_mu], rtol=1e-5)
        jets = np.hypot(a["Jet_Px"][i], a["Jet_Py"][i])
        assert int((l1[i, 9:, 0] > 0).sum()) <= int((jets >= 15).sum())
        n_eg = len(a["Electron_Px"][i]) + len(a["Photon_Px"][i])
        assert int((l1[i, 1:5, 0] > 0).sum()) <= min(4, n_eg)
    for group in (slice(1, 5), slice(5, 9), slice(9, 19)):
        assert (np.diff(l1[:, group, 0], axis=1) <= 0).all()
    assert (l1[:, 9:, 0][l1[:, 9:, 0] > 0] >= 15).all()


def test_root_nanoaod_convention_keeps_event_ids() -> None:
    path = shared_data("cms-open-data", "nanoAOD_2015_CMS_Open_Data_ttbar.root")
    batch = concat(list(replay("root", [path])))
    with uproot.open(path) as file:
        tree = file["Events"]
        ids = tree.arrays(["event", "MET_pt", "nJet"], library="np")
    np.testing.assert_array_equal(batch["event"], ids["event"])
    np.testing.assert_allclose(batch["l1_objects"][:, 0, 0], ids["MET_pt"], rtol=1e-5)
    assert (batch["l1_objects"][:, 9, 0] > 0).sum() > 100  # ttbar: most events have a jet


def test_root_truncated_and_corrupt_files_are_named(tmp_path: Path) -> None:
    data = bytearray(shared_data(*HZZ).read_bytes())
    truncated = tmp_path / "HZZ_truncated.root"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"HZZ_truncated\.root: not a readable ROOT file"):
        list(replay("root", [truncated]))
    with uproot.open(shared_data(*HZZ)) as file:
        seek = int(file["events"]["Jet_Px"].member("fBasketSeek")[0])
    data[seek + 200 : seek + 600] = b"\x00" * 400
    corrupt = tmp_path / "HZZ_corrupt.root"
    corrupt.write_bytes(data)
    with pytest.raises(DataFileError, match=r"HZZ_corrupt\.root, entry 0: cannot read entries"):
        list(replay("root", [corrupt]))
    foreign = tmp_path / "no_objects.root"
    with uproot.recreate(foreign) as file:
        file.mktree("t", {"x": np.float64}).extend({"x": np.arange(3.0)})
    with pytest.raises(DataFileError, match=r"no_objects\.root: tree 't' has no MET"):
        list(replay("root", [foreign]))

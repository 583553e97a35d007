"""The HDF5 event cache, its parallel writer and ``trigfarm simulate``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from deploy.cli import main
from simulator import generate
from simulator.production import detector_from_dict, recipe_from_dict, simulate_to_file
from simulator.recipes import PROCESSES, make_recipe
from stream.batch import EventBatch
from stream.errors import DataFileError
from stream.eventfile import CacheWriter, open_cache, read_cache

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_workers_do_not_change_the_events(tmp_path: Path) -> None:
    one = simulate_to_file("wprime", 40, tmp_path / "one.h5", seed=9, block_size=10, progress=False)
    two = simulate_to_file(
        "wprime", 40, tmp_path / "two.h5", seed=9, block_size=10, workers=2, progress=False
    )
    assert one.info is not None and two.info is not None
    assert one.info.complete and two.info.attrs["workers"] == 2
    a = EventBatch.concat(read_cache(one.info.path))
    b = EventBatch.concat(read_cache(two.info.path))
    for name in a.columns:
        np.testing.assert_array_equal(a[name], b[name])
    # ... and the file holds what generate() makes with the same seed and block size.
    direct = EventBatch.concat(generate("wprime", 40, seed=9, batch_size=10))
    np.testing.assert_array_equal(a["constituents"], direct["constituents"])


def test_attributes_reproduce_the_settings(tmp_path: Path) -> None:
    recipe = make_recipe("wprime", m_x_gev=300.0)
    result = simulate_to_file(recipe, 5, tmp_path / "x.h5", seed=4, progress=False)
    assert result.info is not None
    attrs = result.info.attrs
    assert attrs["seed"] == 4 and attrs["block_size"] == 256 and attrs["n_events"] == 5
    import json

    assert recipe_from_dict(json.loads(attrs["recipe"])) == recipe
    detector = detector_from_dict(json.loads(attrs["detector"]))
    assert detector.ecal.deta == pytest.approx(0.0174)
    versions = json.loads(attrs["versions"])
    assert {"pythia8mc", "fastjet", "numpy", "h5py"} <= set(versions)
    assert json.loads(attrs["generator_stats"])["kept"] == 5


def test_reader_streams_chunks_and_columns(tmp_path: Path) -> None:
    batches = list(generate("ttbar", 30, seed=1, batch_size=15))
    with CacheWriter(tmp_path / "t.h5", {"process": "ttbar"}, chunk_events=8) as writer:
        for batch in batches:
            writer.append(batch)
    chunks = list(read_cache(tmp_path / "t.h5", chunk_size=7, columns=["features"]))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    assert set(chunks[0].columns) == {"features"}
    assert chunks[0].truth["process_id"][0] == PROCESSES["ttbar"].process_id
    np.testing.assert_array_equal(
        np.concatenate([c["features"] for c in chunks]),
        np.concatenate([b["features"] for b in batches]),
    )


def test_an_interrupted_writer_leaves_a_valid_partial_file(tmp_path: Path) -> None:
    batch = next(generate("zll", 6, seed=1, batch_size=6))
    path = tmp_path / "p.h5"
    with pytest.raises(KeyboardInterrupt), CacheWriter(path) as writer:
        writer.append(batch)
        raise KeyboardInterrupt
    info = open_cache(path)
    assert not info.complete and info.n_events == 6
    assert len(EventBatch.concat(read_cache(path))) == 6
    with pytest.raises(DataFileError, match="partial"):
        list(read_cache(path, require_complete=True))
    empty = tmp_path / "e.h5"
    with pytest.raises(KeyboardInterrupt), CacheWriter(empty):
        raise KeyboardInterrupt
    assert not empty.exists() and not list(tmp_path.glob(".e.h5*"))


@pytest.mark.slow
def test_sigint_to_the_command_leaves_a_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "big.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "deploy",
        "simulate",
        "--process",
        "wprime",
        "--events",
        "100000",
        "--block-size",
        "20",
        "--workers",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tmps = list(tmp_path.glob(".big.h5.*.tmp"))
        if tmps and _rows(tmps[0]) >= 40:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    info = open_cache(out)
    assert not info.complete and 40 <= info.n_events < 100000
    assert info.n_events % 20 == 0


def _rows(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return int(handle.attrs["n_events"])
    except (OSError, KeyError):
        return 0


def test_bad_files_are_named(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(DataFileError, match=r"foreign\.h5"):
        open_cache(foreign)
    good = tmp_path / "good.h5"
    with CacheWriter(good) as writer:
        for batch in generate("qcd", 40, seed=3, batch_size=20):
            writer.append(batch)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataFileError, match=r"cut\.h5"):
        list(read_cache(cut))


def test_cli_makes_a_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    args = [
        "simulate",
        "--process",
        "zll",
        "--events",
        "8",
        "--out",
        str(out),
        "--seed",
        "3",
        "--workers",
        "1",
        "--set",
        "pileup_mean=0",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "8 zll events, complete" in result.output
    assert open_cache(out).attrs["seed"] == 3
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "exists" in again.output
    bad = CliRunner().invoke(main, [*args[:-3], "--set", "m_x_gev=3", "--force"])
    assert bad.exit_code != 0 and "m_x_gev" in bad.output
    # a bad value: one line naming the recipe's key, no pydantic dump
    bad = CliRunner().invoke(main, [*args[:-3], "--set", "pileup_mean=-1", "--force"])
    assert bad.exit_code == 2
    assert "Invalid value for --set: zll.pileup_mean: must be >= 0" in bad.output, bad.output
    assert "validation error" not in bad.output and "pydantic.dev" not in bad.output
    recipe = ["simulate", "--recipe", "lhco-like", "--out", str(out), "--set", "pileup_mean=0"]
    ignored = CliRunner().invoke(main, recipe)
    assert ignored.exit_code == 2 and "a --recipe has no --set" in ignored.output

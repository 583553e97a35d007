"""`trigfarm replay` and `run` with unreadable files: one-line error and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from deploy.cli import main
from simulator.lhco_features import _NEEDED
from tests.deploy.conftest import write_topology


def write_lhco_features(path: Path, n: int = 200, seed: int = 1) -> Path:
    """A small file in the LHCO R&D features layout (pandas 'fixed' table under /bkg)."""
    import h5py

    columns = [*_NEEDED, "mjj"]
    values = np.random.default_rng(seed).uniform(0.1, 1.0, (n, len(columns)))
    with h5py.File(path, "w") as handle:
        group = handle.create_group("bkg")
        group["block0_items"] = np.array([c.encode() for c in columns])
        group["block0_values"] = values
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_lhco_features(tmp_path / "good.h5")


@pytest.fixture
def truncated(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "truncated.h5"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def not_hdf5(tmp_path: Path) -> Path:
    path = tmp_path / "notes.h5"
    path.write_text("these are not events\n")
    return path


def small_farm(tmp_path: Path, source: dict[str, object] | None = None) -> Path:
    return write_topology(
        tmp_path / "t.toml",
        {
            "farm": {"name": "bad-t", "chain": ["source", "relay", "sink"], "drain_idle_s": 0.3},
            "source": {"config": source or {"background": ["qcd"], "batch_size": 100}},
            "relay": {},
            "sink": {},
        },
    )


def replay(tmp_path: Path, *args: str) -> Result:
    out = tmp_path / "run"
    topology = small_farm(tmp_path)
    command = ["replay", *args, "--topology", str(topology), "--events", "300"]
    return CliRunner().invoke(main, [*command, "--out", str(out), "--quiet"])


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("bad", ["truncated", "not_hdf5"])
def test_a_bad_file_stops_replay_before_the_farm_starts(
    tmp_path: Path, good: Path, bad: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(bad)
    result = replay(tmp_path, str(good), str(path))
    assert result.exit_code not in (0, None), result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and str(path) in lines[0]
    assert "--skip-bad-files" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # no farm was started


@pytest.mark.slow
def test_skip_bad_files_leaves_them_out_and_runs(
    tmp_path: Path, good: Path, truncated: Path, not_hdf5: Path
) -> None:
    result = replay(tmp_path, str(truncated), str(good), str(not_hdf5), "--skip-bad-files")
    assert result.exit_code == 0, result.output
    skipped = [line for line in error_lines(result) if line.startswith("skipping bad")]
    assert len(skipped) == 2
    assert str(truncated) in skipped[0] and str(not_hdf5) in skipped[1]
    assert "skipped 2 of 3 dataset file(s)" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["accounting"]["balanced"] and report["events_generated"] == 300
    source = report["stages"][0]["nodes"][0]["worker"]
    assert source["bad_files"] == 0 and list(source["components"]) == [f"lhco-features:{good}"]


def test_skip_bad_files_still_fails_when_none_is_left(
    tmp_path: Path, truncated: Path, not_hdf5: Path
) -> None:
    result = replay(tmp_path, str(truncated), str(not_hdf5), "--skip-bad-files")
    assert result.exit_code not in (0, None), result.output
    assert "Error: no readable dataset file left of 2" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.h5"
    result = replay(tmp_path, str(missing))
    assert result.exit_code == 2, result.output
    assert str(missing) in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_bad_file_met_during_a_run_fails_the_run(
    tmp_path: Path, good: Path, truncated: Path
) -> None:
    # `trigfarm run` does not check files first: the source skips the bad one, and the
    # run must still end non-zero, naming it, rather than report a silent success.
    spec = f"lhco-features:{truncated},{good}"
    topology = small_farm(tmp_path, {"background": [spec], "batch_size": 100})
    out = tmp_path / "run"
    args = ["run", "--topology", str(topology), "--events", "150", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"could not read {truncated}" in result.output
    assert "Error: bad input file(s) during the run" in result.output
    assert "Traceback" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["nodes"][0]["worker"]["bad_file_paths"] == [str(truncated)]

"""`trigfarm replay DATASET`: the farm with a source replaying real LHCO R&D feature files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy.cli import main
from tests.conftest import shared_data
from tests.deploy.conftest import write_topology


@pytest.mark.slow
def test_replay_of_lhco_features_balances(tmp_path: Path) -> None:
    folder = shared_data("lhco-rnd-100k")
    topology = write_topology(
        tmp_path / "t.toml",
        {
            "farm": {"name": "replay-t", "chain": ["source", "relay", "sink"], "drain_idle_s": 0.3},
            "source": {"config": {"background": ["qcd"], "batch_size": 500}},
            "relay": {},
            "sink": {},
        },
    )
    out = tmp_path / "run"
    args = ["replay", str(folder), "--signal-fraction", "0.01", "--topology", str(topology)]
    result = CliRunner().invoke(main, [*args, "--events", "3000", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["accounting"]["balanced"]
    assert report["events_generated"] == 3000
    assert report["stages"][-1]["events_in"] == 3000
    source = report["stages"][0]["nodes"][0]["worker"]
    assert source["signal_emitted"] == 30  # floor(0.01 * 3000) from the scalars_sig files
    assert any("bkg" in name and name.startswith("lhco-features:") for name in source["components"])


def test_replay_needs_signal_files_for_a_signal_fraction(tmp_path: Path) -> None:
    data = tmp_path / "only.h5"
    data.write_bytes(b"")
    result = CliRunner().invoke(main, ["replay", str(data), "--signal-fraction", "0.1"])
    assert result.exit_code == 2 and "needs signal files" in result.output

"""`trigfarm run` on the shipped default topology: the real chain (Pythia source, hls4ml L1,
ParticleNet HLT with online flows, archive) for a few hundred events. The books balance at
every stage and link, the archive holds verifiable flow snapshots, and the report exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy.cli import main
from deploy.roles import ROLES
from tests.deploy.conftest import default_table, write_topology

pytestmark = pytest.mark.skipif(
    not all(ROLES[r].available() for r in ("source", "l1", "hlt", "archive")),
    reason="the L1, HLT and archive node modules are not all installed",
)


@pytest.mark.slow
def test_trigfarm_run_default_chain(tmp_path: Path) -> None:
    out = tmp_path / "run"
    topology = str(write_topology(tmp_path / "default.toml", default_table()))
    args = ["run", "--topology", topology, "--events", "256", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (out / "dashboard.png").is_file(), result.output
    assert (out / "dashboard.png").stat().st_size > 10_000
    assert report["accounting"]["balanced"], result.output
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["source"]["accepted"] == 256
    for name in ("l1", "hlt", "archive"):
        stage = stages[name]
        assert stage["balanced"]
        dropped = sum(stage["dropped"].values())
        assert stage["events_in"] == stage["accepted"] + stage["rejected"] + dropped
    assert stages["l1"]["events_in"] == 256
    assert stages["hlt"]["events_in"] == stages["l1"]["accepted"]
    assert stages["archive"]["events_in"] == stages["hlt"]["accepted"]
    assert stages["hlt"]["records_out"] == stages["archive"]["records_in"] >= 1

    from models.archive import Archive
    from models.online import ROLES as FLOW_ROLES

    archive = Archive(out / "archive")
    assert archive.verify() == []
    snapshots = list(archive.snapshots())
    assert snapshots, "no flow snapshot in the archive"
    assert {s.node_id for s in snapshots} == {"hlt-0", "hlt-1"}
    assert {s.role for s in snapshots} == set(FLOW_ROLES)
    seen = sum(s.events_seen for s in snapshots if s.role == "all")
    assert seen == stages["hlt"]["events_in"]  # every HLT event reached a flow
    snapshots[0].flow()  # loads into a working flow
    assert report["archive_bytes"]["archive"] > 0
    # Rates in Hz with their statistical errors. The default source streams weighted bunch
    # crossings with premixed pileup: its rate is the crossing rate within its error, and
    # the L1 keeps a small share of it (the menu is calibrated to ~100 kHz of 40 MHz).
    rates = report["rates"]
    assert rates["weighting"] == "crossing" and rates["pileup"]["mu_mean"] > 0
    crossing_hz = rates["crossing_rate_hz"]
    source_rate = stages["source"]["rate_out"]
    assert 0 < source_rate["error_hz"] < 0.5 * crossing_hz
    assert abs(source_rate["rate_hz"] - crossing_hz) < 4 * source_rate["error_hz"]
    for name in ("l1", "hlt", "archive"):
        rate = stages[name]["rate_in"]
        assert rate["rate_hz"] > 0 and rate["error_hz"] > 0, name
    assert stages["l1"]["rate_in"] == source_rate
    l1_out = stages["l1"]["rate_out"]
    assert 0 < l1_out["rate_hz"] < crossing_hz / 20, l1_out  # far from 1: 400 expected
    reduction = stages["l1"]["reduction"]
    assert reduction["reduction"] > 20 and reduction["error"] > 0
    assert stages["hlt"]["rate_out"]["rate_hz"] < l1_out["rate_hz"]
    for stage in ("l1", "hlt"):
        for path, rate in stages[stage]["path_rates"].items():
            assert rate["error_hz"] > 0 or rate["upper_hz"] > 0, (stage, path)
    assert "reduction" in result.output
    # The efficiency of each path for each signal: the L1 numbers are of the W' events
    # the source made, and the HLT's of those the L1 kept.
    (wprime,) = report["signal_efficiencies"]
    assert wprime["name"] == "wprime"
    l1, hlt = wprime["stages"]
    made = sum(w["signal_emitted"] for w in [stages["source"]["nodes"][0]["worker"]])
    assert l1["stage"] == "l1" and l1["seen"] == made > 0
    kept, low, high = l1["of_seen"]["accepted"]
    assert low <= kept <= high and set(stages["l1"]["paths"]) >= set(l1["of_seen"]) - {"accepted"}
    assert hlt["seen"] == round(kept * made)
    assert "signal wprime" in result.output

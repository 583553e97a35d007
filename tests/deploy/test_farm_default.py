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

    archive = Archive(out / "archive")
    assert archive.verify() == []
    snapshots = list(archive.snapshots())
    assert snapshots, "no flow snapshot in the archive"
    assert {s.node_id for s in snapshots} == {"hlt-0", "hlt-1"}
    assert {s.role for s in snapshots} == {"all", "sideband"}
    seen = sum(s.events_seen for s in snapshots if s.role == "all")
    assert seen == stages["hlt"]["events_in"]  # every HLT event reached a flow
    snapshots[0].flow()  # loads into a working flow
    assert report["archive_bytes"]["archive"] > 0
    # Rates in Hz with their statistical errors: one crossing per unit-weight event, so
    # the source runs at the crossing rate and each later stage at its share of it.
    crossing_hz = report["rates"]["crossing_rate_hz"]
    source_rate = stages["source"]["rate_out"]
    assert source_rate["rate_hz"] == pytest.approx(crossing_hz)
    assert source_rate["error_hz"] == pytest.approx(crossing_hz / 256**0.5)
    for name in ("l1", "hlt", "archive"):
        rate = stages[name]["rate_in"]
        expected = crossing_hz * stages[name]["events_in"] / 256
        assert rate["rate_hz"] == pytest.approx(expected) and rate["error_hz"] > 0
    for path, rate in stages["l1"]["path_rates"].items():
        assert rate["error_hz"] > 0 or rate["rate_hz"] == 0, path

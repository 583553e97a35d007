"""The live progress view from heartbeats, and `trigfarm monitor` on a run folder."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from rich.console import Console

from deploy.cli import main
from deploy.launcher import NodeStatus, plan_farm
from deploy.topology import parse_topology
from deploy.view import ProgressView, StageRates, format_lhc_rate, stage_rows
from stream.protocol import Heartbeat
from stream.transport import free_tcp_port
from tests.deploy.conftest import synthetic_table


def _statuses(tmp_path: Path, events_in: int, **extra: object) -> dict[str, NodeStatus]:
    plan = plan_farm(
        parse_topology(synthetic_table()), out_dir=tmp_path, control="tcp://127.0.0.1:1"
    )
    statuses = {}
    for node in plan.nodes:
        beat = Heartbeat(
            name=node.node.name,
            role=node.stage.role,
            state="running",
            seq=1,
            uptime_s=1.0,
            stats={
                "events_in": events_in,
                "accepted": events_in,
                "rejected": 0,
                "dropped": {"decode_error": 1},
                "queue_depth": 2,
                **extra,
            },
        )
        process = SimpleNamespace(exitcode=None)
        statuses[node.node.name] = NodeStatus(node, process, heartbeat=beat)  # type: ignore[arg-type]
    return statuses


def test_rows_sum_nodes_per_stage_and_measure_rates(tmp_path: Path) -> None:
    rates = StageRates()
    stage_rows(_statuses(tmp_path, 100), rates)
    rows = {r["stage"]: r for r in stage_rows(_statuses(tmp_path, 1100), rates)}
    assert rows["relay"]["nodes"] == 2 and rows["relay"]["in"] == 2200
    assert rows["relay"]["queues"] == [2, 2] and rows["relay"]["dropped"] == 2
    assert rows["relay"]["rate_hz"] > 0 and rows["relay"]["states"] == {"running"}


def test_rows_give_rates_in_hz_at_the_lhc(tmp_path: Path) -> None:
    """Unit weights: the source runs at the crossing rate, a relay keeping a tenth of its
    weight at a tenth of it; errors are sqrt(sum w^2) over the events emitted."""
    stats = {"weight_in": [100.0, 100.0], "weight_out": {"out": [10.0, 10.0]}}
    rows = {r["stage"]: r for r in stage_rows(_statuses(tmp_path, 100, **stats), StageRates())}
    rate, error = rows["source"]["lhc_out"]
    assert rate == pytest.approx(40e6 * 10 / 100) and error == pytest.approx(40e6 * 10**0.5 / 100)
    # Two relay nodes each take 100 weight in: together twice what one source node sent.
    assert rows["relay"]["lhc_in"][0] == pytest.approx(2 * 40e6)
    assert format_lhc_rate(rows["relay"]["lhc_out"]) == "8M+-1.79M Hz"  # sqrt(20) * 0.4M
    assert format_lhc_rate(None) == "-"


def test_live_table_renders(tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with ProgressView("trigfarm t", console=console, min_interval_s=0) as view:
        view.update(_statuses(tmp_path, 10))
    text = buffer.getvalue()
    assert "relay" in text and "queues" in text and "rate/s" in text and "LHC in" in text


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_monitor_starts_prometheus_on_a_run(tmp_path: Path) -> None:
    (tmp_path / "farm.json").write_text(json.dumps({"farm": "t", "nodes": []}))
    port = free_tcp_port()
    result = CliRunner().invoke(
        main,
        [
            "monitor",
            "--run",
            str(tmp_path),
            "--port",
            str(port),
            "--duration",
            "0.5",
            "--grafana-out",
            str(tmp_path / "dash.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"prometheus: http://127.0.0.1:{port}" in result.output
    assert json.loads((tmp_path / "dash.json").read_text())["panels"]


def test_monitor_without_a_run_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["monitor", "--run", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no running farm" in result.output

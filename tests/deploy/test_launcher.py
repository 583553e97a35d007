"""The launcher end to end on synthetic roles: one process per node over TCP, staged stop,
exact accounting in the report, Ctrl-C, and a node that cannot start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deploy.cli import main
from deploy.launcher import Farm, FarmError, NodeStatus, plan_farm
from deploy.report import format_report
from deploy.roles import ROLES
from deploy.run import run_farm
from deploy.topology import TopologyError, load_topology, parse_topology
from nodes.hlt import HLT
from nodes.learner import FlowLearner
from stream.version import version
from tests.deploy.conftest import synthetic_table

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_synthetic_farm_delivers_every_event_once(tmp_path: Path) -> None:
    outcome = run_farm(parse_topology(synthetic_table(events=2050)), out_dir=tmp_path)
    report = outcome.report
    assert report["accounting"]["balanced"], report["accounting"]
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["source"]["accepted"] == 2050
    assert stages["relay"]["events_in"] == 2050
    assert [n["events_in"] > 0 for n in stages["relay"]["nodes"]] == [True, True]  # load-balanced
    assert stages["sink"]["events_in"] == 2050
    assert all(link["sent"] == link["received"] == 2050 for link in report["links"])
    ids = np.load(tmp_path / "sink.npy")
    assert sorted(ids[:, 1].tolist()) == list(range(2050))
    assert report["archive_bytes"]["sink"] == (tmp_path / "sink.npy").stat().st_size
    assert all(code == 0 for code in report["exitcodes"].values())
    assert outcome.dashboard_path.stat().st_size > 10_000
    on_disk = json.loads(outcome.report_path.read_text())
    assert on_disk["stages"][2]["events_in"] == 2050
    assert stages["relay"]["latency_p99_s"] >= stages["relay"]["latency_p50_s"] > 0
    farm = json.loads((tmp_path / "farm.json").read_text())
    assert farm["state"] == "stopped"
    assert {n["name"] for n in farm["nodes"]} == {"source", "relay-0", "relay-1", "sink"}
    with pytest.raises(FarmError, match="already holds a run"):
        run_farm(parse_topology(synthetic_table()), out_dir=tmp_path)


@pytest.mark.slow
def test_cli_run_prints_a_balanced_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["run", "--topology", "synthetic", "--events", "700", "--out", str(tmp_path), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert (
        "accounting (in = accepted + rejected + dropped, sent = received): balanced"
        in result.output
    )
    assert (tmp_path / "report.json").is_file() and (tmp_path / "dashboard.png").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["events_generated"] == 700
    assert report["trigfarm_version"] == version()


def test_cli_rejects_a_bad_topology(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[farm]\nname = "x"\nchain = ["source"]\n[source]\nthreads = "x"\n')
    result = CliRunner().invoke(main, ["run", "--topology", str(path)])
    assert result.exit_code == 2
    assert "topology.source.threads: expected int, got 'x'" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_in_stages_and_still_balances(
    tmp_path: Path, stop: signal.Signals
) -> None:
    table = synthetic_table(events=10_000_000)
    table["source"]["config"]["rate_hz"] = 20_000.0
    path = tmp_path / "t.toml"
    from tests.deploy.conftest import write_topology

    write_topology(path, table)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy",
            "run",
            "--topology",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    farm_json = tmp_path / "run" / "farm.json"
    while time.monotonic() < deadline:
        if farm_json.is_file() and len(json.loads(farm_json.read_text())["nodes"]) == 4:
            break
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(stop)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["interrupted"]
    assert report["accounting"]["balanced"], output
    assert 0 < report["events_generated"] < 10_000_000
    assert report["stages"][-1]["events_in"] == report["events_generated"]


@pytest.mark.slow
def test_the_stop_deadline_kills_a_farm_that_cannot_drain(tmp_path: Path) -> None:
    """A relay paused (SIGSTOP) cannot drain; with --stop-deadline the launcher kills
    every node that long after SIGTERM instead of waiting for the stall expiry, and
    farm.json says stopped."""
    table = synthetic_table(events=10_000_000, stall_after_s=600.0)
    table["source"]["config"]["rate_hz"] = 5_000.0
    path = tmp_path / "t.toml"
    from tests.deploy.conftest import write_topology

    write_topology(path, table)
    cmd = [sys.executable, "-m", "deploy", "run", "--topology", str(path), "--quiet"]
    cmd += ["--out", str(tmp_path / "run"), "--stop-deadline", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    farm_json = tmp_path / "run" / "farm.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if farm_json.is_file() and json.loads(farm_json.read_text())["state"] == "running":
            break
        time.sleep(0.2)
    relay = next(n for n in json.loads(farm_json.read_text())["nodes"] if n["name"] == "relay-1")
    os.kill(relay["pid"], signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    proc.communicate(timeout=90)
    assert time.monotonic() - stopped_at < 45
    assert json.loads(farm_json.read_text())["state"] == "stopped"
    with pytest.raises(ProcessLookupError):
        os.kill(relay["pid"], 0)


@pytest.mark.slow
def test_a_node_that_cannot_start_stops_the_farm(tmp_path: Path) -> None:
    table = synthetic_table()
    table["sink"]["config"] = {"colour": "red"}  # not a SinkConfig field: the node fails to build
    with pytest.raises(FarmError, match=r"\['sink'\] failed to start"):
        run_farm(parse_topology(table), out_dir=tmp_path, start_timeout_s=30)
    farm = json.loads((tmp_path / "farm.json").read_text())
    assert farm["state"] == "stopped"


@pytest.mark.slow
def test_duration_stops_the_source(tmp_path: Path) -> None:
    table = synthetic_table(events=10_000_000)
    table["source"]["config"]["rate_hz"] = 5_000.0
    report = run_farm(parse_topology(table), out_dir=tmp_path, duration_s=2.0).report
    assert report["accounting"]["balanced"]
    assert 2_000 <= report["events_generated"] <= 20_000  # about 2 s at 5 kHz, not 10 M
    assert report["stages"][-1]["events_in"] == report["events_generated"]


def test_each_run_gets_its_own_averaging_rendezvous(tmp_path: Path) -> None:
    """Two farms on one host never meet in one averaging group."""
    topology = load_topology("default")
    first = plan_farm(topology, out_dir=tmp_path / "a").stage_nodes("hlt")
    second = plan_farm(topology, out_dir=tmp_path / "b").stage_nodes("hlt")
    (ours,) = {p.launch.rendezvous for p in first}
    (theirs,) = {p.launch.rendezvous for p in second}
    assert ours.startswith("tcp://127.0.0.1:") and ours != theirs
    hlt = ROLES["hlt"].build(first[0].stage, first[0].launch)
    assert isinstance(hlt, HLT)
    learner = hlt.learner
    assert isinstance(learner, FlowLearner)
    assert learner.config.average_address == ours and learner.averager is not None
    assert learner.config.average_store == "external"  # the launcher hosts it
    learner.averager.close()
    ported = topology.with_changes(
        **{stage.name: {"port": 5600 + 10 * k} for k, stage in enumerate(topology.stages)}
    )
    with pytest.raises(TopologyError, match=r"hlt\.learner\.average_address"):
        plan_farm(ported, out_dir=tmp_path / "c", fixed_ports=True)


def test_an_averaging_store_that_cannot_listen_stops_the_farm_cleanly(tmp_path: Path) -> None:
    plan = plan_farm(load_topology("default"), out_dir=tmp_path, control="tcp://127.0.0.1:0")
    (address,) = {p.launch.rendezvous for p in plan.nodes if p.launch.rendezvous}
    port = int(address.rsplit(":", 1)[1])
    with socket.create_server(("127.0.0.1", port)):  # someone else holds the port
        with pytest.raises(FarmError, match="averaging store"):
            Farm(plan).run()
    assert json.loads((tmp_path / "farm.json").read_text())["state"] == "stopped"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL])
def test_a_stalled_or_killed_node_costs_only_its_in_flight_events(
    tmp_path: Path, fault: signal.Signals
) -> None:
    """The launcher expires a node whose heartbeats stop; the run goes on to its end with
    the other relay, the stage is reported degraded, and the books balance with what the
    lost relay took with it counted as ``node_lost``."""
    events = 30_000
    table = synthetic_table(events=events, stall_after_s=3.0, heartbeat_interval_s=0.2)
    table["source"]["config"]["rate_hz"] = 5_000.0
    faulted: list[float] = []

    def on_update(current: Mapping[str, NodeStatus]) -> None:
        relay = current.get("relay-1")
        if not faulted and relay is not None and relay.heartbeat is not None:
            if relay.heartbeat.state == "running" and relay.heartbeat.stats.get("events_in", 0):
                assert relay.process.pid is not None, "a running node has a pid"
                os.kill(relay.process.pid, fault)
                faulted.append(time.monotonic())

    outcome = run_farm(parse_topology(table), out_dir=tmp_path, on_update=on_update)
    elapsed = time.monotonic() - faulted[0]
    report = outcome.report
    assert elapsed < 40, elapsed
    assert report["exitcodes"]["relay-0"] == 0 and report["exitcodes"]["sink"] == 0
    assert report["exitcodes"]["relay-1"] not in (0, None)
    (loss,) = report["lost_nodes"]["relay-1"]
    if fault == signal.SIGSTOP:
        assert "no heartbeat" in loss["reason"]
    assert loss["at_s"] > 0 and not loss["restarted"]
    source, relay, sink = report["stages"]
    assert source["accepted"] == events  # the run went on to its end
    assert report["degraded_stages"] == ["relay"]
    assert relay["node_lost_estimated"]
    lost = relay["dropped"].get("node_lost", 0)
    # at most what the sockets and queue of one relay hold (HWMs and queue, in batches)
    farm = parse_topology(table).farm
    assert 0 <= lost <= (farm.sndhwm + farm.rcvhwm + 4 + 2) * 100
    assert sink["events_in"] == relay["accepted"] >= events - lost - 100
    assert report["accounting"]["balanced"], report["accounting"]
    assert "DEGRADED" in format_report(report)

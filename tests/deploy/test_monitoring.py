"""Monitoring: generated scrape configs and Grafana dashboard, and a real Prometheus
scraping a running farm whose total matches the run report."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from deploy.monitoring import (
    PANELS,
    SHIPPED_DASHBOARD,
    SHIPPED_SCRAPE_CONFIG,
    grafana_dashboard,
    prometheus_config,
    prometheus_config_for_run,
    topology_targets,
)
from deploy.prometheus import PrometheusServer
from deploy.run import RunOutcome, run_farm
from deploy.topology import TopologyError, load_topology, parse_topology
from stream.transport import free_tcp_port
from tests.deploy.conftest import synthetic_table


def test_scrape_targets_follow_the_topology() -> None:
    table = synthetic_table()
    table["metrics"] = {"host": "127.0.0.1", "base_port": 9300}
    targets = topology_targets(parse_topology(table))
    assert [t.address for t in targets] == [f"127.0.0.1:{9300 + k}" for k in range(4)]
    assert dict(targets[1].labels) == {"node": "relay-0", "stage": "relay", "farm": "t"}
    config = json.loads(prometheus_config(parse_topology(table)))
    assert config["scrape_configs"][0]["job_name"] == "trigfarm"
    with pytest.raises(TopologyError, match=r"^topology\.metrics\.base_port"):
        topology_targets(load_topology("default"))


def test_dashboard_covers_the_farm_and_is_shipped() -> None:
    dashboard = grafana_dashboard()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in ("rate", "accept", "latency", "drop", "r_z", "flow training loss"):
        assert word in titles
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) == sum(len(q) for _, _, q in PANELS)
    assert json.loads(SHIPPED_DASHBOARD.read_text()) == dashboard, (
        "regenerate with: python -m deploy.monitoring"
    )
    shipped = json.loads(SHIPPED_SCRAPE_CONFIG.read_text())
    assert shipped == json.loads(prometheus_config(load_topology("multihost")))
    addresses = [t["targets"][0] for t in shipped["scrape_configs"][0]["static_configs"]]
    assert addresses[0] == "10.0.0.1:9400" and addresses[-1] == "10.0.0.2:9404"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_prometheus_scrapes_a_running_farm(tmp_path: Path) -> None:
    table = synthetic_table(events=30_000, drain_idle_s=2.5)
    table["source"]["config"]["rate_hz"] = 6000.0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    server = PrometheusServer(
        prometheus_config_for_run(run_dir, interval_s=0.5), port=free_tcp_port()
    ).start()
    outcomes: list[RunOutcome] = []
    try:
        thread = threading.Thread(
            target=lambda: outcomes.append(run_farm(parse_topology(table), out_dir=run_dir))
        )
        thread.start()
        thread.join(120)
        assert outcomes, "the farm did not finish"
        report = outcomes[0].report
        assert report["accounting"]["balanced"]
        query = 'sum(max_over_time(events_in_total{job="trigfarm",stage="sink"}[5m]))'
        deadline = time.monotonic() + 10
        value = None
        while time.monotonic() < deadline:
            value = server.query_value(query)
            if value == report["stages"][-1]["events_in"]:
                break
            time.sleep(0.5)
        assert value == report["stages"][-1]["events_in"] == 30_000
        # Every consumer was discovered from the run's targets.json and scraped (the source
        # may finish before a busy machine's Prometheus first reaches it).
        up = server.query_value('count(max_over_time(up{job="trigfarm",stage!="source"}[5m]))')
        assert up == 3
    finally:
        server.stop()

"""Prometheus scrape configs and a Grafana dashboard for the farm, generated from a topology.

Every node serves the runtime metrics of ``stream.metrics`` (``events_in_total``,
``events_accepted_total``, ``dropped_total{reason}``, ``batch_latency_seconds``,
``queue_depth``...) labelled ``node`` and ``role``; the L1 adds its anomaly-score
histogram and the HLT's flow learner its running loss. The dashboard's panels query
those names (``PANELS``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.prometheus import ScrapeTarget, scrape_config
from deploy.topology import Topology, TopologyError

JOB = "trigfarm"

# (title, unit, PromQL expressions with legend) for the Grafana dashboard.
PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Input rate per stage", "ops", (("sum by (role) (rate(events_in_total[30s]))", "{{role}}"),)),
    (
        "Accept fraction per stage",
        "percentunit",
        (
            (
                "sum by (role) (rate(events_accepted_total[1m]))"
                " / sum by (role) (rate(events_in_total[1m]))",
                "{{role}}",
            ),
        ),
    ),
    (
        "Batch latency p50 / p99",
        "s",
        (
            (
                "histogram_quantile(0.5, sum by (role, le) "
                "(rate(batch_latency_seconds_bucket[1m])))",
                "p50 {{role}}",
            ),
            (
                "histogram_quantile(0.99, sum by (role, le) "
                "(rate(batch_latency_seconds_bucket[1m])))",
                "p99 {{role}}",
            ),
        ),
    ),
    (
        "Dropped events by reason",
        "ops",
        (("sum by (role, reason) (rate(dropped_total[1m]))", "{{role}} {{reason}}"),),
    ),
    ("Queue depth", "short", (("max by (node) (queue_depth)", "{{node}}"),)),
    (
        "L1 anomaly score R_z distribution",
        "short",
        (("sum by (le) (increase(l1_score_rz_bucket[5m]))", "{{le}}"),),
    ),
    ("Flow training loss", "short", (("flow_loss", "{{node}} {{flow}}"),)),
    ("Refused CURVE peers", "short", (("sum by (node) (curve_refused_total)", "{{node}}"),)),
)


def topology_targets(topology: Topology) -> list[ScrapeTarget]:
    """Scrape targets from fixed metrics ports (``metrics.base_port`` > 0): node k at base + k.

    Raises:
        TopologyError: metrics are off or on free ports (use ``run_targets`` for a run).
    """
    if not topology.metrics.enabled:
        raise TopologyError(
            key="topology.metrics.enabled", problem="metrics are off; nothing to scrape"
        )
    base = topology.metrics.base_port
    if base == 0:
        raise TopologyError(
            key="topology.metrics.base_port",
            problem="is 0 (free ports): scrape a running farm's farm.json (trigfarm monitor)",
        )
    targets = []
    k = 0
    for stage in topology.stages:
        for i, name in enumerate(stage.node_names()):
            host = topology.metrics.host
            if host in ("0.0.0.0", "::"):
                host = stage.host(i)
            labels = (("node", name), ("stage", stage.name), ("farm", topology.farm.name))
            targets.append(ScrapeTarget(JOB, f"{host}:{base + k}", labels))
            k += 1
    return targets


def run_targets(farm_json: str | Path) -> list[ScrapeTarget]:
    """Scrape targets of a running farm, from the ``farm.json`` its launcher keeps."""
    body = json.loads(Path(farm_json).read_text())
    return [
        ScrapeTarget(
            JOB, n["metrics"], (("node", n["name"]), ("stage", n["stage"]), ("farm", body["farm"]))
        )
        for n in body["nodes"]
        if n.get("metrics")
    ]


def prometheus_config(topology: Topology, *, interval_s: float = 1.0) -> str:
    """The Prometheus configuration for a topology with fixed metrics ports."""
    return scrape_config(topology_targets(topology), interval_s=interval_s)


def prometheus_config_for_run(run_dir: str | Path, *, interval_s: float = 1.0) -> str:
    """The Prometheus configuration for a farm run: file-based discovery of
    ``<run_dir>/targets.json``, which the launcher keeps up to date (the file need not
    exist yet, so Prometheus can start before the farm)."""
    interval = f"{int(interval_s * 1000)}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": JOB,
                "file_sd_configs": [
                    {
                        "files": [str(Path(run_dir).resolve() / "targets.json")],
                        "refresh_interval": "1s",
                    }
                ],
            }
        ],
    }
    return json.dumps(config, indent=2)


def grafana_dashboard(*, title: str = "trigfarm", datasource: str = "Prometheus") -> dict[str, Any]:
    """A Grafana dashboard (JSON model) with one time-series panel per entry of ``PANELS``."""
    panels = []
    for index, (panel_title, unit, queries) in enumerate(PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": panel_title,
                "datasource": {"type": "prometheus", "uid": datasource},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(queries)
                ],
            }
        )
    return {
        "title": title,
        "uid": "trigfarm-farm",
        "schemaVersion": 39,
        "time": {"from": "now-15m", "to": "now"},
        "refresh": "5s",
        "tags": ["trigfarm"],
        "panels": panels,
    }


SHIPPED_DASHBOARD = Path(__file__).resolve().parent / "grafana" / "trigfarm.json"
SHIPPED_SCRAPE_CONFIG = Path(__file__).resolve().parent / "grafana" / "prometheus-multihost.yml"


def main() -> None:
    """Regenerate the shipped dashboard and the multi-host topology's scrape config."""
    from deploy.topology import load_topology

    SHIPPED_DASHBOARD.write_text(json.dumps(grafana_dashboard(), indent=2) + "\n")
    SHIPPED_SCRAPE_CONFIG.write_text(prometheus_config(load_topology("multihost")) + "\n")


if __name__ == "__main__":
    main()

"""One call runs a topology on this host and writes its report: what ``trigfarm run`` does."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.launcher import Farm, FarmError, FarmPlan, NodeStatus, plan_farm
from deploy.report import build_report, write_report
from deploy.topology import Topology
from stream.transport import free_tcp_port


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """The report and where it was written."""

    report: dict[str, Any]
    report_path: Path
    dashboard_path: Path
    plan: FarmPlan


def default_out_dir(topology: Topology) -> Path:
    """``runs/<farm>-<date>-<time>`` under the working folder."""
    return Path("runs") / f"{topology.farm.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_farm(
    topology: Topology,
    *,
    out_dir: str | Path | None = None,
    events: int = 0,
    duration_s: float = 0.0,
    log_level: int = logging.WARNING,
    on_update: Callable[[Mapping[str, NodeStatus]], None] | None = None,
    start_timeout_s: float = 180.0,
    restarts: int = 2,
    stop_deadline_s: float = 0.0,
    restart_every_node: bool = False,
) -> RunOutcome:
    """Run every node of ``topology`` as its own process until the source is done.

    ``events`` > 0 overrides the source's event budget; ``duration_s`` > 0 stops the
    source after that long; ``restarts``, ``stop_deadline_s`` and ``restart_every_node`` as
    in ``Farm``. Returns once every node has drained and exited.

    Raises:
        FarmError: ``out_dir`` holds an earlier run, or a node failed to start.
    """
    out = Path(out_dir) if out_dir is not None else default_out_dir(topology)
    if (out / "farm.json").exists():
        msg = f"{out} already holds a run (its farm.json); choose another --out"
        raise FarmError(msg)
    out.mkdir(parents=True, exist_ok=True)
    control = f"tcp://127.0.0.1:{free_tcp_port()}"
    plan = plan_farm(topology, out_dir=out, events=events, control=control, log_level=log_level)
    farm = Farm(
        plan,
        duration_s=duration_s,
        on_update=on_update,
        start_timeout_s=start_timeout_s,
        restarts=restarts,
        stop_deadline_s=stop_deadline_s,
        restart_every_node=restart_every_node,
    )
    result = farm.run()
    report = build_report(plan, result)
    json_path, png_path = write_report(report, out)
    return RunOutcome(report, json_path, png_path, plan)

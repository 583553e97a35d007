"""The live progress view of a running farm: rate per stage and queue depths, from heartbeats.

Beside the events per second of the simulation, each stage shows its rate in Hz at the LHC
(in and out, with sqrt(sum w^2) errors): the heartbeats carry every node's sums of event
weights, and the source stage's config says how weights become Hz (``hz_per_weight``, as in
``nodes.source``: the luminosity in mb^-1 for cross-section weights, the crossing rate
otherwise) over the events the source has emitted so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from deploy.launcher import NodeStatus


class StageRates:
    """Input rate per stage from successive heartbeat counters (a few seconds' window)."""

    def __init__(self, window_s: float = 3.0) -> None:
        self._window_s = window_s
        self._history: dict[str, list[tuple[float, int]]] = {}

    def update(self, stage: str, now_s: float, events_in: int) -> float:
        history = self._history.setdefault(stage, [])
        history.append((now_s, events_in))
        while len(history) > 2 and now_s - history[0][0] > self._window_s:
            history.pop(0)
        t0, n0 = history[0]
        return (events_in - n0) / (now_s - t0) if now_s > t0 else 0.0


def stage_rows(statuses: Mapping[str, NodeStatus], rates: StageRates) -> list[dict[str, Any]]:
    """One row per stage: nodes, states, counters, rate and queue depths."""
    rows: dict[str, dict[str, Any]] = {}
    now = time.monotonic()
    for status in statuses.values():
        stage = status.plan.stage.name
        row = rows.setdefault(
            stage,
            {
                "stage": stage,
                "nodes": 0,
                "states": set(),
                "in": 0,
                "accepted": 0,
                "rejected": 0,
                "dropped": 0,
                "queues": [],
                "refused": 0,
                "role": status.plan.stage.role,
                "config": status.plan.stage.config,
                "w_in": [0.0, 0.0],
                "w_out": [0.0, 0.0],
            },
        )
        row["nodes"] += 1
        beat = status.heartbeat
        if status.exitcode is not None:
            row["states"].add("exited" if status.exitcode == 0 else f"failed({status.exitcode})")
        elif beat is None:
            row["states"].add("starting")
        else:
            row["states"].add(beat.state)
        if beat is not None:
            stats = beat.stats
            row["in"] += stats.get("events_in", 0)
            row["accepted"] += stats.get("accepted", 0)
            row["rejected"] += stats.get("rejected", 0)
            row["dropped"] += sum(stats.get("dropped", {}).values())
            row["queues"].append(stats.get("queue_depth", 0))
            row["refused"] += sum(stats.get("curve_refused", {}).values())
            _add_pair(row["w_in"], stats.get("weight_in"))
            for pair in (stats.get("weight_out") or {}).values():
                _add_pair(row["w_out"], pair)
    for row in rows.values():
        row["rate_hz"] = rates.update(row["stage"], now, row["in"])
    _add_lhc_rates(list(rows.values()))
    return list(rows.values())


def _add_pair(total: list[float], pair: Any) -> None:
    try:
        total[0] += float(pair[0])
        total[1] += float(pair[1])
    except (TypeError, ValueError, IndexError):
        return


def hz_per_weight(source_config: Mapping[str, Any]) -> float:
    """How a source's weights become Hz (see ``nodes.source``)."""
    if source_config.get("weighting") == "cross_section":
        return float(source_config.get("luminosity_cm2s", 2e34)) * 1e-27
    return float(source_config.get("crossing_rate_hz", 40e6))


def _add_lhc_rates(rows: list[dict[str, Any]]) -> None:
    """Each row's rate in and out in Hz at the LHC, with errors, so far in the run."""
    source = rows[0] if rows else None  # the first stage of the chain makes the events
    n = source["accepted"] if source is not None else 0
    for row in rows:
        row["lhc_in"] = row["lhc_out"] = None
        if source is None or n <= 0:
            continue
        k = hz_per_weight(source["config"] or {}) / n
        w_in = source["w_out"] if row is source else row["w_in"]
        row["lhc_in"] = (k * w_in[0], k * math.sqrt(max(w_in[1], 0.0)))
        row["lhc_out"] = (k * row["w_out"][0], k * math.sqrt(max(row["w_out"][1], 0.0)))


def _si(value_hz: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value_hz) >= scale:
            return f"{value_hz / scale:.3g}{unit}"
    return f"{value_hz:.3g}"


def format_lhc_rate(rate: tuple[float, float] | None) -> str:
    """``"61k+-14k Hz"``, or ``-`` before the source has emitted."""
    if rate is None:
        return "-"
    return f"{_si(rate[0])}+-{_si(rate[1])} Hz"


class ProgressView:
    """A ``rich`` live table refreshed from ``Farm.on_update`` (a plain line if not a TTY)."""

    def __init__(
        self, title: str, *, console: Console | None = None, min_interval_s: float = 0.25
    ) -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self._rates = StageRates()
        self._live: Live | None = None
        self._min_interval_s = min_interval_s
        self._last_s = 0.0

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, statuses: Mapping[str, NodeStatus]) -> None:
        now = time.monotonic()
        if now - self._last_s < self._min_interval_s:
            return
        self._last_s = now
        rows = stage_rows(statuses, self._rates)
        if self._live is not None:
            self._live.update(self._table(rows))

    def _table(self, rows: list[dict[str, Any]]) -> Table:
        table = Table(title=self.title)
        for column in (
            "stage",
            "nodes",
            "state",
            "in",
            "accepted",
            "rejected",
            "dropped",
            "rate/s",
            "LHC in",
            "LHC out",
            "queues",
        ):
            table.add_column(column, justify="left" if column in ("stage", "state") else "right")
        for row in rows:
            table.add_row(
                row["stage"],
                str(row["nodes"]),
                ",".join(sorted(row["states"])),
                f"{row['in']:,}",
                f"{row['accepted']:,}",
                f"{row['rejected']:,}",
                f"[red]{row['dropped']:,}[/red]" if row["dropped"] else "0",
                f"{row['rate_hz']:,.0f}",
                format_lhc_rate(row["lhc_in"]),
                format_lhc_rate(row["lhc_out"]),
                " ".join(str(q) for q in row["queues"]) or "-",
            )
        return table

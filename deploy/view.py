"""The live progress view of a running farm: rate per stage and queue depths, from heartbeats."""

from __future__ import annotations

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
    for row in rows.values():
        row["rate_hz"] = rates.update(row["stage"], now, row["in"])
    return list(rows.values())


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
                " ".join(str(q) for q in row["queues"]) or "-",
            )
        return table

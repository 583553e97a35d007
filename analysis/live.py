"""The search live: re-run the scan each time new flow snapshots reach the archive.

``follow`` polls the archive's index (read only; the farm keeps writing) and, whenever the
set of indexed snapshots has changed and then held still for one poll (the nodes publish
their roles in bursts: a scan of half a burst would mix old and new flows), calls
``analyse`` and yields what it returned with the events the flows had seen.
``live_scan`` is the analysis ``trigfarm analyze ... --follow`` uses: the latest flows of
every node, scored per window, and the bump hunt on the events the archive kept (indexed
event files only; an event file still being written is not indexed and not read, and
nothing the archive did not keep is ever read).

Contract: ``follow`` never writes to the archive and never signals the farm. It stops after
``max_updates`` updates or ``timeout_s`` seconds, whichever comes first (neither: it runs
until interrupted). A snapshot set that cannot be analysed yet (e.g. only one role
arrived) is logged and skipped; the next change is tried again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from analysis.scan import ScanConfig, ScanResult, scan, window_scorer
from models.archive import EVENTS_KIND, SNAPSHOT_KIND, Archive, ArchiveError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveUpdate:
    """One re-run of the scan: what the flows had seen, what the archive kept, the scan."""

    update: int
    events_seen: int
    events_stored: int
    scan: ScanResult
    elapsed_s: float

    def local_z_by_window(self) -> dict[tuple[float, float], float]:
        """The largest local Z over working points in each window."""
        out: dict[tuple[float, float], float] = {}
        for bump in self.scan.bumps:
            z = bump.significance
            if np.isfinite(z):
                out[bump.window_gev] = max(out.get(bump.window_gev, -np.inf), z)
        return out


def archive_state(archive_dir: str | Path) -> tuple[tuple[str, str, int], ...]:
    """The indexed snapshots as (node, role, sequence); empty if there is no index yet."""
    try:
        entries = Archive(archive_dir).entries(kind=SNAPSHOT_KIND)
    except ArchiveError:
        return ()
    return tuple(sorted((e.node, e.role, e.sequence) for e in entries))


def follow(
    archive_dir: str | Path,
    analyse: Callable[[Archive], tuple[int, int, ScanResult]],
    *,
    poll_s: float = 5.0,
    max_updates: int | None = None,
    timeout_s: float | None = None,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[LiveUpdate]:
    """Yield a ``LiveUpdate`` each time the archive's snapshots change.

    Arguments:
        archive_dir: the archive folder the farm writes.
        analyse: archive -> (events seen by the flows, events stored, scan).
        poll_s: seconds between looks at the index.
        max_updates: stop after this many updates.
        timeout_s: stop after this many seconds.
        now, sleep: the clock (tests pass fakes).
    """
    start = now()
    last: tuple[tuple[str, str, int], ...] = ()
    at_previous_poll: tuple[tuple[str, str, int], ...] = ()
    count = 0
    while True:
        state = archive_state(archive_dir)
        settled = bool(state) and state == at_previous_poll
        at_previous_poll = state
        if settled and state != last:
            last = state
            try:
                seen, stored, result = analyse(Archive(archive_dir))
            except (ValueError, ArchiveError) as exc:
                log.warning("live scan skipped %d snapshots: %s", len(state), exc)
            else:
                count += 1
                yield LiveUpdate(count, seen, stored, result, now() - start)
                if max_updates is not None and count >= max_updates:
                    return
        if timeout_s is not None and now() - start >= timeout_s:
            return
        sleep(poll_s)


def live_scan(
    method: str, search: Any, scan_config: ScanConfig
) -> Callable[[Archive], tuple[int, int, ScanResult]]:
    """The analysis of one update: the latest flows, the stored events, the scan."""
    from analysis.scan import FlowSets

    def analyse(archive: Archive) -> tuple[int, int, ScanResult]:
        flows = FlowSets(archive.snapshots(latest_per_node=True))
        if not archive.entries(kind=EVENTS_KIND):
            raise ValueError("no stored events indexed yet")
        features = archive.event_features().astype(np.float64)
        stored = None
        if method in ("cwola_stored", "cathode_hybrid"):
            from analysis.data import Events

            stored = Events(features)
        scorer = window_scorer(method, flows, search, features, stored=stored)
        return flows.events_seen, len(features), scan(features[:, 0], scorer, scan_config)

    return analyse


def plot_history(updates: list[LiveUpdate], path: Path, title: str = "") -> None:
    """Local Z of each window (largest over working points) against events seen."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    windows = sorted({w for u in updates for w in u.local_z_by_window()})
    seen = [u.events_seen for u in updates]
    for window in windows:
        z = [u.local_z_by_window().get(window, np.nan) for u in updates]
        ax.plot(seen, z, marker="o", ms=3, lw=1, label=f"{window[0]:.0f}-{window[1]:.0f}")
    ax.axhline(2, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="events seen by the flows", ylabel="local Z (max over ε)", title=title)
    ax.legend(fontsize=6, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)

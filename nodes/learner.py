"""The HLT's flow learner: an OnlineFlow fed from the stream, publishing flow snapshots.

``build_learner(config, node_id=...)`` returns a ``Learner`` (``nodes.learning``) that
the HLT node calls with every event it sees. It trains the all-data and sideband flows
(``models.online.OnlineFlow``) and returns ``"flow_snapshot"`` records, one per flow,
every ``snapshot_every_events`` events, at the end of each lumi block (when a batch
brings a later lumi number), and at ``finish()``.

Prometheus: ``flow_events_learned_total{node,flow}``, ``flow_not_learned_total{node,flow}``
(events the flow had no time to learn; a uniform subsample is learned instead),
``flow_loss{node,flow}`` (running mean of the training loss),
``flow_snapshots_total{node}`` and ``flow_bad_events_total{node}`` (events with
non-finite features, which are never trained on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prometheus_client import Counter, Gauge

from models.online import MJJ_EDGES_GEV, ROLES, OnlineConfig, OnlineFlow
from models.snapshot import FlowSnapshot
from stream.batch import EventBatch, Record

log = logging.getLogger(__name__)

LEARNED = Counter("flow_events_learned", "Events a flow trained on", ["node", "flow"])
NOT_LEARNED = Counter(
    "flow_not_learned", "Events a flow could not learn in time (subsampled away)", ["node", "flow"]
)
LOSS = Gauge("flow_loss", "Running mean of the flow's training loss", ["node", "flow"])
SNAPSHOTS = Counter("flow_snapshots", "Flow snapshots published", ["node"])
BAD_EVENTS = Counter(
    "flow_bad_events", "Events with non-finite features, never trained on", ["node"]
)


@dataclass(frozen=True, slots=True)
class FlowLearnerConfig(OnlineConfig):
    """An ``OnlineConfig`` plus when to publish snapshots.

    Attributes:
        snapshot_every_events: publish after this many more events seen; 0 never by count.
        snapshot_at_lumi_end: publish when a lumi block ends.
        torch_threads: intra-op threads for training (0 leaves torch's setting alone).
    """

    snapshot_every_events: int = 50_000
    snapshot_at_lumi_end: bool = True
    torch_threads: int = 1

    def __post_init__(self) -> None:
        OnlineConfig.__post_init__(self)
        if self.snapshot_every_events < 0 or self.torch_threads < 0:
            msg = "snapshot_every_events and torch_threads must be >= 0"
            raise ValueError(msg)


class FlowLearner:
    """The ``Learner`` the HLT node drives; see the module doc."""

    def __init__(
        self,
        config: FlowLearnerConfig,
        *,
        node_id: str,
        clock: Callable[[], float] = time.perf_counter,
        on_step: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.node_id = node_id
        self.online = OnlineFlow(config, clock=clock, on_step=on_step)
        self.events_seen = 0
        self.snapshots = 0
        self.bad_events = 0
        self._run: int | None = None
        self._lumi_first: int | None = None
        self._lumi_last: int | None = None
        self._since_snapshot = 0
        self._reported: dict[str, tuple[int, int]] = {role: (0, 0) for role in ROLES}
        self._t_learn_s = 0.0

    def learn(self, batch: EventBatch) -> Sequence[Record]:
        """Train on the batch's ``features``; return the snapshots now due."""
        batch.require("features")
        n = len(batch)
        if n == 0:
            return ()
        records: list[Record] = []
        if "lumi" in batch:
            lumis = batch["lumi"]
            first, last = int(lumis.min()), int(lumis.max())
            if (
                self.config.snapshot_at_lumi_end
                and self._lumi_last is not None
                and first > self._lumi_last
                and self.online.calibrated
            ):
                records += self._snapshot()
            self._lumi_first = first if self._lumi_first is None else min(self._lumi_first, first)
            self._lumi_last = last if self._lumi_last is None else max(self._lumi_last, last)
        if self._run is None and "run" in batch:
            self._run = int(batch["run"][0])
        features = batch["features"]
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            # One NaN would poison the flow's weights: such events are never trained on.
            self.bad_events += int((~finite).sum())
            BAD_EVENTS.labels(node=self.node_id).inc(int((~finite).sum()))
            features = features[finite]
        t0 = time.perf_counter()
        self.online.learn(features)
        self._t_learn_s += time.perf_counter() - t0
        self.events_seen += n
        self._since_snapshot += n
        self._publish_metrics()
        every = self.config.snapshot_every_events
        if every and self._since_snapshot >= every and self.online.calibrated:
            records += self._snapshot()
        return records

    def finish(self) -> Sequence[Record]:
        """Train on what is buffered and publish the final snapshots."""
        t0 = time.perf_counter()
        self.online.finish()
        self._t_learn_s += time.perf_counter() - t0
        self._publish_metrics()
        if not self.online.calibrated:
            log.warning("%s: too few events to calibrate; no snapshot", self.node_id)
            return ()
        return self._snapshot()

    def report(self) -> dict[str, Any]:
        learned = self.online.trainers["all"].stats.learned if self.online.calibrated else 0
        return {
            "events_seen": self.events_seen,
            "events_learned": learned,
            "not_learned_total": sum(v[1] for v in self._reported.values()),
            "pending_calibration": self.online.pending,
            "bad_events": self.bad_events,
            "snapshots": self.snapshots,
            "events_per_s_trained": learned / self._t_learn_s if self._t_learn_s else 0.0,
            "flows": self.online.report(),
        }

    def _publish_metrics(self) -> None:
        for role, trainer in self.online.trainers.items():
            stats = trainer.stats
            learned, missed = self._reported[role]
            LEARNED.labels(node=self.node_id, flow=role).inc(stats.learned - learned)
            NOT_LEARNED.labels(node=self.node_id, flow=role).inc(stats.not_learned - missed)
            self._reported[role] = (stats.learned, stats.not_learned)
            if stats.steps:
                LOSS.labels(node=self.node_id, flow=role).set(stats.loss_ema)

    def _snapshot(self) -> list[Record]:
        self._since_snapshot = 0
        self.snapshots += 1
        SNAPSHOTS.labels(node=self.node_id).inc()
        out = []
        for role, trainer in self.online.trainers.items():
            stats = trainer.stats
            snap = FlowSnapshot.of(
                trainer.estimate,
                mjj_hist=stats.mjj_hist,
                mjj_edges=MJJ_EDGES_GEV,
                node_id=self.node_id,
                role=role,
                run=self._run or 0,
                lumi_first=self._lumi_first or 0,
                lumi_last=self._lumi_last or 0,
                events_seen=stats.offered,
                mjj_min_gev=stats.mjj_min_gev if stats.learned else 0.0,
                mjj_max_gev=stats.mjj_max_gev if stats.learned else 0.0,
                loss=stats.loss_ema,
                sequence=self.snapshots,
                signal_region_gev=self.config.signal_region_gev,
            )
            out.append(snap.to_record())
        log.info("%s: snapshot %d after %d events", self.node_id, self.snapshots, self.events_seen)
        return out


def build_learner(config: FlowLearnerConfig, *, node_id: str) -> FlowLearner:
    """The flow learner for an HLT node."""
    return FlowLearner(config, node_id=node_id)

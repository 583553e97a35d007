"""The HLT's flow learner: an OnlineFlow fed from the stream, publishing flow snapshots.

``build_learner(config, node_id=...)`` returns a ``Learner`` (``nodes.learning``) that
the HLT node calls with every event it sees. It trains the all-data and sideband flows
(``models.online.OnlineFlow``) and returns ``"flow_snapshot"`` records, one per flow,
every ``snapshot_every_events`` events, every ``snapshot_every_s`` seconds (so a crash
loses at most that much learning), at the end of each lumi block (when a batch brings a
later lumi number), and at ``finish()``.

Prometheus: ``flow_events_learned_total{node,flow}``, ``flow_not_learned_total{node,flow}``
(events the flow had no time to learn; a uniform subsample is learned instead),
``flow_loss{node,flow}`` (running mean of the training loss),
``flow_snapshots_total{node}`` and ``flow_bad_events_total{node}`` (events with
non-finite features, which are never trained on).

One flow across nodes: with ``average_every_steps`` > 0 the HLT nodes of a stage average
their flows' parameters (and the published Polyak averages) every that many optimizer
steps, and once more at ``finish()`` (``models.averaging``: FedAvg over gloo, weighted by
the events each node learned; a dead or stalled node is dropped after
``average_timeout_s``, counted in ``flow_average_failures_total``). The nodes agree on one
preprocessing first (the mean of their calibrations), so their flows share a parameter
space, and all start from the same weights (the same ``seed``). The agreed preprocessing is
kept in the rendezvous store: a node restarted while the group runs takes it, is admitted
at the members' next round and adopts their flow (``models.averaging``). Without it each node's
flow is a density for its share of the stream, and the analysis mixes them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
import torch
from prometheus_client import Counter, Gauge
from pydantic import ConfigDict, Field

from models.averaging import AveragingConfig, ParameterAverager, TcpAddress, Timeout
from models.flows import Preprocessing
from models.online import MJJ_EDGES_GEV, OnlineConfig, OnlineFlow
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


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class FlowLearnerConfig(OnlineConfig):
    """An ``OnlineConfig`` plus when to publish snapshots.

    Attributes:
        snapshot_every_events: publish after this many more events seen; 0 never by count.
        snapshot_every_s: publish when this many seconds have passed since the last
            snapshot (checked as batches arrive); 0 never by time.
        snapshot_at_lumi_end: publish when a lumi block ends.
        torch_threads: intra-op threads for training (0 leaves torch's setting alone).
        average_every_steps: average the flows across the stage's nodes every this many
            optimizer steps (0: each node keeps its own flow). With N nodes averaging,
            each steps on ``batch_size / N`` events.
        average_address: ``tcp://host:port`` of the rendezvous store (every node of the
            stage must reach it); the launcher picks a free port per run when the topology
            leaves it out.
        average_store: who hosts that store: ``"node0"`` (node 0 of the stage; if it dies
            the others go on alone) or ``"external"`` (an ``AveragingStore`` elsewhere:
            ``trigfarm run`` hosts one when it picks the address, so that the survivors of
            any node's death go on averaging).
        average_timeout_s: the longest a dead or stalled peer may stall a node, once.
    """

    snapshot_every_events: Annotated[int, Field(ge=0)] = 50_000
    snapshot_every_s: Annotated[float, Field(ge=0)] = 30.0
    snapshot_at_lumi_end: bool = True
    torch_threads: Annotated[int, Field(ge=0)] = 1
    average_every_steps: Annotated[int, Field(ge=0)] = 0
    average_address: TcpAddress = "tcp://127.0.0.1:29400"
    average_store: Literal["node0", "external"] = "node0"
    average_timeout_s: Timeout = 30.0

    def averaging(self, node_index: int, node_count: int) -> AveragingConfig:
        """The averaging settings of node ``node_index`` of ``node_count``."""
        return AveragingConfig(
            rank=node_index,
            world_size=node_count,
            init_method=self.average_address,
            every_steps=self.average_every_steps,
            timeout_s=self.average_timeout_s,
            store_on_rank0=self.average_store == "node0",
        )


class FlowLearner:
    """The ``Learner`` the HLT node drives; see the module doc."""

    def __init__(
        self,
        config: FlowLearnerConfig,
        *,
        node_id: str,
        node_index: int = 0,
        node_count: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        on_step: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.node_id = node_id
        self.averager: ParameterAverager | None = None
        if config.average_every_steps and node_count > 1:
            self.averager = ParameterAverager(
                config.averaging(node_index, node_count), node_id=node_id
            )
            # batch_size is the averaged flow's minibatch: each of N nodes steps on 1/N of it
            # (benchmarks/federated_flows.py: at the full size per node the averaged flow
            # takes N times fewer steps than a single flow would, and learns less).
            config = replace(config, batch_size=max(1, config.batch_size // node_count))
        self._rounds_done = 0
        self._learned_at_round = 0
        self._training: dict[str, Any] = {
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "n_members": config.n_members,
            "averaged_over_nodes": node_count if self.averager else 1,
        }
        self.online = OnlineFlow(
            config,
            clock=clock,
            on_step=on_step,
            agree=self._agree_preprocessing if self.averager else None,
        )
        self.events_seen = 0
        self.snapshots = 0
        self.bad_events = 0
        self._run: int | None = None
        self._lumi_first: int | None = None
        self._lumi_last: int | None = None
        self._since_snapshot = 0
        self._clock = clock
        self._last_snapshot_s = clock()
        self._reported: dict[str, tuple[int, int]] = {role: (0, 0) for role in self.online.roles}
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
        self._average_if_due()
        self._t_learn_s += time.perf_counter() - t0
        self.events_seen += n
        self._since_snapshot += n
        self._publish_metrics()
        every, every_s = self.config.snapshot_every_events, self.config.snapshot_every_s
        due_by_count = every and self._since_snapshot >= every
        due_by_time = every_s and self._clock() - self._last_snapshot_s >= every_s
        if (due_by_count or due_by_time) and self.online.calibrated and not records:
            records += self._snapshot()
        return records

    def finish(self) -> Sequence[Record]:
        """Train on what is buffered and publish the final snapshots."""
        t0 = time.perf_counter()
        self.online.finish()
        if self.averager is not None:
            if self.online.calibrated:
                # Join rounds until every node has finished, so all make the same number of
                # rounds; the last one leaves every node with the same flow to publish.
                while self._average(done=True) and not self.averager.all_done:
                    pass
            self.averager.close()
        self._t_learn_s += time.perf_counter() - t0
        self._publish_metrics()
        if not self.online.calibrated:
            log.warning("%s: too few events to calibrate; no snapshot", self.node_id)
            return ()
        return self._snapshot()

    def _agree_preprocessing(self, own: dict[str, Preprocessing]) -> dict[str, Preprocessing]:
        """The mean of the nodes' calibrations (own if averaging fails), kept in the store
        for newcomers; a newcomer to a running group takes the group's instead, so that its
        flows share the group's parameter space before it is admitted."""
        averager = self.averager
        assert averager is not None
        if averager.group_running():
            kept = averager.shared(_PREPROCESSING_KEY)
            if kept is None:
                log.warning(
                    "%s: the running group kept no preprocessing; training alone", self.node_id
                )
                averager.leave()
                return own
            log.info("%s: joining a running group: its preprocessing is taken", self.node_id)
            return _preprocessing_from_json(kept)
        holders = {role: _ArrayHolder(pre.arrays()) for role, pre in own.items()}
        agreed = own
        if averager.average_(list(holders.values()), weight=1.0):
            agreed = {
                role: Preprocessing.from_arrays(holder.arrays()) for role, holder in holders.items()
            }
        text = _preprocessing_to_json(agreed)
        if averager.share(_PREPROCESSING_KEY, text) not in (None, text):
            # Another node's calibration is the group's: a newcomer admitted here would
            # average flows of two parameter spaces.
            averager.leave()
        return agreed

    def _average_if_due(self) -> None:
        if self.averager is None or not self.online.calibrated:
            return
        due = self.online.trainers["all"].stats.steps // self.config.average_every_steps
        if due > self._rounds_done:
            self._rounds_done = due  # one round however many fell due in this batch
            self._average()

    def _average(self, *, done: bool = False) -> bool:
        """One FedAvg round over both flows and their published Polyak averages."""
        assert self.averager is not None
        trainers = self.online.trainers
        learned = trainers["all"].stats.learned
        modules = [t.flow for t in trainers.values()] + [t.estimate for t in trainers.values()]
        weight = float(learned - self._learned_at_round)
        self._learned_at_round = learned
        return self.averager.average_(modules, weight=weight, done=done)

    def report(self) -> dict[str, Any]:
        learned = self.online.trainers["all"].stats.learned if self.online.calibrated else 0
        averaging = {}
        if self.averager is not None:
            stats = self.averager.stats()
            averaging = {
                "average_rounds": stats.rounds,
                "average_failures": stats.failures,
                "average_live_nodes": stats.live_world_size,
            }
        return {
            **averaging,
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
        self._last_snapshot_s = self._clock()
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
                training=json.dumps(
                    {**self._training, "replay": trainer.config.replay}, sort_keys=True
                ),
            )
            out.append(snap.to_record())
        log.info("%s: snapshot %d after %d events", self.node_id, self.snapshots, self.events_seen)
        return out


_PREPROCESSING_KEY = "preprocessing"


def _preprocessing_to_json(preprocessing: dict[str, Preprocessing]) -> str:
    """Each role's preprocessing arrays as JSON (float64 values round-trip exactly)."""
    return json.dumps(
        {
            role: {name: array.tolist() for name, array in pre.arrays().items()}
            for role, pre in preprocessing.items()
        },
        sort_keys=True,
    )


def _preprocessing_from_json(text: str) -> dict[str, Preprocessing]:
    return {
        role: Preprocessing.from_arrays({k: np.asarray(v, np.float64) for k, v in arrays.items()})
        for role, arrays in json.loads(text).items()
    }


class _ArrayHolder(torch.nn.Module):
    """Named float64 arrays as parameters, so that the averager can average them."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.values = torch.nn.ParameterDict(
            {
                k: torch.nn.Parameter(torch.from_numpy(v.copy()), requires_grad=False)
                for k, v in arrays.items()
            }
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.values.items()}


def build_learner(
    config: FlowLearnerConfig, *, node_id: str, node_index: int = 0, node_count: int = 1
) -> FlowLearner:
    """The flow learner for node ``node_index`` of an HLT stage of ``node_count`` nodes."""
    return FlowLearner(config, node_id=node_id, node_index=node_index, node_count=node_count)

"""The HLT node: ParticleNet on the two leading fat jets, a trigger menu, the online learner.

Input: L1-accepted ``EventBatch`` batches. For every event the node tags both fat jets
with one batched ParticleNet pass (class probabilities per jet) and computes a
classifier-based anomaly score per jet (``models.anomaly``); the event's ``hlt_score`` is
the larger of its two jets' scores.

Menu (each path one bit of ``hlt_bits``):

- bit 0 ``anomaly``: ``hlt_score >= anomaly_threshold``;
- bit 1 ``prescale``: every ``prescale_n``-th valid event, whatever its content (the
  standard pass-through path; it also stores events that cannot be tagged);
- bit 2 + c ``tag_<class>``: either jet has p(class) >= ``tag_thresholds[class]``;
- bit 15 ``fatjet_pt``: the leading fat jet's pT >= ``fatjet_pt_gev`` (the single-jet path).

``tag_jet_pt_gev`` makes the tag and anomaly paths look only at fat jets above that pT
(the tagger is trained on boosted jets; a soft jet's tag means little), so a threshold
calibrated to a rate acts on the jets it was meant for.

An event with any bit set is accepted and sent on port ``"archive"`` with ``hlt_score``,
``hlt_tags`` (N, 2, n_classes) and ``hlt_bits``; the rest are rejected. Every valid event,
accepted or not, goes to ``learner.learn(batch.without_truth())`` (with the HLT columns
added), and the learner's records go out on ``"archive"`` too.

Weights and the learner: the learner never sees the truth table, so it trains on events
as they were sampled, each counting once. With a weighted source (``weighting =
"crossing"`` or ``"cross_section"``) that is the density of the sample, which the source's
biased sampling tilts towards hard crossings, not the physical density. Set
``learner_unweight_max`` to feed the learner an unweighted stream instead: each valid
event goes to it with probability ``min(1, w / learner_unweight_max)`` (hit-or-miss
unweighting; events above the maximum are kept and counted as ``overweight`` in the
report), so that what it learns is the physical density of the events the HLT sees. The
cost is statistics: of N sampled events about ``sum(w) / w_max`` remain, which for the
default run's weighted crossings is a handful, so the default farm leaves it off and its
flows learn the sampled density.

Events that cannot be tagged: a batch without a ``constituents`` column (a feature-only
replay such as the LHCO features) or a jet with no constituents. Such a jet's tags are
NaN; an event with no taggable jet has ``hlt_score`` NaN, so only the prescale path can
accept it. It still goes to the learner. Counted in ``hlt_jets_untagged_total{reason}``.

Rates: the node sums the weights of the events each path fires on (``paths_weight`` in its
report: sum of w and of w^2) and publishes each path's rate per closed lumi block
(``lumi_rates`` in the report, with ``all`` in and ``accepted`` out)
(``nodes.rate_control``; with several HLT nodes each publishes its share). A
``"threshold_change"`` record from the L1 is forwarded to the archive.

Bad input: events with NaN or infinity in a column the schema marks finite are dropped
(``dropped{reason="nonfinite"}``), the rest of the batch carries on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, field
from typing import Annotated, Any

import numpy as np
import pydantic
import torch
from prometheus_client import Counter, Histogram
from pydantic import ConfigDict, Field

from models.anomaly import AnomalyScore
from models.checkpoint import DEFAULT_CHECKPOINT, Tagger, load_checkpoint
from models.jet_inputs import jet_inputs
from nodes.learning import Learner
from nodes.rate_control import THRESHOLD_RECORD_KIND, LumiRates, batch_weights
from nodes.signal_paths import SignalPaths
from stream.batch import EventBatch, Message
from stream.node import Emit, Outcome, Processor
from stream.schema import COLUMNS, N_FATJETS

log = logging.getLogger(__name__)

ANOMALY_BIT = 0
PRESCALE_BIT = 1
FIRST_TAG_BIT = 2
FATJET_PT_BIT = 15
MAX_TAG_CLASSES = 13  # hlt_bits is 16 bits wide; the top bit is fatjet_pt

HLT_INFERENCE_LATENCY = Histogram(
    "hlt_inference_latency_seconds",
    "ParticleNet time per batch (input building included)",
    ["node"],
    buckets=(1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
)
HLT_PATH_ACCEPTS = Counter("hlt_path_accepts", "Events firing each HLT path", ["node", "path"])
HLT_EVENTS_SEEN = Counter("hlt_events_seen", "Valid events the menu ran on", ["node"])
HLT_ANOMALY_SCORE = Histogram(
    "hlt_anomaly_score",
    "Event anomaly score (max over the two jets)",
    ["node"],
    buckets=(-1.0, -0.9, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 300, 1e3),
)
HLT_TAG_PROBABILITY = Histogram(
    "hlt_tag_probability",
    "Per-jet class probability",
    ["node", "tag"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
)
HLT_UNTAGGED = Counter(
    "hlt_jets_untagged", "Fat jets the HLT could not tag, by reason", ["node", "reason"]
)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class HLTConfig:
    """The HLT node's model and menu (plain values, so a TOML table can fill it).

    Attributes:
        checkpoint: tagger checkpoint directory, or a committed one by name ("default",
            the default farm's; "highpt", for fat jets of 1-2 TeV).
        torch_threads: torch intra-op threads for this process (several HLT nodes share a
            host, so keep it small).
        batch_size: jets per ParticleNet forward pass.
        anomaly_score: which score ``hlt_score`` holds, one of ``ANOMALY_SCORES``.
        anomaly_threshold: accept events with ``hlt_score`` >= this; ``None``: path off.
        tag_thresholds: class name -> minimum probability on either jet; empty: no tag path.
        prescale_n: accept every n-th valid event (pass-through path); 0: off.
        fatjet_pt_gev: accept events whose leading fat jet has pT >= this; ``None``: off.
        tag_jet_pt_gev: the tag and anomaly paths see only fat jets with pT >= this.
        learner_unweight_max: > 0 unweights what the learner sees (module doc); 0: off.
        seed: seeds the unweighting's random draws.
    """

    checkpoint: str = str(DEFAULT_CHECKPOINT)
    torch_threads: Annotated[int, Field(ge=1)] = 1
    batch_size: Annotated[int, Field(ge=1)] = 512
    anomaly_score: AnomalyScore = "mahalanobis"
    anomaly_threshold: float | None = None
    tag_thresholds: Mapping[str, Annotated[float, Field(ge=0, le=1)]] = field(default_factory=dict)
    prescale_n: Annotated[int, Field(ge=0)] = 0
    fatjet_pt_gev: Annotated[float, Field(ge=0)] | None = None
    tag_jet_pt_gev: Annotated[float, Field(ge=0)] = 0.0
    learner_unweight_max: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    seed: int = 0


def _finite_rows(batch: EventBatch) -> np.ndarray:
    """Events whose schema-finite columns hold only finite values."""
    ok = np.ones(len(batch), bool)
    for name, array in batch.columns.items():
        if COLUMNS[name].finite:
            ok &= np.isfinite(array.reshape(len(batch), -1)).all(axis=1)
    return ok


class HLT(Processor):
    """Tags, scores and triggers event batches; feeds every valid event to the learner."""

    def __init__(
        self, config: HLTConfig, tagger: Tagger, *, name: str, learner: Learner | None = None
    ) -> None:
        unknown = set(config.tag_thresholds) - set(tagger.classes)
        if unknown:
            msg = f"tag_thresholds name unknown classes {sorted(unknown)}; "
            msg += f"the model has {tagger.classes}"
            raise ValueError(msg)
        if len(tagger.classes) > MAX_TAG_CLASSES:
            msg = f"at most {MAX_TAG_CLASSES} classes fit in hlt_bits, got {len(tagger.classes)}"
            raise ValueError(msg)
        if config.anomaly_score == "mahalanobis" and not tagger.mahalanobis.fitted:
            raise ValueError("the checkpoint has no fitted Mahalanobis scorer")
        if config.anomaly_score == "anti_qcd" and tagger.classes[0] != "qcd":
            msg = "the anti_qcd score needs 'qcd' as the first class; "
            msg += f"the model has {tagger.classes}"
            raise ValueError(msg)
        self.config = config
        self.tagger = tagger
        self.name = name
        self.learner = learner
        self.paths = (
            {"anomaly": ANOMALY_BIT, "prescale": PRESCALE_BIT}
            | {f"tag_{c}": FIRST_TAG_BIT + i for i, c in enumerate(tagger.classes)}
            | {"fatjet_pt": FATJET_PT_BIT}
        )
        self._seen = 0
        self._path_counts = dict.fromkeys(self.paths, 0)
        self._path_weights = {path: [0.0, 0.0] for path in self.paths}
        self.rates = LumiRates(name)
        self.signal_paths = SignalPaths()
        self._untagged: dict[str, int] = {"no_constituents_column": 0, "empty_jet": 0}
        self._inference_s = 0.0
        self._jets_tagged = 0
        self._records_out = 0
        self._rng = np.random.default_rng(config.seed)
        self.learner_fed = 0
        self.overweight = 0

    # -- the worker ------------------------------------------------------------------------

    def process(self, message: Message) -> Outcome:
        if not isinstance(message, EventBatch):
            if message.kind == THRESHOLD_RECORD_KIND:
                return Outcome(emits=(Emit("archive", message),))
            log.debug("%s: ignoring a %s record", self.name, message.kind)
            return Outcome()
        ok = _finite_rows(message)
        n_bad = int((~ok).sum())
        batch = message if n_bad == 0 else message.select(ok)
        dropped = {"nonfinite": n_bad} if n_bad else {}
        if len(batch) == 0:
            return Outcome(dropped=dropped)
        tags, scores = self._tag(batch)
        bits = self._menu(tags, scores, _fatjet_pt_per_jet(batch))
        self._count_weights(batch, bits)
        batch = batch.with_columns(hlt_score=scores, hlt_tags=tags, hlt_bits=bits)
        emits: list[Emit] = []
        accepted = bits != 0
        n_accepted = int(accepted.sum())
        if n_accepted:
            emits.append(Emit("archive", batch.select(accepted)))
        if self.learner is not None:
            fed = self._unweight(batch)
            if len(fed):
                emits += self._records(self.learner.learn(fed.without_truth()))
        return Outcome(
            emits=tuple(emits),
            accepted=n_accepted,
            rejected=len(batch) - n_accepted,
            dropped=dropped,
        )

    def finish(self) -> Sequence[Emit]:
        self.rates.close_all()
        if self.learner is None:
            return ()
        return self._records(self.learner.finish())

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "events_seen": self._seen,
            "paths": dict(self._path_counts),
            "paths_weight": {k: list(v) for k, v in self._path_weights.items()},
            "bits": dict(self.paths),
            "jets_tagged": self._jets_tagged,
            "jets_untagged": dict(self._untagged),
            "inference_s": self._inference_s,
            "jets_per_s": self._jets_tagged / self._inference_s if self._inference_s else 0.0,
            "records_out": self._records_out,
            "lumi_rates": [asdict(r) for r in self.rates.closed],
            "signal_paths": self.signal_paths.report(),
            "learner_fed": self.learner_fed,
            "learner_weighting": (
                "unweighted draw" if self.config.learner_unweight_max > 0 else "as sampled"
            ),
            "overweight": self.overweight,
        }
        if self.learner is not None:
            out["learner"] = self.learner.report()
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _unweight(self, batch: EventBatch) -> EventBatch:
        """The events the learner sees: all, or an unweighted draw (module doc)."""
        w_max = self.config.learner_unweight_max
        if w_max > 0:
            w = np.nan_to_num(batch_weights(batch))
            self.overweight += int((w > w_max).sum())
            batch = batch.select(self._rng.random(len(batch)) * w_max < w)
        self.learner_fed += len(batch)
        return batch

    def _records(self, records: Sequence[Message]) -> list[Emit]:
        self._records_out += len(records)
        return [Emit("archive", record) for record in records]

    def _tag(self, batch: EventBatch) -> tuple[np.ndarray, np.ndarray]:
        """Per-jet class probabilities (N, 2, C) and the event score (N,), NaN if untaggable."""
        n, n_classes = len(batch), len(self.tagger.classes)
        tags = np.full((n, N_FATJETS, n_classes), np.nan, "<f4")
        jet_scores = np.full((n, N_FATJETS), np.nan, "<f4")
        if "constituents" not in batch:
            self._count_untagged("no_constituents_column", n * N_FATJETS)
            return tags, np.full(n, np.nan, "<f4")
        constituents = batch["constituents"]
        counts = (
            batch["n_constituents"]
            if "n_constituents" in batch
            else (constituents[..., 0] > 0).sum(-1).astype("<i2")
        )
        t0 = time.perf_counter()
        inputs = jet_inputs(
            constituents.reshape(n * N_FATJETS, *constituents.shape[2:]),
            counts.reshape(-1),
            n_particles=self.tagger.model.config.n_particles,
        )
        has = inputs.n_real > 0
        self._count_untagged("empty_jet", int((~has).sum()))
        if has.any():
            probabilities, score = self.tagger.predict(
                inputs.select(has),
                score=self.config.anomaly_score,
                batch_size=self.config.batch_size,
            )
            assert score is not None
            tags.reshape(-1, n_classes)[has] = probabilities
            jet_scores.reshape(-1)[has] = score
        elapsed = time.perf_counter() - t0
        self._inference_s += elapsed
        self._jets_tagged += int(has.sum())
        HLT_INFERENCE_LATENCY.labels(node=self.name).observe(elapsed)
        if self.config.tag_jet_pt_gev > 0:
            soft = ~(_fatjet_pt_per_jet(batch) >= self.config.tag_jet_pt_gev)
            jet_scores[soft] = np.nan
        best = np.where(np.isnan(jet_scores), -np.inf, jet_scores).max(1)
        event_scores = np.where(np.isinf(best), np.nan, best).astype("<f4")
        for i, c in enumerate(self.tagger.classes):
            values = tags[..., i][~np.isnan(tags[..., i])]
            histogram = HLT_TAG_PROBABILITY.labels(node=self.name, tag=c)
            for v in values[:: max(1, len(values) // 64)]:  # a sample keeps this cheap
                histogram.observe(float(v))
        score_histogram = HLT_ANOMALY_SCORE.labels(node=self.name)
        for v in event_scores[~np.isnan(event_scores)]:
            score_histogram.observe(float(v))
        return tags, event_scores

    def _menu(self, tags: np.ndarray, scores: np.ndarray, jet_pt: np.ndarray) -> np.ndarray:
        cfg = self.config
        n = len(scores)
        fired: dict[str, np.ndarray] = {}
        if cfg.fatjet_pt_gev is not None:
            fired["fatjet_pt"] = jet_pt.max(axis=1) >= cfg.fatjet_pt_gev
        if cfg.anomaly_threshold is not None:
            fired["anomaly"] = np.nan_to_num(scores, nan=-np.inf) >= cfg.anomaly_threshold
        if cfg.prescale_n:
            index = self._seen + np.arange(n)
            fired["prescale"] = index % cfg.prescale_n == 0
        for c, threshold in cfg.tag_thresholds.items():
            i = self.tagger.classes.index(c)
            probability = np.nan_to_num(tags[..., i], nan=-1.0)
            if cfg.tag_jet_pt_gev > 0:
                probability = np.where(jet_pt >= cfg.tag_jet_pt_gev, probability, -1.0)
            fired[f"tag_{c}"] = (probability >= threshold).any(1)
        self._seen += n
        HLT_EVENTS_SEEN.labels(node=self.name).inc(n)
        bits = np.zeros(n, "<u2")
        for path, mask in fired.items():
            bits |= (mask.astype("<u2") << self.paths[path]).astype("<u2")
            count = int(mask.sum())
            self._path_counts[path] += count
            HLT_PATH_ACCEPTS.labels(node=self.name, path=path).inc(count)
        return bits

    def _count_weights(self, batch: EventBatch, bits: np.ndarray) -> None:
        weights = np.nan_to_num(batch_weights(batch))
        fired = {}
        for path, bit in self.paths.items():
            mask = ((bits >> bit) & 1).astype(bool)
            if mask.any():
                self._path_weights[path][0] += float(weights[mask].sum())
                self._path_weights[path][1] += float(np.square(weights[mask]).sum())
            fired[path] = mask
        fired["accepted"] = bits != 0
        self.rates.add(batch, fired)
        self.signal_paths.add(batch, fired)

    def _count_untagged(self, reason: str, n: int) -> None:
        if n:
            self._untagged[reason] += n
            HLT_UNTAGGED.labels(node=self.name, reason=reason).inc(n)


def _fatjet_pt_per_jet(batch: EventBatch) -> np.ndarray:
    """The two fat jets' pT (N, 2); -inf without a ``fatjets`` column."""
    if "fatjets" not in batch:
        return np.full((len(batch), N_FATJETS), -np.inf)
    return np.asarray(batch["fatjets"][:, :N_FATJETS, 0], np.float64)


def build(config: HLTConfig, *, name: str, learner: Learner | None = None) -> HLT:
    """The HLT worker: loads the checkpoint and sets this process's torch threads."""
    torch.set_num_threads(config.torch_threads)
    tagger = load_checkpoint(config.checkpoint)
    log.info(
        "%s: tagger %s (%s), classes %s, %d torch thread(s)",
        name,
        config.checkpoint,
        tagger.card.get("variant", "?"),
        ",".join(tagger.classes),
        config.torch_threads,
    )
    return HLT(config, tagger, name=name, learner=learner)

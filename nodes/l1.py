"""The L1 trigger node: the emulated VAE firmware (R_z) OR conventional seeds.

An event is accepted when R_z > ``threshold`` (the anomaly path, bit 0) or any enabled
seed fires (bits 1..6, ``SEED_BITS``). Accepted events leave on port ``out`` with
``l1_score`` (R_z, float32) and ``l1_bits``; rejected events are counted, not sent.

Seeds, all on the L1 objects except ``fatjet_pt``:

- ``single_jet``: leading L1 jet pT > ``single_jet_pt_gev``;
- ``ht``: scalar sum of L1 jet pT (jets above ``ht_jet_pt_gev`` within
  |eta| < ``ht_jet_abs_eta``) > ``ht_gev``;
- ``single_egamma``, ``single_muon``: leading e/gamma or muon pT above its threshold;
- ``met``: MET > ``met_gev``;
- ``fatjet_pt``: leading R=1.0 jet pT (``fatjets`` column) > ``fatjet_pt_gev``, for replayed
  feature-level data (LHCO) that has no L1 objects.

A batch without ``l1_objects`` skips the VAE and the L1-object seeds: its events get
``l1_score`` NaN and can only pass on ``fatjet_pt``. Events with non-finite inputs are
dropped (``dropped{reason="nonfinite"}``) and the rest of the batch carries on. (The node
runtime already drops such events before the worker sees them; this covers in-process use.)

The anomaly score is computed on the host from the emulator's exact (mu, log sigma^2)
(``firmware.scores``). The emulator is loaded from its compiled cache; only a cache miss
imports TensorFlow (see ``firmware.emulate``).

Rates and rate control: the node counts the weights of the events each path fires on
(``fired_weight`` in its report: sum of w and of w^2) and publishes each path's rate in
Hz per closed lumi block (``nodes.rate_control.LumiRates``). ``rate_targets_hz`` puts
paths under a ``RateController``: after each lumi block the path's threshold (R_z for
``anomaly``, the seed's threshold otherwise) moves to hold the target rate, from the next
block on; a batch that spans two blocks is decided block by block. Each change is logged,
exported, kept in the report's ``threshold_changes`` and sent on ``out`` as a
``"threshold_change"`` record (the HLT forwards it to the archive). The report's
``lumi_rates`` lists every closed block's rates: ``all`` (in), ``accepted`` (out), paths.

Prometheus: ``l1_seed_accepts_total{node, seed}`` counts events on which each path fired
(an event can fire several), ``l1_score_rz{node}`` is the R_z histogram.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, field
from typing import Annotated, Any

import numpy as np
import pydantic
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from pydantic import AfterValidator, ConfigDict, Field, model_validator

from firmware.emulate import Emulator, load_emulator
from firmware.inputs import FIXED_SCALING, InputScaling
from firmware.model import DEFAULT_MODEL_DIR, load_model
from firmware.scores import r_z
from nodes.rate_control import (
    LumiRates,
    RateControlConfig,
    RateController,
    batch_weights,
    rate_factor,
)
from nodes.signal_paths import SignalPaths
from stream.batch import EventBatch, Message
from stream.node import Emit, Outcome, Processor
from stream.schema import L1_SLOTS

log = logging.getLogger(__name__)

#: Bit of each trigger path in ``l1_bits``.
SEED_BITS: dict[str, int] = {
    "anomaly": 0,
    "single_jet": 1,
    "ht": 2,
    "single_egamma": 3,
    "single_muon": 4,
    "met": 5,
    "fatjet_pt": 6,
}
SEEDS = tuple(name for name in SEED_BITS if name != "anomaly")
_CONTROL_KEYS = {
    "kp",
    "ki",
    "kf",
    "drift_smoothing",
    "max_step",
    "max_error",
    "min_slope",
    "max_slope",
}

RZ_BUCKETS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 1e5)

L1_SEED_ACCEPTS = Counter(
    "l1_seed_accepts", "Events on which an L1 path fired, by path", ["node", "seed"]
)


class ScoreHistograms:
    """The ``l1_score_rz{node}`` histogram, filled a batch at a time with numpy and
    exported by a custom collector (per-event ``observe`` costs ~1 us each in Python)."""

    def __init__(self) -> None:
        self._edges = np.array([*RZ_BUCKETS, np.inf])
        self._lock = threading.Lock()
        self._counts: dict[str, np.ndarray] = {}
        self._sums: dict[str, float] = {}

    def observe(self, node: str, values: np.ndarray) -> None:
        """Add every finite (or +inf) value of ``values`` to ``node``'s histogram."""
        kept = values[np.isfinite(values) | (values == np.inf)]
        counts = np.bincount(
            np.searchsorted(self._edges, kept, side="left"), minlength=self._edges.size
        )
        with self._lock:
            self._counts[node] = self._counts.get(node, 0) + counts
            self._sums[node] = self._sums.get(node, 0.0) + float(kept[np.isfinite(kept)].sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily("l1_score_rz", "L1 anomaly score R_z", labels=["node"])
        with self._lock:
            for node, counts in self._counts.items():
                cumulative = np.cumsum(counts)
                buckets = [
                    (floatToGoString(edge), float(total))
                    for edge, total in zip(self._edges, cumulative, strict=True)
                ]
                family.add_metric([node], buckets, self._sums[node])
        yield family


L1_SCORE = ScoreHistograms()
REGISTRY.register(L1_SCORE)


def _known_seeds(seeds: tuple[str, ...]) -> tuple[str, ...]:
    """``seeds`` if every one is in ``SEEDS``."""
    unknown = set(seeds) - set(SEEDS)
    if unknown:
        msg = f"unknown seed(s) {sorted(unknown)}; choose from {SEEDS}"
        raise ValueError(msg)
    return seeds


_Cut = Annotated[float, Field(ge=0)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class L1Config:
    """The L1 node's parameters (plain values, so a TOML table can fill it).

    Attributes:
        model_dir: model directory (default: the committed ``firmware/default_model``).
        threshold: R_z threshold; ``None`` takes the calibrated one from the model card.
        anomaly: run the VAE anomaly path at all.
        seeds: the conventional seeds that are enabled (names in ``SEEDS``).
        cache_dir: where compiled emulators are cached; "" is ``~/.cache/trigfarm``.
        emulator_threads: OpenMP threads the emulator splits each batch over.
        single_jet_pt_gev, ht_gev, ht_jet_pt_gev, ht_jet_abs_eta, single_egamma_pt_gev,
        single_muon_pt_gev, met_gev, fatjet_pt_gev: seed thresholds (see module doc).
        rate_targets_hz: path -> rate to hold (Hz); those paths' thresholds are controlled.
        rate_control: controller settings shared by the controlled paths (``kp``, ``ki``,
            ``max_step``; see ``RateControlConfig``).
    """

    model_dir: str = str(DEFAULT_MODEL_DIR)
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None
    anomaly: bool = True
    seeds: Annotated[tuple[str, ...], AfterValidator(_known_seeds)] = SEEDS
    cache_dir: str = ""
    emulator_threads: Annotated[int, Field(ge=1)] = 1
    single_jet_pt_gev: _Cut = 180.0
    ht_gev: _Cut = 360.0
    ht_jet_pt_gev: _Cut = 30.0
    ht_jet_abs_eta: _Cut = 2.5
    single_egamma_pt_gev: _Cut = 30.0
    single_muon_pt_gev: _Cut = 22.0
    met_gev: _Cut = 100.0
    fatjet_pt_gev: _Cut = 400.0
    rate_targets_hz: Mapping[str, Annotated[float, Field(gt=0)]] = field(default_factory=dict)
    rate_control: Mapping[str, float] = field(default_factory=dict)

    @model_validator(mode="after")
    def _controlled_paths(self) -> L1Config:
        enabled = {*self.seeds, *(("anomaly",) if self.anomaly else ())}
        off = set(self.rate_targets_hz) - enabled
        if off:
            msg = f"rate_targets_hz names path(s) {sorted(off)} that are not enabled"
            raise ValueError(msg)
        unknown_gains = set(self.rate_control) - _CONTROL_KEYS
        if unknown_gains:
            msg = f"rate_control has unknown key(s) {sorted(unknown_gains)}; use {_CONTROL_KEYS}"
            raise ValueError(msg)
        return self


def _leading_pt(objects: np.ndarray, slot: slice) -> np.ndarray:
    return np.asarray(objects[:, slot, 0].max(axis=1))


#: The config field that holds each seed's threshold.
SEED_THRESHOLDS: dict[str, str] = {
    "single_jet": "single_jet_pt_gev",
    "ht": "ht_gev",
    "single_egamma": "single_egamma_pt_gev",
    "single_muon": "single_muon_pt_gev",
    "met": "met_gev",
    "fatjet_pt": "fatjet_pt_gev",
}


def seed_observables(config: L1Config, batch: EventBatch) -> dict[str, np.ndarray]:
    """The quantity each enabled seed cuts on, per event (-inf where it cannot be made)."""
    n = len(batch)
    out: dict[str, np.ndarray] = {}
    objects = batch["l1_objects"] if "l1_objects" in batch else None
    for seed in config.seeds:
        if seed == "fatjet_pt":
            value = (
                batch["fatjets"][:, :, 0].max(axis=1) if "fatjets" in batch else np.full(n, -np.inf)
            )
        elif objects is None:
            value = np.full(n, -np.inf)
        elif seed == "single_jet":
            value = _leading_pt(objects, L1_SLOTS["jet"])
        elif seed == "ht":
            jets = objects[:, L1_SLOTS["jet"]]
            use = (jets[:, :, 0] > config.ht_jet_pt_gev) & (
                np.abs(jets[:, :, 1]) < config.ht_jet_abs_eta
            )
            value = (jets[:, :, 0] * use).sum(axis=1)
        elif seed == "single_egamma":
            value = _leading_pt(objects, L1_SLOTS["egamma"])
        elif seed == "single_muon":
            value = _leading_pt(objects, L1_SLOTS["muon"])
        else:  # met
            value = objects[:, L1_SLOTS["met"].start, 0]
        out[seed] = np.asarray(value, np.float64)
    return out


def seed_decisions(config: L1Config, batch: EventBatch) -> dict[str, np.ndarray]:
    """Boolean decision per enabled seed for every event of ``batch``."""
    return {
        seed: value > getattr(config, SEED_THRESHOLDS[seed])
        for seed, value in seed_observables(config, batch).items()
    }


class L1Trigger(Processor):
    """Scores events with the emulated firmware and applies the L1 menu (see module doc)."""

    def __init__(
        self,
        config: L1Config,
        *,
        name: str,
        emulator: Emulator,
        threshold: float,
        scaling: InputScaling = FIXED_SCALING,
    ) -> None:
        self.config = config
        self.scaling = scaling
        self.name = name
        self.emulator = emulator
        self.threshold = threshold
        self.fired = dict.fromkeys(SEED_BITS, 0)
        self.fired_weight = {seed: [0.0, 0.0] for seed in SEED_BITS}
        self.scored = 0
        self.unscored = 0
        self._counters = {seed: L1_SEED_ACCEPTS.labels(node=name, seed=seed) for seed in SEED_BITS}
        self.thresholds = {
            "anomaly": threshold,
            **{seed: float(getattr(config, SEED_THRESHOLDS[seed])) for seed in config.seeds},
        }
        self.rates = LumiRates(name)
        self.signal_paths = SignalPaths()
        self.controllers: dict[str, RateController] = {
            path: RateControlConfig(
                path=path,
                target_hz=target,
                initial_threshold=self.thresholds[path],
                **config.rate_control,  # type: ignore[arg-type]
            ).build(node=name)
            for path, target in config.rate_targets_hz.items()
        }
        # The open lumi block of the controlled paths: its number, observables and weights.
        self._block: int | None = None
        self._block_values: dict[str, list[np.ndarray]] = {p: [] for p in self.controllers}
        self._block_weights: list[np.ndarray] = []
        self._hz_per_event: float | None = None
        self._pending: list[Emit] = []

    def process(self, message: Message) -> Outcome:
        if not isinstance(message, EventBatch):
            return Outcome()
        batch = message
        n_in = len(batch)
        good = np.ones(n_in, bool)
        for column in ("l1_objects", "fatjets"):
            if column in batch:
                good &= np.isfinite(batch[column].reshape(n_in, -1)).all(axis=1)
        n_bad = int(n_in - good.sum())
        if n_bad:
            batch = batch.select(good)
        n = len(batch)
        scores = np.full(n, np.nan, np.float32)
        values = seed_observables(self.config, batch)
        if self.config.anomaly and "l1_objects" in batch and n:
            mu, log_var = self.emulator.encode(self.scaling.apply(batch["l1_objects"]))
            rz = r_z(mu, log_var)
            scores = rz.astype(np.float32)
            values["anomaly"] = np.asarray(rz, np.float64)
            L1_SCORE.observe(self.name, rz)
            self.scored += n
        else:
            self.unscored += n
        factor = rate_factor(batch)
        if factor is not None:
            self._hz_per_event = factor
        weights = batch_weights(batch)
        lumi = np.asarray(batch["lumi"], np.int64) if "lumi" in batch else np.zeros(n, np.int64)
        bits = np.zeros(n, np.uint16)
        for block in np.unique(lumi).tolist() if self.controllers else [None]:
            rows = slice(None) if block is None else lumi == block
            if block is not None:
                self._enter_block(int(block))
            for path, value in values.items():
                fired = value[rows] > self.thresholds[path]
                bits[rows] |= fired.astype(np.uint16) << np.uint16(SEED_BITS[path])
            if block is not None:
                for path in self.controllers:
                    self._block_values[path].append(values.get(path, np.full(n, -np.inf))[rows])
                self._block_weights.append(weights[rows])
        fired_masks = {}
        for seed, bit in SEED_BITS.items():
            mask = ((bits >> bit) & 1).astype(bool)
            count = int(mask.sum())
            if count:
                self.fired[seed] += count
                self._counters[seed].inc(count)
                w = np.nan_to_num(weights[mask])
                self.fired_weight[seed][0] += float(w.sum())
                self.fired_weight[seed][1] += float(np.square(w).sum())
            if seed in values:
                fired_masks[seed] = mask
        accept = bits != 0
        fired_masks["accepted"] = accept
        self.rates.add(batch, fired_masks)
        self.signal_paths.add(batch, fired_masks)
        n_accept = int(accept.sum())
        emits: list[Emit] = self._pending
        self._pending = []
        if n_accept:
            out = batch.select(accept).with_columns(l1_score=scores[accept], l1_bits=bits[accept])
            emits.append(Emit("out", out))
        dropped = {"nonfinite": n_bad} if n_bad else {}
        return Outcome(
            emits=tuple(emits), accepted=n_accept, rejected=n - n_accept, dropped=dropped
        )

    def _enter_block(self, block: int) -> None:
        """Close the controlled paths' open block if ``block`` is a later one."""
        if self._block is None:
            self._block = block
        if block <= self._block:
            return
        self._close_block()
        self._block = block

    def _close_block(self) -> None:
        if self._block is None or not self._block_weights:
            return
        weights = np.concatenate(self._block_weights)
        self._block_weights = []
        for path, controller in self.controllers.items():
            values = np.concatenate(self._block_values[path])
            self._block_values[path] = []
            if self._hz_per_event is None:
                log.warning(
                    "%s: batches carry no rate normalisation; %s not controlled", self.name, path
                )
                continue
            change = controller.update(
                self._block, values, weights, hz_per_event=self._hz_per_event
            )
            self.thresholds[path] = change.new_threshold
            if path == "anomaly":
                self.threshold = change.new_threshold
            self._pending.append(Emit("out", change.as_record()))

    def finish(self) -> Sequence[Emit]:
        self.rates.close_all()
        pending, self._pending = self._pending, []
        return pending

    def report(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "thresholds": dict(self.thresholds),
            "fired": dict(self.fired),
            "fired_weight": {k: list(v) for k, v in self.fired_weight.items()},
            "scored": self.scored,
            "unscored": self.unscored,
            "threshold_changes": [
                asdict(c) for controller in self.controllers.values() for c in controller.history
            ],
            # Per closed lumi block: the rate in ("all"), out ("accepted") and of each path.
            "lumi_rates": [asdict(r) for r in self.rates.closed],
            "signal_paths": self.signal_paths.report(),
        }


def build(config: L1Config, *, name: str, emulator: Emulator | None = None) -> L1Trigger:
    """The L1 worker: loads the model directory and its (cached) compiled emulator.

    Raises:
        ValueError: no ``threshold`` given and the model card has no calibration.
    """
    model = load_model(config.model_dir)
    threshold = config.threshold if config.threshold is not None else model.threshold
    if threshold is None and config.anomaly:
        msg = (
            f"L1 node {name!r}: no threshold set and {model.path} has no calibration; run "
            "`trigfarm firmware calibrate` or set threshold"
        )
        raise ValueError(msg)
    if emulator is None:
        emulator = load_emulator(
            model, cache_dir=config.cache_dir or None, threads=config.emulator_threads
        )
    log.info(
        "L1 %s: model %s, R_z threshold %s, seeds %s", name, model.path, threshold, config.seeds
    )
    return L1Trigger(
        config,
        name=name,
        emulator=emulator,
        threshold=float(threshold or np.inf),
        scaling=model.input_scaling,
    )

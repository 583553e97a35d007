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

Prometheus: ``l1_seed_accepts_total{node, seed}`` counts events on which each path fired
(an event can fire several), ``l1_score_rz{node}`` is the R_z histogram.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from firmware.emulate import Emulator, load_emulator
from firmware.inputs import FIXED_SCALING, InputScaling
from firmware.model import DEFAULT_MODEL_DIR, load_model
from firmware.scores import r_z
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

RZ_BUCKETS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 1e5)

L1_SEED_ACCEPTS = Counter(
    "l1_seed_accepts", "Events on which an L1 path fired, by path", ["node", "seed"]
)
L1_SCORE = Histogram("l1_score_rz", "L1 anomaly score R_z", ["node"], buckets=RZ_BUCKETS)


@dataclass(frozen=True, slots=True)
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
    """

    model_dir: str = str(DEFAULT_MODEL_DIR)
    threshold: float | None = None
    anomaly: bool = True
    seeds: tuple[str, ...] = SEEDS
    cache_dir: str = ""
    emulator_threads: int = 1
    single_jet_pt_gev: float = 180.0
    ht_gev: float = 360.0
    ht_jet_pt_gev: float = 30.0
    ht_jet_abs_eta: float = 2.5
    single_egamma_pt_gev: float = 30.0
    single_muon_pt_gev: float = 22.0
    met_gev: float = 100.0
    fatjet_pt_gev: float = 400.0

    def __post_init__(self) -> None:
        seeds = (self.seeds,) if isinstance(self.seeds, str) else tuple(self.seeds)
        object.__setattr__(self, "seeds", seeds)
        unknown = set(seeds) - set(SEEDS)
        if unknown:
            msg = f"unknown seed(s) {sorted(unknown)}; choose from {SEEDS}"
            raise ValueError(msg)
        if self.emulator_threads < 1:
            msg = f"emulator_threads must be >= 1, got {self.emulator_threads}"
            raise ValueError(msg)
        if self.threshold is not None and not np.isfinite(self.threshold):
            msg = f"threshold must be finite, got {self.threshold}"
            raise ValueError(msg)
        for key in (
            "single_jet_pt_gev",
            "ht_gev",
            "ht_jet_pt_gev",
            "ht_jet_abs_eta",
            "single_egamma_pt_gev",
            "single_muon_pt_gev",
            "met_gev",
            "fatjet_pt_gev",
        ):
            if getattr(self, key) < 0:
                msg = f"{key} must be >= 0, got {getattr(self, key)}"
                raise ValueError(msg)


def _leading_pt(objects: np.ndarray, slot: slice) -> np.ndarray:
    return np.asarray(objects[:, slot, 0].max(axis=1))


def seed_decisions(config: L1Config, batch: EventBatch) -> dict[str, np.ndarray]:
    """Boolean decision per enabled seed for every event of ``batch``."""
    n = len(batch)
    out: dict[str, np.ndarray] = {}
    objects = batch["l1_objects"] if "l1_objects" in batch else None
    for seed in config.seeds:
        if seed == "fatjet_pt":
            fired = (
                batch["fatjets"][:, :, 0].max(axis=1) > config.fatjet_pt_gev
                if "fatjets" in batch
                else np.zeros(n, bool)
            )
        elif objects is None:
            fired = np.zeros(n, bool)
        elif seed == "single_jet":
            fired = _leading_pt(objects, L1_SLOTS["jet"]) > config.single_jet_pt_gev
        elif seed == "ht":
            jets = objects[:, L1_SLOTS["jet"]]
            use = (jets[:, :, 0] > config.ht_jet_pt_gev) & (
                np.abs(jets[:, :, 1]) < config.ht_jet_abs_eta
            )
            fired = (jets[:, :, 0] * use).sum(axis=1) > config.ht_gev
        elif seed == "single_egamma":
            fired = _leading_pt(objects, L1_SLOTS["egamma"]) > config.single_egamma_pt_gev
        elif seed == "single_muon":
            fired = _leading_pt(objects, L1_SLOTS["muon"]) > config.single_muon_pt_gev
        else:  # met
            fired = objects[:, L1_SLOTS["met"].start, 0] > config.met_gev
        out[seed] = np.asarray(fired, bool)
    return out


def _observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Add many observations at once (per-event ``observe`` costs ~1 us each in Python).

    Uses prometheus_client's histogram child internals (``_buckets``, ``_sum``), which
    ``observe`` itself updates the same way.
    """
    finite = values[np.isfinite(values) | (values == np.inf)]
    if finite.size == 0:
        return
    edges = np.array([*RZ_BUCKETS, np.inf])
    index = np.searchsorted(edges, finite, side="left")
    counts = np.bincount(index, minlength=edges.size)
    histogram._sum.inc(float(finite[np.isfinite(finite)].sum()))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(int(count))


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
        self.scored = 0
        self.unscored = 0
        self._histogram = L1_SCORE.labels(node=name)
        self._counters = {seed: L1_SEED_ACCEPTS.labels(node=name, seed=seed) for seed in SEED_BITS}

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
        bits = np.zeros(n, np.uint16)
        if self.config.anomaly and "l1_objects" in batch and n:
            mu, log_var = self.emulator.encode(self.scaling.apply(batch["l1_objects"]))
            rz = r_z(mu, log_var)
            scores = rz.astype(np.float32)
            bits |= (rz > self.threshold).astype(np.uint16) << np.uint16(SEED_BITS["anomaly"])
            _observe_many(self._histogram, rz)
            self.scored += n
        else:
            self.unscored += n
        for seed, fired in seed_decisions(self.config, batch).items():
            bits |= fired.astype(np.uint16) << np.uint16(SEED_BITS[seed])
        for seed, bit in SEED_BITS.items():
            count = int(((bits >> bit) & 1).sum())
            if count:
                self.fired[seed] += count
                self._counters[seed].inc(count)
        accept = bits != 0
        n_accept = int(accept.sum())
        emits: tuple[Emit, ...] = ()
        if n_accept:
            out = batch.select(accept).with_columns(l1_score=scores[accept], l1_bits=bits[accept])
            emits = (Emit("out", out),)
        dropped = {"nonfinite": n_bad} if n_bad else {}
        return Outcome(emits=emits, accepted=n_accept, rejected=n - n_accept, dropped=dropped)

    def report(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "fired": dict(self.fired),
            "scored": self.scored,
            "unscored": self.unscored,
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

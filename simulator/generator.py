"""Pythia 8 events through the detector model into ``EventBatch`` columns.

``EventGenerator`` owns one Pythia instance (and one for pileup, if asked) and turns a
recipe into batches of events. Generation runs in blocks: before each block, Pythia and
the detector's random generator are re-seeded from ``(seed, block index)``, so a block's
events depend only on the recipe, the seed, the block index and the block size. That
makes a cache written by K worker processes identical to one written by a single
process, and lets any block be regenerated on its own.

Example:
    >>> from simulator import generate
    >>> batch = next(generate("wprime", 4, seed=7, batch_size=4))
    >>> batch["features"].shape, bool(batch.truth["is_signal"].all())
    ((4, 8), True)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import awkward as ak
import numpy as np
import pythia8mc

from simulator.detector import DetectorModel
from simulator.jets import JetConfig, cluster_fatjets, l1_objects
from simulator.particles import Particles
from simulator.recipes import PROCESSES, MinimumBias, Recipe
from stream.batch import EventBatch

log = logging.getLogger(__name__)

#: What a batch holds: every schema column ("full": L1 objects, fat jets, constituents,
#: features), or only the fat jets and the features ("features": no lepton
#: identification, no R=0.4 jets and no constituent table are made, which is faster).
LAYOUTS = ("full", "features")

_PYTHIA_SEED_MAX = 900_000_000
_PILEUP_STREAM = 1
_DETECTOR_STREAM = 2


def derived_seed(seed: int, *keys: int) -> int:
    """A Pythia seed in [1, 900000000] derived from ``seed`` and ``keys`` (SeedSequence)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]
    return int(state % np.uint64(_PYTHIA_SEED_MAX)) + 1


def resolve(process: Recipe | str) -> Recipe:
    """A recipe from itself or from its name in ``PROCESSES``."""
    if isinstance(process, Recipe):
        return process
    try:
        return PROCESSES[process]
    except KeyError:
        msg = f"unknown process {process!r}; known: {', '.join(PROCESSES)}"
        raise KeyError(msg) from None


@dataclass(slots=True)
class GeneratorStats:
    """What the generator did so far: events tried, aborted by Pythia, filtered, kept."""

    tried: int = 0
    aborted: int = 0
    filtered: int = 0
    kept: int = 0
    pythia_errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def filter_efficiency(self) -> float:
        passed = self.tried - self.aborted
        return self.kept / passed if passed else 0.0


def make_pythia(recipe: Recipe, seed: int) -> pythia8mc.Pythia:
    """An initialised, silent Pythia for ``recipe`` with ``Random:seed = seed``."""
    pythia = pythia8mc.Pythia("", False)
    lines = (*recipe.pythia_settings(), "Random:setSeed = on", f"Random:seed = {seed}")
    for line in lines:
        if not pythia.readString(line):
            msg = f"recipe {recipe.name!r}: Pythia rejected the setting {line!r}"
            raise ValueError(msg)
    if not pythia.init():
        msg = f"recipe {recipe.name!r}: Pythia initialisation failed"
        raise RuntimeError(msg)
    return pythia


class EventGenerator:
    """One recipe's Pythia instance(s), the detector model and the event content.

    Not thread-safe; one per process. Pythia is initialised once (about 0.5 s) and
    re-seeded per block. With ``layout="features"`` a block holds only the fat jets and
    the features; they equal the "full" layout's for the same seed (the detector draws
    the lepton-identification random numbers after the candidates).

    Per event, everything after Pythia runs on flat numpy arrays of the whole batch and
    in FastJet's C++ (one call clusters all events): the final state is read from
    Pythia's batch buffers, the detector is vectorised, and N-subjettiness reclusters
    the two leading jets of the selected events only.
    """

    def __init__(
        self,
        process: Recipe | str,
        *,
        seed: int | None = None,
        detector: DetectorModel | None = None,
        jets: JetConfig | None = None,
        layout: str = "full",
    ) -> None:
        if layout not in LAYOUTS:
            msg = f"layout must be one of {LAYOUTS}, got {layout!r}"
            raise ValueError(msg)
        self.layout = layout
        self.recipe = resolve(process)
        self.seed = self.recipe.seed if seed is None else int(seed)
        self.detector = detector or DetectorModel()
        self.jets = jets or JetConfig()
        self.stats = GeneratorStats()
        self._pythia = make_pythia(self.recipe, derived_seed(self.seed, 0))
        self._pileup: pythia8mc.Pythia | None = None
        if self.recipe.pileup_mean > 0:
            pileup = MinimumBias(name="pileup", process_id=-1, ecm_gev=self.recipe.ecm_gev)
            self._pileup = make_pythia(pileup, derived_seed(self.seed, _PILEUP_STREAM))
        self._rng = np.random.default_rng(self.seed)
        self._charge: dict[int, float] = {}
        self._visible: dict[int, bool] = {}
        # Pythia's weights and the filter's decisions for the last round's events.
        self._last_raw: tuple[np.ndarray, np.ndarray] = (np.zeros(0, "<f4"), np.zeros(0, bool))
        log.info("generator %s ready (seed %d)", self.recipe.name, self.seed)

    @property
    def cross_section_mb(self) -> float:
        """Pythia's estimate of the generated cross section so far (mb), before the filter."""
        return float(self._pythia.infoPython().sigmaGen())

    def block(
        self,
        index: int,
        n_events: int,
        *,
        first_event: int = 0,
        run: int = 1,
        cross_section_weights: bool = False,
    ) -> EventBatch:
        """Block ``index`` of ``n_events`` kept events, reproducible from (seed, index, n).

        Truth ``weight`` is Pythia's event weight (1 unless the recipe biases the
        sampling). With ``cross_section_weights`` it is the event's share of the cross
        section instead, in mb, scaled so that the block's mean weight is its estimate of
        the filtered cross section: ``w_i = sigmaGen * n_events * p_i / sum(p)``, where
        ``p`` are Pythia's weights of every event Pythia produced for this block up to the
        last one kept (filtered ones included, aborted ones not) and ``sigmaGen`` is
        Pythia's running estimate (it converges as the generator runs; the events stay
        reproducible, the weights only to within that estimate).
        """
        if n_events < 1:
            msg = f"n_events must be >= 1, got {n_events}"
            raise ValueError(msg)
        self._pythia.rndm.init(derived_seed(self.seed, 10, index))
        if self._pileup is not None:
            self._pileup.rndm.init(derived_seed(self.seed, 11, index))
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, 12, index]))
        parts: list[EventBatch] = []
        kept = tried = 0
        passed_weight = 0.0
        while kept < n_events:
            want = n_events - kept
            # Size each round from this block's own efficiency only, so that the block's
            # random sequence never depends on what was generated before it.
            efficiency = kept / tried if tried else 1.0
            ask = want
            if self.recipe.event_filter.active:
                ask = int(min(max(want / max(efficiency, 0.01), 8), 4 * n_events + 64))
            tried += ask
            batch = self._one_batch(ask)
            raw_weights, raw_keep = self._last_raw
            if batch is not None and len(batch) > want:
                # Events Pythia made after the last one used belong to no block.
                last = int(np.flatnonzero(raw_keep)[want - 1])
                raw_weights = raw_weights[: last + 1]
            passed_weight += float(raw_weights.astype(np.float64).sum())
            if batch is not None:
                batch = batch.select(slice(0, want))
                parts.append(batch)
                kept += len(batch)
        merged = EventBatch.concat(parts)
        if cross_section_weights:
            share = merged.truth["weight"].astype(np.float64) / max(passed_weight, 1e-300)
            weight = (self.cross_section_mb * n_events * share).astype("<f4")
            merged = EventBatch(merged.columns, {**merged.truth, "weight": weight}, merged.meta)
        return merged.with_columns(
            run=np.full(n_events, run, "<u4"),
            lumi=np.zeros(n_events, "<u4"),
            event=np.arange(first_event, first_event + n_events, dtype="<u8"),
        )

    def _one_batch(self, n_try: int) -> EventBatch | None:
        raw = self._pythia.nextBatch(n_try, "skip")
        n_ok = len(raw)
        self.stats.tried += n_try
        self.stats.aborted += n_try - n_ok
        self.stats.pythia_errors = int(self._pythia.logger.errorTotalNumber())
        self._last_raw = (np.zeros(0, "<f4"), np.zeros(0, bool))
        if n_ok == 0:
            return None
        particles = self._final_state(raw)
        if self._pileup is not None:
            particles = Particles.concat_events([particles, self._pileup_particles(n_ok)])
        full = self.layout == "full"
        flt = self.recipe.event_filter
        needs_l1 = full or flt.lepton_pt_gev is not None or flt.jet_pt_gev is not None
        reco = self.detector.simulate(particles, self._rng, objects=needs_l1)
        l1 = None
        if needs_l1:
            l1 = l1_objects(
                reco.candidates, reco.egamma, reco.muons, reco.met_x, reco.met_y, self.jets
            )
        weights = ak.to_numpy(ak.fill_none(ak.firsts(raw.info.weights), 1.0)).astype("<f4")
        keep = np.full(n_ok, not flt.active)
        if l1 is not None and flt.lepton_pt_gev is not None:
            keep |= np.maximum(l1[:, 1, 0], l1[:, 5, 0]) > flt.lepton_pt_gev
        if l1 is not None and flt.jet_pt_gev is not None:
            keep |= l1[:, 9, 0] > flt.jet_pt_gev
        if flt.fatjet_pt_gev is None:
            # Cluster fat jets only for the events that are kept.
            clustered = cluster_fatjets(reco.candidates.take_events(keep), self.jets)
            events = None
        else:
            # Cluster every event, but compute N-subjettiness only for those kept.
            clustered = cluster_fatjets(reco.candidates, self.jets)
            keep |= clustered.leading_pt > flt.fatjet_pt_gev
            events = keep
        n_kept = int(keep.sum())
        self._last_raw = (weights, keep)
        self.stats.filtered += n_ok - n_kept
        self.stats.kept += n_kept
        if n_kept == 0:
            return None
        content = clustered.content(self.jets, events=events, with_constituents=full)
        columns = content.columns()
        if full:
            assert l1 is not None
            columns["l1_objects"] = l1[keep]
        recipe = self.recipe
        return EventBatch(
            columns,
            truth={
                "process_id": np.full(n_kept, recipe.process_id, "<i2"),
                "is_signal": np.full(n_kept, recipe.is_signal, "u1"),
                "weight": weights[keep],
            },
            meta={"source": recipe.name},
        )

    def _final_state(self, raw: ak.Array) -> Particles:
        """Visible final-state particles with their charges, as flat numpy arrays.

        Reads the flat buffers of the whole batch once (no per-event or per-particle
        Python): about 10 microseconds per event.
        """
        prt = raw.prt
        n_all = ak.to_numpy(ak.num(prt, axis=1)).astype(np.int64)
        status = ak.to_numpy(ak.flatten(prt.status))
        pid_all = ak.to_numpy(ak.flatten(prt.id)).astype(np.int32)
        final = status > 0
        pid = pid_all[final]
        charge, visible = self._lookup(pid)
        keep = np.flatnonzero(final)[visible]
        owner = np.repeat(np.arange(n_all.size), n_all)[keep]
        mom = prt.p
        return Particles(
            np.bincount(owner, minlength=n_all.size).astype(np.int64),
            ak.to_numpy(ak.flatten(mom.px))[keep],
            ak.to_numpy(ak.flatten(mom.py))[keep],
            ak.to_numpy(ak.flatten(mom.pz))[keep],
            ak.to_numpy(ak.flatten(mom.e))[keep],
            pid[visible],
            charge[visible],
        )

    def _lookup(self, pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Charge and visibility per particle, from Pythia's particle data (cached by id)."""
        codes, inverse = np.unique(pid, return_inverse=True)
        data = self._pythia.particleData
        for code in codes.tolist():
            if code not in self._charge:
                self._charge[code] = float(data.charge(code))
                self._visible[code] = bool(data.isVisible(code))
        charges = np.array([self._charge[c] for c in codes.tolist()], float)
        visible = np.array([self._visible[c] for c in codes.tolist()], bool)
        return charges[inverse], visible[inverse]

    def _pileup_particles(self, n_events: int) -> Particles:
        """Poisson(pileup_mean) minimum-bias events per hard event, merged per event."""
        assert self._pileup is not None
        n_pileup = self._rng.poisson(self.recipe.pileup_mean, n_events)
        total = int(n_pileup.sum())
        raws: list[ak.Array] = []
        got = 0
        for _ in range(100):
            if got >= total:
                break
            raw = self._pileup.nextBatch(total - got, "skip")
            raws.append(raw)
            got += len(raw)
        else:
            msg = "the pileup generator keeps failing (100 rounds without enough events)"
            raise RuntimeError(msg)
        if total == 0:
            empty = np.zeros(0)
            return Particles(
                np.zeros(n_events, np.int64),
                empty,
                empty,
                empty,
                empty,
                np.zeros(0, np.int32),
                empty,
            )
        particles = self._final_state(ak.concatenate(raws))
        owner = np.repeat(np.arange(n_events), n_pileup)
        counts = np.bincount(owner, particles.counts, minlength=n_events).astype(np.int64)
        return Particles(
            counts,
            particles.px,
            particles.py,
            particles.pz,
            particles.e,
            particles.pid,
            particles.charge,
        )


def generate(
    process: Recipe | str,
    n_events: int,
    *,
    seed: int | None = None,
    batch_size: int = 256,
    first_event: int = 0,
    run: int = 1,
    detector: DetectorModel | None = None,
    jets: JetConfig | None = None,
    layout: str = "full",
) -> Iterator[EventBatch]:
    """Generate ``n_events`` events of a recipe (or its name) as batches of ``batch_size``.

    Batch ``i`` is block ``i`` of ``EventGenerator``: the output depends only on the
    recipe, ``seed`` (default: the recipe's) and ``batch_size``. Events are numbered from
    ``first_event``; truth holds the recipe's process id and signal flag. ``layout``
    chooses the columns (see ``LAYOUTS``).

    Raises:
        KeyError: an unknown process name.
        ValueError: a setting Pythia rejects, or bad sizes.
    """
    if n_events < 1 or batch_size < 1:
        msg = f"n_events and batch_size must be >= 1, got {n_events} and {batch_size}"
        raise ValueError(msg)
    generator = EventGenerator(process, seed=seed, detector=detector, jets=jets, layout=layout)
    done = 0
    index = 0
    while done < n_events:
        n = min(batch_size, n_events - done)
        yield generator.block(index, n, first_event=first_event + done, run=run)
        done += n
        index += 1

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
from typing import Literal, get_args

import awkward as ak
import numpy as np
import pythia8mc
from scipy.special import logsumexp

from simulator.detector import DetectorModel
from simulator.jets import JetConfig, cluster_fatjets, l1_objects
from simulator.particles import Particles
from simulator.recipes import PROCESSES, InclusiveQCD, MinimumBias, Recipe
from stream.batch import EventBatch

log = logging.getLogger(__name__)

#: What a batch holds: every schema column ("full": L1 objects, fat jets, constituents,
#: features), or only the fat jets and the features ("features": no lepton
#: identification, no R=0.4 jets and no constituent table are made, which is faster).
Layout = Literal["full", "features"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

_PYTHIA_SEED_MAX = 900_000_000
_PILEUP_STREAM = 1
_DETECTOR_STREAM = 2
_SOFT_STREAM = 3
_LIBRARY_STREAM = 13
#: Particles beyond this |eta| never reach the detector model; the pileup library drops them.
_DETECTOR_ABS_ETA = 5.0


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


class _ParticleTable:
    """Charge and visibility per PDG id from one Pythia's particle data (cached by id)."""

    def __init__(self, pythia: pythia8mc.Pythia) -> None:
        self._data = pythia.particleData
        self._charge: dict[int, float] = {}
        self._visible: dict[int, bool] = {}

    def lookup(self, pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes, inverse = np.unique(pid, return_inverse=True)
        for code in codes.tolist():
            if code not in self._charge:
                self._charge[code] = float(self._data.charge(code))
                self._visible[code] = bool(self._data.isVisible(code))
        charges = np.array([self._charge[c] for c in codes.tolist()], float)
        visible = np.array([self._visible[c] for c in codes.tolist()], bool)
        return charges[inverse], visible[inverse]

    def final_state(self, raw: ak.Array) -> Particles:
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
        charge, visible = self.lookup(pid)
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


def _pthat(raw: ak.Array) -> np.ndarray:
    """The hardest scatter's pT-hat (GeV) of each event (for minimum bias: its hardest MPI)."""
    return np.sqrt(np.maximum(ak.to_numpy(raw.info.pT2Hat).astype(np.float64), 0.0))


def _pythia_weights(raw: ak.Array) -> np.ndarray:
    return ak.to_numpy(ak.fill_none(ak.firsts(raw.info.weights), 1.0)).astype(np.float64)


def stack_events(parts: list[Particles]) -> Particles:
    """Particle lists one after the other (the events of ``parts[0]`` first)."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    px, py, pz, e = (cat(n) for n in ("px", "py", "pz", "e"))
    assert px is not None and py is not None and pz is not None and e is not None
    counts = np.concatenate([p.counts for p in parts]).astype(np.int64)
    return Particles(counts, px, py, pz, e, cat("pid"), cat("charge"))


#: With a pileup tilt, the share of crossings whose pileup is still drawn uniformly; it
#: bounds every crossing's weight at 1 / UNTILTED_SHARE times its untilted value.
UNTILTED_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class PileupLibrary:
    """Minimum-bias events generated once and overlaid by random draws (premixing).

    ``particles`` holds each event's visible final state within the detector's |eta| < 5,
    ``pthat_gev`` the pT-hat of its hardest interaction (what the inclusive sample's
    crossing weight needs). Build one with ``pileup_library``.
    """

    particles: Particles
    pthat_gev: np.ndarray
    seed: int

    @property
    def n_events(self) -> int:
        return self.particles.n_events

    @property
    def activity_gev(self) -> np.ndarray:
        """Each library event's scalar pT sum (GeV), what a pileup tilt favours."""
        return self.particles.scalar_pt_sum

    def log_bias(self, activity_gev: np.ndarray, tilt_per_gev: float) -> np.ndarray:
        """log of how much likelier a tilted draw is than a uniform one, for interactions
        this busy: ``tilt * activity`` normalised over the library. Activity beyond the
        library's busiest event counts as that, so a hard scatter's bias stays bounded."""
        library = self.activity_gev
        norm = float(logsumexp(tilt_per_gev * library)) - np.log(self.n_events)
        return tilt_per_gev * np.minimum(activity_gev, library.max()) - norm

    def draw(
        self, n_pileup: np.ndarray, rng: np.random.Generator, *, tilt_per_gev: float = 0.0
    ) -> np.ndarray:
        """Library indices of ``n_pileup[i]`` events for crossing ``i`` (in crossing order),
        drawn with replacement: uniformly, or with a tilt for all but ``UNTILTED_SHARE``
        of the crossings, each draw then ``exp(log_bias)`` times as likely."""
        n_pileup = np.asarray(n_pileup, np.int64)
        draws = rng.integers(0, self.n_events, int(n_pileup.sum()))
        if tilt_per_gev > 0:
            tilted = np.repeat(rng.random(n_pileup.size) >= UNTILTED_SHARE, n_pileup)
            chance = np.exp(self.log_bias(self.activity_gev, tilt_per_gev))
            draws[tilted] = rng.choice(self.n_events, int(tilted.sum()), p=chance / chance.sum())
        return draws

    def overlay(self, n_pileup: np.ndarray, draws: np.ndarray) -> Particles:
        """The library events ``draws`` (from ``draw``) merged into ``n_pileup[i]`` per
        crossing ``i``."""
        n_pileup = np.asarray(n_pileup, np.int64)
        counts = self.particles.counts[draws]
        starts = self.particles.offsets[:-1][draws]
        first = np.cumsum(counts) - counts
        take = np.repeat(starts - first, counts) + np.arange(int(counts.sum()))
        owner = np.repeat(np.arange(n_pileup.size), n_pileup)
        per_crossing = np.bincount(owner, counts, minlength=n_pileup.size).astype(np.int64)
        lib = self.particles
        assert lib.pid is not None and lib.charge is not None
        return Particles(
            per_crossing,
            lib.px[take],
            lib.py[take],
            lib.pz[take],
            lib.e[take],
            lib.pid[take],
            lib.charge[take],
        )


def crossing_weights(
    mu: float,
    n_pileup: np.ndarray,
    inverse_primary: np.ndarray,
    inverse_pileup: np.ndarray,
    *,
    log_bias_primary: np.ndarray | None = None,
    log_bias_pileup: np.ndarray | None = None,
) -> np.ndarray:
    """The share of all bunch crossings each crossing stands for.

    A crossing holds n = 1 + ``n_pileup`` interactions (n ~ Poisson(mu) given n >= 1):
    one sampled from the biased mixture, the rest drawn from the library. Its weight is
    the importance weight of the unordered set, ``(1 - e^-mu) n / sum_j r_j c_j``: ``r_j``
    is sigma / w_j, how much likelier the mixture makes interaction j than nature
    (``inverse_primary`` per crossing, ``inverse_pileup`` per draw in crossing order), and
    ``c_j`` how much likelier the pileup draws make the other n - 1 interactions, 1
    without a tilt and ``UNTILTED_SHARE + (1 - UNTILTED_SHARE) prod_{k != j} b_k`` with
    one (``log_bias_*``: log b of each interaction, ``PileupLibrary.log_bias``).
    """
    n_pileup = np.asarray(n_pileup, np.int64)
    owner = np.repeat(np.arange(n_pileup.size), n_pileup)
    if log_bias_primary is None or log_bias_pileup is None:
        ratio = inverse_primary + np.bincount(owner, inverse_pileup, minlength=n_pileup.size)
    else:
        log_all = log_bias_primary + np.bincount(owner, log_bias_pileup, minlength=n_pileup.size)
        tilted = 1.0 - UNTILTED_SHARE
        primary = inverse_primary * (UNTILTED_SHARE + tilted * np.exp(log_all - log_bias_primary))
        pileup = inverse_pileup * (
            UNTILTED_SHARE + tilted * np.exp(log_all[owner] - log_bias_pileup)
        )
        ratio = primary + np.bincount(owner, pileup, minlength=n_pileup.size)
    return -np.expm1(-mu) * (1 + n_pileup) / ratio


_LIBRARIES: dict[tuple[int, int, float], PileupLibrary] = {}


def pileup_library(n_events: int, *, seed: int, ecm_gev: float = 13000.0) -> PileupLibrary:
    """A library of ``n_events`` non-diffractive minimum-bias events (MPI on), generated
    once per process and reused for the same (size, seed, energy).

    About 4 ms per event on one core; 2000 events take some 8 s.
    """
    if n_events < 1:
        msg = f"a pileup library needs >= 1 event, got {n_events}"
        raise ValueError(msg)
    key = (n_events, seed, float(ecm_gev))
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    recipe = MinimumBias(name="pileup", process_id=-1, ecm_gev=ecm_gev)
    pythia = make_pythia(recipe, derived_seed(seed, _LIBRARY_STREAM))
    table = _ParticleTable(pythia)
    parts: list[Particles] = []
    pthats: list[np.ndarray] = []
    got = 0
    for _ in range(1000):
        if got >= n_events:
            break
        raw = pythia.nextBatch(min(500, n_events - got), "skip")
        if len(raw) == 0:
            continue
        particles = table.final_state(raw)
        parts.append(particles.select(np.abs(particles.eta) < _DETECTOR_ABS_ETA))
        pthats.append(_pthat(raw))
        got += len(raw)
    else:
        msg = "the pileup library's generator keeps failing (1000 rounds)"
        raise RuntimeError(msg)
    library = PileupLibrary(stack_events(parts), np.concatenate(pthats), seed)
    _LIBRARIES[key] = library
    log.info(
        "pileup library: %d minimum-bias events (seed %d), %.0f particles per event",
        n_events,
        seed,
        library.particles.counts.mean(),
    )
    return library


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
        pileup_library: PileupLibrary | None = None,
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
        self.library = pileup_library
        self._pythia = make_pythia(self.recipe, derived_seed(self.seed, 0))
        self._table = _ParticleTable(self._pythia)
        self._pileup: pythia8mc.Pythia | None = None
        if self.recipe.pileup_mean > 0:
            pileup = MinimumBias(name="pileup", process_id=-1, ecm_gev=self.recipe.ecm_gev)
            self._pileup = make_pythia(pileup, derived_seed(self.seed, _PILEUP_STREAM))
        # The inclusive sample's soft slice, and the running sums its weights come from.
        self._soft: pythia8mc.Pythia | None = None
        if isinstance(self.recipe, InclusiveQCD):
            soft = self.recipe.soft_recipe()
            self._soft = make_pythia(soft, derived_seed(self.seed, _SOFT_STREAM))
        self._soft_made = 0
        self._soft_kept = 0
        self._hard_made = 0
        self._hard_weight_sum = 0.0
        self._rng = np.random.default_rng(self.seed)
        # Pythia's weights and the filter's decisions for the last round's events.
        self._last_raw: tuple[np.ndarray, np.ndarray] = (np.zeros(0, "<f4"), np.zeros(0, bool))
        self.mu_sum = 0.0
        log.info("generator %s ready (seed %d)", self.recipe.name, self.seed)

    @property
    def cross_section_mb(self) -> float:
        """Pythia's estimate of the generated cross section so far (mb), before the filter;
        for the inclusive sample, the stitched non-diffractive cross section."""
        if self._soft is not None:
            soft, hard = self.slice_cross_sections_mb()
            return soft + hard
        return float(self._pythia.infoPython().sigmaGen())

    def slice_cross_sections_mb(self) -> tuple[float, float]:
        """The inclusive sample's soft and hard slices' cross sections (mb) so far: the
        soft one is Pythia's non-diffractive cross section times the share below the
        split, the hard one Pythia's biased-sampling estimate above it."""
        if self._soft is None:
            msg = f"{self.recipe.name} is not an inclusive sample"
            raise ValueError(msg)
        kept = self._soft_kept / self._soft_made if self._soft_made else 1.0
        soft = float(self._soft.infoPython().sigmaGen()) * kept
        return soft, float(self._pythia.infoPython().sigmaGen())

    def interaction_weights_mb(self, pthat_gev: np.ndarray) -> np.ndarray:
        """The inclusive sample's weight (mb) of an interaction with this hardest pT-hat,
        had it been sampled: the cross section it stands for, ``sigma_slice / share``
        for the soft slice, and with the bias undone for the hard one."""
        recipe = self.recipe
        assert isinstance(recipe, InclusiveQCD)
        soft_mb, hard_mb = self.slice_cross_sections_mb()
        mean_bias = self._hard_weight_sum / self._hard_made if self._hard_made else 1.0
        pthat = np.asarray(pthat_gev, np.float64)
        hard = pthat >= recipe.pthat_split_gev
        bias = (recipe.pthat_split_gev / np.maximum(pthat, 1e-9)) ** recipe.bias_power
        return np.where(
            hard,
            hard_mb * bias / max(mean_bias, 1e-300) / recipe.hard_share,
            soft_mb / (1.0 - recipe.hard_share),
        )

    def block(
        self,
        index: int,
        n_events: int,
        *,
        first_event: int = 0,
        run: int = 1,
        cross_section_weights: bool = False,
        mu: float = 0.0,
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

        ``mu`` > 0 premixes pileup: each event becomes a bunch crossing by overlaying
        Poisson(``mu``) events drawn from the pileup library (which the generator needs).

        The inclusive sample (``InclusiveQCD``) always carries its own weights. Without
        pileup, an event's weight is the cross section it stands for (mb;
        ``cross_section_weights``) or that over the stitched total (without). With
        pileup, it is the share of all bunch crossings the crossing stands for: a
        crossing holds n ~ Poisson(mu) interactions given n >= 1, one of them sampled from
        the biased mixture and n - 1 drawn from the library, so its weight is
        ``(1 - exp(-mu)) * n / sum_j sigma / w_j`` over all n interactions (``w_j`` the
        weight interaction j would have had as the sampled one,
        ``interaction_weights_mb``; ``sigma`` the total). That is the importance weight
        of the whole crossing, whichever interaction is hard: a crossing whose hard
        scatter came from the library weighs what it should. The sample's rate of a
        selection is then ``crossing_rate * sum(w) / N``.
        """
        if n_events < 1:
            msg = f"n_events must be >= 1, got {n_events}"
            raise ValueError(msg)
        if mu < 0 or not np.isfinite(mu):
            msg = f"mu must be finite and >= 0, got {mu}"
            raise ValueError(msg)
        if mu > 0 and self.library is None:
            msg = f"generator {self.recipe.name}: mu = {mu} needs a pileup library"
            raise ValueError(msg)
        self._pythia.rndm.init(derived_seed(self.seed, 10, index))
        if self._pileup is not None:
            self._pileup.rndm.init(derived_seed(self.seed, 11, index))
        if self._soft is not None:
            self._soft.rndm.init(derived_seed(self.seed, 13, index))
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
            batch = self._one_batch(ask, mu=mu, cross_section_weights=cross_section_weights)
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
        self.mu_sum += mu * n_events
        if cross_section_weights and self._soft is None:
            share = merged.truth["weight"].astype(np.float64) / max(passed_weight, 1e-300)
            weight = (self.cross_section_mb * n_events * share).astype("<f4")
            merged = EventBatch(merged.columns, {**merged.truth, "weight": weight}, merged.meta)
        return merged.with_columns(
            run=np.full(n_events, run, "<u4"),
            lumi=np.zeros(n_events, "<u4"),
            event=np.arange(first_event, first_event + n_events, dtype="<u8"),
        )

    def _primaries(self, n_try: int) -> tuple[Particles, np.ndarray, np.ndarray, np.ndarray]:
        """The hard scatters of up to ``n_try`` events: particles, Pythia's weights, process
        ids and pT-hat. The inclusive sample draws each event from its hard slice with
        probability ``hard_share`` and vetoes soft ones above the split."""
        recipe = self.recipe
        if self._soft is None:
            raw = self._pythia.nextBatch(n_try, "skip")
            self.stats.tried += n_try
            self.stats.aborted += n_try - len(raw)
            n = len(raw)
            if n == 0:
                empty = np.zeros(0)
                return _no_particles(), empty, empty.astype("<i2"), empty
            return (
                self._table.final_state(raw),
                _pythia_weights(raw),
                np.full(n, recipe.process_id, "<i2"),
                _pthat(raw),
            )
        assert isinstance(recipe, InclusiveQCD)
        n_hard = int(self._rng.binomial(n_try, recipe.hard_share))
        parts: list[Particles] = []
        weights: list[np.ndarray] = []
        pids: list[np.ndarray] = []
        pthats: list[np.ndarray] = []
        n_ok = 0
        if n_hard:
            raw = self._pythia.nextBatch(n_hard, "skip")
            if len(raw):
                w = _pythia_weights(raw)
                self._hard_made += len(raw)
                self._hard_weight_sum += float(w.sum())
                parts.append(self._table.final_state(raw))
                weights.append(w)
                pids.append(np.full(len(raw), recipe.process_id, "<i2"))
                pthats.append(_pthat(raw))
                n_ok += len(raw)
        if n_try - n_hard:
            raw = self._soft.nextBatch(n_try - n_hard, "skip")
            if len(raw):
                pthat = _pthat(raw)
                below = pthat < recipe.pthat_split_gev
                self._soft_made += len(raw)
                self._soft_kept += int(below.sum())
                self.stats.filtered += int((~below).sum())
                parts.append(self._table.final_state(raw).take_events(below))
                weights.append(np.ones(int(below.sum())))
                pids.append(np.full(int(below.sum()), recipe.soft_process_id, "<i2"))
                pthats.append(pthat[below])
                n_ok += len(raw)
        self.stats.tried += n_try
        self.stats.aborted += n_try - n_ok
        if not parts:
            empty = np.zeros(0)
            return _no_particles(), empty, empty.astype("<i2"), empty
        return (
            stack_events(parts),
            np.concatenate(weights),
            np.concatenate(pids),
            np.concatenate(pthats),
        )

    def _one_batch(
        self, n_try: int, *, mu: float = 0.0, cross_section_weights: bool = False
    ) -> EventBatch | None:
        particles, weights, pids, pthat = self._primaries(n_try)
        n_ok = particles.n_events
        self.stats.pythia_errors = int(self._pythia.logger.errorTotalNumber())
        self._last_raw = (np.zeros(0, "<f4"), np.zeros(0, bool))
        if n_ok == 0:
            return None
        if self._pileup is not None:
            particles = Particles.concat_events([particles, self._pileup_particles(n_ok)])
        if self._soft is not None:
            own = self.interaction_weights_mb(pthat)
            weights = own if cross_section_weights else own / self.cross_section_mb
        if mu > 0:
            assert self.library is not None
            if self._soft is not None:
                n_pileup = _poisson_at_least_one(self._rng, mu, n_ok) - 1
            else:
                n_pileup = self._rng.poisson(mu, n_ok)
            recipe = self.recipe
            tilt = recipe.pileup_tilt_per_gev if isinstance(recipe, InclusiveQCD) else 0.0
            draws = self.library.draw(n_pileup, self._rng, tilt_per_gev=tilt)
            log_bias_primary = log_bias_pileup = None
            if tilt > 0:
                visible = particles.select(np.abs(particles.eta) < _DETECTOR_ABS_ETA)
                log_bias_primary = self.library.log_bias(visible.scalar_pt_sum, tilt)
                log_bias_pileup = self.library.log_bias(self.library.activity_gev[draws], tilt)
            particles = Particles.concat_events([particles, self.library.overlay(n_pileup, draws)])
            if self._soft is not None:
                total = self.cross_section_mb
                pileup_pthat = self.library.pthat_gev[draws]
                weights = crossing_weights(
                    mu,
                    n_pileup,
                    total / own,  # sigma / w_j of the sampled interaction
                    total / self.interaction_weights_mb(pileup_pthat),
                    log_bias_primary=log_bias_primary,
                    log_bias_pileup=log_bias_pileup,
                )
        full = self.layout == "full"
        flt = self.recipe.event_filter
        needs_l1 = full or flt.lepton_pt_gev is not None or flt.jet_pt_gev is not None
        reco = self.detector.simulate(particles, self._rng, objects=needs_l1)
        l1 = None
        if needs_l1:
            l1 = l1_objects(
                reco.candidates, reco.egamma, reco.muons, reco.met_x, reco.met_y, self.jets
            )
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
        self._last_raw = (weights.astype("<f4"), keep)
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
                "process_id": pids[keep].astype("<i2"),
                "is_signal": np.full(n_kept, recipe.is_signal, "u1"),
                "weight": weights[keep].astype("<f4"),
            },
            meta={"source": recipe.name},
        )

    def _final_state(self, raw: ak.Array) -> Particles:
        return self._table.final_state(raw)

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


def _no_particles() -> Particles:
    empty = np.zeros(0)
    pid = np.zeros(0, np.int32)
    return Particles(np.zeros(0, np.int64), empty, empty, empty, empty, pid, empty)


def _poisson_at_least_one(rng: np.random.Generator, mu: float, n: int) -> np.ndarray:
    """``n`` draws of Poisson(``mu``) given >= 1 (zeros redrawn)."""
    out = rng.poisson(mu, n)
    for _ in range(10_000):
        zero = out == 0
        if not zero.any():
            return out
        out[zero] = rng.poisson(mu, int(zero.sum()))
    out[out == 0] = 1  # mu so small that a crossing almost never has an interaction
    return out


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

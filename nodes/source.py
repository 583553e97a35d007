"""The source node: events from generator recipes or replayed files, mixed, numbered, paced.

A source has a background stream and an optional signal stream. Each stream is a list of
components with weights; a component is either a generator recipe (a table
``{process = "wprime", m_x_gev = 300}``, shorthand ``"wprime?m_x_gev=300"``) or a replay
of files (``{layout = "lhco-features", paths = ["a.h5", "b*.h5"]}``, shorthand
``"lhco-features:a.h5,b*.h5"``; layouts as in ``simulator.replay.READERS``). Every batch
takes ``signal_fraction`` of its events from the signal stream (S/B = f / (1 - f)), split
over the components by weight. The split is deterministic: cumulative counts follow the
targets to within one event, so a run of N events holds floor(f N) signal events. Events
are shuffled within the batch, numbered (run, lumi, event) and sent on port ``out``.
Truth keeps each event's process id; ``is_signal`` says which stream it came from (1
signal, 0 background), except that replayed background files keep their own labels (the
raw LHCO file mixes both).

Replay the LHCO R&D features with 1% signal, looping the files:

    lhco = "../shared/data/lhco-rnd-100k"
    SourceConfig(
        background=({"layout": "lhco-features", "paths": [f"{lhco}/scalars_bkg*.h5"]},),
        signal=({"layout": "lhco-features", "paths": [f"{lhco}/scalars_sig*.h5"]},),
        signal_fraction=0.01,
        loop=True,
    )

Weights and rates in Hz: with ``weighting = "cross_section"`` every event's truth
``weight`` is the cross section it stands for, in mb, so that the stream's mean weight is
the total cross section of what it mixes: a generator component's events carry Pythia's
cross section (``EventGenerator.block(cross_section_weights=True)``: ``sigmaGen`` times
the filter efficiency, Pythia's own event weights included when a recipe biases its
sampling) divided by the component's share of the stream. A selection of the stream then
has the rate ``R = L * sum(w) / N`` over the N events the source emitted (``L`` in
cm^-2 s^-1, 1 mb = 1e-27 cm^2), with the error ``L * sqrt(sum(w^2)) / N``. Use pT-hat
slices as components (``"qcd?pthat_min_gev=200&pthat_max_gev=400"``): each slice keeps
its own cross section and a constant weight, and ``background_weights`` choose how many
events each slice gets without changing the rates. With ``weighting = "unit"`` (the
default, and the only choice for replayed files, which carry no cross section) each
event is one bunch crossing and ``R = crossing_rate_hz * sum(w) / N``. Either way the
factor in front of ``sum(w) / N`` is ``hz_per_weight``; the source writes it and
``events_per_lumi`` into every batch's metadata, so that downstream nodes can turn their
own weighted counts into rates per lumi block.

Bunch crossings with pileup (``weighting = "crossing"``, the default farm's): every event
is a bunch crossing at ``crossing_rate_hz``. Pileup is premixed: a library of
``pileup_library_events`` minimum-bias events is generated once per source (shared by its
components; every generator process builds the same one), and each generated event gets
Poisson(mu) library events overlaid at particle level before the detector model. mu
follows a profile per lumi block: ``pileup_mu`` constant, or a linear ramp to
``pileup_mu_end`` over ``pileup_ramp_lumis`` blocks (a block of events is generated with
the mu of the lumi block of the next event to leave, so near a block boundary a few
events carry the previous block's mu). The background is the ``inclusive`` recipe
(``simulator.recipes.InclusiveQCD``: minimum bias stitched to pT^4-biased QCD), whose
events carry the share of all crossings they stand for (``EventGenerator.block``;
``"inclusive?pileup_tilt_per_gev=0.004"`` also favours busy pileup, weighted back); any
other process (a signal, or a rare background) is an extra interaction whose chance per
crossing is ``L * sigma / crossing_rate_hz``, so its events carry that, with sigma from
Pythia. Either way the weight is divided by the component's share of the stream, and a
selection's rate is ``crossing_rate_hz * sum(w) / N`` (``hz_per_weight`` is the crossing
rate). The stated luminosity and mu should agree: mu = L * sigma_inel / crossing rate is
40 at 2e34 cm^-2 s^-1 with 80 mb and 40 MHz; the pileup itself is non-diffractive only.
The report's ``pileup`` table gives the profile and the mean mu generated.

Pacing: ``rate_hz`` > 0 emits batches so that the average is ``rate_hz`` events per second
(it falls behind, never bursts more than one second's worth, when production is slower);
0 runs as fast as the outputs take the batches. The achieved rate is the Prometheus gauge
``source_rate_events_per_second{node}``.

Bad input never stops the source: a file that cannot be read is counted in
``source_bad_input_total{reason="bad_file"}``, named in the report's ``bad_file_paths``
and skipped (``trigfarm run``/``replay`` then exit non-zero unless told to skip bad files);
a bad row (NaN) is left out, counted as ``reason="bad_row"`` and accounted as a dropped
event.
"""

from __future__ import annotations

import logging
import signal
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import parse_qsl

import numpy as np
import pydantic
from prometheus_client import Counter, Gauge
from pydantic import AfterValidator, ConfigDict, Field, model_validator

from simulator.detector import DetectorModel
from simulator.generator import EventGenerator, derived_seed, pileup_library
from simulator.jets import JetConfig
from simulator.recipes import PROCESSES, InclusiveQCD, Recipe, make_recipe, parse_parameter
from simulator.replay import READERS, expand_paths, reader_for, replay_component
from stream.batch import EventBatch
from stream.errors import DataFileError
from stream.node import Emit, Outcome, Producer

log = logging.getLogger(__name__)

SOURCE_RATE = Gauge(
    "source_rate_events_per_second", "Events emitted per second (last few seconds)", ["node"]
)
SOURCE_TARGET_RATE = Gauge(
    "source_target_rate_events_per_second", "Configured event rate (0: unpaced)", ["node"]
)
SOURCE_EVENTS = Counter("source_events", "Events emitted, by stream", ["node", "stream"])
SOURCE_BAD_INPUT = Counter(
    "source_bad_input", "Unreadable files and rows skipped by the source", ["node", "reason"]
)

Weighting = Literal["unit", "cross_section", "crossing"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
#: 1 mb in cm^2.
MB_CM2 = 1e-27


def _component(spec: str | Mapping[str, Any]) -> str | Mapping[str, Any]:
    """``spec`` if it parses as a component (``parse_component``)."""
    parse_component(spec)
    return spec


_Components = tuple[Annotated[str | Mapping[str, Any], AfterValidator(_component)], ...]
_Weights = tuple[Annotated[float, Field(ge=0)], ...]
_Count = Annotated[int, Field(ge=1)]
_AtLeastZero = Annotated[int, Field(ge=0)]
_Mu = Annotated[float, Field(ge=0, le=1000)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class SourceConfig:
    """The source's parameters (plain values, so a TOML table can fill it).

    Attributes:
        background: component specs of the background stream (see module doc).
        background_weights: relative weights (default: equal).
        signal: component specs of the signal stream (may be empty).
        signal_weights: relative weights (default: equal).
        signal_fraction: share of events taken from the signal stream, in [0, 1).
        rate_hz: target events per second; 0 is as fast as possible.
        batch_size: events per emitted batch.
        max_events: stop after this many events; 0 is no limit.
        loop: start replayed files again when they end (otherwise the source stops).
        run: the run number written on every event.
        first_event: number of the first event.
        events_per_lumi: events per luminosity block (lumi = 1 + index // this).
        seed: seeds the generators and the shuffling.
        chunk_size: events read per replay chunk.
        generator_workers: processes per generator component; 0 generates in the node's
            own process (simple, but the node is busy for a whole block at a time).
        generator_block: events per generator block.
        weighting: ``"unit"``, ``"cross_section"`` or ``"crossing"`` (module doc).
        luminosity_cm2s: instantaneous luminosity for rates in Hz (cross-section weights;
            with ``"crossing"``, the signals' and other rare processes').
        crossing_rate_hz: bunch-crossing rate (the rate of a unit-weight stream).
        pileup_mu: mean number of pileup interactions premixed into every event (0: none).
        pileup_mu_end: with a ramp, mu in lumi block ``pileup_ramp_lumis`` (and after);
            ``None`` keeps ``pileup_mu`` constant.
        pileup_ramp_lumis: lumi blocks the ramp takes (mu is linear in the lumi block).
        pileup_library_events: minimum-bias events in the pileup library.
    """

    background: Annotated[_Components, Field(min_length=1)] = ("qcd",)
    background_weights: _Weights = ()
    signal: _Components = ()
    signal_weights: _Weights = ()
    signal_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    rate_hz: Annotated[float, Field(ge=0)] = 0.0
    batch_size: _Count = 256
    max_events: _AtLeastZero = 0
    loop: bool = False
    run: _AtLeastZero = 1
    first_event: _AtLeastZero = 1
    events_per_lumi: _Count = 100_000
    seed: int = 1
    chunk_size: _Count = 4096
    generator_workers: _AtLeastZero = 0
    generator_block: _Count = 64
    weighting: Weighting = "unit"
    luminosity_cm2s: Annotated[float, Field(gt=0)] = 2e34
    crossing_rate_hz: Annotated[float, Field(gt=0)] = 40e6
    pileup_mu: _Mu = 0.0
    pileup_mu_end: _Mu | None = None
    pileup_ramp_lumis: _Count = 1
    pileup_library_events: _Count = 2000

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        for stream in ("background", "signal"):
            specs, weights = getattr(self, stream), getattr(self, f"{stream}_weights")
            if weights and len(weights) != len(specs):
                msg = f"{stream}_weights has {len(weights)} entries for {len(specs)} components"
                raise ValueError(msg)
            if weights and sum(weights) <= 0:
                msg = f"{stream}_weights must have a positive sum, got {weights}"
                raise ValueError(msg)
        if self.signal_fraction > 0 and not self.signal:
            raise ValueError("signal_fraction > 0 needs signal components")
        pileup = self.pileup_mu > 0 or bool(self.pileup_mu_end)
        if self.weighting != "unit" or pileup:
            replays = [s for s in (*self.background, *self.signal) if parse_component(s).layout]
            if replays:
                what = f"weighting {self.weighting!r}" if self.weighting != "unit" else "pileup"
                msg = f"{what} needs generator components, not {replays}"
                raise ValueError(msg)
        if self.weighting == "crossing" and not self.pileup_mu > 0:
            raise ValueError("weighting 'crossing' needs pileup_mu > 0 (premixed pileup)")
        return self

    def mu_at(self, lumi: int) -> float:
        """The pileup mu of lumi block ``lumi`` (1-based) under the configured profile."""
        if self.pileup_mu_end is None or self.pileup_ramp_lumis == 1:
            return self.pileup_mu if self.pileup_mu_end is None else self.pileup_mu_end
        step = min(max(lumi - 1, 0), self.pileup_ramp_lumis - 1) / (self.pileup_ramp_lumis - 1)
        return self.pileup_mu + (self.pileup_mu_end - self.pileup_mu) * step


@dataclass(frozen=True, slots=True)
class ComponentSpec:
    """A parsed component: a recipe, or a replay layout with its paths."""

    text: str
    recipe: Recipe | None = None
    layout: str | None = None
    paths: tuple[str, ...] = ()


def parse_component(spec: str | Mapping[str, Any]) -> ComponentSpec:
    """Parse a component: a table (``{process = "wprime", m_x_gev = 300}`` or
    ``{layout = "lhco-features", paths = ["a.h5"]}``) or its shorthand (``"qcd"``,
    ``"wprime?m_x_gev=300&m_y_gev=80"``, ``"lhco-features:a.h5,b*.h5"``).

    Raises:
        ValueError: an unknown process or layout, or a bad parameter (names the spec).
    """
    replay = replay_component(spec)
    if replay is not None:  # named as in its shorthand, for reports (never parsed again)
        return ComponentSpec(
            f"{replay[0]}:{','.join(replay[1])}", layout=replay[0], paths=replay[1]
        )
    if isinstance(spec, str):
        text = spec
        name, _, query = spec.partition("?")
        parameters = [f"{k}={v}" for k, v in parse_qsl(query)]
    else:
        name = str(spec.get("process", ""))
        parameters = [f"{k}={v}" for k, v in spec.items() if k != "process"]
        text = f"{name}?{'&'.join(parameters)}" if parameters else name
    if name not in PROCESSES:
        msg = (
            f"component {text!r} is neither a process ({', '.join(PROCESSES)}) nor a "
            f"replay of files with a layout in ({', '.join(sorted(READERS))})"
        )
        raise ValueError(msg)
    base = PROCESSES[name]
    changes = dict(parse_parameter(base, parameter) for parameter in parameters)
    return ComponentSpec(text, recipe=make_recipe(name, **changes))


class Component(ABC):
    """A stream of events that hands them out by count."""

    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec
        self.exhausted = False
        self.bad_files = 0
        self.bad_file_paths: list[str] = []
        self.bad_rows = 0
        self._buffer: deque[EventBatch] = deque()
        self._buffered = 0

    def take(self, n: int) -> list[EventBatch]:
        """Up to ``n`` events (fewer only once exhausted), as consecutive pieces."""
        while self._buffered < n and not self.exhausted:
            self._fill()
        out: list[EventBatch] = []
        need = n
        while need > 0 and self._buffer:
            head = self._buffer.popleft()
            if len(head) > need:
                self._buffer.appendleft(head.select(slice(need, None)))
                head = head.select(slice(0, need))
            out.append(head)
            need -= len(head)
        self._buffered -= n - need
        return out

    def ready(self, n: int) -> bool:
        """Whether ``take(n)`` would return without waiting for generation."""
        del n
        return True

    def close(self) -> None:  # noqa: B027 (optional hook: most components hold nothing)
        """Release processes or files."""

    def _push(self, batch: EventBatch) -> None:
        if len(batch):
            self._buffer.append(batch)
            self._buffered += len(batch)

    @abstractmethod
    def _fill(self) -> None:
        """Buffer more events or set ``exhausted``."""


class ReplayComponent(Component):
    """Files of one layout, read in order, chunk by chunk; optionally looped."""

    def __init__(self, spec: ComponentSpec, *, loop: bool, chunk_size: int) -> None:
        super().__init__(spec)
        assert spec.layout is not None
        self._reader = reader_for(spec.layout)
        self._paths = expand_paths(spec.paths)
        self._loop = loop
        self._chunk_size = chunk_size
        self._file_index = 0
        self._iterator: Any = None
        self._events_this_pass = 0
        self.passes = 0

    def _fill(self) -> None:
        while True:
            if self._iterator is None:
                if self._file_index == len(self._paths):
                    self.passes += 1
                    if not self._loop or self._events_this_pass == 0:
                        self.exhausted = True
                        return
                    self._file_index, self._events_this_pass = 0, 0
                path = self._paths[self._file_index]
                self._iterator = self._reader(
                    [path], chunk_size=self._chunk_size, skip_bad_rows=True
                )
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._next_file()
                continue
            except (DataFileError, OSError, ValueError) as exc:
                self.bad_files += 1
                path = self._paths[self._file_index]
                if str(path) not in self.bad_file_paths:
                    self.bad_file_paths.append(str(path))
                log.warning("skipping the rest of %s: %s", path, exc)
                self._next_file()
                continue
            self.bad_rows += int(batch.meta.get("bad_rows") or 0)
            self._events_this_pass += len(batch)
            self._push(batch)
            return

    def _next_file(self) -> None:
        self._iterator = None
        self._file_index += 1


class GeneratorComponent(Component):
    """A recipe generated block by block, in this process or in worker processes."""

    def __init__(
        self,
        spec: ComponentSpec,
        *,
        seed: int,
        block: int,
        workers: int,
        detector: DetectorModel | None = None,
        jets: JetConfig | None = None,
        cross_section_weights: bool = False,
        library: tuple[int, int] | None = None,
        mu_at: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(spec)
        assert spec.recipe is not None
        self._weighted = cross_section_weights
        self._mu_at = mu_at or (lambda: 0.0)
        self.mu_sum = 0.0  # sum of mu over the events generated
        self.events_generated = 0
        self._seed = seed
        self._block = block
        self._next_index = 0
        self._generator: EventGenerator | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._futures: deque[Future[Any]] = deque()
        detector, jets = detector or DetectorModel(), jets or JetConfig()
        if workers == 0:
            pileup = None if library is None else pileup_library(library[0], seed=library[1])
            self._generator = EventGenerator(
                spec.recipe, seed=seed, detector=detector, jets=jets, pileup_library=pileup
            )
        else:
            level = logging.getLogger().getEffectiveLevel()
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(spec.recipe, seed, detector, jets, level, library),
            )
            self._prefetch = 2 * workers
            self._top_up()

    def _top_up(self) -> None:
        assert self._pool is not None
        while len(self._futures) < self._prefetch:
            mu = self._mu_at()
            task = (self._next_index, self._block, self._weighted, mu)
            self._futures.append(self._pool.submit(_run_block, task))
            self._next_index += 1
            self.mu_sum += mu * self._block
            self.events_generated += self._block

    def ready(self, n: int) -> bool:
        if self._pool is None or self._buffered >= n:
            return True
        done = 0
        for future in self._futures:
            if not future.done():
                break
            done += self._block
        return self._buffered + done >= n

    def _fill(self) -> None:
        if self._generator is not None:
            mu = self._mu_at()
            block = self._generator.block(
                self._next_index, self._block, cross_section_weights=self._weighted, mu=mu
            )
            self.mu_sum += mu * self._block
            self.events_generated += self._block
            self._push(block)
            self._next_index += 1
            return
        self._top_up()
        columns, truth = self._futures.popleft().result()
        self._push(EventBatch(columns, truth, {"source": self.spec.text}))
        self._top_up()

    def close(self) -> None:
        if self._pool is not None:
            for future in self._futures:
                future.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


_WORKER: EventGenerator | None = None


def _init_worker(
    recipe: Recipe,
    seed: int,
    detector: DetectorModel,
    jets: JetConfig,
    level: int,
    library: tuple[int, int] | None,
) -> None:
    """Set up a generator worker process (the node handles SIGINT, not its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=level)
    global _WORKER
    pileup = None if library is None else pileup_library(library[0], seed=library[1])
    _WORKER = EventGenerator(recipe, seed=seed, detector=detector, jets=jets, pileup_library=pileup)


def _run_block(
    task: tuple[int, int, bool, float],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Worker side: block ``index`` of ``n_events``, as plain dicts (mapping proxies do not
    pickle)."""
    index, n_events, weighted, mu = task
    assert _WORKER is not None, "worker not initialised"
    batch = _WORKER.block(index, n_events, cross_section_weights=weighted, mu=mu)
    return dict(batch.columns), dict(batch.truth)


def _apportion(weights: np.ndarray, done: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` events so that cumulative counts ``done + share`` track ``weights``."""
    if n == 0:
        return np.zeros(weights.size, np.int64)
    target = weights / weights.sum() * (done.sum() + n) - done
    share = np.clip(np.floor(target), 0, None).astype(np.int64)
    while share.sum() > n:
        share[np.argmax(share - target)] -= 1
    remainder = target - share
    for i in np.argsort(-remainder, kind="stable")[: n - int(share.sum())]:
        share[i] += 1
    return share


@dataclass(slots=True)
class _Stream:
    name: str
    components: list[Component]
    weights: np.ndarray
    done: np.ndarray
    fraction: float = 1.0  # the stream's share of all events

    def share(self, index: int) -> float:
        """Component ``index``'s share of all events the source emits."""
        return self.fraction * float(self.weights[index] / self.weights.sum())


class Source(Producer):
    """Mixes, numbers and paces events; see the module doc. Emits on port ``out``."""

    def __init__(
        self,
        config: SourceConfig,
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        detector: DetectorModel | None = None,
        jets: JetConfig | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self._clock = clock
        self._rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7]))
        self._streams: list[_Stream] = []
        # One library per source, shared by its components (the same seed in every
        # worker process, so that every crossing draws from the same events).
        library = (
            (config.pileup_library_events, derived_seed(config.seed, 77))
            if config.pileup_mu > 0 or config.pileup_mu_end
            else None
        )
        self.emitted = 0
        index = 0
        for stream in ("background", "signal"):
            specs = getattr(config, stream)
            weights = getattr(config, f"{stream}_weights") or (1.0,) * len(specs)
            components: list[Component] = []
            for text in specs:
                spec = parse_component(text)
                if spec.layout is not None:
                    components.append(
                        ReplayComponent(spec, loop=config.loop, chunk_size=config.chunk_size)
                    )
                else:
                    components.append(
                        GeneratorComponent(
                            spec,
                            seed=derived_seed(config.seed, 1000 + index),
                            block=config.generator_block,
                            workers=config.generator_workers,
                            detector=detector,
                            jets=jets,
                            cross_section_weights=config.weighting != "unit",
                            library=library,
                            mu_at=self._current_mu,
                        )
                    )
                index += 1
            self._streams.append(
                _Stream(
                    stream,
                    components,
                    np.asarray(weights, float),
                    np.zeros(len(components), np.int64),
                )
            )
        f = config.signal_fraction
        self._streams[0].fraction, self._streams[1].fraction = 1.0 - f, f
        self.hz_per_weight = (
            config.luminosity_cm2s * MB_CM2
            if config.weighting == "cross_section"
            else config.crossing_rate_hz
        )
        # "crossing": a process other than the inclusive sample is an extra interaction
        # in a crossing, with the chance L * sigma / crossing rate per crossing.
        self._per_crossing_per_mb = config.luminosity_cm2s * MB_CM2 / config.crossing_rate_hz
        n_components = sum(len(s.components) for s in self._streams)
        # Per component: the weight it came with (cross section in mb, or Pythia's) summed.
        self._generated_weight = np.zeros(n_components)
        self.weight_sum = 0.0
        self.weight2_sum = 0.0
        self.signal_emitted = 0
        self._dropped_bad_rows = 0
        self._reported_bad = {"bad_file": 0, "bad_row": 0}
        self.rate_hz = 0.0
        self._next_due_s: float | None = None
        self._last_now_s = clock()
        self._window: deque[tuple[float, int]] = deque()
        self._plan: list[np.ndarray] | None = None
        self._done = False
        self._dropped_columns: set[str] = set()
        SOURCE_TARGET_RATE.labels(node=name).set(config.rate_hz)
        log.info(
            "source %s: background %s, signal %s at fraction %g, rate %s",
            name,
            list(config.background),
            list(config.signal),
            config.signal_fraction,
            f"{config.rate_hz:g} Hz" if config.rate_hz else "unpaced",
        )

    def _current_mu(self) -> float:
        """mu for the events generated now: the profile's at the lumi block of the next
        event to leave (a component generates at most a block ahead of its use)."""
        return self.config.mu_at(1 + self.emitted // self.config.events_per_lumi)

    # -- planning ------------------------------------------------------------------------

    def _next_size(self) -> int:
        n = self.config.batch_size
        if self.config.max_events:
            n = min(n, self.config.max_events - self.emitted)
        return n

    def _make_plan(self) -> list[np.ndarray]:
        if self._plan is None:
            n = self._next_size()
            f = self.config.signal_fraction
            n_signal = int(np.floor(f * (self.emitted + n))) - self.signal_emitted
            n_signal = min(max(n_signal, 0), n)
            counts = (n - n_signal, n_signal)
            self._plan = [
                _apportion(stream.weights, stream.done, k)
                for stream, k in zip(self._streams, counts, strict=True)
            ]
        return self._plan

    # -- Producer ------------------------------------------------------------------------

    def wait_s(self, now_s: float) -> float:
        self._last_now_s = now_s
        if self._done or self._next_size() <= 0:
            return 0.0
        if self.config.rate_hz > 0:
            if self._next_due_s is None:
                self._next_due_s = now_s
            if self._next_due_s > now_s:
                return self._next_due_s - now_s
        plan = self._make_plan()
        for stream, shares in zip(self._streams, plan, strict=True):
            for component, k in zip(stream.components, shares, strict=True):
                if k and not component.ready(int(k)):
                    return 0.02
        return 0.0

    def produce(self) -> Outcome | None:
        if self._done or self._next_size() <= 0:
            return None
        plan = self._make_plan()
        self._plan = None
        parts: list[EventBatch] = []
        short = False
        n_signal = 0
        offset = 0
        for stream, shares in zip(self._streams, plan, strict=True):
            for i, (component, k) in enumerate(zip(stream.components, shares, strict=True)):
                if k == 0:
                    continue
                pieces = component.take(int(k))
                got = sum(len(p) for p in pieces)
                stream.done[i] += got
                short |= got < k
                if stream.name == "signal":
                    n_signal += got
                    pieces = [_mark(p, 1) for p in pieces]
                elif isinstance(component, GeneratorComponent):
                    pieces = [_mark(p, 0) for p in pieces]
                pieces = [_with_truth(p) for p in pieces]
                self._generated_weight[offset + i] += sum(
                    float(p.truth["weight"].astype(np.float64).sum()) for p in pieces
                )
                if self.config.weighting == "cross_section":
                    pieces = [_scale_weight(p, 1.0 / stream.share(i)) for p in pieces]
                elif self.config.weighting == "crossing":
                    inclusive = isinstance(component.spec.recipe, InclusiveQCD)
                    factor = 1.0 if inclusive else self._per_crossing_per_mb
                    pieces = [_scale_weight(p, factor / stream.share(i)) for p in pieces]
                parts.extend(pieces)
            offset += len(stream.components)
        dropped = self._collect_bad_input()
        if short:
            self._done = True
            log.info("source %s: a component ran out after %d events", self.name, self.emitted)
        if not parts:
            return Outcome(dropped={"bad_input": dropped}) if dropped else None
        batch = self._number(self._concat(parts))
        n = len(batch)
        weight = batch.truth["weight"].astype(np.float64)
        self.weight_sum += float(weight.sum())
        self.weight2_sum += float(np.square(weight).sum())
        self.emitted += n
        self.signal_emitted += n_signal
        SOURCE_EVENTS.labels(node=self.name, stream="background").inc(n - n_signal)
        SOURCE_EVENTS.labels(node=self.name, stream="signal").inc(n_signal)
        self._update_rate(n)
        if self.config.rate_hz > 0 and self._next_due_s is not None:
            # Fall behind rather than burst: owe at most one second of events.
            floor_s = self._last_now_s - 1.0
            self._next_due_s = max(self._next_due_s, floor_s) + n / self.config.rate_hz
        outcome_dropped = {"bad_input": dropped} if dropped else {}
        return Outcome(emits=(Emit("out", batch),), accepted=n, dropped=outcome_dropped)

    def finish(self) -> tuple[Emit, ...]:
        for stream in self._streams:
            for component in stream.components:
                component.close()
        return ()

    def report(self) -> dict[str, Any]:
        done = {
            c.spec.text: (int(s.done[i]), s.share(i))
            for s in self._streams
            for i, c in enumerate(s.components)
        }
        mean_weight = {
            text: float(total / n) if n else None
            for (text, (n, _)), total in zip(done.items(), self._generated_weight, strict=True)
        }
        return {
            "emitted": self.emitted,
            "signal_emitted": self.signal_emitted,
            "rate_hz": self.rate_hz,
            "weighting": self.config.weighting,
            "hz_per_weight": self.hz_per_weight,
            "luminosity_cm2s": self.config.luminosity_cm2s,
            "crossing_rate_hz": self.config.crossing_rate_hz,
            "events_per_lumi": self.config.events_per_lumi,
            "weight_sum": self.weight_sum,
            "weight2_sum": self.weight2_sum,
            # Cross-section weights: each component's cross section estimate (mb), the mean
            # weight its events came with; unit weights: their mean weight.
            "component_mean_weight": mean_weight,
            "component_share": {text: share for text, (_, share) in done.items()},
            "components": {
                c.spec.text: int(s.done[i])
                for s in self._streams
                for i, c in enumerate(s.components)
            },
            "bad_files": self._reported_bad["bad_file"],
            "bad_file_paths": sorted(
                {p for s in self._streams for c in s.components for p in c.bad_file_paths}
            ),
            "bad_rows": self._reported_bad["bad_row"],
            "pileup": self._pileup_report(),
            "process_names": {
                str(c.spec.recipe.process_id): c.spec.recipe.name
                for s in self._streams
                for c in s.components
                if c.spec.recipe is not None
            },
        }

    def _pileup_report(self) -> dict[str, Any] | None:
        cfg = self.config
        if not (cfg.pileup_mu > 0 or cfg.pileup_mu_end):
            return None
        generated = [
            c for s in self._streams for c in s.components if isinstance(c, GeneratorComponent)
        ]
        events = sum(c.events_generated for c in generated)
        return {
            "mu": cfg.pileup_mu,
            "mu_end": cfg.pileup_mu_end,
            "ramp_lumis": cfg.pileup_ramp_lumis,
            "library_events": cfg.pileup_library_events,
            "mu_mean": sum(c.mu_sum for c in generated) / events if events else None,
        }

    # -- helpers -------------------------------------------------------------------------

    def _collect_bad_input(self) -> int:
        files = sum(c.bad_files for s in self._streams for c in s.components)
        rows = sum(c.bad_rows for s in self._streams for c in s.components)
        new_files = files - self._reported_bad["bad_file"]
        new_rows = rows - self._reported_bad["bad_row"]
        if new_files:
            SOURCE_BAD_INPUT.labels(node=self.name, reason="bad_file").inc(new_files)
        if new_rows:
            SOURCE_BAD_INPUT.labels(node=self.name, reason="bad_row").inc(new_rows)
        self._reported_bad = {"bad_file": files, "bad_row": rows}
        return new_rows

    def _concat(self, parts: list[EventBatch]) -> EventBatch:
        common = set.intersection(*(set(p.columns) for p in parts))
        lost = set().union(*(set(p.columns) for p in parts)) - common
        if lost - self._dropped_columns:
            log.warning(
                "source %s: components differ in columns; dropping %s",
                self.name,
                sorted(lost - self._dropped_columns),
            )
            self._dropped_columns |= lost
        trimmed = [EventBatch({k: p.columns[k] for k in common}, p.truth, p.meta) for p in parts]
        batch = EventBatch.concat(trimmed) if len(trimmed) > 1 else trimmed[0]
        order = self._rng.permutation(len(batch))
        return batch.select(order)

    def _number(self, batch: EventBatch) -> EventBatch:
        n = len(batch)
        index = np.arange(self.emitted, self.emitted + n, dtype=np.uint64)
        cfg = self.config
        return EventBatch(
            {
                **batch.columns,
                "run": np.full(n, cfg.run, "<u4"),
                "lumi": (1 + index // cfg.events_per_lumi).astype("<u4"),
                "event": (cfg.first_event + index).astype("<u8"),
            },
            batch.truth,
            {
                "source": self.name,
                "hz_per_weight": self.hz_per_weight,
                "events_per_lumi": cfg.events_per_lumi,
            },
        )

    def _update_rate(self, n: int) -> None:
        now = self._clock()
        self._window.append((now, n))
        while len(self._window) > 2 and now - self._window[0][0] > 5.0:
            self._window.popleft()
        span = now - self._window[0][0]
        if span > 0:
            total = sum(k for _, k in list(self._window)[1:])
            self.rate_hz = total / span
            SOURCE_RATE.labels(node=self.name).set(self.rate_hz)


def _mark(batch: EventBatch, is_signal: int) -> EventBatch:
    truth = dict(batch.truth)
    truth["is_signal"] = np.full(len(batch), is_signal, "u1")
    return EventBatch(batch.columns, truth, batch.meta)


def _with_truth(batch: EventBatch) -> EventBatch:
    """Every event leaves with process_id, is_signal and weight (defaults if missing)."""
    n = len(batch)
    defaults = {
        "process_id": np.full(n, -1, "<i2"),
        "is_signal": np.zeros(n, "u1"),
        "weight": np.ones(n, "<f4"),
    }
    if set(defaults) <= set(batch.truth):
        return batch
    return EventBatch(batch.columns, {**defaults, **batch.truth}, batch.meta)


def _scale_weight(batch: EventBatch, factor: float) -> EventBatch:
    weight = (batch.truth["weight"].astype(np.float64) * factor).astype("<f4")
    return EventBatch(batch.columns, {**batch.truth, "weight": weight}, batch.meta)


def build(config: SourceConfig, *, name: str) -> Source:
    """The source worker for ``config`` (starts generator processes, opens nothing else)."""
    return Source(config, name=name)


def lhco_replay(
    background: Sequence[str | Path],
    signal: Sequence[str | Path],
    signal_fraction: float,
    **options: Any,
) -> SourceConfig:
    """A ``SourceConfig`` replaying LHCO R&D feature files (paths or globs) at a signal
    fraction, looping by default; ``options`` set any other field."""
    return SourceConfig(
        background=({"layout": "lhco-features", "paths": [str(p) for p in background]},),
        signal=({"layout": "lhco-features", "paths": [str(p) for p in signal]},) if signal else (),
        signal_fraction=signal_fraction,
        loop=options.pop("loop", True),
        **options,
    )

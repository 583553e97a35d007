"""Writing a process to an event cache, in parallel worker processes.

Events are made in blocks of ``block_size``; block ``i`` is re-seeded from ``(seed, i)``
(see ``simulator.generator``), so every block has its own random stream and the file is
the same whatever the number of workers. Workers are separate processes (Pythia holds the
GIL), started with ``spawn``, each with its own Pythia; the parent writes blocks in order.

An interrupt (SIGINT or SIGTERM) lets the block in progress finish, stops the workers and
leaves a valid file marked partial with every block finished so far; a second one stops at
once. The signal only sets a flag that the loop checks between blocks, so it can never be
swallowed by library code it happens to interrupt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import platform
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from simulator.detector import DetectorModel
from simulator.generator import EventGenerator, GeneratorStats, resolve
from simulator.jets import JetConfig
from simulator.recipes import PROCESSES, Recipe
from stream.batch import EventBatch
from stream.eventfile import CacheInfo, CacheWriter

log = logging.getLogger(__name__)

_VERSIONED = ("trigfarm", "pythia8mc", "fastjet", "awkward", "numpy", "h5py")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the events (and Python's)."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def recipe_from_dict(body: dict[str, Any]) -> Recipe:
    """Rebuild a recipe from ``Recipe.to_dict()`` (e.g. a cache file's ``recipe`` attribute)."""
    kinds = {type(r).kind: type(r) for r in PROCESSES.values()}
    fields = dict(body)
    kind = fields.pop("kind", None)
    if kind not in kinds:
        msg = f"unknown recipe kind {kind!r}; known: {sorted(kinds)}"
        raise ValueError(msg)
    return kinds[kind](**fields)  # its event filter from a table, lists as tuples


def detector_from_dict(body: dict[str, Any]) -> DetectorModel:
    """Rebuild a detector model from ``dataclasses.asdict`` (cell grids from tables)."""
    return DetectorModel(**body)


@dataclass(frozen=True, slots=True)
class Production:
    """What ``simulate_to_file`` made."""

    info: CacheInfo | None  # None: interrupted before the first block, no file left
    elapsed_s: float
    stats: GeneratorStats
    interrupted: bool

    @property
    def n_events(self) -> int:
        return 0 if self.info is None else self.info.n_events

    @property
    def events_per_s(self) -> float:
        return self.n_events / self.elapsed_s if self.elapsed_s > 0 else 0.0


# -- worker side ----------------------------------------------------------------------------

_WORKER: EventGenerator | None = None


def init_worker(
    recipe: Recipe,
    seed: int,
    detector: DetectorModel,
    jets: JetConfig,
    level: int,
    layout: str = "full",
) -> None:
    """Set up a worker process: its own ``EventGenerator`` (the parent handles SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=level)
    global _WORKER
    _WORKER = EventGenerator(recipe, seed=seed, detector=detector, jets=jets, layout=layout)


def run_block(
    task: tuple[int, int, int],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
    """Worker side: block ``index`` of ``n_events`` as plain column dicts and statistics."""
    index, n_events, first_event = task
    assert _WORKER is not None, "worker not initialised"
    before = dataclasses.replace(_WORKER.stats)
    batch = _WORKER.block(index, n_events, first_event=first_event)
    after = _WORKER.stats
    delta = {
        "tried": after.tried - before.tried,
        "aborted": after.aborted - before.aborted,
        "filtered": after.filtered - before.filtered,
        "kept": after.kept - before.kept,
        "pythia_errors": after.pythia_errors - before.pythia_errors,
    }
    # EventBatch holds read-only mapping proxies, which do not pickle: send plain dicts.
    return dict(batch.columns), dict(batch.truth), delta


# -- parent side ----------------------------------------------------------------------------


def _blocks(n_events: int, block_size: int) -> list[tuple[int, int, int]]:
    return [
        (i, min(block_size, n_events - start), start)
        for i, start in enumerate(range(0, n_events, block_size))
    ]


def _results(
    tasks: list[tuple[int, int, int]],
    workers: int,
    init_args: tuple[Any, ...],
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]]:
    if workers == 1:
        _init_worker_inline(*init_args)
        for task in tasks:
            yield run_block(task)
        return
    context = mp.get_context("spawn")
    with context.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        try:
            yield from pool.imap(run_block, tasks)
        finally:
            pool.terminate()


def _init_worker_inline(
    recipe: Recipe,
    seed: int,
    detector: DetectorModel,
    jets: JetConfig,
    level: int,
    layout: str = "full",
) -> None:
    del level
    global _WORKER
    _WORKER = EventGenerator(recipe, seed=seed, detector=detector, jets=jets, layout=layout)


@contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """An event set by the first SIGINT/SIGTERM (main thread only); the second one raises."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum: int, frame: object) -> None:
        del signum, frame
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, request)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def simulate_to_file(
    process: Recipe | str,
    n_events: int,
    out: str | Path,
    *,
    seed: int | None = None,
    workers: int = 1,
    block_size: int = 256,
    detector: DetectorModel | None = None,
    jets: JetConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
    layout: str = "full",
) -> Production:
    """Generate ``n_events`` of a process into the cache file ``out``.

    Arguments:
        process: a recipe or a name in ``PROCESSES``.
        seed: base seed (default: the recipe's); block ``i`` uses ``(seed, i)``.
        workers: worker processes (one per core is the fastest).
        block_size: events per block (the unit of work and of reproducibility).
        progress: show a tqdm progress bar on stderr.
        command: the command line, recorded in the file.
        layout: the columns, ``"full"`` or ``"features"`` (see ``simulator.generator``).

    Returns:
        The file's description, the time taken, generator statistics and whether it was
        interrupted (then the file is partial; the interrupt is not re-raised).
    """
    if n_events < 1 or block_size < 1 or workers < 1:
        msg = (
            f"n_events, block_size and workers must be >= 1, "
            f"got {n_events}, {block_size}, {workers}"
        )
        raise ValueError(msg)
    recipe = resolve(process)
    seed = recipe.seed if seed is None else int(seed)
    detector = detector or DetectorModel()
    jets = jets or JetConfig()
    tasks = _blocks(n_events, block_size)
    workers = min(workers, len(tasks))
    attrs = {
        "process": recipe.name,
        "process_id": recipe.process_id,
        "is_signal": recipe.is_signal,
        "recipe": recipe.to_dict(),
        "pythia_settings": list(recipe.pythia_settings()),
        "detector": dataclasses.asdict(detector),
        "jets": dataclasses.asdict(jets),
        "seed": seed,
        "block_size": block_size,
        "layout": layout,
        "workers": workers,
        "n_requested": n_events,
        "versions": package_versions(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
    }
    totals = GeneratorStats()
    interrupted = False
    t0 = time.perf_counter()
    level = logging.getLogger().getEffectiveLevel()
    init_args = (recipe, seed, detector, jets, level, layout)
    writer = CacheWriter(out, attrs, overwrite=overwrite)
    bar = tqdm(total=n_events, unit="ev", desc=recipe.name, disable=not progress, smoothing=0.1)
    try:
        with _stop_requests() as stop:
            for columns, truth, delta in _results(tasks, workers, init_args):
                writer.append(EventBatch(columns, truth))
                for key, value in delta.items():
                    setattr(totals, key, getattr(totals, key) + value)
                bar.update(len(truth["process_id"]))
                if stop.is_set():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted after %d of %d events", writer.n_events, n_events)
    finally:
        bar.close()
        elapsed = time.perf_counter() - t0
        writer.set_attrs(
            generator_stats=json.loads(json.dumps(dataclasses.asdict(totals))),
            elapsed_s=elapsed,
        )
        info = writer.close(complete=not interrupted and writer.n_events == n_events)
    return Production(info, elapsed, totals, interrupted)

"""Large simulated datasets: chunked, resumable, checksummed and reproducible bit for bit.

A dataset recipe (``DATASET_RECIPES``) names its components, e.g. ``lhco-like``: QCD
dijets and W'->XY signal, both after the LHCO selection (a fat jet with pT > 1.2 TeV),
in the compact ``features`` layout (fat jets and the 8 features; no constituents).
``produce_dataset`` writes each component as chunk files of ``chunk_events`` events:

    <out>/manifest.json
    <out>/background/chunk-00000.h5, chunk-00001.h5, ...
    <out>/signal/chunk-00000.h5, ...

Every chunk is an event-cache file (``stream.eventfile``: ``read_cache`` and
``replay("cache", ...)`` read it) made of blocks of ``block_size`` events; block ``i`` of
a component is seeded from (component seed, ``i``), so a chunk's bytes depend only on
the manifest's settings, never on the number of workers or on interruptions. A chunk
is written under a temporary name, flushed and renamed, then its SHA-256 goes into the
manifest, which is itself replaced atomically. An interrupt (SIGINT/SIGTERM, or the
``stop`` callback) drops only the chunk in progress; running the same command again
checks the chunks already written against the manifest and makes the missing ones.
``verify_dataset`` recomputes every checksum and reports chunks that changed or are
missing.

Example:
    >>> from simulator.dataset import DATASET_RECIPES
    >>> recipe = DATASET_RECIPES["lhco-like"](2000)
    >>> [(c.name, c.n_events) for c in recipe.components]
    [('background', 2000), ('signal', 200)]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import h5py
import numpy as np
import pydantic
from pydantic import AfterValidator, ConfigDict, Field, model_validator
from tqdm import tqdm

from simulator.detector import DetectorModel
from simulator.generator import GeneratorStats, Layout, derived_seed
from simulator.jets import JetConfig
from simulator.recipes import EventFilter, Recipe, make_recipe
from stream.errors import DataFileError
from stream.eventfile import CACHE_FORMAT, CACHE_FORMAT_VERSION
from stream.schema import COLUMNS, SCHEMA_VERSION, TRUTH_COLUMNS

log = logging.getLogger(__name__)

DATASET_FORMAT = "trigfarm-dataset"
DATASET_FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: The LHCO R&D selection: at least one anti-kT R=1.0 jet with pT > 1.2 TeV.
LHCO_FATJET_PT_MIN_GEV = 1200.0


def _identifier(name: str) -> str:
    """``name`` if it is a plain identifier (it names the component's files)."""
    if not name.isidentifier():
        msg = f"component name must be a plain identifier, got {name!r}"
        raise ValueError(msg)
    return name


@pydantic.dataclasses.dataclass(
    frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid")
)
class Component:
    """One part of a dataset: ``n_events`` events (after the recipe's filter) of ``process``."""

    name: Annotated[str, AfterValidator(_identifier)]
    process: Recipe
    n_events: Annotated[int, Field(ge=1)]


@pydantic.dataclasses.dataclass(
    frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid")
)
class DatasetRecipe:
    """A named dataset: its components (each with its own seed stream) and the layout."""

    name: str
    components: Annotated[tuple[Component, ...], Field(min_length=1)]
    layout: Layout = "features"
    description: str = ""

    @model_validator(mode="after")
    def _distinct_names(self) -> DatasetRecipe:
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            msg = f"a dataset needs components with distinct names, got {names}"
            raise ValueError(msg)
        return self

    @property
    def n_events(self) -> int:
        return sum(c.n_events for c in self.components)


def lhco_like(n_background: int = 1_000_000, n_signal: int | None = None) -> DatasetRecipe:
    """LHCO R&D-like: QCD dijets (pT-hat > 1 TeV) and W'(3.5 TeV) -> X(500) Y(100),
    both kept only with a fat jet above 1.2 TeV; ``n_signal`` defaults to a tenth of the
    background (100k for the million)."""
    selection = EventFilter(fatjet_pt_gev=LHCO_FATJET_PT_MIN_GEV)
    n_signal = max(n_background // 10, 1) if n_signal is None else n_signal
    return DatasetRecipe(
        name="lhco-like",
        components=(
            Component(
                name="background",
                process=make_recipe("qcd", event_filter=selection),
                n_events=n_background,
            ),
            Component(
                name="signal",
                process=make_recipe("wprime", event_filter=selection),
                n_events=n_signal,
            ),
        ),
        description="QCD dijets + W'->XY after the LHCO fat-jet selection, features only",
    )


#: Dataset recipes by name: each takes (n_background, n_signal).
DATASET_RECIPES: Mapping[str, Callable[..., DatasetRecipe]] = {"lhco-like": lhco_like}


@dataclass(frozen=True, slots=True)
class DatasetResult:
    """What ``produce_dataset`` left on disk and how fast it went."""

    path: Path
    n_events: dict[str, int]  # per component, in finished chunks
    complete: bool
    interrupted: bool
    elapsed_s: float
    made_events: int  # events made by this call (resumed chunks excluded)
    stats: GeneratorStats  # this call's generator statistics

    @property
    def events_per_s(self) -> float:
        return self.made_events / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class DatasetCheck:
    """``verify_dataset``'s verdict: chunks whose bytes changed, chunks missing."""

    path: Path
    n_chunks: int
    corrupted: tuple[str, ...]
    missing: tuple[str, ...]
    complete: bool

    @property
    def ok(self) -> bool:
        return not self.corrupted and not self.missing


def _identity(
    recipe: DatasetRecipe,
    seed: int,
    block_size: int,
    chunk_events: int,
    detector: DetectorModel,
    jets: JetConfig,
) -> dict[str, Any]:
    """Everything the chunks' bytes depend on; a resumed run must match it exactly."""
    return json.loads(
        json.dumps(
            {
                "recipe": recipe.name,
                "layout": recipe.layout,
                "seed": seed,
                "block_size": block_size,
                "chunk_events": chunk_events,
                "components": [
                    {
                        "name": c.name,
                        "n_events": c.n_events,
                        "seed": _component_seed(seed, i),
                        "process": c.process.to_dict(),
                        "pythia_settings": list(c.process.pythia_settings()),
                    }
                    for i, c in enumerate(recipe.components)
                ],
                "detector": dataclasses.asdict(detector),
                "jets": dataclasses.asdict(jets),
            }
        )
    )


def _component_seed(seed: int, index: int) -> int:
    return derived_seed(seed, 100 + index)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, body: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        json.dump(body, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_chunk(
    path: Path,
    columns: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
) -> None:
    """Write one chunk as an event-cache file, deterministically (no timestamps)."""
    tmp = path.with_name(f".{path.name}.tmp")
    n = len(truth["process_id"])
    with h5py.File(tmp, "w", track_order=False) as handle:
        root = handle.attrs
        root["format"] = CACHE_FORMAT
        root["format_version"] = CACHE_FORMAT_VERSION
        root["schema_version"] = SCHEMA_VERSION
        root["complete"] = True
        root["n_events"] = n
        for key, value in attrs.items():
            root[key] = value if isinstance(value, str | int | float) else json.dumps(value)
        for group, table, specs in (("events", columns, COLUMNS), ("truth", truth, TRUTH_COLUMNS)):
            grp = handle.create_group(group, track_order=False)
            for name in sorted(table):
                grp.create_dataset(
                    name,
                    data=np.ascontiguousarray(table[name], dtype=np.dtype(specs[name].dtype)),
                    chunks=(min(n, 4096), *table[name].shape[1:]),
                    compression="lzf",
                    track_times=False,
                )
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _chunk_name(component: str, index: int) -> str:
    return f"{component}/chunk-{index:05d}.h5"


def _plan(recipe: DatasetRecipe, chunk_events: int, block_size: int) -> list[dict[str, Any]]:
    """Every chunk: component, index, first event, size and its blocks (index, size)."""
    chunks = []
    for component in recipe.components:
        for k, start in enumerate(range(0, component.n_events, chunk_events)):
            size = min(chunk_events, component.n_events - start)
            first_block = start // block_size
            blocks = [
                (first_block + j, min(block_size, size - j * block_size))
                for j in range(-(-size // block_size))
            ]
            chunks.append(
                {
                    "component": component.name,
                    "index": k,
                    "first_event": start,
                    "n_events": size,
                    "blocks": blocks,
                    "path": _chunk_name(component.name, k),
                }
            )
    return chunks


def produce_dataset(
    recipe: DatasetRecipe,
    out: str | Path,
    *,
    seed: int = 1,
    workers: int = 1,
    block_size: int = 500,
    chunk_events: int = 10_000,
    detector: DetectorModel | None = None,
    jets: JetConfig | None = None,
    repair: bool = False,
    progress: bool = True,
    command: str = "",
    stop: Callable[[], bool] | None = None,
) -> DatasetResult:
    """Make (or continue) the dataset ``recipe`` in the folder ``out``.

    Arguments:
        seed: base seed; component ``i`` uses a seed derived from (seed, 100 + i).
        workers: worker processes (one per core is the fastest).
        block_size: events per reproducible block; ``chunk_events`` must be a multiple.
        chunk_events: events per chunk file (the unit of resumption).
        repair: regenerate chunks whose checksum no longer matches (otherwise refuse).
        stop: checked between blocks; when it returns True the run stops as on Ctrl-C.

    Returns:
        The per-component events on disk, whether the dataset is complete, and the rate.

    Raises:
        ValueError: bad sizes, or ``out`` holds a dataset made with other settings.
        DataFileError: a chunk on disk does not match its checksum (without ``repair``).
    """
    # Imported here: the parallel machinery loads Pythia in the workers only.
    from simulator.production import _results, _stop_requests, package_versions

    if block_size < 1 or chunk_events < 1 or workers < 1:
        msg = (
            "block_size, chunk_events and workers must be >= 1, "
            f"got {block_size}, {chunk_events}, {workers}"
        )
        raise ValueError(msg)
    if chunk_events % block_size:
        msg = f"chunk_events ({chunk_events}) must be a multiple of block_size ({block_size})"
        raise ValueError(msg)
    out = Path(out)
    detector = detector or DetectorModel()
    jets = jets or JetConfig()
    identity = _identity(recipe, seed, block_size, chunk_events, detector, jets)
    manifest_path = out / MANIFEST
    chunks_done: dict[str, dict[str, Any]] = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != DATASET_FORMAT:
            msg = f"{manifest_path} is not a {DATASET_FORMAT} manifest"
            raise ValueError(msg)
        if manifest["identity"] != identity:
            differ = sorted(k for k in identity if manifest["identity"].get(k) != identity.get(k))
            msg = (
                f"{out} holds a dataset made with other settings ({', '.join(differ)} "
                "differ); choose another folder or delete this one"
            )
            raise ValueError(msg)
        check = verify_dataset(out)
        bad = set(check.corrupted) | set(check.missing)
        if bad and not repair:
            first = sorted(bad)[0]
            msg = (
                f"{len(bad)} chunk(s) changed or missing since written (first: {first}); "
                "rerun with --repair to regenerate them"
            )
            raise DataFileError(out / first, msg)
        chunks_done = {c["path"]: c for c in manifest["chunks"] if c["path"] not in bad}
        if bad:
            log.warning("regenerating %d changed or missing chunk(s)", len(bad))
    else:
        out.mkdir(parents=True, exist_ok=True)
    for component in recipe.components:
        (out / component.name).mkdir(exist_ok=True)
    body: dict[str, Any] = {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "identity": identity,
        "versions": package_versions(),
        "command": command,
        "chunks": sorted(chunks_done.values(), key=lambda c: c["path"]),
        "complete": False,
    }
    plan = _plan(recipe, chunk_events, block_size)
    todo = [c for c in plan if c["path"] not in chunks_done]
    _write_json(manifest_path, body)

    done_events = sum(c["n_events"] for c in chunks_done.values())
    bar = tqdm(
        total=recipe.n_events,
        initial=done_events,
        unit="ev",
        desc=recipe.name,
        disable=not progress,
        smoothing=0.05,
    )
    totals = GeneratorStats()
    made = 0
    interrupted = False
    t0 = time.perf_counter()
    level = logging.getLogger().getEffectiveLevel()
    try:
        with _stop_requests() as signalled:

            def stopping() -> bool:
                return signalled.is_set() or (stop is not None and stop())

            for position, component in enumerate(recipe.components):
                mine = [c for c in todo if c["component"] == component.name]
                if not mine:
                    continue
                tasks = [
                    (index, size, c["first_event"] + j * block_size)
                    for c in mine
                    for j, (index, size) in enumerate(c["blocks"])
                ]
                comp_seed = _component_seed(seed, position)
                init_args = (component.process, comp_seed, detector, jets, level, recipe.layout)
                results = _results(tasks, min(workers, len(tasks)), init_args)
                made += _fill_chunks(
                    out, recipe, component, position, comp_seed, mine, results, body, bar,
                    totals, stopping,
                )  # fmt: skip
                if stopping():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted; the chunks finished so far are kept (rerun to continue)")
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    n_events = {c.name: 0 for c in recipe.components}
    for chunk in body["chunks"]:
        n_events[chunk["component"]] += chunk["n_events"]
    complete = len(body["chunks"]) == len(plan)
    body["complete"] = complete
    _write_json(manifest_path, body)
    return DatasetResult(out, n_events, complete, interrupted, elapsed, made, totals)


def _fill_chunks(
    out: Path,
    recipe: DatasetRecipe,
    component: Component,
    position: int,
    comp_seed: int,
    chunks: list[dict[str, Any]],
    results: Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]],
    body: dict[str, Any],
    bar: tqdm[Any],
    totals: GeneratorStats,
    stopping: Callable[[], bool],
) -> int:
    """Collect blocks into chunks in order, write each finished chunk; returns events made."""
    made = 0
    try:
        for chunk in chunks:
            parts: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
            stats = dict.fromkeys(("tried", "aborted", "filtered", "kept"), 0)
            for _ in chunk["blocks"]:
                columns, truth, delta = next(results)
                parts.append((columns, truth))
                for key in stats:
                    stats[key] += delta[key]
                    setattr(totals, key, getattr(totals, key) + delta[key])
                bar.update(len(truth["process_id"]))
                if stopping():
                    return made
            columns = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
            truth = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
            columns["run"] = np.full(len(columns["event"]), position + 1, "<u4")
            path = out / chunk["path"]
            _write_chunk(
                path,
                columns,
                truth,
                {
                    "dataset": recipe.name,
                    "component": component.name,
                    "chunk": chunk["index"],
                    "first_event": chunk["first_event"],
                    "process": component.process.name,
                    "process_id": component.process.process_id,
                    "is_signal": int(component.process.is_signal),
                    "seed": comp_seed,
                    "layout": recipe.layout,
                },
            )
            entry = {
                "path": chunk["path"],
                "component": component.name,
                "index": chunk["index"],
                "n_events": chunk["n_events"],
                "first_event": chunk["first_event"],
                "blocks": [chunk["blocks"][0][0], chunk["blocks"][-1][0]],
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
                "generator": stats,
            }
            body["chunks"] = sorted([*body["chunks"], entry], key=lambda c: c["path"])
            _write_json(out / MANIFEST, body)
            made += chunk["n_events"]
            bar.set_postfix_str(f"{len(body['chunks'])} chunks", refresh=False)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    return made


def verify_dataset(path: str | Path) -> DatasetCheck:
    """Recompute every chunk's SHA-256 against the manifest.

    Raises:
        DataFileError: no readable manifest in ``path``.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise DataFileError(path / MANIFEST, f"no readable dataset manifest ({exc})") from exc
    corrupted: list[str] = []
    missing: list[str] = []
    for chunk in manifest["chunks"]:
        file = path / chunk["path"]
        if not file.exists():
            missing.append(chunk["path"])
        elif file.stat().st_size != chunk["bytes"] or _sha256(file) != chunk["sha256"]:
            corrupted.append(chunk["path"])
    return DatasetCheck(
        path,
        len(manifest["chunks"]),
        tuple(corrupted),
        tuple(missing),
        bool(manifest.get("complete")),
    )


def dataset_files(path: str | Path, component: str) -> list[Path]:
    """The chunk files of ``component`` listed in the manifest, in order (for ``read_cache``)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    chunks = [c for c in manifest["chunks"] if c["component"] == component]
    return [path / c["path"] for c in sorted(chunks, key=lambda c: c["index"])]

"""Replay readers by name: every reader streams ``EventBatch`` chunks from a list of files.

``READERS`` maps a layout name to a function ``(paths, *, chunk_size, skip_bad_rows) ->
Iterator[EventBatch]``. Each raises ``DataFileError`` (naming the file and the entry) for
a file it cannot read; with ``skip_bad_rows`` a reader that can tell a bad row (NaN,
infinity) from a bad file leaves the row out and counts it in ``meta["bad_rows"]``.

=================  ================================================================
name               layout
=================  ================================================================
``cache``          this project's HDF5 event cache (``trigfarm simulate``)
``lhco-features``  LHCO R&D high-level features (``lhco-rnd-100k``), tau21 recomputed
``lhco-raw``       LHCO R&D raw events, 700 x (pT, eta, phi) + label, clustered here
``cms-l1ad``       CMS L1 anomaly-detection challenge HDF5, ``Particles`` (N, 19, 4)
``top-landscape``  top-tagging landscape pandas table, E/PX/PY/PZ of 200 constituents
``root``           ROOT trees of reco objects through uproot, as L1 objects
=================  ================================================================
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from simulator.cms_l1ad import read_cms_l1ad
from simulator.lhco_features import read_lhco_features
from stream.batch import EventBatch
from stream.errors import DataFileError, exception_summary
from stream.eventfile import read_cache

# The readers that cluster (FastJet) or read ROOT (uproot) or pandas tables import their
# modules when first called, so that importing this module stays light.


class ReaderFunction(Protocol):
    """A replay reader."""

    def __call__(
        self, paths: Sequence[Path], *, chunk_size: int, skip_bad_rows: bool
    ) -> Iterator[EventBatch]: ...


def _cache(paths: Sequence[Path], *, chunk_size: int, skip_bad_rows: bool) -> Iterator[EventBatch]:
    del skip_bad_rows  # the cache is written from validated batches
    return read_cache(paths, chunk_size=chunk_size)


def _lhco_features(
    paths: Sequence[Path], *, chunk_size: int, skip_bad_rows: bool
) -> Iterator[EventBatch]:
    return read_lhco_features(paths, chunk_size=chunk_size, skip_bad_rows=skip_bad_rows)


def _lhco_raw(
    paths: Sequence[Path], *, chunk_size: int, skip_bad_rows: bool
) -> Iterator[EventBatch]:
    from simulator.lhco_raw import read_lhco_raw

    return read_lhco_raw(paths, chunk_size=chunk_size, skip_bad_rows=skip_bad_rows)


def _cms_l1ad(
    paths: Sequence[Path], *, chunk_size: int, skip_bad_rows: bool
) -> Iterator[EventBatch]:
    return read_cms_l1ad(paths, chunk_size=chunk_size, skip_bad_rows=skip_bad_rows)


def _top_landscape(
    paths: Sequence[Path], *, chunk_size: int, skip_bad_rows: bool
) -> Iterator[EventBatch]:
    from simulator.top_landscape import read_top_landscape

    return read_top_landscape(paths, chunk_size=chunk_size, skip_bad_rows=skip_bad_rows)


def _root(paths: Sequence[Path], *, chunk_size: int, skip_bad_rows: bool) -> Iterator[EventBatch]:
    from simulator.root_objects import read_root_objects

    return read_root_objects(paths, chunk_size=chunk_size, skip_bad_rows=skip_bad_rows)


READERS: dict[str, ReaderFunction] = {
    "cache": _cache,
    "lhco-features": _lhco_features,
    "lhco-raw": _lhco_raw,
    "cms-l1ad": _cms_l1ad,
    "top-landscape": _top_landscape,
    "root": _root,
}


def replay_component(spec: str | Mapping[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """The (layout, paths) a replay component names, or ``None`` if it names none.

    A component is a table ``{layout = "lhco-features", paths = ["a.h5", "b*.h5"]}`` or
    the command-line shorthand ``"lhco-features:a.h5,b*.h5"`` (which cannot hold a path
    with a comma).

    Raises:
        ValueError: a table with an unknown layout, no paths, or other keys (names it).
    """
    if isinstance(spec, str):
        head, sep, rest = spec.partition(":")
        if not (sep and head in READERS):
            return None
        layout, paths = head, tuple(p.strip() for p in rest.split(",") if p.strip())
    elif "layout" in spec:
        extra = sorted(set(spec) - {"layout", "paths"})
        paths_value = spec.get("paths", ())
        layout = spec["layout"]
        if extra or layout not in READERS or isinstance(paths_value, str):
            msg = (
                f"replay component {dict(spec)} needs layout (one of {sorted(READERS)}) and "
                f"a list of paths, and nothing else{f' (not {extra})' if extra else ''}"
            )
            raise ValueError(msg)
        paths = tuple(str(p) for p in paths_value)
    else:
        return None
    if not paths:
        msg = f"replay component {spec!r} names no file"
        raise ValueError(msg)
    return layout, paths


def register_reader(name: str, function: ReaderFunction) -> None:
    """Add a reader to ``READERS`` (plain code registration, no directory scanning)."""
    READERS[name] = function


def expand_paths(patterns: Sequence[str | Path]) -> list[Path]:
    """Paths from file names or glob patterns, each pattern's matches sorted.

    Raises:
        FileNotFoundError: a pattern that matches nothing (named in the message).
    """
    out: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches or not all(Path(m).exists() for m in matches):
            msg = f"no file matches {text!r}"
            raise FileNotFoundError(msg)
        out.extend(Path(m) for m in matches)
    return out


def check_file(kind: str, path: str | Path) -> None:
    """Open ``path`` as layout ``kind`` and read its first event (cheap: one chunk of 1).

    An empty but well-formed file passes. Use it to refuse bad inputs before a run starts.

    Raises:
        DataFileError: the file cannot be read as ``kind`` (the message names it).
        KeyError: an unknown layout.
    """
    reader = reader_for(kind)
    batches = reader([Path(path)], chunk_size=1, skip_bad_rows=True)
    try:
        next(batches, None)
    except DataFileError:
        raise
    except (OSError, ValueError) as exc:
        msg = f"not readable as {kind} ({exception_summary(exc)})"
        raise DataFileError(path, msg) from exc
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def replay(
    kind: str,
    paths: Sequence[str | Path],
    *,
    chunk_size: int = 4096,
    skip_bad_rows: bool = False,
) -> Iterator[EventBatch]:
    """Stream files of layout ``kind`` (a key of ``READERS``); globs are expanded.

    Example:
        >>> batches = replay("lhco-features", ["../shared/data/lhco-rnd-100k/scalars_sig01.h5"])
        >>> len(next(batches)) <= 4096
        True
    """
    reader = reader_for(kind)
    return reader(expand_paths(paths), chunk_size=chunk_size, skip_bad_rows=skip_bad_rows)


def read_features(
    specs: Sequence[str | Mapping[str, Any]],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every spec's events as features (N, 8) float64, with the truth labels (N,) bool when
    every file has them (else None). A spec is a replay component
    (``"lhco-features:a.h5,b.h5"`` or its table) or a bare path to an event cache.

    Raises:
        ValueError: the specs hold no event.
    """
    features, labels = [], []
    for spec in specs:
        component = replay_component(spec)
        layout, paths = component if component is not None else ("cache", (str(spec),))
        for batch in replay(layout, paths, chunk_size=65_536, skip_bad_rows=True):
            features.append(np.asarray(batch["features"], np.float64))
            labels.append(batch.truth["is_signal"] if "is_signal" in batch.truth else None)
    if not features:
        msg = f"no events in {list(specs)}"
        raise ValueError(msg)
    known = all(label is not None for label in labels)
    return (
        np.concatenate(features),
        np.concatenate(labels).astype(bool) if known else None,  # type: ignore[arg-type]
    )


def reader_for(kind: str) -> ReaderFunction:
    """The reader registered as ``kind``; the error lists the known ones."""
    try:
        return READERS[kind]
    except KeyError:
        msg = f"unknown replay layout {kind!r}; known: {', '.join(sorted(READERS))}"
        raise KeyError(msg) from None

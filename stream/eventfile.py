"""The event cache: chunked HDF5 files of ``EventBatch`` columns, written and replayed.

Layout: group ``/events`` holds one dataset per schema column and ``/truth`` one per truth
column, all chunked along the event axis and compressed with LZF. The root attributes
say what the file is (``format = "trigfarm-events"``), how many events it holds, whether
it is complete, and everything needed to make it again: the recipe, the seed, the block
size, the detector and jet settings, the Pythia settings, and the package versions.

A file is written under a temporary name and renamed when it is closed, so a reader never
sees a half-written file under the final name. ``close(complete=False)`` (an interrupt)
trims the datasets to the events that were fully written and marks the file partial; it
is valid and readable, and ``open_cache`` reports ``complete = False``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from stream.batch import EventBatch
from stream.errors import DataFileError
from stream.schema import COLUMNS, SCHEMA_VERSION, TRUTH_COLUMNS

log = logging.getLogger(__name__)

CACHE_FORMAT = "trigfarm-events"
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What a cache file holds: events, completeness, columns and its attributes."""

    path: Path
    n_events: int
    complete: bool
    columns: tuple[str, ...]
    truth_columns: tuple[str, ...]
    attrs: Mapping[str, Any]


class CacheWriter:
    """Appends batches to a new cache file; use as a context manager.

    On a clean exit the file is complete; on an exception (``KeyboardInterrupt``
    included) it is closed as partial, holding every batch appended before. If nothing
    was written, or finishing fails, the temporary file is removed and nothing appears
    under ``path``.

    Batches are held until they fill a chunk and written a chunk at a time, each write
    flushed: small batches cost no HDF5 work each (an archive's 25-event batches took
    67 ms apiece when each was written and flushed), and a killed writer's temporary
    file holds whole chunks (``recover_partial`` turns it into a partial file).
    """

    def __init__(
        self,
        path: str | Path,
        attrs: Mapping[str, Any] | None = None,
        *,
        chunk_events: int = 512,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            msg = f"{self.path} exists; pass overwrite=True (--force) to replace it"
            raise FileExistsError(msg)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: h5py.File | None = h5py.File(self.tmp_path, "w")
        self._chunk_events = chunk_events
        self.n_events = 0  # appended, written or held
        self._written = 0
        self._held: list[EventBatch] = []
        root = self._file.attrs
        root["format"] = CACHE_FORMAT
        root["format_version"] = CACHE_FORMAT_VERSION
        root["schema_version"] = SCHEMA_VERSION
        root["complete"] = False
        root["n_events"] = 0
        for key, value in (attrs or {}).items():
            root[key] = _attr_value(value)
        self._file.flush()  # a writer killed before its first chunk leaves a readable file

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(complete=exc_type is None)

    def set_attrs(self, **attrs: Any) -> None:
        """Add or replace root attributes (e.g. generator statistics at the end)."""
        assert self._file is not None, "writer is closed"
        for key, value in attrs.items():
            self._file.attrs[key] = _attr_value(value)

    def append(self, batch: EventBatch) -> None:
        """Add a batch at the end of the file; columns must match the first batch."""
        if self._file is None:
            raise ValueError("the cache writer is closed")
        first = self._held[0] if self._held else None
        for group, table in (("events", batch.columns), ("truth", batch.truth)):
            names = set(first.columns if group == "events" else first.truth) if first else None
            if names is None and self._written:
                names = set(self._file[group]) if group in self._file else set()
            if names is not None and names != set(table):
                msg = (
                    f"batch {group} columns {sorted(table)} differ from the file's {sorted(names)}"
                )
                raise ValueError(msg)
        self._held.append(batch)
        self.n_events += len(batch)
        if self.n_events - self._written >= self._chunk_events:
            self._write_held()

    def _write_held(self) -> None:
        handle = self._file
        assert handle is not None
        if not self._held:
            return
        batch = EventBatch.concat(self._held) if len(self._held) > 1 else self._held[0]
        n = len(batch)
        for group, table, specs in (
            ("events", batch.columns, COLUMNS),
            ("truth", batch.truth, TRUTH_COLUMNS),
        ):
            grp = handle.require_group(group)
            for name, array in table.items():
                if name not in grp:
                    grp.create_dataset(
                        name,
                        shape=(0, *array.shape[1:]),
                        maxshape=(None, *array.shape[1:]),
                        dtype=np.dtype(specs[name].dtype),
                        chunks=(self._chunk_events, *array.shape[1:]),
                        compression="lzf",
                    )
                dataset = grp[name]
                dataset.resize(self._written + n, axis=0)
                dataset[self._written :] = array
        self._written += n
        self._held = []
        handle.attrs["n_events"] = self._written
        handle.flush()  # a killed writer leaves a temporary file whose metadata is whole

    def close(self, *, complete: bool = True) -> CacheInfo | None:
        """Finish the file and move it to ``path``; returns its description.

        ``complete=False`` trims to the events fully written and marks the file partial;
        with no event written at all, no file is left and ``None`` is returned.
        """
        handle = self._file
        if handle is None:
            return None
        if not complete and self.n_events == 0:
            self._file = None
            handle.close()
            self.tmp_path.unlink(missing_ok=True)
            log.warning("%s: interrupted before any event was written; no file made", self.path)
            return None
        try:
            self._write_held()
            self._file = None
            for group in ("events", "truth"):
                if group in handle:
                    for dataset in handle[group].values():
                        dataset.resize(self.n_events, axis=0)
            handle.attrs["n_events"] = self.n_events
            handle.attrs["complete"] = complete
            handle.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self._file = None
            handle.close()
            self.tmp_path.unlink(missing_ok=True)
            log.error("could not finish %s; removed the partial file", self.path)
            raise
        if not complete:
            log.warning("%s is partial: %d events written", self.path, self.n_events)
        return open_cache(self.path)


def recover_partial(tmp_path: str | Path, path: str | Path) -> CacheInfo | None:
    """Turn a killed writer's temporary file into a partial cache file at ``path``: the
    whole chunks it flushed, trimmed to its recorded event count (``None``, and the
    temporary file removed, if it had flushed none).

    Raises:
        DataFileError: the temporary file is not a readable cache (names the file).
    """
    tmp_path, path = Path(tmp_path), Path(path)
    try:
        with h5py.File(tmp_path, "r+") as handle:
            if handle.attrs.get("format") != CACHE_FORMAT:
                raise DataFileError(tmp_path, "not a trigfarm event cache")
            n_events = int(handle.attrs["n_events"])
            for group in ("events", "truth"):
                for dataset in handle[group].values() if group in handle else ():
                    dataset.resize(n_events, axis=0)
            handle.attrs["complete"] = False
    except (OSError, KeyError) as exc:
        raise DataFileError(tmp_path, f"not a readable event cache ({exc})") from exc
    if n_events == 0:
        tmp_path.unlink()
        return None
    os.replace(tmp_path, path)
    return open_cache(path)


def _attr_value(value: Any) -> Any:
    """HDF5 attributes hold numbers and strings; anything nested is stored as JSON."""
    if isinstance(value, str | int | float | bool | np.integer | np.floating):
        return value
    return json.dumps(value, default=str)


def open_cache(path: str | Path) -> CacheInfo:
    """Check that ``path`` is a trigfarm cache file and describe it.

    Raises:
        DataFileError: not a readable HDF5 file, or not a cache (names the file).
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            attrs = {k: _decode(v) for k, v in handle.attrs.items()}
            if attrs.get("format") != CACHE_FORMAT:
                msg = f"not a trigfarm event cache (format attribute {attrs.get('format')!r})"
                raise DataFileError(path, msg)
            if "events" not in handle:
                raise DataFileError(path, "no /events group")
            n_events = int(attrs["n_events"])
            columns = tuple(handle["events"])
            truth = tuple(handle["truth"]) if "truth" in handle else ()
            for group, names in (("events", columns), ("truth", truth)):
                for name in names:
                    rows = handle[group][name].shape[0]
                    if rows < n_events:
                        msg = f"{group}/{name} has {rows} rows, the file says {n_events}"
                        raise DataFileError(path, msg, entry=rows)
    except (OSError, KeyError) as exc:
        raise DataFileError(path, f"not a readable event cache ({exc})") from exc
    return CacheInfo(path, n_events, bool(attrs.get("complete")), columns, truth, attrs)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_cache(
    paths: Sequence[str | Path] | str | Path,
    *,
    chunk_size: int = 4096,
    columns: Iterable[str] | None = None,
    require_complete: bool = False,
) -> Iterator[EventBatch]:
    """Stream cache files as ``EventBatch`` chunks of up to ``chunk_size`` events.

    ``columns`` limits which event columns are read (truth is always read). Event
    numbers are the ones stored in the file.

    Raises:
        DataFileError: a file that is not a cache, is partial with ``require_complete``,
            or cannot be read at some entry (the message names the file and entry).
    """
    if chunk_size < 1:
        msg = f"chunk_size must be >= 1, got {chunk_size}"
        raise ValueError(msg)
    if isinstance(paths, str | Path):
        paths = [paths]
    wanted = None if columns is None else set(columns)
    for path in paths:
        info = open_cache(path)
        if require_complete and not info.complete:
            raise DataFileError(info.path, f"partial file ({info.n_events} events)")
        names = [c for c in info.columns if wanted is None or c in wanted]
        with h5py.File(info.path, "r") as handle:
            for start in range(0, info.n_events, chunk_size):
                stop = min(start + chunk_size, info.n_events)
                try:
                    events = {n: handle["events"][n][start:stop] for n in names}
                    truth = {n: handle["truth"][n][start:stop] for n in info.truth_columns}
                except (OSError, KeyError) as exc:
                    msg = f"cannot read events {start}-{stop} ({exc})"
                    raise DataFileError(info.path, msg, entry=start) from exc
                yield EventBatch(events, truth, {"source": info.path.name})

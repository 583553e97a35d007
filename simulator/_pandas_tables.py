"""Row slices of a pandas HDF5 table (fixed or table format), one chunk at a time.

Pandas reads ``start``/``stop`` slices of both formats through PyTables, which
decompresses only the chunks it needs (the LHCO raw file is blosc-compressed, which h5py
alone cannot read). Every failure becomes a ``DataFileError`` naming the file and the
first row of the slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import tables

from stream.errors import DataFileError, exception_summary

# What PyTables and pandas raise for a truncated, corrupt or foreign file.
READ_ERRORS = (OSError, ValueError, KeyError, AttributeError, TypeError, tables.HDF5ExtError)


@dataclass(frozen=True, slots=True)
class PandasTable:
    """One pandas table in an HDF5 file: its path, key, rows and column names."""

    path: Path
    key: str
    n_rows: int
    columns: tuple[str, ...]


def open_pandas_table(path: str | Path, *, preferred_key: str | None = None) -> PandasTable:
    """Describe the file's only table, or ``preferred_key`` among several, without reading
    its rows."""
    path = Path(path)
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = store.keys()
            if len(keys) == 1:
                key = keys[0]
            elif preferred_key is not None and f"/{preferred_key}" in keys:
                key = f"/{preferred_key}"
            else:
                wanted = (
                    f"one pandas table or {preferred_key!r}"
                    if preferred_key
                    else "one pandas table"
                )
                raise DataFileError(path, f"expected {wanted}, found keys {keys}")
            storer = store.get_storer(key)
            n_rows = int(storer.nrows if storer.is_table else storer.shape[0])
            head = store.select(key, start=0, stop=0)
            columns = tuple(str(c) for c in head.columns)
    except READ_ERRORS as exc:
        raise DataFileError(
            path, f"not a readable pandas HDF5 table ({exception_summary(exc)})"
        ) from exc
    return PandasTable(path, key, n_rows, columns)


def table_chunks(table: PandasTable, chunk_size: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(first row, frame)`` for consecutive slices of ``chunk_size`` rows."""
    if chunk_size < 1:
        msg = f"chunk_size must be >= 1, got {chunk_size}"
        raise ValueError(msg)
    try:
        store = pd.HDFStore(table.path, mode="r")
    except READ_ERRORS as exc:
        raise DataFileError(table.path, f"cannot open ({exception_summary(exc)})") from exc
    with store:
        for start in range(0, table.n_rows, chunk_size):
            stop = min(start + chunk_size, table.n_rows)
            try:
                frame = store.select(table.key, start=start, stop=stop)
            except READ_ERRORS as exc:
                msg = f"cannot read rows {start}-{stop} ({exception_summary(exc)})"
                raise DataFileError(table.path, msg, entry=start) from exc
            if len(frame) != stop - start:
                msg = f"rows {start}-{stop} gave {len(frame)} rows"
                raise DataFileError(table.path, msg, entry=start)
            yield start, frame

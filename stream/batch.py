"""The messages that travel between nodes: ``EventBatch`` and the generic ``Record``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from stream.errors import FrameError
from stream.schema import COLUMNS, TRUTH_COLUMNS, ColumnSpec

MetaValue = str | int | float | bool | None


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def _check_table(
    table: Mapping[str, np.ndarray], specs: Mapping[str, ColumnSpec], what: str
) -> int | None:
    """Check names, dtypes, per-event shapes and a common length; return that length."""
    length: int | None = None
    for name, array in table.items():
        spec = specs.get(name)
        if spec is None:
            raise FrameError("unknown_column", f"{what} column {name!r} is not in the schema")
        if not isinstance(array, np.ndarray):
            msg = f"{what} column {name!r} is a {type(array).__name__}, not a numpy array"
            raise FrameError("dtype", msg)
        if array.dtype.str != spec.dtype:
            msg = f"{what} column {name!r} has dtype {array.dtype.str}, schema says {spec.dtype}"
            raise FrameError("dtype", msg)
        if array.ndim == 0 or not spec.matches_shape(array.shape[1:]):
            msg = f"{what} column {name!r} has shape {array.shape}, schema says (N, *{spec.shape})"
            raise FrameError("shape", msg)
        if length is None:
            length = array.shape[0]
        elif array.shape[0] != length:
            msg = f"{what} column {name!r} has {array.shape[0]} rows, others have {length}"
            raise FrameError("length", msg)
    return length


@dataclass(frozen=True, slots=True, repr=False)
class EventBatch:
    """A batch of events as named numpy columns (see ``stream.schema``).

    Construction checks names, dtypes, shapes and lengths; ``check_finite`` is separate
    because it reads every value. Truth is a second table, reachable only through
    ``truth``, and ``without_truth()`` strips it before events reach learning code.

    Example:
        >>> import numpy as np
        >>> batch = EventBatch({"run": np.ones(3, "<u4")}, truth={"is_signal": np.zeros(3, "u1")})
        >>> len(batch), batch.without_truth().truth
        (3, mappingproxy({}))
    """

    columns: Mapping[str, np.ndarray]
    truth: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, MetaValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", _frozen(self.columns))
        object.__setattr__(self, "truth", _frozen(self.truth))
        object.__setattr__(self, "meta", _frozen(self.meta))
        n_columns = _check_table(self.columns, COLUMNS, "event")
        n_truth = _check_table(self.truth, TRUTH_COLUMNS, "truth")
        if n_columns is None:
            raise FrameError("missing_column", "an event batch needs at least one column")
        if n_truth is not None and n_truth != n_columns:
            msg = f"truth has {n_truth} rows, events have {n_columns}"
            raise FrameError("length", msg)

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).shape[0])

    def __repr__(self) -> str:
        return f"EventBatch(n={len(self)}, columns={list(self.columns)}, truth={list(self.truth)})"

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    @property
    def nbytes(self) -> int:
        """Bytes held by all columns and truth."""
        tables = (self.columns, self.truth)
        return sum(a.nbytes for table in tables for a in table.values())

    def require(self, *names: str) -> None:
        """Raise ``FrameError("missing_column")`` unless every named column is present."""
        missing = [name for name in names if name not in self.columns]
        if missing:
            msg = f"batch lacks column(s) {missing}; it has {sorted(self.columns)}"
            raise FrameError("missing_column", msg, n_events=len(self))

    def finite_rows(self) -> np.ndarray:
        """A boolean mask of the events whose schema-finite columns (truth included) hold
        no NaN or infinity; the one definition of a non-finite event that ``check_finite``
        and the node runtime's per-event drop share."""
        ok = np.ones(len(self), bool)
        if not ok.size:  # reshape(0, -1) is ambiguous for zero-width columns
            return ok
        for specs, table in ((COLUMNS, self.columns), (TRUTH_COLUMNS, self.truth)):
            for name, array in table.items():
                if specs[name].finite:
                    ok &= np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        return ok

    def check_finite(self) -> None:
        """Raise ``FrameError("nonfinite")`` if a column the schema marks finite holds NaN/inf.

        This refuses the whole batch; ``finite_rows`` picks out the good events instead.
        """
        for specs, table in ((COLUMNS, self.columns), (TRUTH_COLUMNS, self.truth)):
            for name, array in table.items():
                if specs[name].finite and not np.isfinite(array).all():
                    rows = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
                    msg = (
                        f"column {name!r} is not finite in {rows.size} event(s), "
                        f"first row {rows[0]}"
                    )
                    raise FrameError("nonfinite", msg, n_events=len(self))

    def select(self, rows: np.ndarray | slice) -> EventBatch:
        """The events at ``rows`` (a boolean mask, an index array or a slice), truth included."""
        return EventBatch(
            {k: v[rows] for k, v in self.columns.items()},
            {k: v[rows] for k, v in self.truth.items()},
            self.meta,
        )

    def with_columns(self, **columns: np.ndarray) -> EventBatch:
        """A batch with columns added or replaced."""
        return EventBatch({**self.columns, **columns}, self.truth, self.meta)

    def with_meta(self, **meta: MetaValue) -> EventBatch:
        """A batch with metadata entries added or replaced."""
        return EventBatch(self.columns, self.truth, {**self.meta, **meta})

    def without_truth(self) -> EventBatch:
        """The same events with the truth table removed."""
        return EventBatch(self.columns, {}, self.meta)

    @staticmethod
    def concat(batches: Iterable[EventBatch]) -> EventBatch:
        """Join batches that share the same columns; metadata comes from the first."""
        parts = list(batches)
        if not parts:
            raise FrameError("length", "cannot concatenate zero batches")
        names, truth_names = set(parts[0].columns), set(parts[0].truth)
        for part in parts[1:]:
            if set(part.columns) != names or set(part.truth) != truth_names:
                raise FrameError("unknown_column", "batches to concatenate differ in columns")
        return EventBatch(
            {k: np.concatenate([p.columns[k] for p in parts]) for k in parts[0].columns},
            {k: np.concatenate([p.truth[k] for p in parts]) for k in parts[0].truth},
            parts[0].meta,
        )


@dataclass(frozen=True, slots=True)
class Record:
    """A typed bundle of named arrays and scalar metadata, e.g. a flow snapshot.

    ``kind`` says what the record is (``"flow_snapshot"``); its producer and consumer
    agree on the meaning of ``meta`` and ``arrays``. Arrays use the wire dtypes only.
    """

    kind: str
    meta: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kind:
            raise FrameError("decode_error", "a record needs a non-empty kind")
        object.__setattr__(self, "meta", _frozen(self.meta))
        object.__setattr__(self, "arrays", _frozen(self.arrays))
        for name, array in self.arrays.items():
            if not isinstance(array, np.ndarray):
                msg = f"record array {name!r} is a {type(array).__name__}, not a numpy array"
                raise FrameError("dtype", msg)


Message = EventBatch | Record

"""Replay of the top-tagging landscape layout (Kasieczka et al., arXiv:1902.09914).

Each file is a pandas HDF5 table (key ``table``, or the file's only key) with one jet per
row: columns ``E_i, PX_i, PY_i, PZ_i`` for constituents i = 0..199 (zero-padded) and the
label ``is_signal_new`` (1 for a top jet). Each row becomes one event whose fat jet 0 is
that jet (``simulator.jets.single_jet_content``: kinematics from the constituent sum,
the leading 128 constituents, mJ1, tau21 and tau32); the second jet slot is empty.
Truth: process id 3 (as the ``ttbar`` recipe) for top jets and 0 (as ``qcd``) for QCD jets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from simulator._pandas_tables import open_pandas_table, table_chunks
from simulator.jets import JetConfig, single_jet_content
from simulator.particles import Particles
from stream.batch import EventBatch
from stream.errors import DataFileError

LABEL = "is_signal_new"
TOP_PROCESS_ID = 3
QCD_PROCESS_ID = 0
_FIELDS = ("E", "PX", "PY", "PZ")


def constituent_columns(columns: Sequence[str], path: Path) -> list[str]:
    """The names ``E_0, PX_0, PY_0, PZ_0, E_1, ...`` of every constituent, checked complete."""
    indices = sorted({int(m[1]) for c in columns if (m := re.fullmatch(r"E_(\d+)", c))})
    if not indices or indices != list(range(len(indices))):
        raise DataFileError(path, "no constituent columns E_0, E_1, ...")
    names = [f"{f}_{i}" for i in indices for f in _FIELDS]
    missing = sorted({*names, LABEL} - set(columns))
    if missing:
        raise DataFileError(path, f"missing columns {missing[:8]}")
    return names


def read_top_landscape(
    paths: Sequence[str | Path],
    *,
    chunk_size: int = 1024,
    run: int = 1,
    first_event: int = 0,
    skip_bad_rows: bool = False,
    jets: JetConfig | None = None,
) -> Iterator[EventBatch]:
    """Stream top-tagging landscape files as one-jet ``EventBatch`` chunks with truth.

    Raises:
        DataFileError: an unreadable file, missing columns, or a row with a non-finite
            value, a label other than 0/1 or no constituent (unless ``skip_bad_rows``:
            then the row is left out and counted in ``meta["bad_rows"]``).
    """
    event = first_event
    for path in paths:
        table = open_pandas_table(path, preferred_key="table")
        names = constituent_columns(table.columns, table.path)
        for start, frame in table_chunks(table, chunk_size):
            four = frame[names].to_numpy(np.float64).reshape(len(frame), -1, 4)
            labels = frame[LABEL].to_numpy(np.float64)
            real = four[..., 0] > 0
            bad = ~np.isfinite(four).all(axis=(1, 2)) | ~np.isin(labels, (0.0, 1.0))
            bad |= ~real.any(axis=1)
            if bad.any() and not skip_bad_rows:
                row = int(np.flatnonzero(bad)[0])
                msg = f"non-finite value, bad label {labels[row]!r} or no constituent"
                raise DataFileError(table.path, msg, entry=start + row)
            four, labels, real = four[~bad], labels[~bad], real[~bad]
            n = len(four)
            if n == 0:
                continue
            e, px, py, pz = (four[..., k][real] for k in range(4))
            particles = Particles(real.sum(axis=1).astype(np.int64), px, py, pz, e)
            content = single_jet_content(particles, jets)
            is_signal = labels.astype("u1")
            yield EventBatch(
                {
                    "run": np.full(n, run, "<u4"),
                    "lumi": np.zeros(n, "<u4"),
                    "event": np.arange(event, event + n, dtype="<u8"),
                    **content.columns(),
                },
                truth={
                    "process_id": np.where(is_signal, TOP_PROCESS_ID, QCD_PROCESS_ID).astype("<i2"),
                    "is_signal": is_signal,
                    "weight": np.ones(n, "<f4"),
                },
                meta={"source": table.path.name, "bad_rows": int(bad.sum())},
            )
            event += n

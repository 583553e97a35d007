"""Replay of LHCO R&D raw events: 700 x (pT, eta, phi) + label, clustered here with FastJet.

The official raw files are pandas HDF5 tables of shape (N, 2101): up to 700 massless
particle-flow candidates per event, zero-padded, then the truth label (1 for W'->XY).
Each chunk is clustered like a generated event (``simulator.jets.fatjet_content``:
anti-kT R=1.0, the two leading jets heavier first, N-subjettiness with beta=1), so the
features agree with the LHCO features files (``lhco-rnd-100k``) to float precision.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from simulator._pandas_tables import open_pandas_table, table_chunks
from simulator.jets import JetConfig, fatjet_content
from simulator.lhco_features import LHCO_PROCESS_IDS
from simulator.particles import Particles
from stream.batch import EventBatch
from stream.errors import DataFileError


def read_lhco_raw(
    paths: Sequence[str | Path],
    *,
    chunk_size: int = 1024,
    run: int = 1,
    first_event: int = 0,
    skip_bad_rows: bool = False,
    jets: JetConfig | None = None,
) -> Iterator[EventBatch]:
    """Stream raw LHCO files as clustered ``EventBatch`` chunks (fat jets, constituents,
    features) with truth from the label column.

    Raises:
        DataFileError: an unreadable file, a table that is not 3 x K + 1 columns wide, or
            a row with a non-finite value or a label other than 0/1 (unless
            ``skip_bad_rows``: then the row is left out and counted in ``meta["bad_rows"]``).
    """
    event = first_event
    for path in paths:
        table = open_pandas_table(path)
        width = len(table.columns)
        if width < 4 or (width - 1) % 3:
            msg = f"{width} columns; the raw layout is 3 x (particles) + 1 label"
            raise DataFileError(table.path, msg)
        for start, frame in table_chunks(table, chunk_size):
            values = frame.to_numpy(np.float64)
            labels = values[:, -1]
            bad = ~np.isfinite(values).all(axis=1) | ~np.isin(labels, (0.0, 1.0))
            if bad.any() and not skip_bad_rows:
                row = int(np.flatnonzero(bad)[0])
                msg = f"non-finite value or bad label {labels[row]!r}"
                raise DataFileError(table.path, msg, entry=start + row)
            values = values[~bad]
            n = len(values)
            if n == 0:
                continue
            kin = values[:, :-1].reshape(n, -1, 3)
            real = kin[..., 0] > 0
            particles = Particles.from_pt_eta_phi(
                real.sum(axis=1),
                kin[..., 0][real],
                kin[..., 1][real],
                kin[..., 2][real],
                np.zeros(int(real.sum())),
            )
            content = fatjet_content(particles, jets)
            is_signal = values[:, -1].astype("u1")
            process_id = np.where(is_signal, LHCO_PROCESS_IDS["sig"], LHCO_PROCESS_IDS["bkg"])
            yield EventBatch(
                {
                    "run": np.full(n, run, "<u4"),
                    "lumi": np.zeros(n, "<u4"),
                    "event": np.arange(event, event + n, dtype="<u8"),
                    **content.columns(),
                },
                truth={
                    "process_id": process_id.astype("<i2"),
                    "is_signal": is_signal,
                    "weight": np.ones(n, "<f4"),
                },
                meta={"source": table.path.name, "bad_rows": int(bad.sum())},
            )
            event += n

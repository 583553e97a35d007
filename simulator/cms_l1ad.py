"""Replay of the CMS L1 anomaly-detection layout (Govorkova et al., arXiv:2107.02157).

Each file holds an HDF5 dataset ``Particles`` of shape (N, 19, 4): per event MET, 4 e/gamma,
4 muons and 10 jets as (pT, eta, phi, class), with class 1 MET, 2 e/gamma, 3 muon, 4 jet
and 0 for an empty slot. That is already this project's ``l1_objects`` layout, so the
reader checks the classes slot by slot, zeroes empty slots and streams the first three
fields. Only ``Particles`` is read (the files' other datasets are not needed).

Truth comes from the file name, as the challenge ships one file per sample: a name that
contains a key of ``CMS_L1AD_SAMPLES`` gets its process id and signal flag (ids of the
matching simulator recipes where there is one); any other name gets process id -1 and
``is_signal = 0``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from stream.batch import EventBatch
from stream.errors import DataFileError, exception_summary
from stream.schema import N_L1_OBJECTS

DATASET = "Particles"

# Class code expected in each of the 19 slots: MET, 4 e/gamma, 4 muons, 10 jets.
SLOT_CLASSES = np.array([1] + [2] * 4 + [3] * 4 + [4] * 10)

# File-name fragment -> (process id, is signal).
CMS_L1AD_SAMPLES: dict[str, tuple[int, bool]] = {
    "background": (11, False),
    "Ato4l": (12, True),
    "hToTauTau": (13, True),
    "hChToTauNu": (20, True),
    "leptoquark": (21, True),
}


def sample_of(path: Path) -> tuple[int, bool]:
    """(process id, is signal) from the file name; (-1, False) for an unknown sample."""
    for fragment, sample in CMS_L1AD_SAMPLES.items():
        if fragment.lower() in path.name.lower():
            return sample
    return -1, False


def read_cms_l1ad(
    paths: Sequence[str | Path],
    *,
    chunk_size: int = 4096,
    run: int = 1,
    first_event: int = 0,
    skip_bad_rows: bool = False,
) -> Iterator[EventBatch]:
    """Stream CMS L1 anomaly-detection files as ``EventBatch`` chunks of ``l1_objects``.

    Raises:
        DataFileError: an unreadable file, no ``Particles`` (N, 19, 4) dataset, or a row
            with a non-finite value or a class that does not belong in its slot (unless
            ``skip_bad_rows``: then the row is left out and counted in ``meta["bad_rows"]``).
    """
    if chunk_size < 1:
        msg = f"chunk_size must be >= 1, got {chunk_size}"
        raise ValueError(msg)
    event = first_event
    for path in map(Path, paths):
        process_id, is_signal = sample_of(path)
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise DataFileError(
                path, f"not a readable HDF5 file ({exception_summary(exc)})"
            ) from exc
        with handle:
            dataset = handle.get(DATASET)
            if not isinstance(dataset, h5py.Dataset) or dataset.shape[1:] != (N_L1_OBJECTS, 4):
                found = None if dataset is None else getattr(dataset, "shape", "a group")
                msg = f"expected a dataset {DATASET!r} of shape (N, 19, 4), found {found}"
                raise DataFileError(path, msg)
            for start in range(0, dataset.shape[0], chunk_size):
                stop = min(start + chunk_size, dataset.shape[0])
                try:
                    rows = np.asarray(dataset[start:stop], np.float64)
                except OSError as exc:
                    msg = f"cannot read rows {start}-{stop} ({exception_summary(exc)})"
                    raise DataFileError(path, msg, entry=start) from exc
                classes = rows[..., 3]
                bad = ~np.isfinite(rows).all(axis=(1, 2))
                bad |= ((classes != SLOT_CLASSES) & (classes != 0)).any(axis=1)
                if bad.any() and not skip_bad_rows:
                    row = int(np.flatnonzero(bad)[0])
                    msg = f"non-finite value or an object class out of its slot: {classes[row]}"
                    raise DataFileError(path, msg, entry=start + row)
                rows = rows[~bad]
                objects = np.where((rows[..., 3] != 0)[..., None], rows[..., :3], 0.0)
                n = len(objects)
                if n == 0:
                    continue
                yield EventBatch(
                    {
                        "run": np.full(n, run, "<u4"),
                        "lumi": np.zeros(n, "<u4"),
                        "event": np.arange(event, event + n, dtype="<u8"),
                        "l1_objects": objects.astype("<f4"),
                    },
                    truth={
                        "process_id": np.full(n, process_id, "<i2"),
                        "is_signal": np.full(n, is_signal, "u1"),
                        "weight": np.ones(n, "<f4"),
                    },
                    meta={"source": path.name, "bad_rows": int(bad.sum())},
                )
                event += n

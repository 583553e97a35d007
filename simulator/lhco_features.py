"""Replay of LHCO R&D high-level features (pandas 'fixed' HDF5, as in ``lhco-rnd-100k``).

Each file holds one table (key ``/bkg`` or ``/sig``) with 46 columns per event. The reader
slices the HDF5 blocks directly with h5py, so it streams chunks without loading a file.
It recomputes tau21 = tau2/tau1, because the source's ``tau21_*`` columns hold tau3/tau2
(a known defect), and orders the two jets by mass, heavier first (the LHCO convention).
A jet with tau1 = 0 (one constituent) gets tau21 = tau32 = 0 rather than NaN.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stream.batch import EventBatch
from stream.errors import DataFileError
from stream.schema import FEATURE_NAMES

# process_id values for replayed LHCO events.
LHCO_PROCESS_IDS = {"bkg": 0, "sig": 1}

_NEEDED = [f"{v}_{j}" for j in (1, 2) for v in ("pt", "eta", "phi", "mass", "tau1", "tau2", "tau3")]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def lhco_feature_columns(table: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``features`` (N, 8) and ``fatjets`` (N, 2, 4) from LHCO per-jet columns (suffix _1/_2)."""
    heavier_first = table["mass_1"] >= table["mass_2"]
    a, b = ("1", "2")

    def jet(var: str, lead: bool) -> np.ndarray:
        first, second = table[f"{var}_{a}"], table[f"{var}_{b}"]
        return (
            np.where(heavier_first, first, second)
            if lead
            else np.where(heavier_first, second, first)
        )

    tau21 = [_ratio(jet("tau2", lead), jet("tau1", lead)) for lead in (True, False)]
    tau32 = [_ratio(jet("tau3", lead), jet("tau2", lead)) for lead in (True, False)]
    mj1, mj2 = jet("mass", True), jet("mass", False)
    values = {
        "mjj": table["mjj"],
        "mj1": mj1,
        "delta_mj": mj2 - mj1,
        "tau21_j1": tau21[0],
        "tau21_j2": tau21[1],
        "tau32_j1": tau32[0],
        "tau32_j2": tau32[1],
        "deta_jj": np.abs(table["eta_1"] - table["eta_2"]),
    }
    features = np.stack([values[name] for name in FEATURE_NAMES], axis=1).astype("<f4")
    fatjets = np.stack(
        [
            np.stack([jet(v, lead) for v in ("pt", "eta", "phi", "mass")], axis=1)
            for lead in (True, False)
        ],
        axis=1,
    ).astype("<f4")
    return features, fatjets


@dataclass(frozen=True, slots=True)
class LHCOFeaturesFile:
    """One LHCO features file: its path, table key and number of events."""

    path: Path
    key: str
    n_events: int


def open_lhco_features(path: str | Path) -> LHCOFeaturesFile:
    """Check that ``path`` is an LHCO features file and describe it."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            keys = [k for k in handle if k in LHCO_PROCESS_IDS]
            if len(keys) != 1:
                msg = f"expected one table /bkg or /sig, found {sorted(handle)}"
                raise DataFileError(path, msg)
            group = handle[keys[0]]
            items = [x.decode() for x in group["block0_items"][:]]
            missing = sorted(set([*_NEEDED, "mjj"]) - set(items))
            if missing:
                raise DataFileError(path, f"missing columns {missing}")
            return LHCOFeaturesFile(path, keys[0], int(group["block0_values"].shape[0]))
    except (OSError, KeyError) as exc:
        raise DataFileError(path, f"not a readable LHCO features file ({exc})") from exc


def read_lhco_features(
    paths: Sequence[str | Path],
    *,
    chunk_size: int = 4096,
    run: int = 1,
    first_event: int = 0,
    skip_bad_rows: bool = False,
) -> Iterator[EventBatch]:
    """Stream the files in order as ``EventBatch`` chunks with features, fat jets and truth.

    Events are numbered consecutively from ``first_event`` across files. The columns used
    are checked for finiteness (the source's defective ``tau21_*``/``tau32_*`` columns hold
    NaN for a few events and are never read); a bad value raises ``DataFileError`` naming
    the file and the entry, or with ``skip_bad_rows`` the row is left out and counted in
    the batch's ``meta["bad_rows"]``.
    """
    if chunk_size < 1:
        msg = f"chunk_size must be >= 1, got {chunk_size}"
        raise ValueError(msg)
    event = first_event
    for described in (open_lhco_features(p) for p in paths):
        with h5py.File(described.path, "r") as handle:
            group = handle[described.key]
            items = {x.decode(): i for i, x in enumerate(group["block0_items"][:])}
            values = group["block0_values"]
            for start in range(0, described.n_events, chunk_size):
                try:
                    rows = values[start : start + chunk_size]
                except OSError as exc:
                    msg = f"cannot read rows {start}-{start + chunk_size} ({exc})"
                    raise DataFileError(described.path, msg, entry=start) from exc
                table = {name: rows[:, items[name]] for name in [*_NEEDED, "mjj"]}
                finite = np.ones(len(rows), bool)
                for name, column in table.items():
                    bad = np.flatnonzero(~np.isfinite(column))
                    if bad.size and not skip_bad_rows:
                        msg = f"non-finite {name}"
                        raise DataFileError(described.path, msg, entry=start + int(bad[0]))
                    finite[bad] = False
                n_bad = int((~finite).sum())
                if n_bad:
                    table = {name: column[finite] for name, column in table.items()}
                features, fatjets = lhco_feature_columns(table)
                n = len(features)
                yield EventBatch(
                    {
                        "run": np.full(n, run, "<u4"),
                        "lumi": np.zeros(n, "<u4"),
                        "event": np.arange(event, event + n, dtype="<u8"),
                        "fatjets": fatjets,
                        "features": features,
                    },
                    truth={
                        "process_id": np.full(n, LHCO_PROCESS_IDS[described.key], "<i2"),
                        "is_signal": np.full(n, described.key == "sig", "u1"),
                        "weight": np.ones(n, "<f4"),
                    },
                    meta={"source": described.path.name, "bad_rows": n_bad},
                )
                event += n

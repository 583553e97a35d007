"""Schema version 1 of the event wire format: every column's dtype, shape and meaning.

Columns are grouped as identity, L1 objects, fat jets with their constituents,
high-level features and trigger annotations. Truth lives in a separate table so that
learning code, which reads ``EventBatch.columns``, never sees it by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1

# The most events one batch may declare. Sources send 128 to 1024; the bound keeps a forged
# header from moving a node's counters by more than this per frame.
MAX_BATCH_EVENTS = 1 << 20

# L1 object layout of Govorkova et al. (Nature MI 2022): MET, 4 e/gamma, 4 muons, 10 jets.
L1_SLOTS: dict[str, slice] = {
    "met": slice(0, 1),
    "egamma": slice(1, 5),
    "muon": slice(5, 9),
    "jet": slice(9, 19),
}
N_L1_OBJECTS = 19
L1_FIELDS = ("pt", "eta", "phi")

N_FATJETS = 2
N_CONSTITUENTS = 128
FATJET_FIELDS = ("pt", "eta", "phi", "mass")
CONSTITUENT_FIELDS = ("pt", "eta", "phi", "e")

# High-level features; jets are ordered by mass (J1 the heavier), as in the LHCO convention.
FEATURE_NAMES = (
    "mjj",
    "mj1",
    "delta_mj",
    "tau21_j1",
    "tau21_j2",
    "tau32_j1",
    "tau32_j2",
    "deta_jj",
)
N_FEATURES = len(FEATURE_NAMES)


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """Dtype and per-event shape of one column; ``None`` in ``shape`` is a free length."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    finite: bool
    doc: str

    def matches_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether a per-event shape fits this spec."""
        return len(shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, shape, strict=True)
        )


def _specs(*specs: ColumnSpec) -> dict[str, ColumnSpec]:
    return {spec.name: spec for spec in specs}


COLUMNS: dict[str, ColumnSpec] = _specs(
    ColumnSpec("run", "<u4", (), False, "run number"),
    ColumnSpec("lumi", "<u4", (), False, "luminosity block"),
    ColumnSpec("event", "<u8", (), False, "event number within the run"),
    ColumnSpec(
        "l1_objects",
        "<f4",
        (N_L1_OBJECTS, 3),
        True,
        "MET, 4 e/gamma, 4 muons, 10 R=0.4 jets as (pT [GeV], eta, phi), pT-ordered, zero-padded",
    ),
    ColumnSpec(
        "fatjets",
        "<f4",
        (N_FATJETS, 4),
        True,
        "two leading R=1.0 jets as (pT, eta, phi, mass) in GeV, heavier first",
    ),
    ColumnSpec(
        "constituents",
        "<f4",
        (N_FATJETS, None, 4),
        True,
        "constituents of each fat jet as (pT, eta, phi, E) in GeV, pT-ordered, zero-padded",
    ),
    ColumnSpec("n_constituents", "<i2", (N_FATJETS,), False, "real constituents per fat jet"),
    ColumnSpec("features", "<f4", (N_FEATURES,), True, "high-level features, see FEATURE_NAMES"),
    ColumnSpec("l1_score", "<f4", (), False, "L1 anomaly score R_z"),
    ColumnSpec("l1_bits", "<u2", (), False, "L1 trigger paths that fired, one bit each"),
    ColumnSpec("hlt_score", "<f4", (), False, "HLT anomaly score"),
    ColumnSpec("hlt_tags", "<f4", (N_FATJETS, None), False, "HLT class probabilities per fat jet"),
    ColumnSpec("hlt_bits", "<u2", (), False, "HLT trigger paths that fired, one bit each"),
)

TRUTH_COLUMNS: dict[str, ColumnSpec] = _specs(
    ColumnSpec("process_id", "<i2", (), False, "generator process id"),
    ColumnSpec("is_signal", "|u1", (), False, "1 for signal, 0 for background"),
    ColumnSpec("weight", "<f4", (), True, "event weight"),
)

# Dtypes allowed on the wire at all: plain little-endian numbers, never objects.
WIRE_DTYPES = frozenset(
    np.dtype(code).str
    for code in ("<i1", "<i2", "<i4", "<i8", "<u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8")
) | frozenset({"|b1"})

"""Replay of ROOT trees of reconstructed objects (through uproot) as L1 objects.

Builds the Govorkova et al. L1 layout (``simulator.jets.l1_layout``: MET, 4 e/gamma,
4 muons, 10 jets, with the L1 acceptance of ``JetConfig``) from the reconstructed jets,
muons, electrons and photons and the MET of each event. Two branch conventions are read,
chosen per collection by the branches present:

==============  ===============================================  ==========================
convention      collections ``C`` in Jet, Muon, Electron, Photon  MET
==============  ===============================================  ==========================
Cartesian       ``C_Px``, ``C_Py``, ``C_Pz`` (``uproot-HZZ.root``)  ``MET_px``, ``MET_py``
NanoAOD         ``C_pt``, ``C_eta``, ``C_phi``                    ``MET_pt``, ``MET_phi``
==============  ===============================================  ==========================

e/gamma are electrons and photons together. A missing collection counts as empty, but a
tree needs MET and at least one collection. Run, lumi block and event numbers come from
``run``, ``luminosityBlock`` and ``event`` when the tree has them, the weight from
``EventWeight`` or ``genWeight``. Truth: process id -1, ``is_signal = 0`` (the source node
labels the stream a file is replayed in).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from simulator.detector import Objects
from simulator.jets import JetConfig, l1_layout
from simulator.particles import pseudorapidity
from stream.batch import EventBatch
from stream.errors import DataFileError, exception_summary

# What uproot raises for a truncated, corrupt or foreign file.
READ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    zlib.error,
    uproot.deserialization.DeserializationError,
)

COLLECTIONS = ("Jet", "Muon", "Electron", "Photon")
_CARTESIAN = ("Px", "Py", "Pz")
_POLAR = ("pt", "eta", "phi")
_IDS = ("run", "luminosityBlock", "event")
_WEIGHTS = ("EventWeight", "genWeight")


@dataclass(frozen=True, slots=True)
class RootLayout:
    """The tree to read and the branches that hold each collection and MET."""

    tree: str
    n_entries: int
    collections: dict[str, tuple[str, str, str]]  # name -> three branches
    polar: dict[str, bool]
    met: tuple[str, str]
    met_polar: bool
    ids: tuple[str, ...]
    weight: str | None

    @property
    def branches(self) -> list[str]:
        out = [b for fields in self.collections.values() for b in fields]
        return [*out, *self.met, *self.ids, *([self.weight] if self.weight else [])]


def root_layout(path: Path, file: uproot.ReadOnlyDirectory, tree: str | None) -> RootLayout:
    """Find the tree (``tree``, or the file's only TTree) and the branches to read."""
    trees = [k.split(";")[0] for k, c in file.classnames().items() if c.startswith("TTree")]
    if tree is None:
        if len(set(trees)) != 1:
            raise DataFileError(path, f"expected one TTree, found {sorted(set(trees))}")
        tree = trees[0]
    elif tree not in trees:
        raise DataFileError(path, f"no TTree {tree!r} (trees: {sorted(set(trees))})")
    handle = file[tree]
    names = set(handle.keys())
    collections: dict[str, tuple[str, str, str]] = {}
    polar: dict[str, bool] = {}
    for name in COLLECTIONS:
        for fields, is_polar in ((_POLAR, True), (_CARTESIAN, False)):
            a, b, c = (f"{name}_{f}" for f in fields)
            branches = (a, b, c)
            if set(branches) <= names:
                collections[name] = branches
                polar[name] = is_polar
                break
    if {"MET_pt", "MET_phi"} <= names:
        met, met_polar = ("MET_pt", "MET_phi"), True
    elif {"MET_px", "MET_py"} <= names:
        met, met_polar = ("MET_px", "MET_py"), False
    else:
        raise DataFileError(path, f"tree {tree!r} has no MET_px/MET_py or MET_pt/MET_phi")
    if not collections:
        msg = f"tree {tree!r} has none of the collections {COLLECTIONS} (C_Px... or C_pt...)"
        raise DataFileError(path, msg)
    ids = _IDS if set(_IDS) <= names else ()
    weight = next((w for w in _WEIGHTS if w in names), None)
    return RootLayout(
        tree, int(handle.num_entries), collections, polar, met, met_polar, ids, weight
    )


def _objects(arrays: ak.Array, layout: RootLayout, names: Sequence[str], n: int) -> Objects:
    """Collections ``names`` merged per event as flat (pT, eta, phi)."""
    parts = []
    for name in names:
        if name not in layout.collections:
            continue
        jagged = [arrays[branch] for branch in layout.collections[name]]
        counts = ak.to_numpy(ak.num(jagged[0], axis=1))
        a, b, c = (ak.to_numpy(ak.flatten(x)).astype(np.float64) for x in jagged)
        if not layout.polar[name]:
            pt = np.hypot(a, b)
            a, b, c = pt, np.where(pt > 0, pseudorapidity(a, b, c), 0.0), np.arctan2(b, a)
        parts.append(ak.unflatten(ak.zip({"pt": a, "eta": b, "phi": c}), counts))
    if not parts:
        empty = np.zeros(0)
        return Objects(np.zeros(n, np.int64), empty, empty, empty)
    merged = ak.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    flat = {f: ak.to_numpy(ak.flatten(merged[f])).astype(np.float64) for f in _POLAR}
    counts = ak.to_numpy(ak.num(merged, axis=1)).astype(np.int64)
    return Objects(counts, flat["pt"], flat["eta"], flat["phi"])


def read_root_objects(
    paths: Sequence[str | Path],
    *,
    chunk_size: int = 4096,
    tree: str | None = None,
    run: int = 1,
    first_event: int = 0,
    skip_bad_rows: bool = False,
    jets: JetConfig | None = None,
) -> Iterator[EventBatch]:
    """Stream ROOT files as ``EventBatch`` chunks of ``l1_objects`` built from reco objects.

    Raises:
        DataFileError: an unreadable or truncated file, a tree without the branches, or
            entries that cannot be read (named with the first entry of the chunk); a
            non-finite object raises too, unless ``skip_bad_rows`` (then the event is left
            out and counted in ``meta["bad_rows"]``).
    """
    if chunk_size < 1:
        msg = f"chunk_size must be >= 1, got {chunk_size}"
        raise ValueError(msg)
    event = first_event
    for path in map(Path, paths):
        try:
            file = uproot.open(path)
        except READ_ERRORS as exc:
            raise DataFileError(
                path, f"not a readable ROOT file ({exception_summary(exc)})"
            ) from exc
        with file:
            try:
                layout = root_layout(path, file, tree)
                handle = file[layout.tree]
            except DataFileError:
                raise
            except READ_ERRORS as exc:
                raise DataFileError(
                    path, f"cannot read the tree ({exception_summary(exc)})"
                ) from exc
            for start in range(0, layout.n_entries, chunk_size):
                stop = min(start + chunk_size, layout.n_entries)
                try:
                    arrays = handle.arrays(layout.branches, entry_start=start, entry_stop=stop)
                except READ_ERRORS as exc:
                    reason = exception_summary(exc)
                    msg = f"cannot read entries {start}-{stop} of {layout.tree!r} ({reason})"
                    raise DataFileError(path, msg, entry=start) from exc
                batch = _batch(arrays, layout, jets, path, start, skip_bad_rows, run, event)
                if batch is not None:
                    event += len(batch)
                    yield batch


def _batch(
    arrays: ak.Array,
    layout: RootLayout,
    jets: JetConfig | None,
    path: Path,
    start: int,
    skip_bad_rows: bool,
    run: int,
    event: int,
) -> EventBatch | None:
    n = len(arrays)
    a, b = (ak.to_numpy(arrays[m]).astype(np.float64) for m in layout.met)
    met_x, met_y = (a * np.cos(b), a * np.sin(b)) if layout.met_polar else (a, b)
    egamma = _objects(arrays, layout, ("Electron", "Photon"), n)
    objects = l1_layout(
        met_x,
        met_y,
        egamma,
        _objects(arrays, layout, ("Muon",), n),
        _objects(arrays, layout, ("Jet",), n),
        jets,
    )
    bad = ~np.isfinite(objects).all(axis=(1, 2))
    if bad.any() and not skip_bad_rows:
        raise DataFileError(path, "non-finite object", entry=start + int(np.flatnonzero(bad)[0]))
    keep = ~bad
    n_kept = int(keep.sum())
    if n_kept == 0:
        return None
    if layout.ids:
        run_, lumi, number = (ak.to_numpy(arrays[k])[keep] for k in layout.ids)
    else:
        run_ = np.full(n_kept, run)
        lumi = np.zeros(n_kept)
        number = np.arange(event, event + n_kept)
    weight = ak.to_numpy(arrays[layout.weight])[keep] if layout.weight else np.ones(n_kept)
    return EventBatch(
        {
            "run": run_.astype("<u4"),
            "lumi": lumi.astype("<u4"),
            "event": number.astype("<u8"),
            "l1_objects": objects[keep],
        },
        truth={
            "process_id": np.full(n_kept, -1, "<i2"),
            "is_signal": np.zeros(n_kept, "u1"),
            "weight": weight.astype("<f4"),
        },
        meta={"source": path.name, "bad_rows": int(bad.sum())},
    )

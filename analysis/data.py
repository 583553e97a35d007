"""Event inputs of the analysis: labelled test events and stored events, as features.

A spec is a trigfarm event cache (``.h5`` written by the simulator or the archive) or
``<layout>:<paths>`` with a layout of ``simulator.replay.READERS`` (e.g.
``lhco-features:../shared/data/lhco-rnd-100k/scalars_sig0[3-9].h5``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.replay import expand_paths, reader_for, replay_component
from stream.schema import FEATURE_NAMES

MJJ = FEATURE_NAMES.index("mjj")


@dataclass(frozen=True, slots=True)
class Events:
    """Features (N, 8) and, when known, truth labels (N,) of a set of events."""

    features: np.ndarray
    is_signal: np.ndarray | None = None

    @property
    def mjj(self) -> np.ndarray:
        return self.features[:, MJJ]

    def __len__(self) -> int:
        return len(self.features)

    def select(self, rows: np.ndarray) -> Events:
        labels = None if self.is_signal is None else self.is_signal[rows]
        return Events(self.features[rows], labels)

    def in_window(self, window_gev: tuple[float, float]) -> np.ndarray:
        return (self.mjj >= window_gev[0]) & (self.mjj < window_gev[1])


def load_events(specs: Sequence[str | Mapping[str, Any]]) -> Events:
    """Read every spec (a replay component, or a bare path to an event cache);
    ``is_signal`` is kept when every file has it."""
    features, labels = [], []
    for spec in specs:
        replay = replay_component(spec)
        if replay is not None:
            layout, paths = replay[0], list(replay[1])
        else:
            layout, paths = "cache", [str(spec)]
        for batch in reader_for(layout)(expand_paths(paths), chunk_size=65_536, skip_bad_rows=True):
            features.append(np.asarray(batch["features"], np.float64))
            labels.append(batch.truth["is_signal"] if "is_signal" in batch.truth else None)
    if not features:
        msg = f"no events in {list(specs)}"
        raise ValueError(msg)
    known = all(label is not None for label in labels)
    return Events(
        np.concatenate(features),
        np.concatenate(labels).astype(bool) if known else None,  # type: ignore[arg-type]
    )
